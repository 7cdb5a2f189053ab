//! A function's stages and how one invocation flows through them.
//!
//! `Manifest → Function` happens once, in the registry, at publish; here a
//! function revision becomes a [`PreparedFunction`] (compiled components in pools,
//! optimised model plans), and [`PreparedFunction::invoke`] carries one
//! message through it: a preprocessor turns the message into tensors, a
//! model maps tensors to tensors, a postprocessor receives the previous
//! stage's inputs followed by its outputs and returns the reply message.

use crate::bindings::{Message, Tensor, TensorType};
use crate::error::{InvokeError, StageError};
use crate::metrics::Metrics;
use crate::model::ModelQueue;
use crate::model::wide_runs::RequestInFlight;
use crate::operations::FunctionWatch;
use crate::operations::drift::Sample;
use crate::operations::shadow::{self, Answer, ShadowTarget};
use crate::pool::{Gate, InstancePool, Lease, Refused, StageStatus};
use cascade_registry::manifest::Function;
use cascade_registry::records::{ModelSignature, World};
use opentelemetry::KeyValue;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// One prepared stage.
pub enum PreparedStage {
    /// A component with its instance pool.
    Component {
        /// `name@version`.
        label: String,
        /// Its world.
        world: World,
        /// Its warm instances.
        pool: Arc<InstancePool>,
        /// For a postprocessor: the tensors it receives (`None`: all).
        inputs: Option<Vec<String>>,
    },
    /// A model run natively.
    Model {
        /// `name@version`.
        label: String,
        /// Its runs, queued (and batched, with `batch` > 1).
        queue: Arc<ModelQueue>,
        /// What it takes, and what it gives (the selected outputs).
        signature: ModelSignature,
    },
}

impl PreparedStage {
    /// The stage's label.
    pub fn label(&self) -> &str {
        match self {
            PreparedStage::Component { label, .. } | PreparedStage::Model { label, .. } => label,
        }
    }
}

/// A function revision ready to serve.
pub struct PreparedFunction {
    name: String,
    revision: u64,
    function: Function,
    stages: Vec<PreparedStage>,
    gate: Gate,
    metrics: Arc<Metrics>,
    /// What the host watches of the function (shared by its revisions).
    watch: Arc<FunctionWatch>,
    /// Set once the function is no longer served at all (deleted): its
    /// metric labels are gone, and late requests must not bring them back.
    retired: AtomicBool,
}

impl ShadowTarget for PreparedFunction {
    fn answer(self: Arc<Self>, request_id: String, input: Message) -> Answer {
        Box::pin(async move {
            let admission = self.admit_now(&request_id)?;
            Ok(self.run_message(admission, input).await?.output)
        })
    }
}

/// How a request reached a function, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `POST /v1/functions/{name}/invoke`.
    Http,
    /// `POST /v2/models/{name}/infer` (Open Inference Protocol, REST).
    OipRest,
    /// `ModelInfer` (Open Inference Protocol, gRPC).
    OipGrpc,
    /// A NATS message (the micro service or the manifest's subject).
    Nats,
    /// A message of a durable JetStream consumer.
    JetStream,
}

impl Trigger {
    /// How the log and traces name it.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Http => "http",
            Trigger::OipRest => "oip-rest",
            Trigger::OipGrpc => "oip-grpc",
            Trigger::Nats => "nats",
            Trigger::JetStream => "jetstream",
        }
    }
}

/// A request admitted to a function, holding its slot until dropped.
pub struct Admission {
    request_id: String,
    deadline: Instant,
    _entry: crate::pool::Entry,
    _counted: RequestInFlight,
}

impl Admission {
    /// Brings the deadline forward to at most `within` from now (a caller's
    /// own timeout tighter than the function's); never later.
    pub fn tighten(&mut self, within: Duration) {
        self.deadline = self.deadline.min(Instant::now() + within);
    }

