//! `cascade serve`: opens the registry (or mirrors another host's),
//! prepares every function, serves HTTP and NATS until SIGTERM/SIGINT, then
//! drains in-flight requests and closes.

use crate::access::Access;
use crate::client::RegistryClient;
use crate::cluster::Cluster;
use crate::config::{RegistryStore, ServeConfig};
use crate::dashboard::history::History;
use crate::engine::{EngineSettings, ServingEngine};
use crate::events::Events;
use crate::http::{HttpSettings, HttpState, Readiness};
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::runtime::Runtime;
use crate::trigger::http::{self, Limits};
use crate::trigger::jetstream::JetStreamTrigger;
use crate::trigger::nats::{self, ConnectionState, NatsOptions, NatsTrigger};
use crate::trigger::subjects;
use crate::verdicts::Decider;
use anyhow::{Context, Result};
use cascade_registry::Registry;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A mirror of another host's registry over HTTP.
type HttpMirror = Mirror<RegistryClient>;

/// gRPC calls in flight at once on one connection.
const GRPC_STREAMS_PER_CONNECTION: u32 = 64;

/// How often idle instances are reaped.
const REAP_EVERY: Duration = Duration::from_millis(250);

/// Runs a host until it is told to stop.
pub async fn run(config: ServeConfig) -> Result<()> {
    let access = Access::from_flags(
        config.token.as_deref(),
        config.token_read,
        config.tokens.as_deref(),
    )?;
    check_registry_store(&config)?;
    let runtime = Arc::new(open_runtime(&config)?);
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
    let nats = match &config.nats_url {
        Some(url) => Some(connect_nats(&config, url).await?),
        None => None,
    };
    let cluster = match (&nats, config.registry_store) {
        (Some(nats), RegistryStore::Jetstream) => {
            let cluster = Arc::new(Cluster::default());
            tasks.push(tokio::spawn(crate::cluster::follow::run(
                cluster.clone(),
                nats.client.clone(),
                config.buckets.buckets(),
                runtime.clone(),
                config.max_upload_mb << 20,
            )));
            Some(cluster)
        }
        _ => None,
    };
    let mut readiness = readiness(&runtime, nats.as_ref(), mirror.as_ref());
    if let Some(cluster) = &cluster {
        let synced = cluster.clone();
        readiness.push((
            "cluster_registry".into(),
            Box::new(move || synced.synced.load(Ordering::SeqCst)),
        ));
    }
    if let Some(mirror) = &mirror {
        tasks.push(follow_source(mirror, &runtime, nats.as_ref()).await?);
    }
    let grpc = match config.grpc_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for gRPC on {address}"))?,
        ),
        None => None,
    };
    let history = Arc::new(History::new());
    let (kept, metrics) = (history.clone(), runtime.metrics().clone());
    tasks.push(tokio::spawn(async move { kept.follow(&metrics).await }));
    let events = Events::new(nats.as_ref().map(|n| n.client.clone()));
    if let Some(verdicts) = runtime.take_verdicts() {
        let decider = match (&mirror, &cluster) {
            (Some(_), _) => Decider::Mirror,
            (None, Some(cluster)) => Decider::Cluster(cluster.clone()),
            (None, None) => Decider::Local,
        };
        let carried =
            crate::verdicts::carry_out(runtime.clone(), events.clone(), verdicts, decider);
        tasks.push(tokio::spawn(carried));
    }
    let state = HttpState::new(HttpSettings {
        runtime: runtime.clone(),
        access,
        max_upload: config.max_upload_mb << 20,
        readiness,
        events,
        mirror_of: mirror.map(|m| m.source().base().to_string()),
        cluster,
        history: history.clone(),
    });
    let listeners = Listeners {
        http: listener,
        grpc,
    };
    serve_until_stopped(&config, listeners, Arc::new(state), nats, runtime).await;
    for task in tasks {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Refuses settings that cannot work together, before anything starts.
fn check_registry_store(config: &ServeConfig) -> Result<()> {
    if config.registry_store == RegistryStore::Jetstream {
        if config.nats_url.is_none() {
            anyhow::bail!(
                "--registry-store jetstream keeps the registry in the NATS cluster: give its URL(s) with --nats"
            );
        }
        if config.registry_url.is_some() {
            anyhow::bail!(
                "--registry-store jetstream and --registry-url contradict each other: with JetStream every host is a source; drop --registry-url"
            );
        }
    }
    Ok(())
}

/// Keeps a mirror in step with its source, woken by registry events when
/// NATS is there.
async fn follow_source(
    mirror: &Arc<HttpMirror>,
    runtime: &Arc<Runtime>,
    nats: Option<&Nats>,
) -> Result<tokio::task::JoinHandle<()>> {
    let events = match nats {
        Some(nats) => Some((
            nats.client.subscribe(subjects::REGISTRY_EVENTS).await?,
            nats.connection.clone(),
        )),
        None => None,
    };
    let wakeup = crate::mirror::RegistryEvents(events);
    let follow = crate::mirror::run(mirror.clone(), runtime.clone(), wakeup);
    Ok(tokio::spawn(follow))
}

/// The registry, the engine, the model backend and the runtime over them.
fn open_runtime(config: &ServeConfig) -> Result<Runtime> {
    let registry = Registry::open(&config.data)
        .with_context(|| format!("opening the registry in {}", config.data.display()))?;
    let engine = ServingEngine::new(&EngineSettings {
        max_instances: config.max_instances,
        max_memory_mb: cascade_registry::manifest::MAX_MEMORY_MB,
    })
    .map_err(anyhow::Error::from)?;
    let metrics = Metrics::new()?;
    let chosen = crate::model::choice::choose(&config.backend_request(), &metrics.model_backend)?;
    tracing::info!("{}", chosen.reason);
    let backend = chosen.backend;
    Ok(Runtime::new(
        engine,
        Arc::new(registry),
        Arc::new(metrics),
        config.data.join("compiled"),
        backend,
        config.shape_plans,
    ))
}

/// A host's NATS connection and what follows its state.
struct Nats {
    client: async_nats::Client,
    connection: Arc<ConnectionState>,
}

async fn connect_nats(config: &ServeConfig, url: &str) -> Result<Nats> {
    let options = NatsOptions {
        url: url.to_string(),
        token: config.nats_token.clone(),
        credentials: config.nats_creds.clone(),
        tls: config.nats_tls,
    };
    let connection = Arc::new(ConnectionState::default());
    let client = nats::connect(&options, connection.clone())
        .await
        .context("connecting to NATS")?;
    Ok(Nats { client, connection })
}

/// `/readyz`'s checks beyond the registry: functions loaded, NATS
/// connected, the mirror's last sync complete.
fn readiness(
    runtime: &Arc<Runtime>,
    nats: Option<&Nats>,
    mirror: Option<&Arc<HttpMirror>>,
) -> Vec<Readiness> {
    let loaded = runtime.clone();
    let mut checks: Vec<Readiness> =
        vec![("functions".into(), Box::new(move || !loaded.is_loading()))];
    if let Some(nats) = nats {
        let probe = nats.connection.clone();
        checks.push((
            "nats".into(),
            Box::new(move || probe.connected.load(Ordering::SeqCst)),
        ));
    }
    if let Some(mirror) = mirror {
        let synced = mirror.clone();
        checks.push((
            "mirror".into(),
            Box::new(move || synced.failures().is_some_and(|f| f.is_empty())),
        ));
    }
    checks
}

/// The sockets a host serves on.
struct Listeners {
    http: tokio::net::TcpListener,
    grpc: Option<tokio::net::TcpListener>,
}

/// Serves the OIP gRPC service on `listener` until `stop`, then lets
/// in-flight calls finish.
async fn serve_grpc(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    stop: CancellationToken,
) {
    if let Ok(address) = listener.local_addr() {
        tracing::info!("cascade serving the Open Inference Protocol over gRPC on {address}");
    }
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    });
    let service = crate::oip::grpc::server(
        state,
        (cascade_registry::manifest::MAX_BODY_KB << 10) as usize,
    );
    // Calls in flight per connection are bounded like HTTP/2 servers do
    // by default; each still waits for admission to its function's queue.
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION)
        .serve_with_incoming_shutdown(service, incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!("gRPC server: {e}");
    }
}

