//! The OIP REST routes on the host's listener: server metadata, health,
//! model metadata and readiness, and inference. Every function is a model;
//! its revisions are the model's versions, and only the revision served
//! answers. Inference goes through the same admission, limits, deadline,
//! queue and metrics as `/v1`.

use super::codec;
use super::infer::{self, for_inference, invalid, served};
use super::metadata;
use crate::http::{
    ApiError, Body, HttpState, check_length, full, json, read_within, server_timing, too_large,
};
use crate::pipeline::{PreparedFunction, Trigger};
use crate::routes::{Matched, Route};
use crate::trace_context::{self, HttpHeaders};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The header that says where a binary request's or response's JSON ends.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Serves the `/v2` routes; errors are `{"error": "..."}`.
pub async fn route(
    state: &Arc<HttpState>,
    matched: &Matched<'_>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (name, version) = (matched.param(0), matched.params.get(1).copied());
    match matched.route {
        Route::OipServer => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "name": "cascade",
                "version": env!("CARGO_PKG_VERSION"),
                "extensions": ["binary_tensor_data"],
            }),
        )),
        Route::OipLive => Ok(json(StatusCode::OK, &serde_json::json!({ "live": true }))),
        Route::OipReady => {
            let ready = state.is_ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json(status, &serde_json::json!({ "ready": ready })))
        }
        Route::OipModel | Route::OipModelVersion => model_metadata(state, name, version).await,
        Route::OipModelReady | Route::OipModelVersionReady => {
            model_ready(state, name, version).await
        }
        Route::OipInfer | Route::OipInferVersion => infer(state, name, version, request).await,
        other => Err(ApiError::internal(format!(
            "route {other:?} reached the OIP routes"
        ))),
    }
}

async fn model_metadata(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let function = served(state, name, version).await?;
    let versions: Vec<String> = state
        .runtime
        .registry()
        .function_revisions(name)?
        .iter()
        .map(|r| r.record.revision.to_string())
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "name": name,
            "versions": versions,
            "platform": "cascade",
            "inputs": metadata::inputs(&function),
            "outputs": metadata::outputs(&function),
        }),
    ))
}

async fn model_ready(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    match served(state, name, version).await {
        Ok(_) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "ready": true }),
        )),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => Ok(json(
            e.status,
            &serde_json::json!({ "name": name, "ready": false, "error": e.message }),
        )),
        Err(e) => Err(e),
    }
}

/// `POST /v2/models/{name}[/versions/{v}]/infer`, recorded like `/v1`.
async fn infer(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let request_id = state.request_id(request.headers());
    let headers = HttpHeaders(request.headers());
    let span = trace_context::invocation(Trigger::OipRest, name, &request_id, &headers);
    trace_context::http_server(&span, &request, "/v2/models/{name}/infer");
    async {
        let function = for_inference(state, name, version).await?;
        let result = infer_function(&function, request, &request_id).await;
        let status = result.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
        function.record(Trigger::OipRest, &request_id, status, started.elapsed());
        result
    }
    .instrument(span)
    .await
}

async fn infer_function(
    function: &Arc<PreparedFunction>,
    request: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let name = function.name();
    let limit = function.max_body();
    if check_length(&request, limit).is_err() {
        return Err(too_large(name, limit).refusing(request.into_body()));
    }
    let header_length = match request.headers().get(HEADER_LENGTH) {
        Some(value) => match value.to_str().ok().and_then(|v| v.trim().parse().ok()) {
            Some(length) => Some(length),
            None => {
                let refused = ApiError::invalid("Inference-Header-Content-Length is not a number");
                return Err(refused.refusing(request.into_body()));
            }
        },
        None => None,
    };
    let admission = match function.admit(request_id).await {
        Ok(admission) => admission,
        Err(refused) => return Err(ApiError::from(refused).refusing(request.into_body())),
    };
    let body = read_within(name, request.into_body(), limit, admission.remaining()).await?;
    let (request, inputs) = codec::decode(&body, header_length).map_err(invalid)?;
    let answer = infer::run(function, admission, &request, inputs).await?;
    let version = function.revision().to_string();
    let encoded = codec::encode(request.id.as_deref(), name, &version, answer.outputs);
    let mut response = Response::new(full(encoded.body));
    let headers = response.headers_mut();
    match encoded.header_length {
        Some(length) => {
            headers.insert(HEADER_LENGTH, HeaderValue::from(length));
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        }
        None => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    if let Some(timing) = server_timing(&answer.timings) {
        headers.insert("server-timing", timing);
    }
    Ok(response)
}
