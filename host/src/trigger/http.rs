//! The HTTP trigger (hyper): invocation, the registry API, health, metrics.
//!
//! One listener serves everything; routes and what each needs of the caller
//! come from [`crate::routes`]. Errors are JSON `{"error": {"code", "message"}}`.

use crate::access::Access;
use crate::api;
use crate::bindings::Message;
use crate::pipeline::InvokeError;
use crate::routes::{self, Route};
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
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Response bodies: whole buffers or streamed files.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What every request handler shares.
pub struct HttpState {
    /// Functions and registry.
    pub runtime: Arc<Runtime>,
    /// Who may do what.
    pub access: Access,
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
    pub fn new(runtime: Arc<Runtime>, access: Access, max_upload: u64) -> Self {
        HttpState {
            runtime,
            access,
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
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message.into())
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message.into())
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

    fn into_response(self) -> Response<Body> {
        let close = self.close_connection;
        let mut response = json(
            self.status,
            &serde_json::json!({ "error": { "code": self.code, "message": self.message } }),
        );
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

/// What one listener allows a client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; the next accept waits for one to close.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slow clients are cut off).
    pub header_timeout: Duration,
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        // A connection slot first, so a flood waits in the kernel's backlog
        // instead of holding a task and a buffer each.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
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
                let connection = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection ended: {e}");
                    }
                    drop(slot);
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

/// The text after `Bearer ` in the `Authorization` header, if any.
fn bearer(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

async fn route(
    state: &Arc<HttpState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let Some(matched) = routes::resolve(&method, &path) else {
        let refused = ApiError::not_found(format!("no route for {method} {path}"));
        return Err(refused.refusing(request.into_body()));
    };
    if let Err(denied) = state
        .access
        .check(matched.need, bearer(&request), matched.param(0))
    {
        let (status, code) = match denied.status() {
            403 => (StatusCode::FORBIDDEN, "forbidden"),
            _ => (StatusCode::UNAUTHORIZED, "unauthorized"),
        };
        let refused = ApiError::new(status, code, denied.to_string());
        return Err(refused.refusing(request.into_body()));
    }
    if let (true, Some(source)) = (matched.writes_registry(), &state.mirror_of) {
        let message = format!("this host serves the registry of {source}; publish there");
        let refused = ApiError::new(StatusCode::CONFLICT, "read_only", message);
        return Err(refused.refusing(request.into_body()));
    }
    match matched.route {
        Route::Healthz => Ok(json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))),
        Route::Readyz => Ok(readyz(state)),
        Route::Metrics => {
            let mut response = Response::new(full(state.runtime.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        Route::Invoke => invoke(state, matched.param(0), request).await,
        Route::Status => Ok(json(
            StatusCode::OK,
            &state
                .runtime
                .function_when_loaded(matched.param(0))
                .await?
                .status(),
        )),
        _ => api::route(state, &matched, request).await,
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
    let unservable = state.runtime.unservable();
    checks.insert("servable".into(), unservable.is_empty().into());
    let ready = checks.values().all(|v| v.as_bool() == Some(true));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({ "ready": ready, "checks": checks });
    if !unservable.is_empty() {
        body["unservable"] = unservable
            .into_iter()
            .map(|(name, revision, why)| {
                serde_json::json!({ "function": name, "revision": revision, "reason": why })
            })
            .collect();
    }
    json(status, &body)
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
    let too_large = || {
        ApiError::from(InvokeError::TooLarge {
            function: name.into(),
            limit,
        })
        .closing()
    };
    if check_length(&request, limit).is_err() {
        return Err(too_large().refusing(request.into_body()));
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    // Admitted first: the queue then bounds how many bodies are in memory,
    // and reading the body counts against the deadline.
    let admission = match function.admit().await {
        Ok(admission) => admission,
        Err(refused) => return Err(ApiError::from(refused).refusing(request.into_body())),
    };
    let body =
        match tokio::time::timeout(admission.remaining(), read_body(request.into_body(), limit))
            .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(e)) if e.status == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!("function {name}: the request body did not arrive within the deadline"),
                )
                .closing());
            }
        };
    let invocation = function
        .run(
            admission,
            Message {
                content_type,
                body: body.to_vec(),
            },
        )
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
