//! A serving host's copy of another host's registry (`--registry-url`).
//!
//! The source registry stays the one place artifacts are published; this
//! host fetches function revisions and the components and models they use
//! over the registry API, verifies every digest, stores them in its own
//! data directory (so restarts need no network), and reports which
//! functions changed so the runtime can hot-reload them.

use anyhow::Context;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use cascade_registry::{
    ModelPackage, Registry, RegistryError, blobs::StagedBlob, names::Reference,
};
use futures_util::StreamExt;
use prometheus::IntGauge;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The source registry and the local copy.
pub struct Mirror {
    source: String,
    token: Option<String>,
    registry: Arc<Registry>,
    http: reqwest::Client,
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
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        Ok(Mirror {
            source: source.trim_end_matches('/').to_string(),
            token,
            registry,
            http,
            limit,
            health: Mutex::new(None),
            failed_gauge,
        })
    }

    /// Where artifacts are published.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(format!("{}{path}", self.source));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.get(path).send().await?.error_for_status()?;
        Ok(response.json().await?)
    }

    /// Streams `path` into a staged blob and checks it has `digest`.
    async fn fetch(&self, path: &str, digest: &str) -> anyhow::Result<StagedBlob> {
        let response = self.get(path).send().await?.error_for_status()?;
        let mut writer = self.registry.stage(self.limit)?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            tokio::task::block_in_place(|| writer.write_chunk(&chunk))?;
        }
        let staged = tokio::task::block_in_place(|| writer.finish())?;
        if staged.digest != digest {
            anyhow::bail!(
                "{path}: fetched bytes have digest {}, the registry lists {digest}",
                staged.digest
            );
        }
        Ok(staged)
    }

    /// Brings the local copy in line with the source. Each function syncs
    /// on its own: one whose artifacts cannot be copied is reported in
    /// [`SyncReport::failed`] while the others, and deletions, go ahead.
    /// Fails as a whole only when the source cannot be listed.
    pub async fn sync(&self) -> anyhow::Result<SyncReport> {
        let remote: Vec<FunctionRecord> = self.json("/v1/functions").await?;
        let mut report = SyncReport::default();
        let replaced = self.follow_replaced_artifacts(&mut report).await?;
        let local = tokio::task::block_in_place(|| self.registry.functions())?;
        for function in &remote {
            let current = local.iter().find(|l| l.name == function.name);
            let unchanged = current
                .is_some_and(|c| c.revision == function.revision && c.digest == function.digest);
            if unchanged && !function.uses.iter().any(|u| replaced.contains(u)) {
                continue;
            }
            match self.copy_function(function).await {
                Ok(()) => report.changed.push(function.name.clone()),
                Err(e) => report
                    .failed
                    .push((format!("function {}", function.name), format!("{e:#}"))),
            }
        }
        for gone in local
            .iter()
            .filter(|l| !remote.iter().any(|r| r.name == l.name))
        {
            match tokio::task::block_in_place(|| self.registry.delete_function(&gone.name)) {
                Ok(_) => report.changed.push(gone.name.clone()),
                Err(e) => report
                    .failed
                    .push((format!("function {}", gone.name), e.to_string())),
            }
        }
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = Some(report.failed.clone());
        Ok(report)
    }

    /// Copies what `function` uses, then the revision itself.
    async fn copy_function(&self, function: &FunctionRecord) -> anyhow::Result<()> {
        for used in &function.uses {
            self.ensure(used)
                .await
                .with_context(|| format!("copying {used}"))?;
        }
        tokio::task::block_in_place(|| self.registry.mirror_function(function))?;
        Ok(())
    }

    /// Compares the digests of local components and models with the
    /// source's and copies again every version whose bytes differ there
    /// (deleted and re-published); returns their uses (`component:x@1.0.0`).
    async fn follow_replaced_artifacts(
        &self,
        report: &mut SyncReport,
    ) -> anyhow::Result<Vec<String>> {
        let components: Vec<ComponentRecord> = self.json("/v1/components").await?;
        let models: Vec<ModelRecord> = self.json("/v1/models").await?;
        let mut stale = Vec::new();
        for local in tokio::task::block_in_place(|| self.registry.components())? {
            let differs = components.iter().any(|r| {
                r.name == local.name && r.version == local.version && r.digest != local.digest
            });
            if differs {
                stale.push(format!("component:{}@{}", local.name, local.version));
            }
        }
        for local in tokio::task::block_in_place(|| self.registry.models())? {
            let differs = models.iter().any(|r| {
                r.name == local.name
                    && r.version == local.version
                    && r.package_digest != local.package_digest
            });
            if differs {
                stale.push(format!("model:{}@{}", local.name, local.version));
            }
        }
        let mut replaced = Vec::new();
        for used in stale {
            match self.copy(&used, true).await {
                Ok(()) => replaced.push(used),
                Err(e) => report.failed.push((used, format!("{e:#}"))),
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

    /// Copies one `component:name@version` or `model:name@version` if missing.
    async fn ensure(&self, used: &str) -> anyhow::Result<()> {
        self.copy(used, false).await
    }

    /// Copies one use from the source: when `replace`, even over a local
    /// version with other bytes; else only when missing.
    async fn copy(&self, used: &str, replace: bool) -> anyhow::Result<()> {
        let (kind, reference) = used
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("odd use {used:?}"))?;
        let reference: Reference = reference.parse()?;
        let (name, version) = (&reference.name, &reference.version);
        match kind {
            "component" => {
                if !replace && self.registry.component(&reference).is_ok() {
                    return Ok(());
                }
                let record: ComponentRecord = self
                    .json(&format!("/v1/components/{name}/{version}"))
                    .await?;
                let blob = self
                    .fetch(
                        &format!("/v1/components/{name}/{version}/content"),
                        &record.digest,
                    )
                    .await?;
                tokio::task::block_in_place(|| {
                    self.registry
                        .mirror_component(&reference, blob, &record.world)
                })?;
            }
            "model" => {
                if !replace && self.registry.model(&reference).is_ok() {
                    return Ok(());
                }
                let record: ModelRecord =
                    self.json(&format!("/v1/models/{name}/{version}")).await?;
                let model = self
                    .fetch(
                        &format!("/v1/models/{name}/{version}/content"),
                        &record.digest,
                    )
                    .await?;
                let mut files = Vec::new();
                for file in &record.files {
                    let path = format!("/v1/models/{name}/{version}/files/{}", file.name);
                    files.push((file.name.clone(), self.fetch(&path, &file.digest).await?));
                }
                let package = ModelPackage {
                    model,
                    files,
                    input_shapes: record.input_shapes.clone(),
                    signature: record.signature.clone(),
                };
                let published = tokio::task::block_in_place(|| {
                    self.registry.mirror_model(&reference, package)
                })?;
                if published.record.package_digest != record.package_digest {
                    anyhow::bail!(
                        "model {reference}: package digest differs from the source registry"
                    );
                }
            }
            other => return Err(RegistryError::Invalid(format!("unknown kind {other:?}")).into()),
        }
        Ok(())
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
        match mirror.sync().await {
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
            Err(e) => tracing::warn!("syncing from {}: {e:#}", mirror.source()),
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
