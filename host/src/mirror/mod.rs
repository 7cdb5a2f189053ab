//! A serving host's copy of a registry of record: another host's registry
//! over HTTP (`--registry-url`, [`http_source`]) or the cluster's buckets in
//! JetStream (`--registry-store jetstream`, [`crate::cluster`]).
//!
//! The host fetches function revisions and the components and models they
//! use from its [`Source`], verifies every digest, stores them in its own
//! data directory (so restarts need no network), and reports which
//! functions changed so the runtime can hot-reload them.

pub mod http_source;

use crate::client::ClientError;
use cascade_registry::blobs::BlobWriter;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord, Use};
use cascade_registry::traffic::{RevisionRef, Traffic};
use cascade_registry::{
    ModelPackage, Registry, RegistryError, blobs::StagedBlob, names::Reference,
};
use prometheus::IntGauge;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::Instrument;

/// Bytes a source holds, named as the source's API names them.
#[derive(Debug, Clone, Copy)]
pub enum Blob<'a> {
    /// A component's WebAssembly.
    Component(&'a Reference),
    /// A model's ONNX file.
    Model(&'a Reference),
    /// One extra file of a model package.
    ModelFile(&'a Reference, &'a str),
}

impl std::fmt::Display for Blob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blob::Component(r) => write!(f, "component {r}"),
            Blob::Model(r) => write!(f, "model {r}"),
            Blob::ModelFile(r, name) => write!(f, "file {name} of model {r}"),
        }
    }
}

/// Where a mirror copies from: the records and bytes of a registry of record.
pub trait Source: Send + Sync {
    /// Where it is, for logs.
    fn describe(&self) -> String;
    /// The current revision of every function.
    fn functions(&self) -> impl Future<Output = Result<Vec<FunctionRecord>, MirrorError>> + Send;
    /// Every component version.
    fn components(&self) -> impl Future<Output = Result<Vec<ComponentRecord>, MirrorError>> + Send;
    /// Every model version.
    fn models(&self) -> impl Future<Output = Result<Vec<ModelRecord>, MirrorError>> + Send;
    /// One component version.
    fn component(
        &self,
        reference: &Reference,
    ) -> impl Future<Output = Result<ComponentRecord, MirrorError>> + Send;
    /// One model version.
    fn model(
        &self,
        reference: &Reference,
    ) -> impl Future<Output = Result<ModelRecord, MirrorError>> + Send;
    /// A function's traffic split as stored.
    fn traffic(&self, name: &str) -> impl Future<Output = Result<Traffic, MirrorError>> + Send;
    /// One revision of a function.
    fn revision(
        &self,
        name: &str,
        revision: u64,
    ) -> impl Future<Output = Result<FunctionRecord, MirrorError>> + Send;
    /// Streams the bytes of `blob` (whose digest is `digest`) into `writer`.
    fn download(
        &self,
        blob: Blob<'_>,
        digest: &str,
        writer: &mut BlobWriter,
    ) -> impl Future<Output = Result<(), MirrorError>> + Send;
}

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
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cluster's buckets refused or could not be reached.
    #[error("the cluster registry: {0}")]
    Bucket(String),
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
    /// This host is storing it from a publish of its own right now.
    #[error("{0} is being published on this host")]
    InFlight(Use),
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
pub struct Mirror<S> {
    source: S,
    /// Copy every artifact the source lists, not only those functions use.
    copy_all: bool,
    /// What this host's own publishes are storing (not to fetch twice).
    in_flight: Arc<InFlight>,
    registry: Arc<Registry>,
    limit: u64,
    /// The last sync's failures (`None` before the source was first reached).
    health: Mutex<Option<Vec<(String, String)>>>,
    failed_gauge: IntGauge,
}

impl<S: Source> Mirror<S> {
    /// Mirrors `source` into `registry`, staging at most `limit` bytes a
    /// blob; with `copy_all`, every artifact, else those functions use.
    pub fn new(
        source: S,
        copy_all: bool,
        registry: Arc<Registry>,
        limit: u64,
        failed_gauge: IntGauge,
    ) -> Self {
        Mirror {
            source,
            copy_all,
            in_flight: Arc::default(),
            registry,
            limit,
            health: Mutex::new(None),
            failed_gauge,
        }
    }