    /// Time left before the invocation's deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A successful invocation: the reply and each stage's duration.
pub struct Invocation {
    /// The last stage's message (tensors a last model stage yields come
    /// as JSON, see [`tensors_as_json`]).
    pub output: Message,
    /// (stage label, duration) in order.
    pub timings: Vec<(String, Duration)>,
}

/// What an invocation carries in or out: a message (what a preprocessor
/// takes and a postprocessor gives) or tensors (what models take and give).
pub enum Payload {
    /// A message.
    Message(Message),
    /// Tensors.
    Tensors(Vec<Tensor>),
}

/// A successful invocation at the tensor level: what the last stage gave,
/// and each stage's duration.
pub struct Outcome {
    /// The last stage's message or tensors.
    pub output: Payload,
    /// (stage label, duration) in order.
    pub timings: Vec<(String, Duration)>,
}

/// What flows between stages.
enum Flow {
    Message(Message),
    Tensors {
        inputs: Vec<Tensor>,
        outputs: Vec<Tensor>,
    },
}

impl PreparedFunction {
    /// Revision `revision` of `function`, whose stages are prepared,
    /// admitting requests through `gate`, watched by `watch`.
    pub fn new(
        revision: u64,
        function: Function,
        stages: Vec<PreparedStage>,
        gate: Gate,
        metrics: Arc<Metrics>,
        watch: Arc<FunctionWatch>,
    ) -> Self {
        PreparedFunction {
            name: function.name.to_string(),
            revision,
            function,
            stages,
            gate,
            metrics,
            watch,
            retired: AtomicBool::new(false),
        }
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The revision served.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// What its manifest declares.
    pub fn function(&self) -> &Function {
        &self.function
    }

    /// What the host watches of the function.
    pub fn watch(&self) -> &Arc<FunctionWatch> {
        &self.watch
    }

    /// Its stages, first to last.
    pub fn stages(&self) -> &[PreparedStage] {
        &self.stages
    }

    /// The function's deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.function.limits.timeout_ms)
    }

    /// Largest accepted body.
    pub fn max_body(&self) -> u64 {
        self.function.limits.max_body_kb.saturating_mul(1024)
    }

    /// Marks the function as no longer served (deleted), before its
    /// metric labels are forgotten.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Records a finished request in the metrics and the log: the one place
    /// every trigger reports to, once per request, with the status its
    /// caller saw.
    pub fn record(&self, trigger: Trigger, request_id: &str, status: u16, elapsed: Duration) {
        if !self.retired.load(Ordering::SeqCst) {
            self.metrics
                .observe_request(&self.name, self.revision, status, elapsed);
            self.watch.outcome(self.revision, status, elapsed);
        }
        let span = tracing::Span::current();
        span.record("revision", self.revision);
        span.record("status", status);
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        if matches!(trigger, Trigger::Http | Trigger::OipRest) {
            span.set_attribute("http.response.status_code", i64::from(status));
        }
        tracing::info!(
            request_id = %request_id,
            function = %self.name,
            revision = self.revision,
            trigger = trigger.name(),
            status,
            elapsed_ms = elapsed.as_millis() as u64,
            "invoke"
        );
    }

    /// Waits for admission (a slot, or a place in the bounded queue), then
    /// runs one invocation through every stage.
    pub async fn invoke(
        self: &Arc<Self>,
        request_id: &str,
        input: Message,
    ) -> Result<Invocation, InvokeError> {
        let admission = self.admit(request_id).await?;
        self.run(admission, input).await
    }

    /// Admission to this function: its deadline starts now. Triggers that
    /// must read a body admit first, so the queue bounds how many bodies
    /// are held in memory at once. `request_id` names the answer for
    /// feedback.
    pub async fn admit(&self, request_id: &str) -> Result<Admission, InvokeError> {
        // The invocation's span (every trigger admits inside it): the
        // revision is known from here on, for every line logged.
        tracing::Span::current().record("revision", self.revision);
        let arrived = Instant::now();
        let deadline = arrived + self.timeout();
        let counted = RequestInFlight::enter();
        let entry = self
            .gate
            .enter(self.timeout())
            .await
            .map_err(|refused| self.refused(refused))?;
        let waited = arrived.elapsed();
        tracing::Span::current().add_event(
            "admitted",
            vec![KeyValue::new(
                "cascade.queue.wait_ms",
                waited.as_secs_f64() * 1000.0,
            )],
        );
        Ok(Admission {
            request_id: request_id.to_string(),
            deadline,
            _entry: entry,
            _counted: counted,
        })
    }

    /// Admission for a shadow copy, which must take nothing from callers:
    /// only while the host has fewer invocations in flight than cores
    /// (idle capacity) and an instance slot of this revision is free now;
    /// it never queues.
    pub fn admit_now(&self, request_id: &str) -> Result<Admission, InvokeError> {
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores =
            *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if crate::model::wide_runs::requests_in_flight() >= cores {
            return Err(InvokeError::Overloaded(self.name.clone()));
        }
        let entry = self
            .gate
            .try_enter()
            .map_err(|_| InvokeError::Overloaded(self.name.clone()))?;
        Ok(Admission {
            request_id: request_id.to_string(),
            deadline: Instant::now() + self.timeout(),
            _entry: entry,
            _counted: RequestInFlight::enter(),
        })
    }

