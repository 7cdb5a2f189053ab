//! Configuration of `cascade serve`, from flags or the environment,
//! validated once.

use crate::model::choice::{BackendRequest, ModelBackend};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `cascade serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "CASCADE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Also serve the Open Inference Protocol over gRPC on this address
    /// (Triton's and KServe's convention: a port of its own, e.g. 8081).
    #[arg(long, env = "CASCADE_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Export traces over OTLP to this collector (base URL, e.g.
    /// `http://127.0.0.1:4318`; `OTEL_EXPORTER_OTLP_ENDPOINT` does the
    /// same). The transport is `OTEL_EXPORTER_OTLP_PROTOCOL`
    /// (`http/protobuf`, the default, or `grpc`); sampling is
    /// `OTEL_TRACES_SAMPLER`/`_ARG`. Off when neither is set.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// The OTLP transport: `http/protobuf` or `grpc`; overrides
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` and `OTEL_EXPORTER_OTLP_PROTOCOL`.
    #[arg(long)]
    pub otlp_protocol: Option<String>,
    /// Data directory: registry.redb, blobs, compiled artifacts.
    #[arg(long, env = "CASCADE_DATA", default_value = "./cascade-data")]
    pub data: PathBuf,
    /// Bearer token required for registry writes.
    #[arg(long, env = "CASCADE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Require the token for reads, invocations and metrics too.
    #[arg(long, requires = "token")]
    pub token_read: bool,
    /// Tokens with scopes (publish, read, invoke, metrics), their secrets
    /// stored as sha256 hashes: a TOML file (see the README).
    #[arg(long, env = "CASCADE_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Most connections open at once; more wait in the listen backlog.
    #[arg(long, env = "CASCADE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, env = "CASCADE_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
    /// Largest registry upload, in MiB.
    #[arg(long, env = "CASCADE_MAX_UPLOAD_MB", default_value_t = 1024)]
    pub max_upload_mb: u64,
    /// Component instances alive at once across all functions (the pools
    /// reserve address space for them, ~8 GB each, not memory).
    #[arg(long, default_value_t = 1024)]
    pub max_instances: u32,
    /// Serve the registry of another host (read-only here): fetch its
    /// functions, components and models, verify and cache them, and follow
    /// its changes.
    #[arg(long, env = "CASCADE_REGISTRY_URL")]
    pub registry_url: Option<String>,
    /// Token for reading the source registry (when it uses `--token-read`).
    #[arg(long, env = "CASCADE_REGISTRY_TOKEN", hide_env_values = true)]
    pub registry_token: Option<String>,
    /// Where the registry of record lives: `embedded` (this host's data
    /// directory) or `jetstream` (the buckets of the NATS cluster given by
    /// `--nats`: every host publishes and serves, each keeping its data
    /// directory as a local copy).
    #[arg(long, env = "CASCADE_REGISTRY_STORE", value_enum, default_value_t = RegistryStore::Embedded)]
    pub registry_store: RegistryStore,
    /// The JetStream buckets, with `--registry-store jetstream`.
    #[command(flatten)]
    pub buckets: BucketFlags,
    /// NATS server URL(s), comma-separated; functions with `triggers.nats`
    /// then serve over NATS.
    #[arg(long = "nats", env = "CASCADE_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS token.
    #[arg(long, env = "CASCADE_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials (`.creds`) file.
    #[arg(long, env = "CASCADE_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Require TLS to NATS.
    #[arg(long)]
    pub nats_tls: bool,
    /// Input shapes per model that get a plan of their own once seen twice:
    /// faster kernels for that shape, at the cost of another copy of the
    /// model's matrix weights each. 0 runs every shape on the general plan.
    #[arg(long, env = "CASCADE_SHAPE_PLANS", default_value_t = 4)]
    pub shape_plans: usize,
    /// The engine that runs models: `auto` runs them with ONNX Runtime when
    /// its library is given (`--onnxruntime`) or cached by `cargo xtask
    /// models`, else with tract; `onnxruntime` refuses to start without the
    /// library; `tract` is pure Rust whatever is installed.
    #[arg(long, env = "CASCADE_MODEL_BACKEND", value_enum, default_value_t = ModelBackend::Auto)]
    pub model_backend: ModelBackend,
    /// ONNX Runtime's shared library (`libonnxruntime.so.1.x.y`, 1.22 or
    /// newer, e.g. from the `onnxruntime` wheel's `onnxruntime/capi/`);
    /// without it the host looks for the copy `cargo xtask models` caches.
    #[arg(long, env = "CASCADE_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
    /// Threads one ONNX Runtime model run may use.
    #[arg(long, env = "CASCADE_ONNXRUNTIME_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub onnxruntime_threads: u16,
    /// Threads an ONNX Runtime run may use when no other run is in flight,
    /// for models it proves faster for (default: every core; 1 turns it off).
    #[arg(long, env = "CASCADE_ONNXRUNTIME_ALONE_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub onnxruntime_alone_threads: Option<u16>,
    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

/// Where the registry of record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RegistryStore {
    /// redb in the data directory, on this host alone.
    Embedded,
    /// JetStream buckets shared by every host on the NATS cluster.
    Jetstream,
}

/// The JetStream buckets of the registry (`--registry-store jetstream`,
/// `cascade registry push`).
#[derive(Debug, Clone, Args)]
pub struct BucketFlags {
    /// The key-value bucket of records.
    #[arg(
        long,
        env = "CASCADE_REGISTRY_BUCKET",
        default_value = "cascade-registry"
    )]
    pub registry_bucket: String,
    /// The object store of blobs (components, models, files), by sha256.
    #[arg(
        long,
        env = "CASCADE_REGISTRY_BLOB_BUCKET",
        default_value = "cascade-blobs"
    )]
    pub registry_blob_bucket: String,
    /// Copies JetStream keeps of each bucket when it creates them (3 for a
    /// production cluster, at most the number of NATS servers).
    #[arg(long, env = "CASCADE_REGISTRY_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub registry_replicas: u8,
    /// Seconds a blob no record names is kept before it is removed (a
    /// publish on another host may be about to name it).
    #[arg(long, env = "CASCADE_REGISTRY_GC_GRACE_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub registry_gc_grace_secs: u64,
}

impl BucketFlags {
    /// The buckets these flags name.
    pub fn buckets(&self) -> crate::cluster::Buckets {
        crate::cluster::Buckets {
            records: self.registry_bucket.clone(),
            blobs: self.registry_blob_bucket.clone(),
            replicas: usize::from(self.registry_replicas),
            gc_grace: std::time::Duration::from_secs(self.registry_gc_grace_secs),
        }
    }
}

impl ServeConfig {
    /// What `--model-backend` and the ONNX Runtime flags ask for; see
    /// [`crate::model::choice::choose`].
    pub fn backend_request(&self) -> BackendRequest {
        BackendRequest {
            choice: self.model_backend,
            library: self.onnxruntime.clone(),
            threads: usize::from(self.onnxruntime_threads),
            alone_threads: self.onnxruntime_alone_threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            ),
        }
    }
}
