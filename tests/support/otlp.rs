//! An OTLP trace receiver on loopback (HTTP/protobuf or gRPC): what a collector would get
//! from a host, decoded with the official OpenTelemetry protobuf
//! definitions (the `opentelemetry-proto` crate).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One span as received.
#[derive(Debug, Clone)]
pub struct Span {
    /// The service that sent it (`service.name`).
    pub service: String,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id; empty for a root.
    pub parent_span_id: String,
    /// Its name.
    pub name: String,
    /// `SPAN_KIND_*` number (2 server, 5 consumer, 1 internal).
    pub kind: i32,
    /// Its attributes, each value as text.
    pub attributes: BTreeMap<String, String>,
    /// Its duration.
    pub duration: Duration,
    /// Its events' names, in order.
    pub events: Vec<String>,
}

/// A receiver listening on a free loopback port until dropped.
pub struct Receiver {
    /// The base URL to give `--otlp-endpoint`.
    pub url: String,
    received: Arc<Received>,
}

/// What came in: every span (when kept) and how many.
#[derive(Default)]
struct Received {
    keep: bool,
    spans: Mutex<Vec<Span>>,
    count: AtomicU64,
}

impl Receiver {
    /// Starts listening, keeping every span for [`Receiver::trace`].
    pub fn start() -> Receiver {
        Receiver::listening(true)
    }

    /// Starts listening, decoding and counting spans but keeping none
    /// (for load that would otherwise fill memory).
    pub fn counting() -> Receiver {
        Receiver::listening(false)
    }

    /// Starts listening for OTLP over gRPC instead, keeping every span.
    pub fn start_grpc() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let received = Arc::new(Received {
            keep: true,
            ..Received::default()
        });
        let service = TraceServiceServer::new(Collector(received.clone()));
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio");
            runtime.block_on(async move {
                listener.set_nonblocking(true).expect("non-blocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let incoming = futures_util::stream::unfold(listener, |l| async move {
                    Some((l.accept().await.map(|(stream, _)| stream), l))
                });
                let _ = tonic::transport::Server::builder()
                    .serve_with_incoming(service, incoming)
                    .await;
            });
        });
        Receiver { url, received }
    }

    fn listening(keep: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let received = Arc::new(Received {
            keep,
            ..Received::default()
        });
        let shared = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        Receiver { url, received }
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.received.count.load(Ordering::SeqCst)
    }

    /// Every span of `trace_id` received once `done` holds for them, or
    /// what arrived within 20 s.
    pub fn trace(&self, trace_id: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Span> = self
                .received
                .spans
                .lock()
                .map(|all| {
                    all.iter()
                        .filter(|s| s.trace_id == trace_id)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The gRPC trace service: each export's spans into `Received`.
struct Collector(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let spans = flatten(request);
        self.count.fetch_add(spans.len() as u64, Ordering::SeqCst);
        if self.keep
            && let Ok(mut all) = self.spans.lock()
        {
            all.extend(spans);
        }
    }
}

/// Answers OTLP exports on one connection until the client closes it.
fn serve(stream: TcpStream, received: &Received) {
    let mut writer = stream.try_clone().expect("a second handle");
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(request) = ExportTraceServiceRequest::decode(body.as_slice()) {
            let spans = flatten(request);
            received
                .count
                .fetch_add(spans.len() as u64, Ordering::SeqCst);
            if received.keep
                && let Ok(mut all) = received.spans.lock()
            {
                all.extend(spans);
            }
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .map(|r| attributes(r.attributes))
            .and_then(|mut a| a.remove("service.name"))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    service: service.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(span.attributes),
                    duration: Duration::from_nanos(
                        span.end_time_unix_nano
                            .saturating_sub(span.start_time_unix_nano),
                    ),
                    events: span.events.into_iter().map(|e| e.name).collect(),
                });
            }
        }
    }
    spans
}

fn attributes(
    list: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
) -> BTreeMap<String, String> {
    list.into_iter()
        .map(|kv| {
            let value = match kv.value.and_then(|v| v.value) {
                Some(Value::StringValue(s)) => s,
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key, value)
        })
        .collect()
}
