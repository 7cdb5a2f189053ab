//! The cluster's two buckets: records (key-value, one JSON document a key)
//! and blobs (object store, one object a sha256 digest), with blobs
//! streamed in and out in chunks, never whole in memory.

use super::ClusterError;
use super::view::View;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::object_store::{self, ObjectMetadata, ObjectStore};
use async_nats::jetstream::{self, kv, stream::StorageType};
use bytes::Bytes;
use cascade_registry::blobs::BlobWriter;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Names and replication of the two buckets.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// The key-value bucket of records.
    pub records: String,
    /// The object store of blobs.
    pub blobs: String,
    /// Copies JetStream keeps of each (1 on a laptop, 3 in production).
    pub replicas: usize,
    /// How old an unnamed blob must be before it is collected ([`super::gc`]).
    pub gc_grace: Duration,
}

/// The buckets, and this host's view of the records.
pub struct ClusterStore {
    pub(super) kv: kv::Store,
    pub(super) objects: ObjectStore,
    pub(super) view: Arc<View>,
    pub(super) gc_grace: Duration,
    jetstream: jetstream::Context,
    buckets: Buckets,
}

/// What a create-if-absent found.
pub enum Created<R> {
    /// The key was free and now holds the value.
    Now,
    /// The key already held this.
    Already(R),
}

/// Size of the pieces a blob is read in.
const CHUNK: usize = 128 << 10;

impl ClusterStore {
    /// Opens the buckets, creating them when missing.
    pub async fn open(
        jetstream: &jetstream::Context,
        buckets: &Buckets,
    ) -> Result<Self, ClusterError> {
        let kv = match jetstream.get_key_value(&buckets.records).await {
            Ok(kv) => kv,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: buckets.records.clone(),
                    description: "Cascade registry records".into(),
                    history: 1,
                    num_replicas: buckets.replicas,
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::unavailable("creating the record bucket", e))?,
        };
        let objects = match jetstream.get_object_store(&buckets.blobs).await {
            Ok(objects) => objects,
            Err(_) => jetstream
                .create_object_store(object_store::Config {
                    bucket: buckets.blobs.clone(),
                    description: Some("Cascade registry blobs, by sha256".into()),
                    num_replicas: buckets.replicas,
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::unavailable("creating the blob bucket", e))?,
        };
        Ok(ClusterStore {
            kv,
            objects,
            view: Arc::new(View::default()),
            gc_grace: buckets.gc_grace,
            jetstream: jetstream.clone(),
            buckets: buckets.clone(),
        })
    }

    /// The bucket names, for logs.
    pub fn describe(&self) -> String {
        format!(
            "JetStream buckets {} and {}",
            self.buckets.records, self.buckets.blobs
        )
    }

