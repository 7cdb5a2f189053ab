//! HTTP plumbing the triggers and the registry API share: bodies, JSON and
//! file responses, the error response, body limits, and the state every
//! request handler sees. Routes live in [`crate::routes`]; the listener and
//! invocation in [`crate::trigger::http`]; registry routes in [`crate::registry_api`].

use crate::access::Access;
use crate::dashboard::history::History;
use crate::error::InvokeError;
use crate::runtime::Runtime;
use bytes::Bytes;
use cascade_registry::RegistryError;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Response bodies: whole buffers or streamed files.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A readiness probe of `/readyz`: a name and whether it holds now.
pub type Readiness = (String, Box<dyn Fn() -> bool + Send + Sync>);

/// What every request handler shares; built once, whole, before serving.
pub struct HttpState {
    /// Functions and registry.
    pub(crate) runtime: Arc<Runtime>,
    /// Who may do what.
    pub(crate) access: Access,
    /// Largest upload to the registry, in bytes.
    pub(crate) max_upload: u64,
    /// Extra readiness checks (functions loaded, NATS connected, mirror synced).
    pub(crate) readiness: Vec<Readiness>,
    /// Where registry changes are announced.
    pub(crate) events: crate::events::Events,
    /// Set on hosts that serve another host's registry: writes go there.
    pub(crate) mirror_of: Option<String>,
    /// Set when the registry of record is the cluster's (JetStream): writes
    /// are decided there, then applied here.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The last minutes of the metrics, for the dashboard.
    pub(crate) history: Arc<History>,
    next_request: AtomicU64,
}

/// Everything an [`HttpState`] is made of.
pub struct HttpSettings {
    /// Functions and registry.
    pub runtime: Arc<Runtime>,
    /// Who may do what.
    pub access: Access,
    /// Largest upload to the registry, in bytes.
    pub max_upload: u64,
    /// Extra readiness checks.
    pub readiness: Vec<Readiness>,
    /// Where registry changes are announced.
    pub events: crate::events::Events,
    /// The source registry, on a mirror.
    pub mirror_of: Option<String>,
    /// The cluster registry, with `--registry-store jetstream`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The last minutes of the metrics, kept by [`History::follow`].
    pub history: Arc<History>,
}

impl HttpState {
    /// Shared state for the HTTP trigger.
    pub fn new(settings: HttpSettings) -> Self {
        HttpState {
            runtime: settings.runtime,
            access: settings.access,
            max_upload: settings.max_upload,
            readiness: settings.readiness,
            events: settings.events,
            mirror_of: settings.mirror_of,
            cluster: settings.cluster,
            history: settings.history,
            next_request: AtomicU64::new(1),
        }
    }

    /// After a write to the cluster registry: waits until this host's copy
    /// holds it (a no-op without one).
    pub(crate) async fn settle_cluster(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.settle().await;
        }
    }

    /// `/readyz`'s checks by name: the registry answers, every readiness
    /// probe holds, and every stored function is servable here.
    pub fn readiness_checks(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut checks = serde_json::Map::new();
        checks.insert(
            "registry".into(),
            self.runtime.registry().functions().is_ok().into(),
        );
        for (name, probe) in &self.readiness {
            checks.insert(name.clone(), probe().into());
        }
        let servable = self.runtime.unservable().is_empty();
        checks.insert("servable".into(), servable.into());
        checks
    }

    /// Whether every readiness check holds.
    pub fn is_ready(&self) -> bool {
        self.readiness_checks()
            .values()
            .all(|v| v.as_bool() == Some(true))
    }

    /// The request's `X-Request-Id`, or a new one when it brought none.
    pub fn request_id(&self, headers: &hyper::HeaderMap) -> String {
        headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            // A caller's id is logged, traced and may be remembered for
            // feedback: a longer one is replaced, not kept.
            .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES)
            .map(str::to_string)
            .unwrap_or_else(|| self.next_request_id())
    }

    /// A request id for a request that brought none (`X-Request-Id`), or
    /// one too long to keep.
    pub fn next_request_id(&self) -> String {
        format!("{:016x}", self.next_request.fetch_add(1, Ordering::Relaxed))
    }
}