    /// Shares `in_flight` with this host's publishes.
    pub fn with_in_flight(mut self, in_flight: Arc<InFlight>) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// Where artifacts come from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Streams `blob` into a staged blob and checks it has `digest`.
    async fn fetch(&self, blob: Blob<'_>, digest: &str) -> Result<StagedBlob, MirrorError> {
        let mut writer = self.registry.stage(self.limit)?;
        self.source.download(blob, digest, &mut writer).await?;
        let staged = tokio::task::block_in_place(|| writer.finish())?;
        if staged.digest != digest {
            return Err(MirrorError::Digest {
                path: blob.to_string(),
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
        let artifacts = Artifacts {
            components: self.source.components().await?,
            models: self.source.models().await?,
        };
        let mut report = SyncReport::default();
        let replaced = self
            .follow_replaced_artifacts(&artifacts, &mut report)
            .await;
        if self.copy_all {
            self.copy_every_artifact(&artifacts, &mut report).await;
        }
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
                Ok(_) => {
                    tracing::info!(function = %name, "the source no longer lists it; removed here");
                    report.changed.push(name.clone());
                }
                Err(e) => report
                    .failed
                    .push((format!("function {name}"), e.to_string())),
            }
        }
        self.forget_deleted_artifacts(&artifacts)?;
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.failed.clone());
        Ok(report)
    }

    /// Copies every component and model the source lists that is not here
    /// yet (so a function published later finds them already local).
    async fn copy_every_artifact(&self, artifacts: &Artifacts, report: &mut SyncReport) {
        let components = artifacts
            .components
            .iter()
            .map(|r| reference(&r.name, &r.version).map(Use::Component));
        let models = artifacts
            .models
            .iter()
            .map(|r| reference(&r.name, &r.version).map(Use::Model));
        for used in components.chain(models) {
            let copied = match used {
                Ok(used) => self
                    .copy(&used, false)
                    .await
                    .map_err(|e| (used.to_string(), e)),
                Err(e) => Err(("a listed artifact".to_string(), e.into())),
            };
            match copied {
                // The publish storing it is this host's own.
                Ok(()) | Err((_, MirrorError::InFlight(_))) => {}
                Err((what, e)) => report.failed.push((what, e.to_string())),
            }
        }
    }

    /// Deletes local component and model versions the source no longer
    /// lists, unless a local function revision still uses them.
    fn forget_deleted_artifacts(&self, artifacts: &Artifacts) -> Result<(), MirrorError> {
        tokio::task::block_in_place(|| {
            for local in self.registry.components()? {
                let listed = artifacts
                    .components
                    .iter()
                    .any(|r| r.name == local.name && r.version == local.version);
                if !listed {
                    let gone = self
                        .registry
                        .delete_component(&reference(&local.name, &local.version)?);
                    keep_if_used(gone)?;
                }
            }
            for local in self.registry.models()? {
                let listed = artifacts
                    .models
                    .iter()
                    .any(|r| r.name == local.name && r.version == local.version);
                if !listed {
                    let gone = self
                        .registry
                        .delete_model(&reference(&local.name, &local.version)?);
                    keep_if_used(gone)?;
                }
            }
            Ok(())
        })
    }

