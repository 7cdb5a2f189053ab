//! Closed-loop load over HTTP and gRPC with one generator, for the OIP
//! section: wrk speaks no gRPC and `perf_analyzer` has no wheel for this
//! machine, so REST and gRPC, Cascade and MLServer are all driven by these
//! loops (one tokio thread, as wrk runs one, each connection its own
//! socket, every answer checked). Results have wrk's shape.

use crate::stats::Latency;
use crate::wrk::WrkRun;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// The generated OIP gRPC client (`host/proto/grpc_predict_v2.proto`).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// One request the load repeats.
#[derive(Clone)]
pub enum Call {
    /// A POST with these headers and body; success is a 200.
    Http {
        /// Full URL.
        url: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
        /// The body.
        body: Bytes,
    },
    /// A `ModelInfer` to `endpoint` (`http://host:port`); success is OK.
    Grpc {
        /// Where the service listens.
        endpoint: String,
        /// The request.
        request: proto::ModelInferRequest,
    },
}

impl Call {
    /// Where the call goes, for reports.
    pub fn target(&self) -> String {
        match self {
            Call::Http { url, .. } => url.clone(),
            Call::Grpc { endpoint, request } => {
                format!("{endpoint} ModelInfer {}", request.model_name)
            }
        }
    }
}

/// What one answer was.
enum Answer {
    Ok,
    /// An error status (HTTP ≥ 400 or a gRPC status).
    Refused(String),
}

/// A connection that sends one call after another.
enum Connection {
    Http(reqwest::Client),
    Grpc(GrpcInferenceServiceClient<tonic::transport::Channel>),
}

impl Connection {
    async fn open(call: &Call) -> Result<Connection> {
        Ok(match call {
            Call::Http { .. } => Connection::Http(
                reqwest::Client::builder()
                    .http1_only()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(10))
                    .build()?,
            ),
            Call::Grpc { endpoint, .. } => {
                // Flow-control windows that grow with the traffic, as
                // gRPC's own clients do (BDP probing), not h2's fixed 64 KiB.
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
                    .timeout(Duration::from_secs(10))
                    .http2_adaptive_window(true)
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {endpoint}"))?;
                Connection::Grpc(
                    GrpcInferenceServiceClient::new(channel)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                )
            }
        })
    }

    /// Sends `call` once; `Err` is a transport failure.
    async fn send(&mut self, call: &Call) -> Result<Answer> {
        match (self, call) {
            (Connection::Http(client), Call::Http { url, headers, body }) => {
                let mut request = client.post(url).body(body.clone());
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let response = request.send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                Ok(if status.as_u16() == 200 {
                    Answer::Ok
                } else {
                    Answer::Refused(format!("{status}: {}", String::from_utf8_lossy(&body)))
                })
            }
            (Connection::Grpc(client), Call::Grpc { request, .. }) => {
                Ok(match client.model_infer(request.clone()).await {
                    Ok(_) => Answer::Ok,
                    Err(status) => Answer::Refused(format!("{status}")),
                })
            }
            _ => bail!("a connection of another protocol than its call"),
        }
    }
}

/// Sends `call` once and fails unless it succeeds (a check before loading).
pub fn once(call: &Call) -> Result<()> {
    runtime()?.block_on(async {
        let mut connection = Connection::open(call).await?;
        match connection.send(call).await? {
            Answer::Ok => Ok(()),
            Answer::Refused(why) => bail!("{}: {why}", call.target()),
        }
    })
}

/// `connections` loops sending `call` back to back for `duration`.
pub fn run(call: &Call, connections: u32, duration: Duration) -> Result<WrkRun> {
    runtime()?.block_on(async {
        let mut opened = Vec::new();
        for _ in 0..connections {
            opened.push(Connection::open(call).await?);
        }
        let started = Instant::now();
        let end = started + duration;
        let loops = opened.into_iter().map(|mut connection| async move {
            let mut tally = Tally::default();
            while Instant::now() < end {
                let sent = Instant::now();
                let answer = connection.send(call).await;
                tally.latencies.push(sent.elapsed());
                match answer {
                    Ok(Answer::Ok) => {}
                    Ok(Answer::Refused(why)) => tally.refused(why),
                    Err(error) => {
                        tally.socket_errors += 1;
                        tally.first_error.get_or_insert(format!("{error:#}"));
                    }
                }
            }
            tally
        });
        let tallies = futures_util::future::join_all(loops).await;
        let elapsed = started.elapsed();
        let mut all = Tally::default();
        for tally in tallies {
            all.merge(tally);
        }
        all.into_run(elapsed, call)
    })
}

/// A measured run ([`run_clean`]) or a warm-up ([`run`]), as
/// [`crate::context::Bench::in_rounds`] asks.
pub fn measure(call: &Call, connections: u32, duration: Duration, clean: bool) -> Result<WrkRun> {
    if clean {
        run_clean(call, connections, duration)
    } else {
        run(call, connections, duration)
    }
}

/// Like [`run`], but a run with any failed answer is an error naming it.
pub fn run_clean(call: &Call, connections: u32, duration: Duration) -> Result<WrkRun> {
    let run = run(call, connections, duration)?;
    if run.non2xx > 0 || run.socket_errors > 0 {
        bail!(
            "{} at {connections} connections: {} of {} answers failed and {} transport errors; \
             a run with errors is not a result",
            call.target(),
            run.non2xx,
            run.requests,
            run.socket_errors
        );
    }
    Ok(run)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What the loops saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    refused: u64,
    socket_errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn refused(&mut self, why: String) {
        self.refused += 1;
        self.first_error.get_or_insert(why);
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.refused += other.refused;
        self.socket_errors += other.socket_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn into_run(self, elapsed: Duration, call: &Call) -> Result<WrkRun> {
        if let Some(error) = &self.first_error {
            eprintln!("cascade-bench:   {}: first failure: {error}", call.target());
        }
        if self.latencies.is_empty() {
            bail!("no answer from {}", call.target());
        }
        let latency = Latency::of(&self.latencies);
        Ok(WrkRun {
            requests: self.latencies.len() as u64,
            duration_us: elapsed.as_micros() as u64,
            non2xx: self.refused,
            socket_errors: self.socket_errors,
            p50_us: latency.p50_us,
            p99_us: latency.p99_us,
        })
    }
}