    /// Runs an admitted invocation through every stage.
    ///
    /// Guests run on the reactor as async calls that yield at every epoch
    /// tick, so a request whose stages are all components never leaves its
    /// thread; a model, or a guest granted models through `wasi:nn` (tract
    /// cannot yield), runs on the blocking pool, one hop there and back.
    ///
    /// Shadows of the function's split get a copy of the input; they run
    /// once the answer is ready, on their own instances, and are compared
    /// with it. Answers are remembered for feedback when the manifest asks.
    pub async fn run(
        self: &Arc<Self>,
        admission: Admission,
        input: Message,
    ) -> Result<Invocation, InvokeError> {
        let shadows = self.watch.shadows_for(self.revision);
        let copy = (!shadows.is_empty()).then(|| input.clone());
        let request_id = admission.request_id.clone();
        let invocation = self.run_message(admission, input).await?;
        if let Some(copy) = copy {
            shadow::spawn(&self.watch, shadows, copy, &invocation.output, &request_id);
        }
        let keep = self.function.monitoring.feedback as usize;
        self.watch
            .remember(&request_id, self.revision, &invocation.output, keep);
        Ok(invocation)
    }

    /// [`PreparedFunction::run`] without the shadows and feedback.
    pub async fn run_message(
        self: &Arc<Self>,
        admission: Admission,
        input: Message,
    ) -> Result<Invocation, InvokeError> {
        let outcome = self.run_payload(admission, Payload::Message(input)).await?;
        let output = match outcome.output {
            Payload::Message(message) => message,
            Payload::Tensors(tensors) => tensors_as_json(&tensors),
        };
        Ok(Invocation {
            output,
            timings: outcome.timings,
        })
    }

    /// Runs an admitted invocation that starts from a message or from
    /// tensors (for a function whose first stage takes tensors), and gives
    /// what the last stage gave.
    pub async fn run_payload(
        self: &Arc<Self>,
        admission: Admission,
        input: Payload,
    ) -> Result<Outcome, InvokeError> {
        let drift = &self.function.monitoring.drift;
        let sample = self.watch.drift_sample(drift);
        let (outcome, sample) = self.run_summarised(admission, input, sample).await?;
        if let Some(sample) = sample {
            self.watch.drift_observe(self.revision, sample, drift);
        }
        Ok(outcome)
    }

    /// Summarises `input` as drift does, counting it nowhere: one example
    /// input of an uploaded drift reference.
    pub async fn summarise(
        self: &Arc<Self>,
        request_id: &str,
        input: Message,
    ) -> Result<Sample, InvokeError> {
        let admission = self.admit(request_id).await?;
        let input = Payload::Message(input);
        let (_, sample) = self
            .run_summarised(admission, input, Some(Sample::default()))
            .await?;
        Ok(sample.unwrap_or_default())
    }

    /// Runs an admitted invocation, filling `sample` (when given) with what
    /// crossed each stage boundary.
    async fn run_summarised(
        self: &Arc<Self>,
        admission: Admission,
        input: Payload,
        mut sample: Option<Sample>,
    ) -> Result<(Outcome, Option<Sample>), InvokeError> {
        let deadline = admission.deadline;
        if let Some(sample) = sample.as_mut() {
            match &input {
                Payload::Message(message) => sample.size("input.bytes", message.body.len()),
                Payload::Tensors(tensors) => tensors.iter().for_each(|t| sample.tensor(t)),
            }
        }
        let mut flow = match input {
            Payload::Message(message) => Flow::Message(message),
            Payload::Tensors(outputs) => Flow::Tensors {
                inputs: Vec::new(),
                outputs,
            },
        };
        let mut timings = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let stage_started = Instant::now();
            flow = run_stage(stage, flow, deadline)
                .instrument(stage_span(stage))
                .await
                .map_err(|e| self.stage_error(stage, e))?;
            let took = stage_started.elapsed();
            if let Some(sample) = sample.as_mut() {
                match &flow {
                    Flow::Message(message) => sample.answer(message),
                    Flow::Tensors { outputs, .. } => outputs.iter().for_each(|t| sample.tensor(t)),
                }
            }
            self.metrics
                .stage_latency
                .with_label_values(&[&self.name, stage.label()])
                .observe(took.as_secs_f64());
            timings.push((stage.label().to_string(), took));
        }
        let output = match flow {
            Flow::Message(message) => Payload::Message(message),
            Flow::Tensors { outputs, .. } => Payload::Tensors(outputs),
        };
        Ok((Outcome { output, timings }, sample))
    }