/// Longest request id a caller may choose (`X-Request-Id`).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Close the connection after answering: the request's body was left
    /// unread, and reading it only to throw it away is what a slow or
    /// hostile client wants.
    pub close_connection: bool,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            close_connection: false,
        }
    }

    /// The same error, answered on a connection that is then closed.
    pub fn closing(mut self) -> Self {
        self.close_connection = true;
        self
    }

    /// The same error, answered at once while the rest of `body` is read
    /// and thrown away in the background, within bounds ([`linger`]).
    pub fn refusing(self, body: Incoming) -> Self {
        linger(body);
        self
    }

    /// A 400.
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message.to_string())
    }

    /// A 404.
    pub fn not_found(message: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message.to_string())
    }

    /// A 413.
    pub fn too_large(limit: u64) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds the limit of {limit} bytes"),
        )
    }

    /// A 500 that hides host details from the caller but logs them.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// The JSON error response (`Retry-After` on a 503).
    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        self.respond(&body)
    }

    /// The error as the Open Inference Protocol spells it: `{"error": "..."}`.
    pub fn into_oip_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.message });
        self.respond(&body)
    }

    fn respond(self, body: &serde_json::Value) -> Response<Body> {
        let close = self.close_connection;
        let mut response = json(self.status, body);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        if close {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::Storage(detail) => return ApiError::internal(detail),
            RegistryError::StorageFull(_) => tracing::error!("{e}"),
            _ => {}
        }
        ApiError::new(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.code(),
            e.to_string(),
        )
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError;
        match e {
            ClusterError::Registry(e) => e.into(),
            ClusterError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            ClusterError::Unreadable { .. } => ApiError::internal(e),
        }
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        ApiError::new(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.code(),
            e.to_string(),
        )
    }
}

/// A whole-buffer body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let (status, body) = match serde_json::to_vec_pretty(value) {
        Ok(body) => (status, body),
        Err(e) => {
            tracing::error!("encoding a JSON response: {e}");
            let body = br#"{"error": {"code": "internal", "message": "internal error"}}"#;
            (StatusCode::INTERNAL_SERVER_ERROR, body.to_vec())
        }
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A file streamed from disk.
pub async fn file(path: &Path, content_type: &'static str) -> Result<Response<Body>, ApiError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(ApiError::internal)?;
    let length = file.metadata().await.map_err(ApiError::internal)?.len();
    let stream = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data);
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::too_large(limit).closing())
        }
        Err(e) => Err(ApiError::invalid(format!("reading the body: {e}"))),
    }
}

/// How much of a refused request's body is still read and thrown away after
/// the answer, and for how long: enough for an honest client to finish
/// sending and then read the answer (clients write the whole body before
/// they read), too little to be worth anything to an attacker. Past either
/// bound the connection is closed.
const LINGER_BYTES: usize = 16 << 20;
/// See [`LINGER_BYTES`].
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Reads and discards what is left of a refused request's body, in the
/// background (the answer does not wait for it).
pub fn linger(mut body: Incoming) {
    tokio::spawn(async move {
        let drained = async {
            let mut seen = 0;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drained).await;
    });
}

/// Refuses a declared body length over `limit` before reading anything.
pub fn check_length(request: &Request<Incoming>, limit: u64) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(ApiError::too_large(limit)),
        _ => Ok(()),
    }
}

/// Runs registry work (redb, files, compiling) off the reactor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)
}

/// A 413 for a body over `limit`, on a connection then closed.
pub fn too_large(name: &str, limit: u64) -> ApiError {
    ApiError::from(InvokeError::TooLarge {
        function: name.into(),
        limit,
    })
    .closing()
}

/// The request body, read within what is left of the deadline.
pub async fn read_within(
    name: &str,
    body: Incoming,
    limit: u64,
    remaining: Duration,
) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(remaining, read_body(body, limit)).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) if e.status == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large(name, limit)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("function {name}: the request body did not arrive within the deadline"),
        )
        .closing()),
    }
}

/// Each stage's time as a `Server-Timing` header value
/// (`s0;desc="bert-tokenizer@0.1.0";dur=0.196, ...`).
pub fn server_timing(timings: &[(String, Duration)]) -> Option<HeaderValue> {
    let entries: Vec<String> = timings
        .iter()
        .enumerate()
        .map(|(i, (label, took))| {
            format!(
                "s{i};desc=\"{label}\";dur={:.3}",
                took.as_secs_f64() * 1000.0
            )
        })
        .collect();
    HeaderValue::from_str(&entries.join(", ")).ok()
}
