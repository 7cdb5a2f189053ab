//! The HTTP routes of model operations.
//!
//! - `POST /v1/functions/{name}/feedback`: the true label or value of an
//!   answer the function gave, named by its request id, scored into the
//!   quality of the revision that gave it. The body is one
//!   `{"request_id": ..., "label": ...}` (or `"value": N`), or an array of
//!   them (each answered in turn, in a `results` array).
//! - `PUT /v1/functions/{name}/drift/reference`: example inputs, run
//!   through the function and summarised, become a revision's drift
//!   reference in place of its first requests.

use crate::bindings::Message;
use crate::http::{ApiError, Body, HttpState, json, read_body};
use crate::operations::feedback::{Feedback, FeedbackError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cascade_registry::manifest::DRIFT_SUMMARIES;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
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
    // Each revision remembers as many answers as its manifest says; the
    // function's feedback window is the largest of those it serves.
    let split = state.runtime.split(name);
    let served = split.iter().flat_map(|s| s.revisions());
    let capacity = std::iter::once(&function)
        .chain(served)
        .map(|f| f.function().monitoring.feedback as usize)
        .max()
        .unwrap_or(0);
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

/// Largest drift reference upload.
const MAX_REFERENCE_BYTES: u64 = 64 << 20;

/// Failures listed in a reference upload's answer, at most.
const LISTED_FAILURES: usize = 10;

/// A drift reference as uploaded: example inputs, as text or base64.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceUpload {
    /// The revision it is for (default: the head).
    #[serde(default)]
    revision: Option<u64>,
    /// The inputs' content type.
    #[serde(default = "text_plain")]
    content_type: String,
    /// Text inputs.
    #[serde(default)]
    inputs: Vec<String>,
    /// Binary inputs, base64.
    #[serde(default)]
    inputs_base64: Vec<String>,
}

fn text_plain() -> String {
    "text/plain".into()
}

/// Runs the uploaded example inputs through the revision and makes their
/// summaries its drift reference.
pub async fn drift_reference(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let head = state.runtime.function_when_loaded(name).await?;
    let body = read_body(request.into_body(), MAX_REFERENCE_BYTES).await?;
    let upload: ReferenceUpload = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "expected JSON {{\"revision\": N, \"content_type\": T, \"inputs\": [TEXT, ...]}} or \"inputs_base64\": [...]: {e}"
        ))
    })?;
    let function = match upload.revision {
        None => head,
        Some(number) if number == head.revision() => head,
        Some(number) => state
            .runtime
            .split(name)
            .and_then(|split| split.revision(number))
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "function {name} does not serve revision {number} on this host (serve it in its traffic split first)"
                ))
            })?,
    };
    let mut inputs = Vec::with_capacity(upload.inputs.len() + upload.inputs_base64.len());
    inputs.extend(upload.inputs.into_iter().map(String::into_bytes));
    for (i, encoded) in upload.inputs_base64.iter().enumerate() {
        let bytes = BASE64
            .decode(encoded)
            .map_err(|e| ApiError::invalid(format!("inputs_base64[{i}] is not base64: {e}")))?;
        inputs.push(bytes);
    }
    let (fewest, most) = (
        *DRIFT_SUMMARIES.start() as usize,
        *DRIFT_SUMMARIES.end() as usize,
    );
    if !(fewest..=most).contains(&inputs.len()) {
        return Err(ApiError::invalid(format!(
            "a drift reference takes {fewest} to {most} example inputs, not {}",
            inputs.len()
        )));
    }
    let mut samples = Vec::with_capacity(inputs.len());
    let mut failed = Vec::new();
    for (i, body) in inputs.into_iter().enumerate() {
        let input = Message {
            content_type: upload.content_type.clone(),
            body,
        };
        match function
            .summarise(&format!("drift-reference-{i}"), input)
            .await
        {
            Ok(sample) => samples.push(sample),
            Err(e) => failed.push(json!({ "input": i, "error": e.to_string() })),
        }
    }
    let failures = failed.len();
    failed.truncate(LISTED_FAILURES);
    if samples.len() < fewest {
        let refused = ApiError::invalid(format!(
            "only {} of the example inputs ran ({failures} failed; first: {}); a reference needs {fewest}",
            samples.len(),
            failed
                .first()
                .map(|f| f["error"].to_string())
                .unwrap_or_default()
        ));
        return Err(refused);
    }
    let summaries = samples.len();
    let drift = &function.function().monitoring.drift;
    function
        .watch()
        .set_drift_reference(function.revision(), samples, drift);
    tracing::info!(function = %name, revision = function.revision(), summaries, "drift reference uploaded");
    Ok(json(
        StatusCode::OK,
        &json!({
            "function": name,
            "revision": function.revision(),
            "summaries": summaries,
            "failed": failures,
            "failures": failed,
        }),
    ))
}