    /// A request the gate did not admit: 503 when the queue was full, 504
    /// when it waited out its deadline in the queue.
    fn refused(&self, refused: Refused) -> InvokeError {
        match refused {
            Refused::QueueFull => InvokeError::Overloaded(self.name.clone()),
            Refused::TimedOut => {
                self.metrics.timeouts.with_label_values(&[&self.name]).inc();
                InvokeError::DeadlineExceeded {
                    function: self.name.clone(),
                    stage: "queue".into(),
                    timeout_ms: self.function.limits.timeout_ms,
                }
            }
        }
    }

    fn stage_error(&self, stage: &PreparedStage, error: StageError) -> InvokeError {
        let (function, stage) = (self.name.clone(), stage.label().to_string());
        match error {
            StageError::InvalidInput(message) => InvokeError::InvalidInput {
                function,
                stage,
                message,
            },
            StageError::Internal(message) => InvokeError::Internal {
                function,
                stage,
                message,
            },
            StageError::Trap(message) => {
                tracing::warn!(function = %function, stage = %stage, "guest trapped: {message}");
                InvokeError::Internal {
                    function,
                    stage,
                    message: "the guest trapped and was restarted".into(),
                }
            }
            StageError::Capacity(message) => InvokeError::NoCapacity {
                function,
                stage,
                message,
            },
            StageError::DeadlineExceeded => {
                self.metrics.timeouts.with_label_values(&[&function]).inc();
                InvokeError::DeadlineExceeded {
                    function,
                    stage,
                    timeout_ms: self.function.limits.timeout_ms,
                }
            }
        }
    }

    /// Instances per stage and requests waiting.
    pub fn status(&self) -> FunctionStatus {
        FunctionStatus {
            name: self.name.clone(),
            revision: self.revision,
            queued: self.gate.waiting(),
            max_instances: self.function.scaling.max_instances,
            min_instances: self.function.scaling.min_instances,
            stages: self
                .stages
                .iter()
                .filter_map(|s| match s {
                    PreparedStage::Component { pool, .. } => Some(pool.status()),
                    PreparedStage::Model { .. } => None,
                })
                .collect(),
            quality: self.watch.quality(),
        }
    }

    /// Drops instances idle past the timeout; returns how many.
    pub fn reap(&self, now: Instant) -> usize {
        self.stages
            .iter()
            .map(|s| match s {
                PreparedStage::Component { pool, .. } => pool.reap(now),
                PreparedStage::Model { .. } => 0,
            })
            .sum()
    }
}

/// The span of one stage of an invocation: a child of the invocation's.
fn stage_span(stage: &PreparedStage) -> tracing::Span {
    let kind = match stage {
        PreparedStage::Component { world, .. } => world.name(),
        PreparedStage::Model { .. } => "model",
    };
    tracing::info_span!(
        "stage",
        otel.name = %format_args!("stage {}", stage.label()),
        stage = stage.label(),
        stage_kind = kind,
        batch_size = tracing::field::Empty,
    )
}

/// Runs one stage, holding it to `deadline`.
async fn run_stage(
    stage: &PreparedStage,
    flow: Flow,
    deadline: Instant,
) -> Result<Flow, StageError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(StageError::DeadlineExceeded);
    }
    match stage {
        PreparedStage::Component {
            world,
            pool,
            inputs: selection,
            ..
        } => {
            let mut lease = pool.checkout().await?;
            if !pool.grants_models() {
                return call_guest(&mut lease, *world, flow, selection.as_deref(), remaining).await;
            }
            // A guest granted models may call `wasi:nn` compute, which runs
            // tract inside the call and cannot yield: off the reactor.
            let (world, selection) = (*world, selection.clone());
            let reactor = tokio::runtime::Handle::current();
            let span = tracing::Span::current();
            off_reactor(remaining, move || {
                let call = call_guest(&mut lease, world, flow, selection.as_deref(), remaining);
                reactor.block_on(call.instrument(span))
            })
            .await
        }
        PreparedStage::Model { queue, .. } => {
            let Flow::Tensors {
                outputs: inputs, ..
            } = flow
            else {
                return Err(StageError::InvalidInput(
                    "this function starts with a model, which takes tensors, not a message".into(),
                ));
            };
            match tokio::time::timeout(remaining, queue.run(inputs, Some(deadline))).await {
                Ok(answer) => {
                    let answer = answer?;
                    if let Some((started, waited)) = answer.run {
                        traced_model_run(started, waited, answer.batched);
                    }
                    Ok(Flow::Tensors {
                        inputs: answer.available,
                        outputs: answer.outputs?,
                    })
                }
                Err(_) => Err(StageError::DeadlineExceeded),
            }
        }
    }
}

