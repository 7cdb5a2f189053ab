//! Distributed traces: real hosts export over OTLP/HTTP to a receiver that
//! decodes the official protobuf; callers' `traceparent` over HTTP, NATS
//! and JetStream continue into the hosts' spans and out of their messages.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use cascade_tests::host::Host;
use cascade_tests::nats::NatsServer;
use cascade_tests::otlp::{Receiver, Span};
use futures_util::StreamExt;
use std::time::Duration;

/// A caller's trace id and span id, as a `traceparent` would name them.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// `(label, ms)` of each entry of a `Server-Timing` header.
fn server_timing(header: &str) -> Vec<(String, f64)> {
    header
        .split(", ")
        .map(|entry| {
            let part = |key: &str| {
                entry
                    .split(';')
                    .find_map(|p| p.strip_prefix(key))
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string()
            };
            (part("desc="), part("dur=").parse().unwrap_or(f64::NAN))
        })
        .collect()
}

#[test]
fn an_http_invocation_continues_the_callers_trace_with_a_span_per_stage() {
    let receiver = Receiver::start();
    let host = Host::start_logged_with(&["--otlp-endpoint", &receiver.url, "--log-format", "json"]);
    host.publish_examples();
    let response = cascade_tests::host::client()
        .post(format!("{}/v1/functions/embed/invoke", host.url))
        .header("content-type", "text/plain")
        .header("traceparent", traceparent(TRACE, CALLER))
        .body("A man is eating food.")
        .send()
        .expect("answered");
    assert_eq!(response.status(), 200);
    let timing = server_timing(response.headers()["server-timing"].to_str().expect("ascii"));
    assert_eq!(timing.len(), 3, "{timing:?}");
    let spans = receiver.trace(TRACE, |s| {
        named(s, "invoke embed").len() == 1 && s.len() >= 4
    });
    let invoke = named(&spans, "invoke embed");
    assert_eq!(invoke.len(), 1, "{spans:#?}");
    let invoke = invoke[0];
    assert_eq!(
        invoke.parent_span_id, CALLER,
        "the caller's span is the parent"
    );
    assert_eq!(invoke.kind, 2, "a server span");
    assert_eq!(invoke.service, "cascade");
    assert_eq!(invoke.attributes["function"], "embed");
    assert_eq!(invoke.attributes["revision"], "1");
    assert_eq!(invoke.attributes["trigger"], "http");
    assert_eq!(invoke.attributes["status"], "200");
    assert_eq!(invoke.attributes["http.response.status_code"], "200");
    assert_eq!(invoke.attributes["http.request.method"], "POST");
    assert_eq!(
        invoke.attributes["http.route"],
        "/v1/functions/{name}/invoke"
    );
    assert_eq!(
        invoke.events,
        ["admitted", "invoke"],
        "admission, then the log line"
    );
    let request_id = response.headers()["x-request-id"].to_str().expect("ascii");
    assert_eq!(invoke.attributes["request_id"], request_id);
    // One child per stage, in the order and with the durations the caller
    // saw in Server-Timing.
    let mut total = 0.0;
    for (label, ms) in &timing {
        let stage = named(&spans, &format!("stage {label}"));
        assert_eq!(stage.len(), 1, "stage {label}: {spans:#?}");
        assert_eq!(stage[0].parent_span_id, invoke.span_id);
        let traced = stage[0].duration.as_secs_f64() * 1000.0;
        assert!(
            (traced - ms).abs() <= 0.5 + ms * 0.1,
            "stage {label}: span {traced:.3} ms, Server-Timing {ms:.3} ms"
        );
        total += traced;
    }
    let model = named(&spans, "stage minilm-l3@1.0.0");
    assert_eq!(
        model[0].events,
        ["model run"],
        "the model's run in its stage"
    );
    let whole = invoke.duration.as_secs_f64() * 1000.0;
    assert!(
        total <= whole,
        "stages {total:.3} ms within the invocation's {whole:.3} ms"
    );
    // A registry write continues its caller's trace too.
    let publish_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let refused = cascade_tests::host::client()
        .put(format!("{}/v1/functions/nothing", host.url))
        .header("content-type", "application/toml")
        .header("traceparent", traceparent(publish_trace, CALLER))
        .body("name = \"nothing\"\n")
        .send()
        .expect("answered");
    assert_eq!(refused.status(), 400);
    let spans = receiver.trace(publish_trace, |s| !s.is_empty());
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].name, "registry PublishFunction");
    assert_eq!(spans[0].parent_span_id, CALLER);
    assert_eq!(spans[0].attributes["target"], "nothing");
    // The log lines of the request carry the same trace and span ids.
    let log = host.log();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "invoke" && l["function"] == "embed")
        .unwrap_or_else(|| panic!("no invoke line:\n{log}"));
    assert_eq!(line["trace_id"], TRACE, "{line}");
    assert_eq!(
        line["span_id"].as_str(),
        Some(invoke.span_id.as_str()),
        "{line}"
    );
    assert_eq!(line["request_id"], request_id, "{line}");
}

