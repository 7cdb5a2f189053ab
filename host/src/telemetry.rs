//! OpenTelemetry traces out of the host: the OTLP exporter, set up from
//! `--otlp-endpoint` and the standard `OTEL_*` environment, and the layer
//! that turns the host's `tracing` spans into OpenTelemetry spans.
//!
//! Off unless an endpoint is given (the flag, `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): then no layer is installed and
//! spans cost what the log's own spans cost. `OTEL_SDK_DISABLED=true` turns
//! it off whatever else is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// Where spans come from: only the host's own (not hyper's, h2's or the
/// exporter's, whose spans would feed the exporter back into itself).
const TRACED_TARGET: &str = "cascade_host";

/// How long shutting down may take to send the spans still buffered.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The OTLP transport, from `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// `http/protobuf` (the specification's default).
    HttpProtobuf,
    /// `grpc`.
    Grpc,
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a transport we do not speak.
    #[error(
        "the OTLP protocol is {0:?} (--otlp-protocol or OTEL_EXPORTER_OTLP_PROTOCOL); \
         Cascade exports traces over \"http/protobuf\" or \"grpc\""
    )]
    Protocol(String),
    /// The exporter refused its configuration (a malformed endpoint…).
    #[error("cannot export traces over OTLP: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The trace pipeline of a serving host; [`Traces::shutdown`] sends what
/// is still buffered.
pub struct Traces {
    provider: SdkTracerProvider,
    summary: String,
}

impl Traces {
    /// The exporter, if traces are on: `endpoint` (the flag) or the
    /// environment says where to, `protocol` (the flag) or the environment
    /// how. Must be called inside the tokio runtime (the gRPC transport
    /// needs it).
    pub fn from_env(
        endpoint: Option<&str>,
        protocol: Option<&str>,
    ) -> Result<Option<Traces>, TelemetryError> {
        if env_true("OTEL_SDK_DISABLED") {
            return Ok(None);
        }
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if endpoint.is_none() && !configured {
            return Ok(None);
        }
        let transport = transport(protocol)?;
        let summary = format!(
            "exporting traces over OTLP {} to {}",
            match transport {
                Transport::HttpProtobuf => "http/protobuf",
                Transport::Grpc => "grpc",
            },
            endpoint.unwrap_or("the endpoint OTEL_EXPORTER_OTLP_ENDPOINT names")
        );
        let exporter = match transport {
            Transport::HttpProtobuf => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary);
                if let Some(base) = endpoint {
                    // The flag is a base URL, like the environment variable.
                    builder =
                        builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
                }
                builder.build()?
            }
            Transport::Grpc => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(base) = endpoint {
                    builder = builder.with_endpoint(base);
                }
                builder.build()?
            }
        };
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("cascade");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Some(Traces { provider, summary }))
    }

    /// Where and how spans go, for the log.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The layer that exports the host's spans.
    pub fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let tracer = self.provider.tracer("cascade");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target(TRACED_TARGET, tracing::Level::INFO))
    }

    /// Sends the spans still buffered, waiting at most a few seconds.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!("sending the last spans failed: {e}");
        }
    }
}

fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The transport `flag` names, or else the environment.
fn transport(flag: Option<&str>) -> Result<Transport, TelemetryError> {
    let value = match flag {
        Some(value) => value.to_string(),
        None => std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default(),
    };
    match value.trim() {
        "" | "http/protobuf" => Ok(Transport::HttpProtobuf),
        "grpc" => Ok(Transport::Grpc),
        other => Err(TelemetryError::Protocol(other.to_string())),
    }
}
