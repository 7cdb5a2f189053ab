//! The HTTP trigger (hyper): invocation, the registry API, health, metrics.
//!
//! One listener serves everything; routes are matched on method and path
//! segments in [`route`]. Errors are JSON `{"error": {"code", "message"}}`.

use crate::api;
use crate::bindings::Message;
use crate::pipeline::InvokeError;
use crate::runtime::Runtime;
use bytes::Bytes;
use cascade_registry::RegistryError;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Response bodies: whole buffers or streamed files.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Bearer token required for writes (and reads when `protect_reads`).
    pub token: Option<String>,
    /// Reads and invocations need the token too.
    pub protect_reads: bool,
}

/// What every request handler shares.
pub struct HttpState {
    /// Functions and registry.
    pub runtime: Arc<Runtime>,
    /// Access control.
    pub auth: Auth,
    /// Largest upload to the registry, in bytes.
    pub max_upload: u64,
    /// Extra readiness checks (e.g. NATS connected): name and probe.
    pub readiness: Vec<(String, Box<dyn Fn() -> bool + Send + Sync>)>,
    /// Where registry changes are announced.
    pub events: crate::trigger::nats::Events,
    /// Set on hosts that serve another host's registry: writes go there.
    pub mirror_of: Option<String>,
    next_request: AtomicU64,
}

impl HttpState {
    /// Shared state for the HTTP trigger.
    pub fn new(runtime: Arc<Runtime>, auth: Auth, max_upload: u64) -> Self {
        HttpState {
            runtime,
            auth,
            max_upload,
            readiness: Vec::new(),
            events: Default::default(),
            mirror_of: None,
            next_request: AtomicU64::new(1),
        }
    }
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// A 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    /// A 413.
    pub fn too_large(limit: u64) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "too_large",
            message: format!("body exceeds the limit of {limit} bytes"),
        }
    }

    /// A 500 that hides host details from the caller but logs them.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error".into(),
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut response = json(
            self.status,
            &serde_json::json!({ "error": { "code": self.code, "message": self.message } }),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        if let RegistryError::Storage(detail) = &e {
            return ApiError::internal(detail);
        }
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code(),
            message: e.to_string(),
        }
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
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
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
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::invalid(format!("reading the body: {e}"))),
    }
}

/// Most of an unread body that is read and discarded before an early error
/// response, so the client sees the error rather than a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads and discards (a bounded amount of) a body that will not be used.
pub async fn drain(mut body: Incoming) {
    let mut seen = 0;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > DRAIN_LIMIT {
            break;
        }
    }
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

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = hyper::service::service_fn(move |request| handle(state.clone(), request));
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {grace:?}");
    }
}

async fn handle(
    state: Arc<HttpState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let response = match route(&state, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    Ok(response)
}

fn authorize(state: &HttpState, request: &Request<Incoming>, write: bool) -> Result<(), ApiError> {
    let Some(token) = &state.auth.token else {
        return Ok(());
    };
    if !write && !state.auth.protect_reads {
        return Ok(());
    }
    let presented = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "wrong token".into(),
        }),
        None => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "this request needs `Authorization: Bearer <token>`".into(),
        }),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(
    state: &Arc<HttpState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = request.method().clone();
    let write = !matches!(method, Method::GET | Method::HEAD)
        && !matches!(segments.last(), Some(&"invoke"));
    if !matches!(segments.as_slice(), ["healthz"] | ["readyz"] | ["metrics"])
        && let Err(refused) = authorize(state, &request, write)
    {
        drain(request.into_body()).await;
        return Err(refused);
    }
    if let (true, Some(source), ["v1", ..]) = (write, &state.mirror_of, segments.as_slice()) {
        drain(request.into_body()).await;
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "read_only",
            message: format!("this host serves the registry of {source}; publish there"),
        });
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            Ok(json(StatusCode::OK, &serde_json::json!({ "status": "ok" })))
        }
        (&Method::GET, ["readyz"]) => Ok(readyz(state)),
        (&Method::GET, ["metrics"]) => {
            let mut response = Response::new(full(state.runtime.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        (&Method::POST, ["v1", "functions", name, "invoke"]) => invoke(state, name, request).await,
        (&Method::GET, ["v1", "functions", name, "status"]) => Ok(json(
            StatusCode::OK,
            &state.runtime.function_when_loaded(name).await?.status(),
        )),
        (_, ["v1", kind, rest @ ..]) => api::route(state, &method, kind, rest, request).await,
        _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
    }
}

fn readyz(state: &HttpState) -> Response<Body> {
    let mut checks = serde_json::Map::new();
    checks.insert(
        "registry".into(),
        state.runtime.registry.functions().is_ok().into(),
    );
    for (name, probe) in &state.readiness {
        checks.insert(name.clone(), probe().into());
    }
    let ready = checks.values().all(|v| v.as_bool() == Some(true));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({ "ready": ready, "checks": checks }),
    )
}

async fn invoke(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{:016x}",
                state.next_request.fetch_add(1, Ordering::Relaxed)
            )
        });
    let result = invoke_inner(state, name, request).await;
    let status = match &result {
        Ok(_) => 200,
        Err(e) => e.status.as_u16(),
    };
    // Unknown names are not recorded: they would grow the label set without bound.
    if state.runtime.function(name).is_ok() {
        state
            .runtime
            .metrics
            .observe_request(name, status, started.elapsed());
    }
    tracing::info!(request_id = %request_id, function = name, status, elapsed_ms = started.elapsed().as_millis() as u64, "invoke");
    let mut response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

async fn invoke_inner(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let function = state.runtime.function_when_loaded(name).await?;
    if !function.manifest.triggers.http {
        return Err(ApiError::not_found(format!(
            "function {name} has no HTTP trigger"
        )));
    }
    let limit = function.max_body();
    check_length(&request, limit).map_err(|_| InvokeError::TooLarge {
        function: name.into(),
        limit,
    })?;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let body = read_body(request.into_body(), limit)
        .await
        .map_err(|e| match e.status {
            StatusCode::PAYLOAD_TOO_LARGE => InvokeError::TooLarge {
                function: name.into(),
                limit,
            }
            .into(),
            _ => e,
        })?;
    let invocation = function
        .invoke(Message {
            content_type,
            body: body.to_vec(),
        })
        .await?;
    let timing: Vec<String> = invocation
        .timings
        .iter()
        .enumerate()
        .map(|(i, (label, took))| {
            format!(
                "s{i};desc=\"{label}\";dur={:.3}",
                took.as_secs_f64() * 1000.0
            )
        })
        .collect();
    let mut response = Response::new(full(invocation.output.body));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&invocation.output.content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&timing.join(", ")) {
        headers.insert("server-timing", value);
    }
    Ok(response)
}