    /// Copies the source's traffic split of `name`, and the revisions it
    /// serves beside the head; says whether the local split changed.
    async fn copy_traffic(&self, name: &str) -> Result<bool, MirrorError> {
        // A function whose head could not be copied is reported once, as such.
        if tokio::task::block_in_place(|| self.registry.function(name)).is_err() {
            return Ok(false);
        }
        let split = self.source.traffic(name).await?;
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
            let record = self.source.revision(name, number).await?;
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
        artifacts: &Artifacts,
        report: &mut SyncReport,
    ) -> Vec<Use> {
        let (components, models) = (&artifacts.components, &artifacts.models);
        let mut stale = Vec::new();
        let listed = tokio::task::block_in_place(|| -> Result<(), MirrorError> {
            for local in self.registry.components()? {
                let differs = components.iter().any(|r| {
                    r.name == local.name && r.version == local.version && r.digest != local.digest
                });
                if differs {
                    stale.push(Use::Component(reference(&local.name, &local.version)?));
                }
            }
            for local in self.registry.models()? {
                let differs = models.iter().any(|r| {
                    r.name == local.name
                        && r.version == local.version
                        && r.package_digest != local.package_digest
                });
                if differs {
                    stale.push(Use::Model(reference(&local.name, &local.version)?));
                }
            }
            Ok(())
        });
        if let Err(e) = listed {
            report
                .failed
                .push(("local artifacts".into(), e.to_string()));
        }
        let mut replaced = Vec::new();
        for used in stale {
            match self.copy(&used, true).await {
                Ok(()) => replaced.push(used),
                Err(e) => report.failed.push((used.to_string(), e.to_string())),
            }
        }
        replaced
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

    fn not_in_flight(&self, used: Use) -> Result<(), MirrorError> {
        if self.in_flight.holds(&used) {
            return Err(MirrorError::InFlight(used));
        }
        Ok(())
    }

    async fn copy_component(
        &self,
        reference: &Reference,
        replace: bool,
    ) -> Result<(), MirrorError> {
        if !replace && self.registry.component(reference).is_ok() {
            return Ok(());
        }
        self.not_in_flight(Use::Component(reference.clone()))?;
        let record = self.source.component(reference).await?;
        let blob = self
            .fetch(Blob::Component(reference), &record.digest)
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
        self.not_in_flight(Use::Model(reference.clone()))?;
        let record = self.source.model(reference).await?;
        let model = self.fetch(Blob::Model(reference), &record.digest).await?;
        let mut files = Vec::new();
        for file in &record.files {
            let blob = Blob::ModelFile(reference, &file.name);
            files.push((file.name.clone(), self.fetch(blob, &file.digest).await?));
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

/// The artifacts this host's own publishes are storing: a sync that sees
/// their records first leaves them to the publish (which has the bytes)
/// rather than download them again.
#[derive(Default)]
pub struct InFlight(Mutex<Vec<Use>>);

impl InFlight {
    /// Marks `used` as being stored until the guard drops.
    pub fn hold(self: &Arc<Self>, used: Use) -> InFlightGuard {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(used.clone());
        InFlightGuard {
            set: self.clone(),
            used,
        }
    }

    fn holds(&self, used: &Use) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(used)
    }
}

/// Releases an [`InFlight`] mark when dropped (the publish ended, or its
/// request was abandoned).
pub struct InFlightGuard {
    set: Arc<InFlight>,
    used: Use,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut held = self.set.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = held.iter().position(|u| *u == self.used) {
            held.swap_remove(at);
        }
    }
}

/// The component and model versions a source lists.
struct Artifacts {
    components: Vec<ComponentRecord>,
    models: Vec<ModelRecord>,
}

/// A local delete that found the artifact still used is not a failure:
/// the function that uses it goes first, on a later sync.
fn keep_if_used<R>(deleted: Result<R, RegistryError>) -> Result<(), MirrorError> {
    match deleted {
        Ok(_) | Err(RegistryError::Conflict(_) | RegistryError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
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

/// What wakes a mirror for its next sync.
pub trait Wakeup: Send {
    /// Returns when the source may have changed.
    fn wait(&mut self) -> impl Future<Output = ()> + Send;
}

/// Wakes an HTTP mirror on every registry event (when NATS is configured),
/// after every NATS (re)connection (events sent meanwhile were missed), and
/// every [`SYNC_EVERY`].
pub struct RegistryEvents(
    pub  Option<(
        async_nats::Subscriber,
        Arc<crate::trigger::nats::ConnectionState>,
    )>,
);

impl Wakeup for RegistryEvents {
    async fn wait(&mut self) {
        use futures_util::StreamExt;
        match self.0.as_mut() {
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

/// Keeps the mirror in sync: at once, then whenever `wakeup` says; reloads
/// the functions that changed.
pub async fn run<S: Source + 'static>(
    mirror: Arc<Mirror<S>>,
    runtime: Arc<crate::runtime::Runtime>,
    mut wakeup: impl Wakeup,
) {
    loop {
        sync_and_reload(&mirror, &runtime).await;
        wakeup.wait().await;
    }
}

/// One sync, then a reload of each function it changed.
pub async fn sync_and_reload<S: Source>(
    mirror: &Mirror<S>,
    runtime: &Arc<crate::runtime::Runtime>,
) {
    let source = mirror.source.describe();
    let span = tracing::info_span!("mirror sync", source = %source);
    match mirror.sync().instrument(span).await {
        Ok(report) => {
            mirror.failed_gauge.set(report.failed.len() as i64);
            for (what, why) in &report.failed {
                tracing::warn!("mirror cannot copy {what} from {source}: {why}");
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
        Err(e) => tracing::warn!("syncing from {source}: {e}"),
    }
}
