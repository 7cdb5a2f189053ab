//! A serving host's copy of another host's registry (`--registry-url`).
//!
//! The source registry stays the one place artifacts are published; this
//! host fetches function revisions and the components and models they use
//! over the registry API, verifies every digest, stores them in its own
//! data directory (so restarts need no network), and reports which
//! functions changed so the runtime can hot-reload them.

use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use cascade_registry::{Registry, RegistryError, blobs::StagedBlob, names::Reference};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// The source registry and the local copy.
pub struct Mirror {
    source: String,
    token: Option<String>,
    registry: Arc<Registry>,
    http: reqwest::Client,
    limit: u64,
}

impl Mirror {
    /// Mirrors the registry at `source` (e.g. `http://10.0.0.1:8080`) into `registry`.
    pub fn new(
        source: &str,
        token: Option<String>,
        registry: Arc<Registry>,
        limit: u64,
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

    /// Brings the local copy in line with the source; returns the names of
    /// functions whose current revision changed.
    pub async fn sync(&self) -> anyhow::Result<Vec<String>> {
        let remote: Vec<FunctionRecord> = self.json("/v1/functions").await?;
        let local = tokio::task::block_in_place(|| self.registry.functions())?;
        let mut changed = Vec::new();
        for function in &remote {
            let current = local.iter().find(|l| l.name == function.name);
            if current
                .is_some_and(|c| c.revision == function.revision && c.digest == function.digest)
            {
                continue;
            }
            for used in &function.uses {
                self.ensure(used).await?;
            }
            tokio::task::block_in_place(|| self.registry.mirror_function(function))?;
            changed.push(function.name.clone());
        }
        for gone in local
            .iter()
            .filter(|l| !remote.iter().any(|r| r.name == l.name))
        {
            tokio::task::block_in_place(|| self.registry.delete_function(&gone.name))?;
            changed.push(gone.name.clone());
        }
        Ok(changed)
    }

    /// Copies one `component:name@version` or `model:name@version` if missing.
    async fn ensure(&self, used: &str) -> anyhow::Result<()> {
        let (kind, reference) = used
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("odd use {used:?}"))?;
        let reference: Reference = reference.parse()?;
        let (name, version) = (&reference.name, &reference.version);
        match kind {
            "component" => {
                if self.registry.component(&reference).is_ok() {
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
                        .publish_component(&reference, blob, &record.world)
                })?;
            }
            "model" => {
                if self.registry.model(&reference).is_ok() {
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
                let published = tokio::task::block_in_place(|| {
                    self.registry.publish_model(
                        &reference,
                        model,
                        files,
                        record.input_shapes.clone(),
                        record.signature.clone(),
                    )
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
            Ok(changed) => {
                for name in changed {
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
