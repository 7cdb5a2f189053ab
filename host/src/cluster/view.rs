//! A host's copy of the record bucket, kept by a watch: every key's last
//! value, read without a round trip by the sync and by writes that need a
//! listing (revision numbers, who uses an artifact).
//!
//! The copy is *ready* only once the watch has delivered the bucket as it
//! was when the watch began; until then a sync must not conclude that a
//! function missing from it was deleted.

use super::ClusterError;
use super::store::{decode, records_now};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

/// The record bucket as this host last saw it.
#[derive(Default)]
pub struct View {
    entries: RwLock<BTreeMap<String, Bytes>>,
    ready: AtomicBool,
    /// The bucket's sequence number of the last change seen.
    last_revision: AtomicU64,
    /// Woken on every change once ready.
    pub changed: Notify,
}

/// How long to wait before watching again after the watch broke.
const REWATCH_AFTER: Duration = Duration::from_millis(500);

/// How often a follower asks the server whether its watch keeps up.
const STALL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Checks in a row that find the copy behind the bucket, with no progress
/// between them, before the watch is dropped and set up again.
const STALL_CHECKS: u32 = 2;

/// Notices a watch that stopped delivering. async-nats reports a consumer
/// lost with its NATS node only after two missed heartbeats (10 s), and
/// recreates one lost with a connection with a backoff of up to 10 s;
/// meanwhile this host would serve a stale registry.
#[derive(Default)]
struct Stall {
    /// The copy's sequence at the first check that found it behind.
    behind_at: Option<u64>,
    strikes: u32,
}

impl Stall {
    /// Takes one check: `seen` is the last sequence the copy holds,
    /// `bucket` the stream's. True once the watch should be set up again.
    fn stalled(&mut self, seen: u64, bucket: u64) -> bool {
        if seen >= bucket {
            *self = Self::default();
            return false;
        }
        if self.behind_at == Some(seen) {
            self.strikes += 1;
        } else {
            self.behind_at = Some(seen);
            self.strikes = 1;
        }
        self.strikes >= STALL_CHECKS
    }
}

impl View {
    /// Whether the whole bucket has been read at least once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The bucket's sequence number of the last change this copy holds.
    pub fn last_revision(&self) -> u64 {
        self.last_revision.load(Ordering::SeqCst)
    }

    /// Every record whose key starts with `prefix`, decoded.
    pub fn with_prefix<R: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<R>, ClusterError> {
        self.ensure_ready()?;
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| decode(key, value))
            .collect()
    }

    /// The record under `key`, if any.
    pub fn get<R: DeserializeOwned>(&self, key: &str) -> Result<Option<R>, ClusterError> {
        self.ensure_ready()?;
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).map(|value| decode(key, value)).transpose()
    }

    /// The keys that start with `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, ClusterError> {
        self.ensure_ready()?;
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        Ok(entries
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect())
    }

    fn ensure_ready(&self) -> Result<(), ClusterError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(ClusterError::Unavailable(
                "the record bucket has not been read yet".into(),
            ))
        }
    }

    fn apply(&self, entries: &mut BTreeMap<String, Bytes>, entry: kv::Entry) {
        self.last_revision
            .fetch_max(entry.revision, Ordering::SeqCst);
        match entry.operation {
            kv::Operation::Put => {
                entries.insert(entry.key, entry.value);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                entries.remove(&entry.key);
            }
        }
    }

    /// Replaces the copy with `fresh`, a whole reading of the bucket.
    fn replace(&self, fresh: BTreeMap<String, Bytes>) {
        *self.entries.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        self.ready.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Follows `kv` for as long as the host runs: reads it whole, then
    /// applies each change; watches again from scratch when the watch
    /// breaks (the copy stays as it was meanwhile).
    pub async fn follow(&self, kv: kv::Store) {
        loop {
            let outcome = tokio::select! {
                outcome = self.watch_once(&kv) => outcome,
                stalled = self.until_stalled(&kv) => Err(stalled),
            };
            if let Err(e) = outcome {
                tracing::warn!("watching the cluster registry: {e}");
            }
            tokio::time::sleep(REWATCH_AFTER).await;
        }
    }

    /// Returns once the copy has stayed behind the bucket, without
    /// progress, for [`STALL_CHECKS`] checks.
    async fn until_stalled(&self, kv: &kv::Store) -> ClusterError {
        let mut stall = Stall::default();
        loop {
            tokio::time::sleep(STALL_CHECK_EVERY).await;
            // Unreachable NATS is the watch's to report.
            let Ok(bucket) = records_now(kv).await else {
                continue;
            };
            let seen = self.last_revision();
            if stall.stalled(seen, bucket.last_sequence) {
                return ClusterError::Unavailable(format!(
                    "the watch stopped at sequence {seen} while the bucket is at {}",
                    bucket.last_sequence
                ));
            }
        }
    }

    async fn watch_once(&self, kv: &kv::Store) -> Result<(), ClusterError> {
        let unavailable = |e: &dyn std::fmt::Display| ClusterError::unavailable("watching", e);
        let empty = records_now(kv).await?.messages == 0;
        let mut watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| unavailable(&e))?;
        let mut fresh = Some(BTreeMap::new());
        if empty && let Some(fresh) = fresh.take() {
            self.replace(fresh);
        }
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| unavailable(&e))?;
            match fresh.as_mut() {
                Some(building) => {
                    let caught_up = entry.delta == 0;
                    self.apply(building, entry);
                    if caught_up && let Some(whole) = fresh.take() {
                        self.replace(whole);
                    }
                }
                None => {
                    let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
                    self.apply(&mut entries, entry);
                    drop(entries);
                    self.changed.notify_one();
                }
            }
        }
        Err(ClusterError::Unavailable("the watch ended".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::Stall;

    #[test]
    fn a_watch_is_stalled_only_after_two_checks_behind_without_progress() {
        let mut stall = Stall::default();
        assert!(!stall.stalled(5, 5), "caught up");
        assert!(
            !stall.stalled(5, 6),
            "one check behind may be a change in flight"
        );
        assert!(stall.stalled(5, 6), "no progress over two checks");
    }

    #[test]
    fn progress_or_catching_up_starts_the_count_again() {
        let mut stall = Stall::default();
        assert!(!stall.stalled(5, 9));
        assert!(!stall.stalled(7, 9), "behind, but moving");
        assert!(stall.stalled(7, 9));
        let mut stall = Stall::default();
        assert!(!stall.stalled(5, 6));
        assert!(!stall.stalled(6, 6));
        assert!(!stall.stalled(6, 7), "a new lag counts from one");
    }
}
