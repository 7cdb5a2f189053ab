//! The registry of record in JetStream (`--registry-store jetstream`): any
//! host publishes, every host serves, no host is the single source.
//!
//! - [`keys`]: the record bucket's keys, in one place;
//! - [`store`]: the two buckets — records in a key-value bucket, blobs in an
//!   object store keyed by sha256 — and streaming blobs in and out;
//! - [`view`]: each host's copy of the record bucket, followed by a watch;
//! - [`writes`]: publish, delete, roll back and set traffic, decided in the
//!   bucket (create-if-absent for versions, compare-and-set for heads and
//!   splits) and then applied to the local registry;
//! - [`source`]: the buckets as a [`crate::mirror::Source`], so each host's
//!   redb follows them like a mirror (and serves without NATS);
//! - [`gc`]: removing blobs no record names, safe against publishes on
//!   other hosts;
//! - [`follow`]: a host's task that opens, follows, syncs and collects;
//! - [`push`]: moving a local registry into the buckets.

pub mod follow;
pub mod gc;
pub mod keys;
pub mod push;
pub mod source;
pub mod store;
pub mod view;
pub mod writes;

use cascade_registry::RegistryError;
use cascade_registry::records::FunctionRecord;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use store::{Buckets, ClusterStore};

/// Why the cluster registry could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The registry's own answer: invalid, not found, conflict, storage.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// JetStream could not be reached or refused.
    #[error("the cluster registry is unavailable: {0}")]
    Unavailable(String),
    /// A record in the bucket is not what Cascade writes.
    #[error("the cluster registry holds an unreadable {key}: {why}")]
    Unreadable {
        /// Its key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

impl ClusterError {
    /// A JetStream failure while doing `what`.
    pub fn unavailable(what: &str, e: impl std::fmt::Display) -> Self {
        ClusterError::Unavailable(format!("{what}: {e}"))
    }
}

/// A function's head in the bucket: the revision it serves and the last
/// revision number given, so numbers never repeat after a rollback.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Head {
    /// The served revision.
    pub head: FunctionRecord,
    /// The highest revision number given so far.
    pub last: u64,
}

/// A host's handle on the cluster registry: set once the buckets are
/// opened (NATS may come up after the host).
#[derive(Default)]
pub struct Cluster {
    store: OnceLock<Arc<ClusterStore>>,
    /// Whether the last sync copied everything the buckets hold.
    pub synced: AtomicBool,
    /// The record bucket's sequence number the last sync was complete to.
    synced_through: AtomicU64,
    /// Woken after each sync.
    settled: tokio::sync::Notify,
    /// What this host's publishes are storing, shared with its sync.
    pub in_flight: Arc<crate::mirror::InFlight>,
}

/// How long a write waits for this host's sync to include it.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);

impl Cluster {
    /// The buckets, once open; else why writes must wait.
    pub fn store(&self) -> Result<&Arc<ClusterStore>, ClusterError> {
        self.store.get().ok_or_else(|| {
            ClusterError::Unavailable(
                "the buckets are not open yet (is NATS with JetStream reachable?)".into(),
            )
        })
    }

    /// Records that a sync made the local registry match the bucket up to
    /// sequence `through` (`clean`: with nothing left to copy).
    pub fn synced_to(&self, through: u64, clean: bool) {
        self.synced.store(clean, Ordering::SeqCst);
        self.synced_through.fetch_max(through, Ordering::SeqCst);
        self.settled.notify_waiters();
    }

    /// Waits (at most [`SETTLE_WITHIN`]) until this host's sync has caught
    /// up with every change in the record bucket so far, so a write's
    /// answer is followed by reads that show it, and a sync that read the
    /// bucket before the write cannot undo it afterwards.
    pub async fn settle(&self) {
        let Ok(store) = self.store() else { return };
        let Ok(state) = store::records_now(&store.kv).await else {
            return;
        };
        let target = state.last_sequence;
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        while self.synced_through.load(Ordering::SeqCst) < target {
            let settled = self.settled.notified();
            if self.synced_through.load(Ordering::SeqCst) >= target {
                break;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                tracing::warn!(target, "this host's copy of the cluster registry is behind");
                break;
            }
        }
    }

    /// Records the opened buckets.
    pub fn opened(&self, store: Arc<ClusterStore>) {
        let _ = self.store.set(store);
    }
}
