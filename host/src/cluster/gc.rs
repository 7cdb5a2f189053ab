//! Removing blobs no record names, safe against publishes on other hosts.
//!
//! The rule: an object is removed only when no record in the bucket names
//! it **and** it was written more than the grace period ago. A publish
//! uploads its blobs before creating its record, so a blob whose record is
//! still to come is young; a publish that reuses a stored blob older than
//! half the grace writes it again, so it is young too; and after creating
//! its record a publish checks its blobs are still there and uploads any
//! that a collection took meanwhile. Records are read from the bucket
//! after the objects are listed, never before.

use super::{ClusterError, ClusterStore, keys};
use cascade_registry::records::{ComponentRecord, ModelRecord};
use futures_util::StreamExt;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// The digests the records name.
async fn named_digests(store: &ClusterStore) -> Result<BTreeSet<String>, ClusterError> {
    let mut named = BTreeSet::new();
    let unavailable = |e: &dyn std::fmt::Display| ClusterError::unavailable("listing records", e);
    let mut listed = store.kv.keys().await.map_err(|e| unavailable(&e))?;
    let mut wanted = Vec::new();
    while let Some(key) = listed.next().await {
        let key = key.map_err(|e| unavailable(&e))?;
        if key.starts_with(keys::COMPONENTS) || key.starts_with(keys::MODELS) {
            wanted.push(key);
        }
    }
    for key in wanted {
        if key.starts_with(keys::COMPONENTS) {
            if let Some((record, _)) = store.entry::<ComponentRecord>(&key).await? {
                named.insert(record.digest);
            }
        } else if let Some((record, _)) = store.entry::<ModelRecord>(&key).await? {
            named.insert(record.digest);
            named.extend(record.files.into_iter().map(|f| f.digest));
        }
    }
    Ok(named)
}

/// Removes the objects no record names that are older than the grace
/// period; returns how many.
pub async fn collect(store: &ClusterStore) -> Result<usize, ClusterError> {
    let unavailable = |e: &dyn std::fmt::Display| ClusterError::unavailable("listing blobs", e);
    let cutoff = time::OffsetDateTime::now_utc() - store.gc_grace;
    let mut old = Vec::new();
    let mut objects = store.objects.list().await.map_err(|e| unavailable(&e))?;
    while let Some(info) = objects.next().await {
        let info = info.map_err(|e| unavailable(&e))?;
        if !info.deleted && info.modified.is_some_and(|at| at < cutoff) {
            old.push(info.name);
        }
    }
    if old.is_empty() {
        return Ok(0);
    }
    let named = named_digests(store).await?;
    let mut removed = 0;
    for name in old.into_iter().filter(|name| !named.contains(name)) {
        store
            .objects
            .delete(&name)
            .await
            .map_err(|e| ClusterError::unavailable(&format!("removing blob {name}"), e))?;
        tracing::info!(digest = %name, "removed a blob no record names");
        removed += 1;
    }
    Ok(removed)
}

/// How often a host collects: a quarter of the grace, within bounds.
fn every(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Collects for as long as the host runs (every host does; removing is
/// idempotent).
pub async fn run(store: Arc<ClusterStore>) {
    loop {
        tokio::time::sleep(every(store.gc_grace)).await;
        if let Err(e) = collect(&store).await {
            tracing::warn!("collecting unnamed blobs: {e}");
        }
    }
}
