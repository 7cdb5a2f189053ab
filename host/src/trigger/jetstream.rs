//! The JetStream trigger: durable, at-least-once event processing. Every
//! host serving a function with `[triggers.jetstream]` pulls from one
//! shared durable consumer, so work spreads across hosts and survives any
//! of them dying.
//!
//! A message is acked only after its result is stored (PubAck received);
//! a retryable failure (5xx: a trap, overload, a deadline, shutdown) is
//! nak'ed with the manifest's backoff; a caller error (4xx) or the
//! `max_deliver`-th failure goes to the dead-letter subject with headers
//! saying why, and is terminated. Results carry `Nats-Msg-Id`
//! `<stream>:<sequence>`, so a redelivered message whose first result was
//! stored produces no duplicate within the stream's duplicate window.
//! Long runs send progress acks so `ack_wait` never expires under a slow
//! model, and a host never holds more messages than the function can run or
//! queue (`max_instances + max_queue`).

use crate::error::InvokeError;
use crate::pipeline::{PreparedFunction, Trigger};
use crate::runtime::Runtime;
use crate::trace_context::{self, NatsHeaders};
use crate::traffic::Choice;
use crate::trigger::{nats, subjects};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, AckKind, Context};
use async_nats::{Client, HeaderMap};
use cascade_registry::manifest::JetStreamTrigger as Settings;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Headers of a dead letter: why it died and where it came from.
pub mod headers {
    /// The function that failed it.
    pub const FUNCTION: &str = "Cascade-Function";
    /// The revision that failed it last.
    pub const REVISION: &str = crate::trigger::subjects::REVISION;
    /// The last error's status code (as over HTTP).
    pub const ERROR_CODE: &str = "Cascade-Error-Code";
    /// The last error's message.
    pub const ERROR: &str = "Cascade-Error";
    /// Deliveries made.
    pub const ATTEMPTS: &str = "Cascade-Attempts";
    /// The subject it was published on.
    pub const SUBJECT: &str = "Cascade-Subject";
    /// The stream it was consumed from.
    pub const STREAM: &str = "Cascade-Stream";
    /// Its sequence number in that stream.
    pub const SEQUENCE: &str = "Cascade-Stream-Sequence";
}

/// How long one pull request waits for messages before the next.
const PULL_EXPIRY: Duration = Duration::from_secs(1);
/// The first and the longest wait between attempts to bind the consumer.
const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);
const BIND_RETRY_MOST: Duration = Duration::from_secs(30);
/// How often the consumer's lag is read for metrics and `/readyz`.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// Keeps one consumer loop per served function with a JetStream trigger.
pub struct JetStreamTrigger {
    jetstream: Context,
    runtime: Arc<Runtime>,
    running: Mutex<HashMap<String, Running>>,
}

