//! The host's own log on stderr: text for people, colour only when stderr
//! is a terminal (and `NO_COLOR` is unset), so files and pipes get no
//! escape codes; or one JSON object per line for log pipelines
//! (`--log-format json`), every event's fields at the top level.

use crate::log_json::JsonLine;
use crate::telemetry::Traces;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::prelude::*;

/// How the log is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `message`, the event's fields and those of its spans (`function`,
    /// `revision`, `stage`, `request_id`, `trace_id`, `span_id`…).
    Json,
}

/// The log's filter when `RUST_LOG` is unset: `info`, but ONNX Runtime's
/// own account of each session it builds (hundreds of lines per model) only
/// from `warn`.
pub const DEFAULT_FILTER: &str = "info,ort=warn";

/// Installs the log for this process, and with it the trace exporter's
/// layer when traces are on. `RUST_LOG` filters the log (default
/// [`DEFAULT_FILTER`]); it does not filter traces, which take the host's
/// spans at `info`.
pub fn init(format: LogFormat, traces: Option<&Traces>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let exported = traces.map(Traces::layer);
    let registry = tracing_subscriber::registry().with(exported);
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            registry
                .with(log.with_ansi(colour).with_filter(filter))
                .init();
        }
        LogFormat::Json => registry
            .with(
                log.fmt_fields(JsonFields::new())
                    .event_format(JsonLine)
                    .with_filter(filter),
            )
            .init(),
    }
}
