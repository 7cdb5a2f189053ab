//! The Prometheus metrics a host exports; every metric name lives here.

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::collections::HashMap;

/// Latency buckets in seconds: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric of a host.
pub struct Metrics {
    registry: Registry,
    /// `cascade_requests_total{function, revision, status}`.
    pub requests: IntCounterVec,
    /// `cascade_request_duration_seconds{function, revision}`.
    pub latency: HistogramVec,
    /// `cascade_stage_duration_seconds{function, stage}`.
    pub stage_latency: HistogramVec,
    /// `cascade_instances{function, stage}`: live instances.
    pub instances: IntGaugeVec,
    /// `cascade_instances_busy{function, stage}`.
    pub busy: IntGaugeVec,
    /// `cascade_queued_requests{function}`: waiting for an instance.
    pub queued: IntGaugeVec,
    /// `cascade_cold_starts_total{function, stage}`: instances created on demand.
    pub cold_starts: IntCounterVec,
    /// `cascade_traps_total{function, stage}`: instances discarded after a trap.
    pub traps: IntCounterVec,
    /// `cascade_timeouts_total{function}`: invocations past their deadline.
    pub timeouts: IntCounterVec,
    /// `cascade_compiled_artifacts_total{source}`: `cache` or `compiled`.
    pub compiled: IntCounterVec,
    /// `cascade_snapshots_total{outcome}`: component snapshots `made`,
    /// loaded `cached`, or `refused` (see `crate::snapshot`).
    pub snapshots: IntCounterVec,
    /// `cascade_shape_plans{model}`: model plans specialised to one input shape.
    pub shape_plans: IntGaugeVec,
    /// `cascade_onnxruntime_runs_total{model, threads}`: ONNX Runtime runs by
    /// the threads they used.
    pub onnxruntime_runs: IntCounterVec,
    /// `cascade_onnxruntime_runs_stopped_total{model}`: runs ended early
    /// because every caller had left (deadline, disconnect).
    pub onnxruntime_stopped: IntCounterVec,
    /// `cascade_model_batches_total{function, stage}`: model runs that
    /// served two or more requests (`batch` in the manifest).
    pub model_batches: IntCounterVec,
    /// `cascade_model_batched_requests_total{function, stage}`: requests
    /// those runs served.
    pub model_batched_requests: IntCounterVec,
    /// `cascade_jetstream_pending{function}`: messages of its durable
    /// consumer not yet delivered (the consumer's lag).
    pub jetstream_pending: IntGaugeVec,
    /// `cascade_jetstream_bound{function}`: 1 while this host consumes the
    /// function's durable consumer, 0 while it cannot (no JetStream, say).
    pub jetstream_bound: IntGaugeVec,
    /// `cascade_jetstream_redeliveries_total{function}`: retryable failures
    /// handed back with a backoff.
    pub jetstream_redeliveries: IntCounterVec,
    /// `cascade_jetstream_dead_letters_total{function}`.
    pub jetstream_dead_letters: IntCounterVec,
    /// `cascade_mirror_sync_failures`: what a mirror's last sync could not
    /// copy from its source (functions and artifacts).
    pub mirror_failures: IntGauge,
    /// `cascade_shadow_requests_total{function, revision, status}`: shadow
    /// copies run, by the status the shadow would have answered.
    pub shadow_requests: IntCounterVec,
    /// `cascade_shadow_duration_seconds{function, revision}`.
    pub shadow_latency: HistogramVec,
    /// `cascade_shadow_agreement{function, revision}`: mean agreement of a
    /// shadow's answers with the served ones over its window, 0 to 1.
    pub shadow_agreement: GaugeVec,
    /// `cascade_rollbacks_total{function, revision}`: targets taken out of
    /// a split by its rollback rule.
    pub rollbacks: IntCounterVec,
    /// `cascade_feedback_total{function, revision}`: feedback scored.
    pub feedback: IntCounterVec,
    /// `cascade_prediction_accuracy{function, revision}`: share of right
    /// labels over the latest feedback.
    pub accuracy: GaugeVec,
    /// `cascade_prediction_mean_absolute_error{function, revision}`.
    pub mean_absolute_error: GaugeVec,
    /// `cascade_drift_score{function, revision, signal}`: the population
    /// stability index of a signal's latest window against its reference.
    pub drift_score: GaugeVec,
    /// `cascade_model_backend{backend}`: 1 for the engine models run on
    /// (`tract` or `onnxruntime`).
    pub model_backend: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let float_gauge =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<HistogramVec> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        Ok(Metrics {
            requests: counter(
                "cascade_requests_total",
                "Invocations by function, revision served and status.",
                &["function", "revision", "status"],
            )?,
            latency: histogram(
                "cascade_request_duration_seconds",
                "Invocation latency by function and revision served.",
                &["function", "revision"],
            )?,
            stage_latency: histogram(
                "cascade_stage_duration_seconds",
                "Stage latency.",
                &["function", "stage"],
            )?,
            instances: gauge(
                "cascade_instances",
                "Live instances per stage.",
                &["function", "stage"],
            )?,
            busy: gauge(
                "cascade_instances_busy",
                "Busy instances per stage.",
                &["function", "stage"],
            )?,
            queued: gauge(
                "cascade_queued_requests",
                "Requests waiting for an instance.",
                &["function"],
            )?,
            cold_starts: counter(
                "cascade_cold_starts_total",
                "Instances created on demand.",
                &["function", "stage"],
            )?,
            traps: counter(
                "cascade_traps_total",
                "Instances discarded after a trap.",
                &["function", "stage"],
            )?,
            timeouts: counter(
                "cascade_timeouts_total",
                "Invocations past their deadline.",
                &["function"],
            )?,
            compiled: counter(
                "cascade_compiled_artifacts_total",
                "Components loaded, by source.",
                &["source"],
            )?,
            snapshots: counter(
                "cascade_snapshots_total",
                "Component snapshots after `initialize`, by outcome: made, cached, refused.",
                &["outcome"],
            )?,
            shape_plans: gauge(
                "cascade_shape_plans",
                "Model plans specialised to one input shape.",
                &["model"],
            )?,
            onnxruntime_runs: counter(
                "cascade_onnxruntime_runs_total",
                "ONNX Runtime model runs by the threads they used.",
                &["model", "threads"],
            )?,
            onnxruntime_stopped: counter(
                "cascade_onnxruntime_runs_stopped_total",
                "ONNX Runtime model runs ended early because every caller had left.",
                &["model"],
            )?,
            model_batches: counter(
                "cascade_model_batches_total",
                "Model runs that served two or more requests.",
                &["function", "stage"],
            )?,
            model_batched_requests: counter(
                "cascade_model_batched_requests_total",
                "Requests served by model runs shared with others.",
                &["function", "stage"],
            )?,
            jetstream_pending: gauge(
                "cascade_jetstream_pending",
                "Messages of the function's JetStream consumer not yet delivered.",
                &["function"],
            )?,
            jetstream_bound: gauge(
                "cascade_jetstream_bound",
                "1 while this host consumes the function's JetStream consumer.",
                &["function"],
            )?,
            jetstream_redeliveries: counter(
                "cascade_jetstream_redeliveries_total",
                "JetStream messages handed back for redelivery after a retryable failure.",
                &["function"],
            )?,
            jetstream_dead_letters: counter(
                "cascade_jetstream_dead_letters_total",
                "JetStream messages sent to the dead letters and terminated.",
                &["function"],
            )?,
            mirror_failures: {
                let g = IntGauge::new(
                    "cascade_mirror_sync_failures",
                    "Functions and artifacts the last mirror sync could not copy.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            shadow_requests: counter(
                "cascade_shadow_requests_total",
                "Shadow copies run, by the status the shadow answered.",
                &["function", "revision", "status"],
            )?,
            shadow_latency: histogram(
                "cascade_shadow_duration_seconds",
                "Latency of shadow copies.",
                &["function", "revision"],
            )?,
            shadow_agreement: float_gauge(
                "cascade_shadow_agreement",
                "Mean agreement of a shadow's answers with the served ones, 0 to 1.",
                &["function", "revision"],
            )?,
            rollbacks: counter(
                "cascade_rollbacks_total",
                "Traffic targets taken out of a split by its rollback rule.",
                &["function", "revision"],
            )?,
            feedback: counter(
                "cascade_feedback_total",
                "Feedback scored against remembered answers.",
                &["function", "revision"],
            )?,
            accuracy: float_gauge(
                "cascade_prediction_accuracy",
                "Share of right labels over the latest feedback.",
                &["function", "revision"],
            )?,
            mean_absolute_error: float_gauge(
                "cascade_prediction_mean_absolute_error",
                "Mean absolute error over the latest feedback.",
                &["function", "revision"],
            )?,
            drift_score: float_gauge(
                "cascade_drift_score",
                "Population stability index of a signal's latest window against its reference.",
                &["function", "revision", "signal"],
            )?,
            model_backend: gauge(
                "cascade_model_backend",
                "The engine models run on: 1 for the one in use.",
                &["backend"],
            )?,
            registry,
        })
    }