/// A consumer loop and how to stop it.
struct Running {
    settings: Settings,
    capacity: u32,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl JetStreamTrigger {
    /// A trigger over `client`; call [`JetStreamTrigger::run`] to serve.
    pub fn new(client: Client, runtime: Arc<Runtime>) -> Arc<Self> {
        Arc::new(JetStreamTrigger {
            jetstream: jetstream::new(client),
            runtime,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Follows the served functions until `stop`; then stops pulling and
    /// finishes (or hands back) the messages taken, for at most `grace`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, grace: Duration) {
        loop {
            self.reconcile();
            tokio::select! {
                () = self.runtime.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => break,
            }
        }
        let running: Vec<Running> = match self.running.lock() {
            Ok(mut running) => running.drain().map(|(_, r)| r).collect(),
            Err(_) => Vec::new(),
        };
        for r in &running {
            r.stop.cancel();
        }
        let finished = futures_util::future::join_all(running.into_iter().map(|r| r.task));
        if tokio::time::timeout(grace, finished).await.is_err() {
            tracing::warn!("JetStream messages still in flight after {grace:?}");
        }
    }

    fn reconcile(self: &Arc<Self>) {
        let wanted: HashMap<String, (Settings, u32)> = self
            .runtime
            .served()
            .into_iter()
            .filter_map(|f| {
                let settings = f.function().triggers.jetstream.clone()?;
                let scaling = &f.function().scaling;
                Some((
                    f.name().to_string(),
                    (settings, scaling.max_instances + scaling.max_queue),
                ))
            })
            .collect();
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        running.retain(|name, r| {
            let keep = wanted.get(name).is_some_and(|(s, c)| {
                *s == r.settings && *c == r.capacity && !r.task.is_finished()
            });
            if !keep {
                // Its loop finishes what it holds; a new one may start at once
                // (the durable consumer hands each message to one of them).
                r.stop.cancel();
            }
            keep
        });
        for (name, (settings, capacity)) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let stop = CancellationToken::new();
            let consumer = FunctionConsumer {
                name: name.clone(),
                settings: settings.clone(),
                capacity,
                jetstream: self.jetstream.clone(),
                runtime: self.runtime.clone(),
            };
            let task = tokio::spawn(Arc::new(consumer).run(stop.clone()));
            running.insert(
                name,
                Running {
                    settings,
                    capacity,
                    stop,
                    task,
                },
            );
        }
    }
}

/// One function's share of its durable consumer.
struct FunctionConsumer {
    name: String,
    settings: Settings,
    capacity: u32,
    jetstream: Context,
    runtime: Arc<Runtime>,
}

/// What happened to one message, for the log and the metrics.
enum Fate {
    Done,
    Retry(Duration),
    Dead,
}

impl FunctionConsumer {
    /// Binds the stream and consumer (retrying until NATS answers), then
    /// pulls at most as many messages as there are free slots, until `stop`.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let bound = self
            .runtime
            .metrics()
            .jetstream_bound
            .with_label_values(&[&self.name]);
        // A server without JetStream fails every attempt the same way: say
        // so once (and again when the reason changes), retrying ever less often.
        let (mut retry, mut last_error) = (BIND_RETRY_FIRST, String::new());
        let consumer = loop {
            match self.bind().await {
                Ok(consumer) => {
                    if !last_error.is_empty() {
                        tracing::info!(function = %self.name, "JetStream trigger bound");
                    }
                    bound.set(1);
                    break consumer;
                }
                Err(e) => {
                    let error = e.to_string();
                    if error != last_error {
                        tracing::warn!(
                            function = %self.name,
                            "JetStream trigger not bound (retrying, up to every {}s): {error}",
                            BIND_RETRY_MOST.as_secs()
                        );
                    }
                    last_error = error;
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = stop.cancelled() => return,
                    }
                    retry = (retry * 2).min(BIND_RETRY_MOST);
                }
            }
        };
        let slots = Arc::new(Semaphore::new(self.capacity as usize));
        let mut lag_read: Option<Instant> = None;
        while !stop.is_cancelled() {
            if lag_read.is_none_or(|read| read.elapsed() >= LAG_EVERY) {
                self.read_lag(&consumer).await;
                lag_read = Some(Instant::now());
            }
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = stop.cancelled() => break,
            };
            let free = slots.available_permits() + 1;
            let batch = consumer
                .batch()
                .max_messages(free)
                .expires(PULL_EXPIRY)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(function = %self.name, "pulling from JetStream: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut first = Some(first);
            // The batch asked for no more than the free slots, so each
            // message finds one; after `stop` the rest are handed back.
            while let Some(next) = batch.next().await {
                let message = match next {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(function = %self.name, "JetStream delivery: {e}");
                        break;
                    }
                };
                if stop.is_cancelled() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => match slots.clone().acquire_owned().await {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                tokio::spawn(self.clone().handle(message, permit));
            }
        }
        // Wait until every message taken is answered.
        let _ = slots.acquire_many(self.capacity).await;
        bound.set(0);
    }