/// Marks in the stage's span when its model run started, after how long a
/// wait for a runner, and with how many requests in its batch.
fn traced_model_run(started: std::time::SystemTime, waited: Duration, batched: usize) {
    let span = tracing::Span::current();
    if batched > 1 {
        span.record("batch_size", batched);
    }
    let attributes = vec![
        KeyValue::new("cascade.queue.wait_ms", waited.as_secs_f64() * 1000.0),
        KeyValue::new(
            "cascade.batch.size",
            i64::try_from(batched).unwrap_or(i64::MAX),
        ),
    ];
    span.add_event_with_timestamp("model run", started, attributes);
}

/// Calls the guest export of `world` with what flowed in, settling the lease.
async fn call_guest(
    lease: &mut Lease,
    world: World,
    flow: Flow,
    selection: Option<&[String]>,
    remaining: Duration,
) -> Result<Flow, StageError> {
    match (world, flow) {
        (World::Preprocessor, Flow::Message(message)) => {
            let instance = lease.instance();
            instance.set_timeout(remaining);
            let result = held_to(remaining, instance.preprocess(message)).await;
            lease.settle(&result);
            result.map(|outputs| Flow::Tensors {
                inputs: Vec::new(),
                outputs,
            })
        }
        (
            World::Postprocessor,
            Flow::Tensors {
                mut inputs,
                outputs,
            },
        ) => {
            inputs.extend(outputs);
            let tensors = match selection {
                Some(names) => select(names, inputs)?,
                None => inputs,
            };
            let instance = lease.instance();
            instance.set_timeout(remaining);
            let result = held_to(remaining, instance.postprocess(tensors)).await;
            lease.settle(&result);
            result.map(Flow::Message)
        }
        (
            World::Inferencer,
            Flow::Tensors {
                outputs: inputs, ..
            },
        ) => {
            let instance = lease.instance();
            instance.set_timeout(remaining);
            let result = held_to(remaining, instance.infer(&inputs)).await;
            lease.settle(&result);
            result.map(|outputs| Flow::Tensors { inputs, outputs })
        }
        (World::Postprocessor, Flow::Message(_)) => Err(StageError::InvalidInput(
            "this function starts with a postprocessor, which takes tensors, not a message".into(),
        )),
        (World::Preprocessor, Flow::Tensors { .. }) => Err(StageError::InvalidInput(
            "this function starts with a preprocessor, which takes a message, not tensors".into(),
        )),
        _ => Err(StageError::Internal(
            "stage does not fit its position".into(),
        )),
    }
}

/// A guest call held to `remaining`: epoch ticks interrupt a guest that
/// computes, but one that waits in a host call (a sleep, a poll) sees no
/// tick, so the wait itself is bounded too. The instance is then discarded.
async fn held_to<T>(
    remaining: Duration,
    call: impl Future<Output = Result<T, StageError>>,
) -> Result<T, StageError> {
    tokio::time::timeout(remaining, call)
        .await
        .unwrap_or(Err(StageError::DeadlineExceeded))
}

/// Runs a guest that may call `wasi:nn` on the blocking pool. Past
/// `remaining` the caller gets a deadline error at once while the work
/// finishes in the background (tract cannot be interrupted); model stages
/// do the same on [`ModelThreads`].
async fn off_reactor(
    remaining: Duration,
    work: impl FnOnce() -> Result<Flow, StageError> + Send + 'static,
) -> Result<Flow, StageError> {
    match tokio::time::timeout(remaining, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(StageError::Internal(format!("stage task failed: {e}"))),
        Err(_) => Err(StageError::DeadlineExceeded),
    }
}

