//! The dashboard at `GET /ui`: one static page (no build step, no assets
//! from elsewhere) that polls `GET /ui/data`, a JSON view of what the host
//! serves and how it fares over the last minutes ([`history`]).
//!
//! The page holds no data, so it needs no scope; the data needs `read`.
//! With `--token-read`, the page asks for a token once and keeps it in the
//! browser's session storage (or takes it from `/ui#token=…`).

pub mod history;

use crate::pipeline::PreparedStage;
use crate::runtime::Runtime;
use history::{Buckets, History, Snapshot};
use prometheus::IntGaugeVec;
use prometheus::core::{Collector, GenericCounterVec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// What `GET /ui/data` answers.
#[derive(Debug, Serialize)]
pub struct View {
    /// Seconds the figures cover (up to five minutes).
    pub window_seconds: f64,
    /// The host's version.
    pub version: &'static str,
    /// Every function served.
    pub functions: Vec<FunctionView>,
    /// What the registry holds.
    pub registry: RegistryView,
}

/// One function.
#[derive(Debug, Serialize)]
pub struct FunctionView {
    /// Its name.
    pub name: String,
    /// The revision served.
    pub revision: u64,
    /// How it is invoked: `http`, `nats`, `jetstream`.
    pub triggers: Vec<&'static str>,
    /// Invocations over the window, per second.
    pub per_second: f64,
    /// Invocations over the window by status (`"200"`, `"503"`…).
    pub statuses: BTreeMap<String, u64>,
    /// Latency quantiles over the window, milliseconds.
    pub p50_ms: Option<f64>,
    /// Latency quantiles over the window, milliseconds.
    pub p99_ms: Option<f64>,
    /// Requests waiting for admission now.
    pub queued: usize,
    /// Scaling bound.
    pub max_instances: u32,
    /// Its stages, first to last.
    pub stages: Vec<StageView>,
    /// Its durable consumer, when it has a JetStream trigger.
    pub jetstream: Option<JetStreamView>,
    /// Its traffic split (empty: every request to `revision`).
    pub traffic: Vec<TargetView>,
    /// What feedback, shadows and drift say of each watched revision.
    pub quality: Vec<crate::operations::RevisionQuality>,
    /// The drift score above which a signal has drifted.
    pub drift_threshold: f64,
}

/// One target of a traffic split.
#[derive(Debug, Serialize)]
pub struct TargetView {
    /// The revision it serves (`latest` resolved).
    pub revision: u64,
    /// Its share of untagged requests.
    pub percent: u8,
    /// Its tag, if any.
    pub tag: Option<String>,
    /// Whether it only gets copies.
    pub shadow: bool,
}

/// One stage of a function.
#[derive(Debug, Serialize)]
pub struct StageView {
    /// `name@version`.
    pub label: String,
    /// `preprocessor`, `postprocessor`, `inferencer` or `model`.
    pub kind: &'static str,
    /// Runs over the window, per second.
    pub per_second: f64,
    /// Latency quantiles over the window, milliseconds.
    pub p50_ms: Option<f64>,
    /// Latency quantiles over the window, milliseconds.
    pub p99_ms: Option<f64>,
    /// Live instances now (components only).
    pub instances: Option<usize>,
    /// Busy instances now (components only).
    pub busy: Option<usize>,
}

/// A function's durable consumer.
#[derive(Debug, Serialize)]
pub struct JetStreamView {
    /// Stream and durable.
    pub durable: String,
    /// Messages not yet delivered (the lag).
    pub pending: i64,
    /// Whether the consumer is bound now.
    pub bound: bool,
    /// Since the host started.
    pub redeliveries: u64,
    /// Since the host started.
    pub dead_letters: u64,
}

/// What the registry holds, by `name@version`.
#[derive(Debug, Serialize)]
pub struct RegistryView {
    /// Components, with their world.
    pub components: Vec<(String, &'static str)>,
    /// Models.
    pub models: Vec<String>,
}

/// The view now, against `history`.
pub fn view(runtime: &Runtime, history: &History) -> View {
    let metrics = runtime.metrics();
    let at = Instant::now();
    let (window, over) = history.window(&Snapshot::take(metrics), at);
    let seconds = over.as_secs_f64().max(1.0);
    let mut functions: Vec<FunctionView> = runtime
        .served()
        .iter()
        .map(|function| {
            let name = function.name();
            let status = function.status();
            let manifest = function.function();
            let requests = window.requests.get(name).cloned().unwrap_or_default();
            let stages = function
                .stages()
                .iter()
                .map(|stage| {
                    let key = (name.to_string(), stage.label().to_string());
                    let runs = window.stages.get(&key).cloned().unwrap_or_default();
                    let pool = status.stages.iter().find(|s| s.stage == stage.label());
                    StageView {
                        label: stage.label().to_string(),
                        kind: match stage {
                            PreparedStage::Component { world, .. } => world.name(),
                            PreparedStage::Model { .. } => "model",
                        },
                        per_second: runs.count as f64 / seconds,
                        p50_ms: millis(&runs, 0.5),
                        p99_ms: millis(&runs, 0.99),
                        instances: pool.map(|p| p.instances),
                        busy: pool.map(|p| p.busy),
                    }
                })
                .collect();
            let traffic = runtime
                .split(name)
                .map(|split| {
                    split
                        .traffic()
                        .targets
                        .iter()
                        .map(|t| TargetView {
                            revision: t.revision.resolve(function.revision()),
                            percent: t.percent,
                            tag: t.tag.clone(),
                            shadow: t.shadow,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let triggers = &manifest.triggers;
            FunctionView {
                name: name.to_string(),
                revision: function.revision(),
                triggers: [
                    (triggers.http, "http"),
                    (triggers.nats.is_some(), "nats"),
                    (triggers.jetstream.is_some(), "jetstream"),
                ]
                .into_iter()
                .filter_map(|(on, trigger)| on.then_some(trigger))
                .collect(),
                per_second: requests.count as f64 / seconds,
                statuses: window
                    .statuses
                    .iter()
                    .filter(|((f, _), n)| f == name && **n > 0)
                    .map(|((_, status), n)| (status.clone(), *n))
                    .collect(),
                p50_ms: millis(&requests, 0.5),
                p99_ms: millis(&requests, 0.99),
                queued: status.queued,
                max_instances: status.max_instances,
                stages,
                jetstream: triggers.jetstream.as_ref().map(|js| JetStreamView {
                    durable: format!("{}/{}", js.stream, js.durable),
                    pending: gauge(&metrics.jetstream_pending, name),
                    bound: gauge(&metrics.jetstream_bound, name) > 0,
                    redeliveries: counter(&metrics.jetstream_redeliveries, name),
                    dead_letters: counter(&metrics.jetstream_dead_letters, name),
                }),
                traffic,
                quality: function.watch().quality(),
                drift_threshold: manifest.monitoring.drift.threshold,
            }
        })
        .collect();
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    View {
        window_seconds: over.as_secs_f64(),
        version: env!("CARGO_PKG_VERSION"),
        functions,
        registry: registry(runtime),
    }
}

fn registry(runtime: &Runtime) -> RegistryView {
    let registry = runtime.registry();
    RegistryView {
        components: registry
            .components()
            .unwrap_or_default()
            .into_iter()
            .map(|c| (format!("{}@{}", c.name, c.version), c.world.name()))
            .collect(),
        models: registry
            .models()
            .unwrap_or_default()
            .into_iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect(),
    }
}

fn millis(buckets: &Buckets, q: f64) -> Option<f64> {
    buckets.quantile(q).map(|s| (s * 1e5).round() / 100.0)
}

/// The value of a per-function gauge, read without creating its label set.
fn gauge(vec: &IntGaugeVec, function: &str) -> i64 {
    per_function(vec.collect(), function, |m| m.get_gauge().get_value()).map_or(0, |v| v as i64)
}

/// The value of a per-function counter, read without creating its label set.
fn counter<P: prometheus::core::Atomic>(vec: &GenericCounterVec<P>, function: &str) -> u64 {
    per_function(vec.collect(), function, |m| m.get_counter().get_value()).map_or(0, |v| v as u64)
}

fn per_function(
    families: Vec<prometheus::proto::MetricFamily>,
    function: &str,
    value: impl Fn(&prometheus::proto::Metric) -> f64,
) -> Option<f64> {
    families.iter().flat_map(|f| f.get_metric()).find_map(|m| {
        m.get_label()
            .iter()
            .any(|l| l.name() == "function" && l.value() == function)
            .then(|| value(m))
    })
}
