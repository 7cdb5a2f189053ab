//! W3C trace context (`traceparent`, `tracestate`) in and out of every
//! trigger's headers, and the invocation span that continues a caller's
//! trace.
//!
//! Every trigger opens one [`invocation`] span per request, a child of the
//! caller's span when the request carried a `traceparent`. Its `trace_id`
//! and `span_id` fields are recorded on it, so every log line inside the
//! request joins the trace, with or without an exporter.

use crate::pipeline::Trigger;
use crate::routes::Matched;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads trace context from HTTP headers (and gRPC metadata, its `AsRef`).
pub struct HttpHeaders<'a>(pub &'a hyper::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(hyper::header::HeaderName::as_str)
            .collect()
    }
}

/// Reads trace context from NATS message headers.
pub struct NatsHeaders<'a>(pub Option<&'a async_nats::HeaderMap>);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0?.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|headers| headers.iter().map(|(name, _)| name.as_ref()).collect())
            .unwrap_or_default()
    }
}

/// Writes trace context into NATS message headers.
pub struct NatsHeadersMut<'a>(pub &'a mut async_nats::HeaderMap);

impl Injector for NatsHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// The invocation span of one request through `trigger` to `function`,
/// continuing the trace `carrier` names (if it names one).
pub fn invocation(
    trigger: Trigger,
    function: &str,
    request_id: &str,
    carrier: &dyn Extractor,
) -> Span {
    let span = tracing::info_span!(
        "invoke",
        otel.name = %format_args!("invoke {function}"),
        otel.kind = kind(trigger),
        otel.status_code = Empty,
        function,
        revision = Empty,
        request_id,
        trigger = trigger.name(),
        status = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(carrier);
    let parent_trace = parent.span().span_context().trace_id();
    // Fails only when no exporter is installed: then the caller's trace id
    // alone goes into the log.
    let exported = span.set_parent(parent).is_ok();
    let context = span.context();
    let own = context.span().span_context().clone();
    if exported && own.is_valid() {
        span.record("trace_id", tracing::field::display(own.trace_id()));
        span.record("span_id", tracing::field::display(own.span_id()));
    } else if parent_trace != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(parent_trace));
    }
    span
}

/// The span of a change to the registry (a publish, a delete, a
/// rollback), continuing the trace of the CLI or pipeline that sent it.
pub fn registry_write(matched: &Matched<'_>, carrier: &dyn Extractor) -> Span {
    let span = tracing::info_span!(
        "registry",
        otel.name = %format_args!("registry {:?}", matched.route),
        otel.kind = "server",
        target = %matched.params.join("@"),
    );
    let _ = span.set_parent(TraceContextPropagator::new().extract(carrier));
    span
}

/// The HTTP server attributes of an invocation span (semantic conventions).
pub fn http_server<B>(span: &Span, request: &hyper::Request<B>, route: &'static str) {
    span.set_attribute("http.request.method", request.method().as_str().to_string());
    span.set_attribute("http.route", route);
    span.set_attribute("url.path", request.uri().path().to_string());
}

/// The messaging attributes of an invocation span of a NATS message.
pub fn messaging(span: &Span, subject: &str, message_id: Option<String>) {
    span.set_attribute("messaging.system", "nats");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", subject.to_string());
    if let Some(id) = message_id {
        span.set_attribute("messaging.message.id", id);
    }
}

/// The RPC attributes of an invocation span of a gRPC call.
pub fn grpc(span: &Span, method: &'static str) {
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", "inference.GRPCInferenceService");
    span.set_attribute("rpc.method", method);
}

/// Writes into `headers` (a result, a dead letter, a reply) the trace
/// context of `span`, the invocation's; without an exporter, the context
/// the `original` message came with, so the trace still joins up.
pub fn carry_nats(
    span: &Span,
    original: Option<&async_nats::HeaderMap>,
    headers: &mut async_nats::HeaderMap,
) {
    let propagator = TraceContextPropagator::new();
    let own = span.context();
    let context = if own.span().span_context().is_valid() {
        own
    } else {
        propagator.extract(&NatsHeaders(original))
    };
    propagator.inject_context(&context, &mut NatsHeadersMut(headers));
}

/// The span kind: requests answered are `server`; messages taken from a
/// subject or a stream are `consumer`.
fn kind(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Http | Trigger::OipRest | Trigger::OipGrpc => "server",
        Trigger::Nats | Trigger::JetStream => "consumer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_trace_id_reaches_the_log_fields_without_an_exporter() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "traceparent",
            hyper::header::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let parent = TraceContextPropagator::new().extract(&HttpHeaders(&headers));
        assert_eq!(
            parent.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut nats = async_nats::HeaderMap::new();
        nats.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let parent = TraceContextPropagator::new().extract(&NatsHeaders(Some(&nats)));
        assert_eq!(
            parent.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
        assert!(NatsHeaders(None).get("traceparent").is_none());
        let mut carried = async_nats::HeaderMap::new();
        carry_nats(&Span::none(), Some(&nats), &mut carried);
        assert_eq!(
            carried.get("traceparent").map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