    /// Creates the stream when missing (else binds it), makes sure the
    /// outlets land in streams, and creates or updates the durable consumer.
    async fn bind(&self) -> Result<PullConsumer, async_nats::Error> {
        let s = &self.settings;
        let stream = match self.jetstream.get_stream(&s.stream).await {
            Ok(stream) => stream,
            Err(_) => {
                self.jetstream
                    .get_or_create_stream(stream::Config {
                        name: s.stream.clone(),
                        subjects: s.subjects.clone(),
                        storage: StorageType::File,
                        ..Default::default()
                    })
                    .await?
            }
        };
        let outlets = [
            ("RESULTS", &s.result_subject),
            ("DEAD", &s.dead_letter_subject),
        ];
        for (kind, subject) in outlets {
            if let Some(subject) = subject {
                self.ensure_captured(kind, subject).await?;
            }
        }
        let mut config = pull::Config {
            durable_name: Some(s.durable.clone()),
            description: Some(format!("Cascade function {}", self.name)),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(s.ack_wait_ms),
            // Hosts count deliveries themselves and dead-letter at
            // `max_deliver`, so a message whose dead letter could not be
            // stored yet is retried rather than dropped by the server.
            max_deliver: -1,
            max_ack_pending: i64::from(self.capacity) * MAX_HOSTS,
            ..Default::default()
        };
        match s.subjects.as_slice() {
            [one] => config.filter_subject = one.clone(),
            many => config.filter_subjects = many.to_vec(),
        }
        Ok(stream.create_consumer(config).await?)
    }