/// The tensors a postprocessor asked for in its stage's `inputs`, in that
/// order; a name both stages produced resolves to the later stage's tensor.
fn select(names: &[String], mut tensors: Vec<Tensor>) -> Result<Vec<Tensor>, StageError> {
    if let Some(missing) = names
        .iter()
        .find(|name| !tensors.iter().any(|t| &t.name == *name))
    {
        let produced: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        return Err(StageError::Internal(format!(
            "the stage's `inputs` names tensor {missing:?}, which the stages before did not \
             produce (they produced [{}])",
            produced.join(", ")
        )));
    }
    Ok(names
        .iter()
        .filter_map(|name| {
            let at = tensors.iter().rposition(|t| &t.name == name)?;
            Some(tensors.swap_remove(at))
        })
        .collect())
}

/// What `GET /v1/functions/{name}/status` returns.
#[derive(Debug, Serialize)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Revision served.
    pub revision: u64,
    /// Requests waiting for admission.
    pub queued: usize,
    /// Scaling bounds.
    pub min_instances: u32,
    /// Scaling bounds.
    pub max_instances: u32,
    /// One entry per component stage.
    pub stages: Vec<StageStatus>,
    /// What feedback and shadows say of each watched revision.
    pub quality: Vec<crate::operations::RevisionQuality>,
}

/// A tensor type as the WIT spells it (`fp32`, `u8`, ...).
fn type_name(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp16 => "fp16",
        TensorType::Fp32 => "fp32",
        TensorType::Fp64 => "fp64",
        TensorType::Bf16 => "bf16",
        TensorType::U8 => "u8",
        TensorType::I32 => "i32",
        TensorType::I64 => "i64",
    }
}

/// The reply of a function whose last stage yields tensors:
/// `{"tensors": [{"name", "dimensions", "type", "data": [numbers]}]}`.
fn tensors_as_json(tensors: &[Tensor]) -> Message {
    let values: Vec<serde_json::Value> = tensors
        .iter()
        .map(|t| {
            let data: Vec<serde_json::Value> = match t.ty {
                TensorType::Fp32 => t
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).into())
                    .collect(),
                TensorType::Fp64 => t
                    .data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])).into())
                    .collect(),
                TensorType::I64 => t
                    .data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])).into())
                    .collect(),
                TensorType::I32 => t
                    .data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]).into())
                    .collect(),
                TensorType::U8 => t.data.iter().map(|&b| b.into()).collect(),
                TensorType::Fp16 | TensorType::Bf16 => Vec::new(),
            };
            serde_json::json!({
                "name": t.name,
                "dimensions": t.dimensions,
                "type": type_name(t.ty),
                "data": data,
            })
        })
        .collect();
    Message {
        content_type: "application/json".into(),
        body: serde_json::json!({ "tensors": values })
            .to_string()
            .into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, value: f32) -> Tensor {
        Tensor {
            name: name.into(),
            dimensions: vec![1],
            ty: TensorType::Fp32,
            data: value.to_le_bytes().to_vec(),
        }
    }

    fn values(tensors: &[Tensor]) -> Vec<(String, f32)> {
        tensors
            .iter()
            .map(|t| {
                let bytes: [u8; 4] = t.data[..4].try_into().expect("four bytes");
                (t.name.clone(), f32::from_le_bytes(bytes))
            })
            .collect()
    }

    #[test]
    fn selection_keeps_the_asked_order_and_the_later_stage() {
        // The stage before's inputs come first, then its outputs: a name
        // both produced resolves to the output.
        let flowed = vec![
            tensor("mask", 1.0),
            tensor("hidden", 2.0),
            tensor("mask", 3.0),
        ];
        let picked = select(&["mask".into(), "hidden".into()], flowed).expect("both there");
        assert_eq!(
            values(&picked),
            [("mask".to_string(), 3.0), ("hidden".to_string(), 2.0)]
        );
    }

    #[test]
    fn selecting_a_tensor_nobody_produced_names_what_there_is() {
        let error = select(&["logits".into()], vec![tensor("hidden", 2.0)]).expect_err("absent");
        assert_eq!(
            error.to_string(),
            "internal error: the stage's `inputs` names tensor \"logits\", which the stages \
             before did not produce (they produced [hidden])"
        );
    }

    #[test]
    fn tensors_become_json_numbers() {
        let mut ids = tensor("ids", 0.0);
        ids.ty = TensorType::I64;
        ids.dimensions = vec![2];
        ids.data = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let message = tensors_as_json(&[tensor("score", 0.5), ids]);
        assert_eq!(message.content_type, "application/json");
        let json: serde_json::Value = serde_json::from_slice(&message.body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"tensors": [
                {"name": "score", "dimensions": [1], "type": "fp32", "data": [0.5]},
                {"name": "ids", "dimensions": [2], "type": "i64", "data": [7, -1]},
            ]})
        );
    }
}