    /// This host's copy of the record bucket.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Writes `value` under `key` unless the key exists; then returns what
    /// it holds.
    pub(super) async fn create<R: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        value: &R,
    ) -> Result<Created<R>, ClusterError> {
        let bytes = encode(value)?;
        match self.kv.create(key, bytes).await {
            Ok(_) => Ok(Created::Now),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.entry::<R>(key).await? {
                    Some((existing, _)) => Ok(Created::Already(existing)),
                    // Deleted between the two calls: try once more.
                    None => match self.kv.create(key, encode(value)?).await {
                        Ok(_) => Ok(Created::Now),
                        Err(e) => Err(ClusterError::unavailable(&format!("creating {key}"), e)),
                    },
                }
            }
            Err(e) => Err(ClusterError::unavailable(&format!("creating {key}"), e)),
        }
    }

    /// The value under `key` and its revision in the bucket, if any.
    pub(super) async fn entry<R: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(R, u64)>, ClusterError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| ClusterError::unavailable(&format!("reading {key}"), e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some((decode(key, &entry.value)?, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Replaces `key` if it is still at `revision` (or absent, for `None`);
    /// false when another write came first.
    pub(super) async fn swap<R: Serialize>(
        &self,
        key: &str,
        value: &R,
        revision: Option<u64>,
    ) -> Result<bool, ClusterError> {
        let bytes = encode(value)?;
        let written = match revision {
            Some(revision) => self.kv.update(key, bytes, revision).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => self.kv.create(key, bytes).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
        };
        match written {
            Ok(_) => Ok(true),
            Err((true, _)) => Ok(false),
            Err((false, e)) => Err(ClusterError::unavailable(&format!("updating {key}"), e)),
        }
    }

    /// Writes `value` under `key` whatever it held.
    pub(super) async fn put<R: Serialize>(&self, key: &str, value: &R) -> Result<(), ClusterError> {
        self.kv
            .put(key, encode(value)?)
            .await
            .map_err(|e| ClusterError::unavailable(&format!("writing {key}"), e))?;
        Ok(())
    }

    /// Deletes `key` (a no-op when absent).
    pub(super) async fn delete(&self, key: &str) -> Result<(), ClusterError> {
        self.kv
            .delete(key)
            .await
            .map_err(|e| ClusterError::unavailable(&format!("deleting {key}"), e))
    }

    /// When the object `digest` was last written, if it is stored.
    pub(super) async fn blob_written(
        &self,
        digest: &str,
    ) -> Result<Option<time::OffsetDateTime>, ClusterError> {
        match self.objects.info(digest).await {
            Ok(info) if !info.deleted => Ok(Some(
                info.modified.unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            )),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClusterError::unavailable(
                &format!("looking up blob {digest}"),
                e,
            )),
        }
    }

    /// Streams the file at `path` into the object `digest`, unless a copy
    /// written less than `fresh` ago is there (see [`super::gc`] for why an
    /// older copy is written again).
    pub(super) async fn upload(
        &self,
        path: &Path,
        digest: &str,
        fresh: Duration,
    ) -> Result<(), ClusterError> {
        if let Some(written) = self.blob_written(digest).await?
            && time::OffsetDateTime::now_utc() - written < fresh
        {
            return Ok(());
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ClusterError::Registry(e.into()))?;
        let meta = ObjectMetadata {
            name: digest.to_string(),
            chunk_size: Some(CHUNK),
            ..Default::default()
        };
        self.objects
            .put(meta, &mut file)
            .await
            .map_err(|e| ClusterError::unavailable(&format!("uploading blob {digest}"), e))?;
        Ok(())
    }

    /// Streams the object `digest` into `writer` (the caller checks the
    /// digest of what was written). The chunks come through an ordered pull
    /// consumer that holds at most [`CHUNKS_IN_FLIGHT`] of them, so a large
    /// blob never piles up in memory when the disk is slower than the
    /// network (the object store's own reader takes them as fast as the
    /// server pushes).
    pub(super) async fn download(
        &self,
        digest: &str,
        writer: &mut BlobWriter,
    ) -> Result<(), ClusterError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ClusterError::unavailable(&format!("reading blob {digest}"), e)
        };
        let info = self
            .objects
            .info(digest)
            .await
            .map_err(|e| unavailable(&e))?;
        if info.deleted {
            return Err(unavailable(&"it was removed"));
        }
        if info.chunks == 0 {
            return Ok(());
        }
        let stream = self
            .jetstream
            .get_stream(format!("OBJ_{}", self.buckets.blobs))
            .await
            .map_err(|e| unavailable(&e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("$O.{}.C.{}", self.buckets.blobs, info.nuid),
                deliver_policy: DeliverPolicy::All,
                max_batch: CHUNKS_IN_FLIGHT,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        let mut chunks = consumer.messages().await.map_err(|e| unavailable(&e))?;
        let mut size = 0;
        for _ in 0..info.chunks {
            let chunk = chunks
                .next()
                .await
                .ok_or_else(|| unavailable(&"the chunks ended early"))?
                .map_err(|e| unavailable(&e))?;
            size += chunk.payload.len();
            tokio::task::block_in_place(|| writer.write_chunk(&chunk.payload))?;
        }
        if size != info.size {
            return Err(unavailable(&format!(
                "{size} bytes read, the object lists {}",
                info.size
            )));
        }
        Ok(())
    }
}

/// Chunks of a blob a download holds at most (128 KiB each).
const CHUNKS_IN_FLIGHT: i64 = 8;

/// The record bucket's stream as the server holds it now: its last
/// sequence and message count. (`kv::Store::status` answers from what the
/// client read when it opened the bucket, so it never moves.)
pub(super) async fn records_now(kv: &kv::Store) -> Result<jetstream::stream::State, ClusterError> {
    let mut stream = kv.stream.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| ClusterError::unavailable("reading the record bucket's state", e))?;
    Ok(info.state.clone())
}

fn encode<R: Serialize>(value: &R) -> Result<Bytes, ClusterError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ClusterError::Registry(e.into()))
}

/// Reads one record of the bucket.
pub(super) fn decode<R: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<R, ClusterError> {
    serde_json::from_slice(bytes).map_err(|e| ClusterError::Unreadable {
        key: key.to_string(),
        why: e.to_string(),
    })
}