    /// Results and dead letters are published with JetStream and wait for
    /// its PubAck, so some stream must capture their subject: when none
    /// does, one is created for it (`CASCADE_<KIND>_<durable>`).
    async fn ensure_captured(&self, kind: &str, subject: &str) -> Result<(), async_nats::Error> {
        if self.jetstream.stream_by_subject(subject).await.is_ok() {
            return Ok(());
        }
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: format!("CASCADE_{kind}_{}", self.settings.durable),
                subjects: vec![subject.to_string()],
                storage: StorageType::File,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Reads the consumer's pending count into the metrics.
    async fn read_lag(&self, consumer: &PullConsumer) {
        let mut consumer = consumer.clone();
        if let Ok(info) = consumer.info().await {
            self.runtime
                .metrics()
                .jetstream_pending
                .with_label_values(&[&self.name])
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
        }
    }

    /// Runs one message and settles it: ack, nak with backoff, or dead letter.
    async fn handle(self: Arc<Self>, message: jetstream::Message, _slot: OwnedSemaphorePermit) {
        let started = Instant::now();
        let Ok(info) = message.info() else {
            tracing::warn!(function = %self.name, "a JetStream message without delivery info");
            return;
        };
        let delivery = Delivery {
            stream: info.stream.to_string(),
            sequence: info.stream_sequence,
            attempt: u32::try_from(info.delivered).unwrap_or(u32::MAX),
        };
        // Each delivery says how many wait behind it: the freshest lag.
        self.runtime
            .metrics()
            .jetstream_pending
            .with_label_values(&[&self.name])
            .set(i64::try_from(info.pending).unwrap_or(i64::MAX));
        let request_id = delivery.id();
        let headers = NatsHeaders(message.headers.as_ref());
        let span = trace_context::invocation(Trigger::JetStream, &self.name, &request_id, &headers);
        trace_context::messaging(&span, message.subject.as_str(), Some(request_id.clone()));
        let fate = self
            .decide(&message, &delivery, started, &request_id)
            .instrument(span)
            .await;
        let metrics = self.runtime.metrics();
        let settled = match fate {
            Fate::Done => message.ack().await,
            Fate::Retry(delay) => {
                metrics
                    .jetstream_redeliveries
                    .with_label_values(&[&self.name])
                    .inc();
                message.ack_with(AckKind::Nak(Some(delay))).await
            }
            Fate::Dead => {
                metrics
                    .jetstream_dead_letters
                    .with_label_values(&[&self.name])
                    .inc();
                message.ack_with(AckKind::Term).await
            }
        };
        if let Err(e) = settled {
            // The server redelivers after ack_wait; the result (if any) is
            // de-duplicated by its message id.
            tracing::warn!(function = %self.name, "settling {}: {e}", delivery.id());
        }
    }

    /// Runs the message through the function (inside its invocation span)
    /// and decides its fate; results and dead letters are stored here.
    async fn decide(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        started: Instant,
        request_id: &str,
    ) -> Fate {
        // The function's traffic split decides, as for any trigger; a
        // `Cascade-Tag` header names a target.
        let tag = message
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::TAG))
            .map(|v| v.as_str().to_string());
        let choice = Choice {
            tag: tag.as_deref(),
            sticky_key: None,
        };
        match self.runtime.choose_when_loaded(&self.name, &choice).await {
            Err(error) => self.failed(message, delivery, None, &error).await,
            Ok(function) => {
                if delivery.attempt > self.settings.max_deliver {
                    // Earlier deliveries went unanswered (their hosts died or
                    // ack_wait expired): the count is already spent.
                    let why = format!(
                        "delivered {} times without an answer (hosts stopped or ack_wait passed)",
                        delivery.attempt - 1
                    );
                    self.dead_letter(message, delivery, Some(&function), (504, &why))
                        .await
                } else {
                    let outcome = self
                        .with_progress(message, nats::invoke(&function, message, request_id))
                        .await;
                    let status = outcome.as_ref().map_or_else(InvokeError::status, |_| 200);
                    function.record(Trigger::JetStream, request_id, status, started.elapsed());
                    match outcome {
                        Ok(output) => self.succeeded(message, delivery, &function, output).await,
                        Err(error) => {
                            self.failed(message, delivery, Some(&function), &error)
                                .await
                        }
                    }
                }
            }
        }
    }

    /// Awaits `work`, telling JetStream it is still in progress every half
    /// `ack_wait`, so a slow run is never handed to another host.
    async fn with_progress<T>(
        &self,
        message: &jetstream::Message,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let every = Duration::from_millis(self.settings.ack_wait_ms / 2);
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep(every) => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    }

    /// Stores the result (when the trigger names a result subject).
    async fn succeeded(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        function: &PreparedFunction,
        output: crate::bindings::Message,
    ) -> Fate {
        let Some(subject) = &self.settings.result_subject else {
            return Fate::Done;
        };
        let mut headers = carried_headers(message);
        headers.insert(
            subjects::CONTENT_TYPE,
            nats::header_text(&output.content_type).as_str(),
        );
        headers.insert(headers::FUNCTION, function.name());
        headers.insert(headers::REVISION, function.revision().to_string().as_str());
        headers.insert(headers::SEQUENCE, delivery.sequence.to_string().as_str());
        let publish = PublishMessage::build()
            .payload(output.body.into())
            .headers(headers)
            .message_id(delivery.id());
        match self.store(subject, publish).await {
            Ok(()) => Fate::Done,
            Err(e) => {
                tracing::warn!(function = %self.name, "storing the result of {}: {e}", delivery.id());
                Fate::Retry(self.backoff(delivery.attempt))
            }
        }
    }

    /// A failed run: retried with backoff while it may be, else dead.
    async fn failed(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        function: Option<&PreparedFunction>,
        error: &InvokeError,
    ) -> Fate {
        let retryable = error.status() >= 500;
        if retryable && delivery.attempt < self.settings.max_deliver {
            tracing::info!(
                function = %self.name,
                "{} failed (attempt {} of {}), retrying: {error}",
                delivery.id(),
                delivery.attempt,
                self.settings.max_deliver
            );
            return Fate::Retry(self.backoff(delivery.attempt));
        }
        let why = (error.status(), error.to_string());
        self.dead_letter(message, delivery, function, (why.0, &why.1))
            .await
    }

    /// Publishes the original payload to the dead-letter subject with
    /// headers saying why (`code` as over HTTP); a message whose dead letter cannot be stored
    /// is retried, never dropped.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        function: Option<&PreparedFunction>,
        (code, error): (u16, &str),
    ) -> Fate {
        tracing::warn!(
            function = %self.name,
            "{} goes to the dead letters after {} attempt(s): {error}",
            delivery.id(),
            delivery.attempt
        );
        let Some(subject) = &self.settings.dead_letter_subject else {
            return Fate::Dead;
        };
        let mut headers = carried_headers(message);
        if let Some(content_type) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(subjects::CONTENT_TYPE))
        {
            headers.insert(subjects::CONTENT_TYPE, content_type.as_str());
        }
        headers.insert(headers::FUNCTION, self.name.as_str());
        if let Some(function) = function {
            headers.insert(headers::REVISION, function.revision().to_string().as_str());
        }
        headers.insert(headers::ERROR_CODE, code.to_string().as_str());
        headers.insert(headers::ERROR, nats::header_text(error).as_str());
        headers.insert(headers::ATTEMPTS, delivery.attempt.to_string().as_str());
        headers.insert(headers::SUBJECT, message.subject.as_str());
        headers.insert(headers::STREAM, delivery.stream.as_str());
        headers.insert(headers::SEQUENCE, delivery.sequence.to_string().as_str());
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers)
            .message_id(format!("{}:dead", delivery.id()));
        match self.store(subject, publish).await {
            Ok(()) => Fate::Dead,
            Err(e) => {
                tracing::warn!(function = %self.name, "storing the dead letter of {}: {e}", delivery.id());
                Fate::Retry(self.backoff(delivery.attempt))
            }
        }
    }

    /// Publishes with JetStream and waits for the stream's PubAck.
    async fn store(&self, subject: &str, publish: PublishMessage) -> Result<(), async_nats::Error> {
        self.jetstream
            .send_publish(subject.to_string(), publish)
            .await?
            .await?;
        Ok(())
    }

    /// The delay before the next delivery after failed attempt `attempt`
    /// (1-based); the last delay repeats.
    fn backoff(&self, attempt: u32) -> Duration {
        let delays = &self.settings.backoff_ms;
        let index = (attempt.max(1) as usize - 1).min(delays.len().saturating_sub(1));
        Duration::from_millis(delays.get(index).copied().unwrap_or(1_000))
    }
}

