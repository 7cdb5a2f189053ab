//! Shadow copies: a served request's input run again on a shadow revision
//! after the caller's answer is ready, on the shadow's own instances and
//! behind its own gate, so a slow, failing or trapping shadow never
//! touches the caller. The two answers are compared, then the shadow's is
//! dropped.

use super::FunctionWatch;
use crate::bindings::Message;
use crate::error::InvokeError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// A shadow's answer, when it is ready.
pub type Answer = Pin<Box<dyn Future<Output = Result<Message, InvokeError>> + Send>>;

/// A revision that can answer a copy of a request.
pub trait ShadowTarget: Send + Sync + 'static {
    /// Admits and runs `input` as request `request_id`.
    fn answer(self: Arc<Self>, request_id: String, input: Message) -> Answer;
}

/// Runs `input` on each of `shadows` (revision, target) in the
/// background, comparing each answer with `served`.
pub fn spawn(
    watch: &Arc<FunctionWatch>,
    shadows: Vec<(u64, Arc<dyn ShadowTarget>)>,
    input: Message,
    served: &Message,
    request_id: &str,
) {
    let served = Arc::new(served.clone());
    for (revision, target) in shadows {
        let (watch, served, input) = (watch.clone(), served.clone(), input.clone());
        let request_id = request_id.to_string();
        let span = tracing::info_span!("shadow", function = %watch.name, revision, request_id = %request_id);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let result = target.answer(request_id, input).await;
                if let Err(e) = &result {
                    tracing::debug!("shadow failed: {e}");
                }
                watch.shadow_finished(revision, &result, &served, started.elapsed());
            }
            .instrument(span),
        );
    }
}
