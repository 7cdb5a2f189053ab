//! A serving host's copy of another host's registry (`--registry-url`).
//!
//! The source registry stays the one place artifacts are published; this
//! host fetches function revisions and the components and models they use
//! over the registry API, verifies every digest, stores them in its own
//! data directory (so restarts need no network), and reports which
//! functions changed so the runtime can hot-reload them.

use crate::client::{ClientError, Kind, RegistryClient, paths};
use cascade_registry::records::{FunctionRecord, Use};
use cascade_registry::traffic::{RevisionRef, Traffic};
use cascade_registry::{
    ModelPackage, Registry, RegistryError, blobs::StagedBlob, names::Reference,
};
use futures_util::StreamExt;
use prometheus::IntGauge;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::Instrument;

/// Why a mirror could not copy something from its source.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The source refused or could not be reached.
    #[error(transparent)]
    Source(#[from] ClientError),
    /// A download broke off.
    #[error("downloading {path}: {source}")]
    Download {
        /// What was downloaded.
        path: String,
        /// Why it stopped.
        #[source]
        source: reqwest::Error,
    },
    /// The local registry refused or failed.
    #[error(transparent)]
    Local(#[from] RegistryError),
    /// The source answered something that is not what it should be.
    #[error("the source's {what}: {why}")]
    Unreadable {
        /// What was read.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// Fetched bytes are not what the source lists.
    #[error("{path}: fetched bytes have digest {fetched}, the registry lists {listed}")]
    Digest {
        /// What was fetched.
        path: String,
        /// The digest of the bytes.
        fetched: String,
        /// The digest the source's record lists.
        listed: String,
    },
    /// A model package stored here differs from the source's.
    #[error("model {0}: package digest differs from the source registry")]
    PackageDigest(Reference),
    /// Copying one thing a function uses failed.
    #[error("copying {used}: {source}")]
    Copy {
        /// What was being copied.
        used: Use,
        /// Why it failed.
        #[source]
        source: Box<MirrorError>,
    },
}

/// The source registry and the local copy.
pub struct Mirror {
    source: RegistryClient,
    registry: Arc<Registry>,
    limit: u64,
    /// The last sync's failures (`None` before the source was first reached).
    health: Mutex<Option<Vec<(String, String)>>>,
    failed_gauge: IntGauge,
}

impl Mirror {
    /// Mirrors the registry at `source` (e.g. `http://10.0.0.1:8080`) into `registry`.
    pub fn new(
        source: &str,
        token: Option<String>,
        registry: Arc<Registry>,
        limit: u64,
        failed_gauge: IntGauge,
    ) -> Result<Self, MirrorError> {
        Ok(Mirror {
            source: RegistryClient::new(source, token)?,
            registry,
            limit,
            health: Mutex::new(None),
            failed_gauge,
        })
    }

    /// Where artifacts are published.
    pub fn source(&self) -> &str {
        self.source.base()
    }

    /// Streams `path` into a staged blob and checks it has `digest`.
    async fn fetch(&self, path: &str, digest: &str) -> Result<StagedBlob, MirrorError> {
        let response = self.source.download(path).await?;
        let mut writer = self.registry.stage(self.limit)?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| MirrorError::Download {
                path: path.to_string(),
                source,
            })?;
            tokio::task::block_in_place(|| writer.write_chunk(&chunk))?;
        }
        let staged = tokio::task::block_in_place(|| writer.finish())?;
        if staged.digest != digest {
            return Err(MirrorError::Digest {
                path: path.to_string(),
                fetched: staged.digest,
                listed: digest.to_string(),
            });
        }
        Ok(staged)
    }

    /// Brings the local copy in line with the source. Each function syncs
    /// on its own: one whose artifacts cannot be copied is reported in
    /// [`SyncReport::failed`] while the others, and deletions, go ahead.
    /// Fails as a whole only when the source cannot be listed.
    pub async fn sync(&self) -> Result<SyncReport, MirrorError> {
        let remote = self.source.functions().await?;
        let mut report = SyncReport::default();
        let replaced = self.follow_replaced_artifacts(&mut report).await?;
        let local = tokio::task::block_in_place(|| self.registry.functions())?;
        for function in &remote {
            let current = local.iter().find(|l| l.record.name == function.name);
            let unchanged = current.is_some_and(|c| {
                c.record.revision == function.revision && c.record.digest == function.digest
            });
            if unchanged && !function.uses.iter().any(|u| replaced.contains(u)) {
                continue;
            }
            match self.copy_function(function).await {
                Ok(()) => report.changed.push(function.name.clone()),
                Err(e) => report
                    .failed
                    .push((format!("function {}", function.name), e.to_string())),
            }
        }
        for function in &remote {
            match self.copy_traffic(&function.name).await {
                Ok(true) if !report.changed.contains(&function.name) => {
                    report.changed.push(function.name.clone());
                }
                Ok(_) => {}
                Err(e) => report
                    .failed
                    .push((format!("traffic of {}", function.name), e.to_string())),
            }
        }
        for gone in local
            .iter()
            .filter(|l| !remote.iter().any(|r| r.name == l.record.name))
        {
            let name = &gone.record.name;
            match tokio::task::block_in_place(|| self.registry.delete_function(name)) {
                Ok(_) => report.changed.push(name.clone()),
                Err(e) => report
                    .failed
                    .push((format!("function {name}"), e.to_string())),
            }
        }
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.failed.clone());
        Ok(report)
    }

    /// Copies the source's traffic split of `name`, and the revisions it
    /// serves beside the head; says whether the local split changed.
    async fn copy_traffic(&self, name: &str) -> Result<bool, MirrorError> {
        // A function whose head could not be copied is reported once, as such.
        if tokio::task::block_in_place(|| self.registry.function(name)).is_err() {
            return Ok(false);
        }
        let shown: serde_json::Value = self.source.get(&paths::traffic(name)).await?;
        let split: Traffic = serde_json::from_value(shown["split"].clone()).map_err(|e| {
            MirrorError::Unreadable {
                what: format!("traffic split of {name}"),
                why: e.to_string(),
            }
        })?;
        let local = tokio::task::block_in_place(|| self.registry.traffic(name))?;
        if local == split {
            return Ok(false);
        }
        for target in &split.targets {
            let RevisionRef::Number(number) = target.revision else {
                continue;
            };
            if self.registry.function_revision(name, number).is_ok() {
                continue;
            }
            let path = format!("{}/{number}", paths::function(name));
            let record: FunctionRecord = self.source.get(&path).await?;
            self.copy_revision(&record, false).await?;
        }
        tokio::task::block_in_place(|| self.registry.set_traffic(name, &split))?;
        Ok(true)
    }

    /// Copies what `function` uses, then the revision itself as the head.
    async fn copy_function(&self, function: &FunctionRecord) -> Result<(), MirrorError> {
        self.copy_revision(function, true).await
    }

    /// Copies what `record` uses, then the revision itself, as the head
    /// when `head`.
    async fn copy_revision(&self, record: &FunctionRecord, head: bool) -> Result<(), MirrorError> {
        for used in &record.uses {
            self.copy(used, false)
                .await
                .map_err(|source| MirrorError::Copy {
                    used: used.clone(),
                    source: Box::new(source),
                })?;
        }
        tokio::task::block_in_place(|| self.registry.mirror_revision(record, head))?;
        Ok(())
    }

    /// Compares the digests of local components and models with the
    /// source's and copies again every version whose bytes differ there
    /// (deleted and re-published); returns them.
    async fn follow_replaced_artifacts(
        &self,
        report: &mut SyncReport,
    ) -> Result<Vec<Use>, MirrorError> {
        let components = self.source.components().await?;
        let models = self.source.models().await?;
        let mut stale = Vec::new();
        for local in tokio::task::block_in_place(|| self.registry.components())? {
            let differs = components.iter().any(|r| {
                r.name == local.name && r.version == local.version && r.digest != local.digest
            });
            if differs {
                stale.push(Use::Component(reference(&local.name, &local.version)?));
            }
        }
        for local in tokio::task::block_in_place(|| self.registry.models())? {
            let differs = models.iter().any(|r| {
                r.name == local.name
                    && r.version == local.version
                    && r.package_digest != local.package_digest
            });
            if differs {
                stale.push(Use::Model(reference(&local.name, &local.version)?));
            }
        }
        let mut replaced = Vec::new();
        for used in stale {
            match self.copy(&used, true).await {
                Ok(()) => replaced.push(used),
                Err(e) => report.failed.push((used.to_string(), e.to_string())),
            }
        }
        Ok(replaced)
    }

    /// What the last sync could not copy (artifact or function, and why);
    /// `None` before the first sync reached the source.
    pub fn failures(&self) -> Option<Vec<(String, String)>> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Copies one use from the source: when `replace`, even over a local
    /// version with other bytes; else only when missing.
    async fn copy(&self, used: &Use, replace: bool) -> Result<(), MirrorError> {
        match used {
            Use::Component(reference) => self.copy_component(reference, replace).await,
            Use::Model(reference) => self.copy_model(reference, replace).await,
        }
    }

    async fn copy_component(
        &self,
        reference: &Reference,
        replace: bool,
    ) -> Result<(), MirrorError> {
        if !replace && self.registry.component(reference).is_ok() {
            return Ok(());
        }
        let record = self.source.component(reference).await?;
        let blob = self
            .fetch(&paths::content(Kind::Components, reference), &record.digest)
            .await?;
        tokio::task::block_in_place(|| {
            self.registry
                .mirror_component(reference, blob, record.world)
        })?;
        Ok(())
    }

    async fn copy_model(&self, reference: &Reference, replace: bool) -> Result<(), MirrorError> {
        if !replace && self.registry.model(reference).is_ok() {
            return Ok(());
        }
        let record = self.source.model(reference).await?;
        let model = self
            .fetch(&paths::content(Kind::Models, reference), &record.digest)
            .await?;
        let mut files = Vec::new();
        for file in &record.files {
            let path = paths::model_file(reference, &file.name);
            files.push((file.name.clone(), self.fetch(&path, &file.digest).await?));
        }
        let package = ModelPackage {
            model,
            files,
            input_shapes: record.input_shapes.clone(),
            signature: record.signature.clone(),
        };
        let published =
            tokio::task::block_in_place(|| self.registry.mirror_model(reference, package))?;
        if published.record.package_digest != record.package_digest {
            return Err(MirrorError::PackageDigest(reference.clone()));
        }
        Ok(())
    }
}