/// Serves HTTP, gRPC and NATS until SIGTERM/SIGINT; then each stops taking
/// work and finishes what it took, side by side, within the grace period.
async fn serve_until_stopped(
    config: &ServeConfig,
    listeners: Listeners,
    state: Arc<HttpState>,
    nats: Option<Nats>,
    runtime: Arc<Runtime>,
) {
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let stop = CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.cancel();
    });
    // Core NATS and JetStream share the connection; both finish what they
    // took within the grace period.
    let nats_trigger = nats.map(|nats| {
        let jetstream = JetStreamTrigger::new(nats.client.clone(), runtime.clone());
        let core = NatsTrigger::new(nats.client, runtime);
        let (stop_core, stop_jetstream) = (stop.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::join!(
                core.run(stop_core, grace),
                jetstream.run(stop_jetstream, grace)
            );
        })
    });
    let limits = Limits {
        max_connections: config.max_connections as usize,
        header_timeout: Duration::from_secs(config.header_timeout_secs),
    };
    let grpc = listeners
        .grpc
        .map(|listener| tokio::spawn(serve_grpc(listener, state.clone(), stop.clone())));
    let http = http::serve(listeners.http, state, limits, stop.cancelled_owned(), grace);
    match nats_trigger {
        Some(nats) => {
            let (_, drained) = tokio::join!(http, nats);
            if let Err(e) = drained {
                tracing::warn!("NATS trigger: {e}");
            }
        }
        None => http.await,
    }
    if let Some(grpc) = grpc {
        let _ = tokio::time::timeout(grace, grpc).await;
    }
    let saved =
        tokio::task::spawn_blocking(move || crate::model::optimized::finish_saving(grace)).await;
    if !saved.unwrap_or(false) {
        tracing::warn!("stopping while an optimised model is still being saved");
    }
}

/// Mirrors `url` into this host's registry, syncing once before serving.
async fn start_mirror(
    config: &ServeConfig,
    url: &str,
    runtime: &Arc<Runtime>,
) -> Result<HttpMirror> {
    let mirror = Mirror::new(
        RegistryClient::new(url, config.registry_token.clone())?,
        false,
        runtime.registry().clone(),
        config.max_upload_mb << 20,
        runtime.metrics().mirror_failures.clone(),
    );
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