#[test]
fn spans_go_over_grpc_when_asked() {
    let receiver = Receiver::start_grpc();
    let host = Host::start_with(&["--otlp-endpoint", &receiver.url, "--otlp-protocol", "grpc"]);
    host.publish_examples();
    let trace = "6cf92f3577b34da6a3ce929d0e0e4738";
    let response = cascade_tests::host::client()
        .post(format!("{}/v1/functions/embed/invoke", host.url))
        .header("content-type", "text/plain")
        .header("traceparent", traceparent(trace, CALLER))
        .body("over gRPC")
        .send()
        .expect("answered");
    assert_eq!(response.status(), 200);
    let spans = receiver.trace(trace, |s| s.len() >= 4);
    let invoke = named(&spans, "invoke embed");
    assert_eq!(invoke.len(), 1, "{spans:#?}");
    assert_eq!(invoke[0].parent_span_id, CALLER);
    assert_eq!(
        spans.len(),
        4,
        "the invocation and three stages: {spans:#?}"
    );
}

#[test]
fn an_unknown_otlp_protocol_is_refused_at_start() {
    let out = std::process::Command::new(cascade_tests::host::cascade_binary())
        .args([
            "serve",
            "--otlp-endpoint",
            "http://127.0.0.1:9",
            "--otlp-protocol",
            "http/json",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the OTLP protocol is \"http/json\"") && stderr.contains("\"grpc\""),
        "{stderr}"
    );
}

#[test]
fn a_nats_request_continues_the_trace_and_the_reply_carries_it() {
    let receiver = Receiver::start();
    let nats = NatsServer::start();
    let host = Host::start_with(&["--otlp-endpoint", &receiver.url, "--nats", &nats.url()]);
    host.publish_examples();
    let trace = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let reply = runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "text/plain");
        headers.insert("traceparent", traceparent(trace, CALLER).as_str());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let request = client.request_with_headers(
                "embed.requests".to_string(),
                headers.clone(),
                Bytes::from_static(b"A man is eating food."),
            );
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(5), request).await
                && reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .is_none()
            {
                break reply;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "embed.requests never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let spans = receiver.trace(trace, |s| {
        named(s, "invoke embed").len() == 1 && s.len() >= 4
    });
    let invoke = named(&spans, "invoke embed");
    assert_eq!(invoke.len(), 1, "{spans:#?}");
    assert_eq!(invoke[0].parent_span_id, CALLER);
    assert_eq!(invoke[0].kind, 5, "a consumer span");
    assert_eq!(invoke[0].attributes["messaging.system"], "nats");
    assert_eq!(
        invoke[0].attributes["messaging.destination.name"],
        "embed.requests"
    );
    assert_eq!(invoke[0].attributes["trigger"], "nats");
    assert_eq!(
        named(&spans, "stage minilm-l3@1.0.0").len(),
        1,
        "{spans:#?}"
    );
    let carried = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_string());
    assert_eq!(
        carried,
        Some(traceparent(trace, &invoke[0].span_id)),
        "the reply continues the invocation's span"
    );
}

/// `echo` fed by the durable `name` on `events.<name>`, its answers (the
/// message as a tensor, in JSON) sent to `result`.
fn relay(name: &str, result: &str) -> String {
    format!(
        r#"name = "{name}"
[[stages]]
component = "echo@0.1.0"
[triggers.jetstream]
stream = "EVENTS"
subjects = ["events.{name}"]
durable = "{name}"
result_subject = "{result}"
"#
    )
}

#[test]
fn a_jetstream_message_carries_one_trace_across_two_hosts() {
    let receiver = Receiver::start();
    let nats = NatsServer::start_jetstream();
    // Host A answers events.first into events.second, which host B
    // consumes and answers into results.second.
    // The streams exist before the hosts start, as a producer's would.
    let runtime = runtime();
    let (js, results) = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
        js.get_or_create_stream(stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["events.>".into()],
            ..Default::default()
        })
        .await
        .expect("the EVENTS stream");
        let results = js
            .get_or_create_stream(stream::Config {
                name: "RESULTS".into(),
                subjects: vec!["results.>".into()],
                ..Default::default()
            })
            .await
            .expect("the RESULTS stream");
        (js, results)
    });
    let traced = ["--otlp-endpoint", &receiver.url, "--nats", &nats.url()];
    let a = Host::start_with(&traced);
    a.publish_component("echo");
    a.publish_function("first", &relay("first", "events.second"));
    let b = Host::start_with(&traced);
    b.publish_component("echo");
    b.publish_function("second", &relay("second", "results.second"));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let result = runtime.block_on(async {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "text/plain");
        headers.insert("traceparent", traceparent(trace, CALLER).as_str());
        js.publish_with_headers("events.first", headers, Bytes::from_static(b"hello"))
            .await
            .expect("published")
            .await
            .expect("stored");
        let consumer = results
            .create_consumer(jetstream::consumer::pull::Config::default())
            .await
            .expect("a reader of results");
        let mut messages = consumer.messages().await.expect("messages");
        tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("a result within 30 s")
            .expect("a message")
            .expect("readable")
    });
    let answer: serde_json::Value = serde_json::from_slice(&result.payload).expect("JSON");
    assert_eq!(answer["tensors"][0]["name"], "body", "{answer}");
    let spans = receiver.trace(trace, |s| {
        named(s, "invoke first").len() == 1 && named(s, "invoke second").len() == 1
    });
    let (first, second) = (
        named(&spans, "invoke first"),
        named(&spans, "invoke second"),
    );
    assert_eq!((first.len(), second.len()), (1, 1), "{spans:#?}");
    assert_eq!(
        first[0].parent_span_id, CALLER,
        "host A continues the producer's trace"
    );
    assert_eq!(
        second[0].parent_span_id, first[0].span_id,
        "host B continues host A's invocation, through the message A stored"
    );
    assert_eq!(second[0].attributes["trigger"], "jetstream");
    let carried = result
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_string());
    assert_eq!(carried, Some(traceparent(trace, &second[0].span_id)));
}