    /// Records one finished invocation, whichever trigger it came through.
    pub fn observe_request(
        &self,
        function: &str,
        revision: u64,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        let revision = revision.to_string();
        self.requests
            .with_label_values(&[function, &revision, &status.to_string()])
            .inc();
        self.latency
            .with_label_values(&[function, &revision])
            .observe(elapsed.as_secs_f64());
    }

    /// Removes every label set of a function that is no longer served,
    /// so deleting functions does not grow the exposition for ever.
    pub fn forget_function(&self, function: &str) {
        forget(&self.requests, function);
        forget(&self.latency, function);
        forget(&self.stage_latency, function);
        forget(&self.instances, function);
        forget(&self.busy, function);
        forget(&self.queued, function);
        forget(&self.cold_starts, function);
        forget(&self.traps, function);
        forget(&self.timeouts, function);
        forget(&self.model_batches, function);
        forget(&self.model_batched_requests, function);
        forget(&self.shadow_requests, function);
        forget(&self.shadow_latency, function);
        forget(&self.shadow_agreement, function);
        forget(&self.rollbacks, function);
        forget(&self.feedback, function);
        forget(&self.accuracy, function);
        forget(&self.mean_absolute_error, function);
        forget(&self.drift_score, function);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Removes the label sets of `vec` whose `function` label is `function`.
fn forget<T: MetricVecBuilder>(vec: &MetricVec<T>, function: &str) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if labels.get("function") == Some(&function) {
                let _ = vec.remove(&labels);
            }
        }
    }
}
