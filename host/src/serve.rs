//! `cascade serve`: opens the registry, prepares every function, serves
//! HTTP until SIGTERM/SIGINT, then drains in-flight requests and closes.

use crate::config::ServeConfig;
use crate::engine::{EngineSettings, ServingEngine};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::trigger::http::{self, Auth, HttpState};
use crate::trigger::nats::{self, Events, NatsOptions, NatsTrigger};
use anyhow::{Context, Result};
use cascade_registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often idle instances are reaped.
const REAP_EVERY: Duration = Duration::from_millis(250);

/// Runs a host until it is told to stop.
pub async fn run(config: ServeConfig) -> Result<()> {
    let registry = Registry::open(&config.data)
        .with_context(|| format!("opening the registry in {}", config.data.display()))?;
    let engine = ServingEngine::new(&EngineSettings {
        max_instances: config.max_instances,
        max_memory_mb: cascade_registry::manifest::MAX_MEMORY_MB,
    })
    .map_err(anyhow::Error::from)?;
    let metrics = Arc::new(Metrics::new()?);
    let runtime = Arc::new(Runtime::new(
        engine,
        Arc::new(registry),
        metrics,
        config.data.join("compiled"),
    ));
    let loading = runtime.clone();
    tokio::task::spawn_blocking(move || loading.load_all()).await?;

    let reaper = runtime.clone();
    let reaping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_EVERY);
        loop {
            tick.tick().await;
            let runtime = reaper.clone();
            let _ = tokio::task::spawn_blocking(move || runtime.reap()).await;
        }
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!("cascade listening on http://{}", listener.local_addr()?);
    let auth = Auth {
        token: config.token.clone(),
        protect_reads: config.token_read,
    };
    let mut state = HttpState::new(runtime.clone(), auth, config.max_upload_mb << 20);
    let mut nats_task = None;
    if let Some(url) = &config.nats_url {
        let options = NatsOptions {
            url: url.clone(),
            token: config.nats_token.clone(),
            credentials: config.nats_creds.clone(),
            tls: config.nats_tls,
        };
        let connected = Arc::new(AtomicBool::new(false));
        let client = nats::connect(&options, connected.clone())
            .await
            .context("connecting to NATS")?;
        state.events = Events::new(Some(client.clone()));
        state.readiness.push((
            "nats".into(),
            Box::new(move || connected.load(Ordering::SeqCst)),
        ));
        nats_task = Some(tokio::spawn(
            NatsTrigger::new(client, runtime.clone()).run(),
        ));
    }
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    http::serve(listener, Arc::new(state), shutdown_signal(), grace).await;
    if let Some(task) = nats_task {
        task.abort();
    }
    reaping.abort();
    tracing::info!("stopped");
    Ok(())
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