/// The reference of a record's name and version.
fn reference(name: &str, version: &str) -> Result<Reference, RegistryError> {
    Ok(Reference::new(name.parse()?, version.parse()?))
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Functions whose served revision changed (to reload).
    pub changed: Vec<String>,
    /// What could not be copied, and why.
    pub failed: Vec<(String, String)>,
}

/// How often a mirror checks its source even without events.
pub const SYNC_EVERY: Duration = Duration::from_secs(10);

/// Keeps the mirror in sync: at once, on every registry event from
/// `events` (when NATS is configured), after every NATS (re)connection
/// (events sent meanwhile were missed), and every [`SYNC_EVERY`]; reloads
/// the functions that changed.
pub async fn run(
    mirror: Arc<Mirror>,
    runtime: Arc<crate::runtime::Runtime>,
    mut events: Option<(
        async_nats::Subscriber,
        Arc<crate::trigger::nats::ConnectionState>,
    )>,
) {
    loop {
        let span = tracing::info_span!("mirror sync", source = %mirror.source());
        match mirror.sync().instrument(span).await {
            Ok(report) => {
                mirror.failed_gauge.set(report.failed.len() as i64);
                for (what, why) in &report.failed {
                    tracing::warn!("mirror cannot copy {what} from {}: {why}", mirror.source());
                }
                for name in report.changed {
                    let runtime = runtime.clone();
                    let reloaded = tokio::task::spawn_blocking(move || {
                        let result = runtime.reload(&name);
                        (name, result)
                    })
                    .await;
                    if let Ok((name, Err(e))) = reloaded {
                        tracing::error!(function = %name, "cannot serve the mirrored revision: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("syncing from {}: {e}", mirror.source()),
        }
        match events.as_mut() {
            Some((subscriber, connection)) => {
                tokio::select! {
                    _ = subscriber.next() => {}
                    () = connection.reconnected.notified() => {}
                    () = tokio::time::sleep(SYNC_EVERY) => {}
                }
            }
            None => tokio::time::sleep(SYNC_EVERY).await,
        }
    }
}
