//! `cascade serve`: opens the registry (or mirrors another host's),
//! prepares every function, serves HTTP and NATS until SIGTERM/SIGINT, then
//! drains in-flight requests and closes.

use crate::access::Access;
use crate::config::ServeConfig;
use crate::engine::{EngineSettings, ServingEngine};
use crate::events::Events;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::model::Backend;
use crate::runtime::Runtime;
use crate::trigger::http::{self, Limits};
use crate::trigger::nats::{self, ConnectionState, NatsOptions, NatsTrigger};
use crate::trigger::subjects;
use anyhow::{Context, Result};
use cascade_registry::Registry;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often idle instances are reaped.
const REAP_EVERY: Duration = Duration::from_millis(250);

/// Runs a host until it is told to stop.
pub async fn run(config: ServeConfig) -> Result<()> {
    let access = Access::from_flags(
        config.token.as_deref(),
        config.token_read,
        config.tokens.as_deref(),
    )?;
    let registry = Registry::open(&config.data)
        .with_context(|| format!("opening the registry in {}", config.data.display()))?;
    let engine = ServingEngine::new(&EngineSettings {
        max_instances: config.max_instances,
        max_memory_mb: cascade_registry::manifest::MAX_MEMORY_MB,
    })
    .map_err(anyhow::Error::from)?;
    let metrics = Arc::new(Metrics::new()?);
    let backend = config.backend();
    if let Backend::OnnxRuntime(settings) = &backend {
        // Fail at start, not at the first model, when the library is wrong.
        crate::model::ort::init(&settings.library)?;
        tracing::info!(
            "models run with ONNX Runtime from {}",
            settings.library.display()
        );
    }
    let runtime = Arc::new(Runtime::new(
        engine,
        Arc::new(registry),
        metrics,
        config.data.join("compiled"),
        backend,
        config.shape_plans,
    ));
    let mirror = match &config.registry_url {
        Some(url) => Some(Arc::new(start_mirror(&config, url, &runtime).await?)),
        None => None,
    };
    // Listen first and prepare functions meanwhile: each answers as soon as
    // it is ready (requests for it wait), and /readyz says 503 until all are.
    let loading = runtime.clone();
    let mut tasks = vec![
        tokio::task::spawn_blocking(move || loading.load_all()),
        tokio::spawn(reap(runtime.clone())),
    ];

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!("cascade listening on http://{}", listener.local_addr()?);
    let mut state = HttpState::new(runtime.clone(), access, config.max_upload_mb << 20);
    let loaded = runtime.clone();
    state
        .readiness
        .push(("functions".into(), Box::new(move || !loaded.is_loading())));
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let stop = CancellationToken::new();
    let mut nats_trigger = None;
    let mut nats_client = None;
    let mut nats_connection = None;
    if let Some(url) = &config.nats_url {
        let options = NatsOptions {
            url: url.clone(),
            token: config.nats_token.clone(),
            credentials: config.nats_creds.clone(),
            tls: config.nats_tls,
        };
        let connection = Arc::new(ConnectionState::default());
        let client = nats::connect(&options, connection.clone())
            .await
            .context("connecting to NATS")?;
        state.events = Events::new(Some(client.clone()));
        let probe = connection.clone();
        state.readiness.push((
            "nats".into(),
            Box::new(move || probe.connected.load(Ordering::SeqCst)),
        ));
        nats_connection = Some(connection);
        nats_trigger = Some(tokio::spawn(
            NatsTrigger::new(client.clone(), runtime.clone()).run(stop.clone(), grace),
        ));
        nats_client = Some(client);
    }
    if let Some(mirror) = mirror {
        state.mirror_of = Some(mirror.source().to_string());
        let synced = mirror.clone();
        state.readiness.push((
            "mirror".into(),
            Box::new(move || synced.failures().is_some_and(|f| f.is_empty())),
        ));
        let events = match (&nats_client, nats_connection) {
            (Some(client), Some(connection)) => Some((
                client.subscribe(subjects::REGISTRY_EVENTS).await?,
                connection,
            )),
            _ => None,
        };
        tasks.push(tokio::spawn(crate::mirror::run(
            mirror,
            runtime.clone(),
            events,
        )));
    }
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.cancel();
    });
    let limits = Limits {
        max_connections: config.max_connections as usize,
        header_timeout: Duration::from_secs(config.header_timeout_secs),
    };
    let stopped = stop.clone();
    let http = http::serve(
        listener,
        Arc::new(state),
        limits,
        stopped.cancelled_owned(),
        grace,
    );
    // HTTP and NATS wind down side by side: each stops taking work and
    // finishes what it took, within the grace period.
    match nats_trigger {
        Some(nats) => {
            let (_, drained) = tokio::join!(http, nats);
            if let Err(e) = drained {
                tracing::warn!("NATS trigger: {e}");
            }
        }
        None => http.await,
    }
    for task in tasks {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Mirrors `url` into this host's registry, syncing once before serving.
async fn start_mirror(config: &ServeConfig, url: &str, runtime: &Arc<Runtime>) -> Result<Mirror> {
    let mirror = Mirror::new(
        url,
        config.registry_token.clone(),
        runtime.registry.clone(),
        config.max_upload_mb << 20,
        runtime.metrics.mirror_failures.clone(),
    )?;
    if let Err(e) = mirror.sync().await {
        tracing::warn!(
            "source registry {url} is not reachable yet ({e:#}); serving the local copy"
        );
    }
    Ok(mirror)
}

async fn reap(runtime: Arc<Runtime>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        let runtime = runtime.clone();
        let _ = tokio::task::spawn_blocking(move || runtime.reap()).await;
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