/// Each JetStream-fed function's consumer as `/readyz` shows it: whether
/// this host consumes it, its lag, redeliveries and dead letters so far.
/// Informational: a lagging consumer does not make the host unready.
pub fn status(runtime: &Runtime) -> serde_json::Map<String, serde_json::Value> {
    let metrics = runtime.metrics();
    runtime
        .served()
        .into_iter()
        .filter(|f| f.function().triggers.jetstream.is_some())
        .map(|f| {
            let name = [f.name()];
            let value = serde_json::json!({
                "bound": metrics.jetstream_bound.with_label_values(&name).get() == 1,
                "pending": metrics.jetstream_pending.with_label_values(&name).get(),
                "redeliveries": metrics.jetstream_redeliveries.with_label_values(&name).get(),
                "dead_letters": metrics.jetstream_dead_letters.with_label_values(&name).get(),
            });
            (f.name().to_string(), value)
        })
        .collect()
}

/// Hosts one durable consumer may spread over at `max_instances +
/// max_queue` messages each: the consumer-wide `max_ack_pending`. Each host
/// bounds what it holds itself.
const MAX_HOSTS: i64 = 64;

/// Where a message sits in its stream and how often it was delivered.
struct Delivery {
    stream: String,
    sequence: u64,
    attempt: u32,
}

impl Delivery {
    /// `<stream>:<sequence>`: the result's `Nats-Msg-Id` and the request id.
    fn id(&self) -> String {
        format!("{}:{}", self.stream, self.sequence)
    }
}

/// The request id a producer set, carried onto results and dead letters.
fn carried_headers(message: &jetstream::Message) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // Called inside the invocation's span: the result continues its trace.
    let span = tracing::Span::current();
    trace_context::carry_nats(&span, message.headers.as_ref(), &mut headers);
    if let Some(id) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::REQUEST_ID))
    {
        headers.insert(
            subjects::REQUEST_ID,
            nats::header_text(id.as_str()).as_str(),
        );
    }
    headers
}
