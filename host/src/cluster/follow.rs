//! Keeps a host in step with the cluster registry: opens the buckets (NATS
//! may come up after the host, which serves its local copy meanwhile),
//! follows the record bucket, syncs the local registry on every change and
//! collects unnamed blobs.

use super::{Buckets, Cluster, ClusterStore, gc};
use crate::mirror::{self, Mirror};
use crate::runtime::Runtime;
use std::sync::Arc;
use std::time::Duration;

/// How long to wait between attempts to open the buckets.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// Runs for as long as the host does.
pub async fn run(
    cluster: Arc<Cluster>,
    client: async_nats::Client,
    buckets: Buckets,
    runtime: Arc<Runtime>,
    limit: u64,
) {
    let jetstream = async_nats::jetstream::new(client);
    let store = loop {
        match ClusterStore::open(&jetstream, &buckets).await {
            Ok(store) => break Arc::new(store),
            Err(e) => {
                tracing::warn!(
                    "opening the cluster registry (retrying; serving the local copy): {e}"
                );
                tokio::time::sleep(OPEN_RETRY).await;
            }
        }
    };
    tracing::info!("registry of record: {}", store.describe());
    cluster.opened(store.clone());
    let view = store.view().clone();
    let kv = store.kv.clone();
    let watched = view.clone();
    let watch = tokio::spawn(async move { watched.follow(kv).await });
    let collect = tokio::spawn(gc::run(store.clone()));
    let mirror = Mirror::new(
        store,
        true,
        runtime.registry().clone(),
        limit,
        runtime.metrics().mirror_failures.clone(),
    )
    .with_in_flight(cluster.in_flight.clone());
    let _tasks = AbortOnDrop(vec![watch, collect]);
    loop {
        if view.is_ready() {
            let through = view.last_revision();
            mirror::sync_and_reload(&mirror, &runtime).await;
            let clean = mirror.failures().is_some_and(|f| f.is_empty());
            cluster.synced_to(through, clean);
            precompile(&runtime).await;
        }
        tokio::select! {
            () = view.changed.notified() => {}
            () = tokio::time::sleep(mirror::SYNC_EVERY) => {}
        }
    }
}

/// Compiles every local component not compiled yet, so a function that
/// arrives after its components serves without waiting for the compiler.
async fn precompile(runtime: &Arc<Runtime>) {
    let runtime = runtime.clone();
    let compiled = tokio::task::spawn_blocking(move || {
        let registry = runtime.registry();
        let mut compiled = 0;
        for component in registry.components()? {
            let wasm = registry.blob_path(&component.digest);
            let fresh =
                runtime
                    .engine()
                    .precompile(&wasm, &component.digest, runtime.compiled_dir());
            match fresh {
                Ok(true) => compiled += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    component = %format!("{}@{}", component.name, component.version),
                    "cannot compile: {e:#}"
                ),
            }
        }
        Ok::<_, cascade_registry::RegistryError>(compiled)
    })
    .await;
    if let Ok(Err(e)) = compiled {
        tracing::warn!("listing components to compile: {e}");
    }
}

/// Stops the helper tasks with the loop that owns them.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
