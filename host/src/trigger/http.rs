//! The HTTP trigger (hyper): invocation, the registry API, health, metrics.
//!
//! One listener serves everything; routes and what each needs of the caller
//! come from [`crate::routes`]. Errors are JSON `{"error": {"code", "message"}}`.

use crate::bindings::Message;
use crate::dashboard;
use crate::http::{
    ApiError, Body, HttpState, check_length, full, json, read_within, server_timing, too_large,
};
use crate::oip;
use crate::pipeline::{Invocation, PreparedFunction, Trigger};
use crate::registry_api;
use crate::routes::{self, Route};
use crate::trace_context::{self, HttpHeaders};
use crate::traffic::{self, Choice};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// The response header naming the revision that answered.
pub const REVISION_HEADER: &str = "x-cascade-revision";

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
    // Open Inference Protocol clients read errors as `{"error": "..."}`.
    let path = request.uri().path();
    let oip = path == "/v2" || path.starts_with("/v2/");
    let response = match route(&state, request).await {
        Ok(response) => response,
        Err(error) if oip => error.into_oip_response(),
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
        // A token for function `embed` may invoke `embed@candidate` too.
        .check(
            matched.need,
            bearer(&request),
            traffic::split_tag(matched.param(0)).0,
        )
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
        Route::Ui => {
            let mut response = Response::new(full(dashboard::PAGE));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            Ok(response)
        }
        Route::UiData => {
            let state = state.clone();
            let view = tokio::task::spawn_blocking(move || {
                dashboard::view(&state.runtime, &state.history)
            })
            .await
            .map_err(|e| ApiError::internal(format!("the dashboard view failed: {e}")))?;
            Ok(json(StatusCode::OK, &view))
        }
        Route::Metrics => {
            let mut response = Response::new(full(state.runtime.metrics().render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(response)
        }
        Route::Invoke => invoke(state, matched.param(0), request).await,
        Route::Feedback => crate::operations_api::feedback(state, matched.param(0), request).await,
        Route::DriftReference => {
            crate::operations_api::drift_reference(state, matched.param(0), request).await
        }
        Route::Status => status(state, matched.param(0)).await,
        route if route.is_oip() => oip::rest::route(state, &matched, request).await,
        _ if matched.writes_registry() => {
            let span = trace_context::registry_write(&matched, &HttpHeaders(request.headers()));
            registry_api::route(state, &matched, request)
                .instrument(span)
                .await
        }
        _ => registry_api::route(state, &matched, request).await,
    }
}

/// `GET /v1/functions/{name}/status`: the head's status, with the
/// traffic split it is served with (when not all to the head).
async fn status(state: &HttpState, name: &str) -> Result<Response<Body>, ApiError> {
    let function = state.runtime.function_when_loaded(name).await?;
    let mut status = serde_json::to_value(function.status()).map_err(ApiError::internal)?;
    if let Some(split) = state.runtime.split(name) {
        status["traffic"] = serde_json::to_value(split.traffic()).map_err(ApiError::internal)?;
    }
    Ok(json(StatusCode::OK, &status))
}

fn readyz(state: &HttpState) -> Response<Body> {
    let checks = state.readiness_checks();
    let unservable = state.runtime.unservable();
    let ready = checks.values().all(|v| v.as_bool() == Some(true));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({ "ready": ready, "checks": checks });
    let consumers = crate::trigger::jetstream::status(&state.runtime);
    if !consumers.is_empty() {
        body["jetstream"] = consumers.into();
    }
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

/// `POST /v1/functions/{name}[@tag]/invoke`: the revision its traffic
/// split chooses (the tagged target, or by sticky key or share) runs it.
async fn invoke(
    state: &Arc<HttpState>,
    target: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let (name, tag) = traffic::split_tag(target);
    let request_id = state.request_id(request.headers());
    let headers = HttpHeaders(request.headers());
    let span = trace_context::invocation(Trigger::Http, name, &request_id, &headers);
    trace_context::http_server(&span, &request, "/v1/functions/{name}/invoke");
    let sticky = state.runtime.sticky_header(name);
    let key = sticky
        .and_then(|header| request.headers().get(header))
        .map(|value| value.as_bytes().to_vec());
    let choice = Choice {
        tag,
        sticky_key: key.as_deref(),
    };
    let mut revision = None;
    // Unknown or unservable names are not recorded: they would grow the
    // label set without bound.
    let result = async {
        match state.runtime.choose_when_loaded(name, &choice).await {
            Ok(function) => {
                revision = Some(function.revision());
                let result = invoke_function(&function, request, &request_id).await;
                let status = result.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
                function.record(Trigger::Http, &request_id, status, started.elapsed());
                result
            }
            Err(unknown) => {
                tracing::debug!("invoke: {unknown}");
                Err(ApiError::from(unknown))
            }
        }
    }
    .instrument(span)
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    if let Some(revision) = revision {
        response
            .headers_mut()
            .insert(REVISION_HEADER, HeaderValue::from(revision));
    }
    Ok(response)
}

async fn invoke_function(
    function: &Arc<PreparedFunction>,
    request: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let name = function.name();
    if !function.function().triggers.http {
        return Err(ApiError::not_found(format!(
            "function {name} has no HTTP trigger"
        )));
    }
    let limit = function.max_body();
    if check_length(&request, limit).is_err() {
        return Err(too_large(name, limit).refusing(request.into_body()));
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    // Admitted first: the queue then bounds how many bodies are in memory,
    // and reading the body counts against the deadline.
    let admission = match function.admit(request_id).await {
        Ok(admission) => admission,
        Err(refused) => return Err(ApiError::from(refused).refusing(request.into_body())),
    };
    let body = read_within(name, request.into_body(), limit, admission.remaining()).await?;
    let input = Message {
        content_type,
        body: body.to_vec(),
    };
    Ok(reply(function.run(admission, input).await?))
}

/// The reply message, with each stage's time in `Server-Timing`.
fn reply(invocation: Invocation) -> Response<Body> {
    let mut response = Response::new(full(invocation.output.body));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&invocation.output.content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    if let Some(value) = server_timing(&invocation.timings) {
        headers.insert("server-timing", value);
    }
    response
}
