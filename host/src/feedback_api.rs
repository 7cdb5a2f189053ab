//! `POST /v1/functions/{name}/feedback`: the true label or value of an
//! answer the function gave, named by its request id, scored into the
//! quality of the revision that gave it.
//!
//! The body is one `{"request_id": ..., "label": ...}` (or `"value": N`),
//! or an array of them (each answered in turn, in a `results` array).

use crate::http::{ApiError, Body, HttpState, json, read_body};
use crate::operations::feedback::{Feedback, FeedbackError};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest feedback body.
const MAX_FEEDBACK_BYTES: u64 = 1 << 20;

/// Scores the feedback in `request` for function `name`.
pub async fn feedback(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let function = state.runtime.function_when_loaded(name).await?;
    let body = read_body(request.into_body(), MAX_FEEDBACK_BYTES).await?;
    let expected = "expected JSON {\"request_id\": ID, \"label\": L} or {\"request_id\": ID, \"value\": N}, or an array of them";
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("{expected}: {e}")))?;
    let capacity = function.function().monitoring.feedback as usize;
    let watch = function.watch();
    let score = |item: Value| -> Result<Value, ApiError> {
        let feedback: Feedback = serde_json::from_value(item)
            .map_err(|e| ApiError::invalid(format!("{expected}: {e}")))?;
        let scored = watch.feedback(&feedback, capacity).map_err(refused)?;
        serde_json::to_value(scored).map_err(ApiError::internal)
    };
    match value {
        Value::Array(items) => {
            let results: Vec<Value> = items
                .into_iter()
                .map(|item| match score(item) {
                    Ok(scored) => scored,
                    Err(e) => json!({ "error": e.message, "status": e.status.as_u16() }),
                })
                .collect();
            Ok(json(StatusCode::OK, &json!({ "results": results })))
        }
        item => Ok(json(StatusCode::OK, &score(item)?)),
    }
}

/// Feedback not counted: 409 when the function keeps no answers, 404 for
/// an answer not remembered, 400 for feedback that does not fit it.
fn refused(why: FeedbackError) -> ApiError {
    match &why {
        FeedbackError::Off(_) => {
            ApiError::new(StatusCode::CONFLICT, "feedback_off", why.to_string())
        }
        FeedbackError::Unknown { .. } => ApiError::not_found(why),
        FeedbackError::Mismatch(_) => ApiError::invalid(why),
    }
}
