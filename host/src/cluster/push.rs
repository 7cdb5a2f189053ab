//! `cascade registry push`: moves a local registry into the cluster's
//! buckets. Idempotent: what the buckets hold with the same bytes is left
//! alone; what they hold with other bytes is reported, never overwritten.

use super::store::Created;
use super::{ClusterError, ClusterStore, Head, keys};
use cascade_registry::Registry;
use cascade_registry::names::Reference;
use cascade_registry::records::FunctionRecord;
use serde::Serialize;
use std::time::Duration;

/// What a push did, by item (`component tok@1.0.0`, …).
#[derive(Debug, Default, Serialize)]
pub struct PushReport {
    /// Written to the buckets.
    pub pushed: Vec<String>,
    /// Already there with the same content.
    pub present: Vec<String>,
    /// There with other content: left as the buckets hold it.
    pub conflicts: Vec<String>,
}

impl PushReport {
    fn note<R>(&mut self, what: String, created: Created<R>, same: impl Fn(&R) -> bool) {
        match created {
            Created::Now => self.pushed.push(what),
            Created::Already(stored) if same(&stored) => self.present.push(what),
            Created::Already(_) => self.conflicts.push(what),
        }
    }
}

fn reference(name: &str, version: &str) -> Result<Reference, ClusterError> {
    Ok(Reference::new(
        name.parse().map_err(ClusterError::Registry)?,
        version.parse().map_err(ClusterError::Registry)?,
    ))
}

/// Pushes every component, model and function of `registry` into `store`.
pub async fn push(registry: &Registry, store: &ClusterStore) -> Result<PushReport, ClusterError> {
    let mut report = PushReport::default();
    for record in registry.components()? {
        let reference = reference(&record.name, &record.version)?;
        store
            .upload(
                &registry.blob_path(&record.digest),
                &record.digest,
                Duration::ZERO,
            )
            .await?;
        let created = store.create(&keys::component(&reference), &record).await?;
        report.note(format!("component {reference}"), created, |s| {
            s.digest == record.digest
        });
    }
    for record in registry.models()? {
        let reference = reference(&record.name, &record.version)?;
        let digests = std::iter::once(&record.digest).chain(record.files.iter().map(|f| &f.digest));
        for digest in digests {
            store
                .upload(&registry.blob_path(digest), digest, Duration::ZERO)
                .await?;
        }
        let created = store.create(&keys::model(&reference), &record).await?;
        report.note(format!("model {reference}"), created, |s| {
            s.package_digest == record.package_digest
        });
    }
    for head in registry.functions()? {
        push_function(registry, store, &head.record, &mut report).await?;
    }
    Ok(report)
}

/// Pushes a function's revisions, its head and its split.
async fn push_function(
    registry: &Registry,
    store: &ClusterStore,
    head: &FunctionRecord,
    report: &mut PushReport,
) -> Result<(), ClusterError> {
    let name = &head.name;
    let revisions = registry.function_revisions(name)?;
    let last = revisions
        .iter()
        .map(|r| r.record.revision)
        .max()
        .unwrap_or(0);
    for revision in &revisions {
        let record = &revision.record;
        let created = store
            .create(&keys::revision(name, record.revision), record)
            .await?;
        report.note(
            format!("function {name} revision {}", record.revision),
            created,
            |s| s.digest == record.digest,
        );
    }
    let value = Head {
        head: head.clone(),
        last,
    };
    let created = store.create(&keys::function(name), &value).await?;
    report.note(format!("function {name}"), created, |s| {
        s.head.digest == head.digest && s.head.revision == head.revision
    });
    let split = registry.traffic(name)?;
    if split != Default::default() {
        let created = store.create(&keys::traffic(name), &split).await?;
        report.note(format!("traffic of {name}"), created, |s| *s == split);
    }
    Ok(())
}
