//! Model operations: what the host watches of a function's revisions in
//! production. Each function has one [`FunctionWatch`], shared by every
//! prepared revision of it; its traffic split says what to watch:
//!
//! - the latest outcomes of its canaries and shadows, and of the stable
//!   revision they are judged against, so a rollback rule can take a
//!   failing one out of the split ([`RollbackOrder`]);
//! - shadow copies of a sampled share of requests, run after the served
//!   answer is on its way and compared with it ([`agreement`]);
//! - the latest answers by request id, scored by feedback ([`feedback`]);
//! - summaries of a sampled share of requests, compared with each
//!   revision's reference for drift ([`drift`]).
//!
//! What the watch decides (a rollback, a drift) goes out as a [`Verdict`]
//! for the host to carry out. A function with no split, no rule and no
//! feedback pays an atomic load per request, and the summary of the
//! requests drift samples.

pub mod agreement;
pub mod drift;
pub mod feedback;
pub mod shadow;
pub mod window;

use crate::bindings::Message;
use crate::error::InvokeError;
use crate::metrics::Metrics;
use cascade_registry::manifest::Drift;
use cascade_registry::traffic::{RollbackRule, Traffic};
use drift::{RevisionDrift, Sample};
use feedback::{Feedback, FeedbackError, Remembered, Score};
use serde::Serialize;
use shadow::ShadowTarget;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use window::{Outcome, Ring};

/// Outcomes and comparisons kept per revision when no rule says how many.
const DEFAULT_WINDOW: usize = 200;

/// A target to take out of its function's split, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackOrder {
    /// The function.
    pub function: String,
    /// The revision the failing target serves.
    pub revision: u64,
    /// Whether the target is a shadow.
    pub shadow: bool,
    /// What it breached.
    pub reason: String,
}

/// A signal of a revision that drifted from its reference, or came back.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftAlert {
    /// The function.
    pub function: String,
    /// The revision.
    pub revision: u64,
    /// The signal, e.g. `input_ids.mean` or `output.class`.
    pub signal: String,
    /// Its score (PSI).
    pub score: f64,
    /// The manifest's threshold.
    pub threshold: f64,
    /// True when it rose above the threshold, false when it fell back.
    pub drifted: bool,
}

/// What a watch decided, for the host to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Take a target out of its split.
    Rollback(RollbackOrder),
    /// Say that a signal drifted (or recovered).
    Drift(DriftAlert),
}

/// What feedback did to a revision's quality.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scored {
    /// The revision that gave the answer.
    pub revision: u64,
    /// Whether its label was right (a classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    /// How far off its number was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub absolute_error: Option<f64>,
    /// The revision's accuracy over its latest feedback (labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// The revision's mean absolute error over its latest feedback (numbers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_absolute_error: Option<f64>,
    /// How much feedback that window holds.
    pub window: usize,
}

/// A revision's recent history.
struct RevisionState {
    outcomes: Ring<Outcome>,
    agreement: Ring<f64>,
    /// 1 or 0 per label scored, or the absolute error per number.
    quality: Ring<f64>,
    labels: bool,
    /// A rollback was ordered; not again until the split changes.
    ordered: bool,
}

impl RevisionState {
    fn new(window: usize) -> Self {
        RevisionState {
            outcomes: Ring::new(window),
            agreement: Ring::new(window),
            quality: Ring::new(window),
            labels: true,
            ordered: false,
        }
    }
}

/// A shadow target, ready: the revision, its share, its own counter.
struct Shadow {
    revision: u64,
    function: Weak<dyn ShadowTarget>,
    percent: u64,
    sequence: AtomicU64,
}

/// What the split asks to watch.
#[derive(Default)]
struct Plan {
    /// The split and the head it was resolved with.
    split: Option<(Traffic, u64)>,
    rule: Option<RollbackRule>,
    stable: Option<u64>,
    /// Revisions judged by the rule: canaries (false) and shadows (true).
    judged: HashMap<u64, bool>,
    shadows: Vec<Arc<Shadow>>,
}

/// A split as served: the split, the head revision it is resolved with,
/// and its prepared revisions.
pub type SplitView<'a, T> = (&'a Traffic, u64, &'a HashMap<u64, Arc<T>>);

/// What the host watches of one function.
pub struct FunctionWatch {
    name: String,
    metrics: Arc<Metrics>,
    plan: RwLock<Plan>,
    /// A rule to judge by, or shadows to run: the per-request work is on.
    active: AtomicBool,
    revisions: Mutex<HashMap<u64, RevisionState>>,
    remembered: Mutex<Remembered>,
    drift: Mutex<HashMap<u64, RevisionDrift>>,
    drift_sequence: AtomicU64,
    verdicts: UnboundedSender<Verdict>,
}

impl FunctionWatch {
    /// The watch of function `name`, sending what it decides to `verdicts`.
    pub fn new(name: &str, metrics: Arc<Metrics>, verdicts: UnboundedSender<Verdict>) -> Self {
        FunctionWatch {
            name: name.to_string(),
            metrics,
            plan: RwLock::new(Plan::default()),
            active: AtomicBool::new(false),
            revisions: Mutex::new(HashMap::new()),
            remembered: Mutex::new(Remembered::default()),
            drift: Mutex::new(HashMap::new()),
            drift_sequence: AtomicU64::new(0),
            verdicts,
        }
    }

    /// Watches what `split` (resolved with `head`, its revisions prepared
    /// in `revisions`) asks for; `None`: everything goes to the head.
    /// A changed split starts every judgement afresh.
    pub fn follow<T: ShadowTarget>(&self, split: Option<SplitView<'_, T>>) {
        let mut plan = self.plan.write().unwrap_or_else(PoisonError::into_inner);
        let now = split.map(|(traffic, head, _)| (traffic.clone(), head));
        if plan.split == now {
            return;
        }
        let mut next = Plan {
            split: now,
            ..Plan::default()
        };
        if let Some((traffic, head, revisions)) = split {
            let stable = traffic.stable();
            next.stable = stable.map(|i| traffic.targets[i].revision.resolve(head));
            let served: Vec<u64> = traffic.served().map(|t| t.revision.resolve(head)).collect();
            for (i, target) in traffic.targets.iter().enumerate() {
                let revision = target.revision.resolve(head);
                if target.shadow {
                    if target.percent == 0 {
                        continue;
                    }
                    if served.contains(&revision) {
                        tracing::warn!(function = %self.name, revision, "a shadow of a served revision is skipped: it would take the callers' instances");
                        continue;
                    }
                    let Some(function) = revisions.get(&revision) else {
                        continue;
                    };
                    let function: Arc<dyn ShadowTarget> = function.clone();
                    next.shadows.push(Arc::new(Shadow {
                        revision,
                        function: Arc::downgrade(&function),
                        percent: u64::from(target.percent),
                        sequence: AtomicU64::new(0),
                    }));
                    next.judged.insert(revision, true);
                } else if Some(i) != stable && target.percent > 0 && next.stable != Some(revision) {
                    next.judged.insert(revision, false);
                }
            }
            next.rule = traffic.rollback.clone();
        }
        let window = next
            .rule
            .as_ref()
            .map_or(DEFAULT_WINDOW, |r| r.window as usize);
        if let Ok(mut revisions) = self.revisions.lock() {
            for state in revisions.values_mut() {
                state.outcomes = Ring::new(window);
                state.agreement = Ring::new(window);
                state.ordered = false;
            }
        }
        self.active.store(
            next.rule.is_some() || !next.shadows.is_empty(),
            Ordering::SeqCst,
        );
        *plan = next;
    }

    /// The shadows that get a copy of this request to `served`, sampled by
    /// their shares.
    pub fn shadows_for(&self, served: u64) -> Vec<(u64, Arc<dyn ShadowTarget>)> {
        if !self.active.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let plan = self.plan.read().unwrap_or_else(PoisonError::into_inner);
        plan.shadows
            .iter()
            .filter(|s| s.revision != served)
            .filter(|s| {
                (s.sequence.fetch_add(1, Ordering::Relaxed).wrapping_mul(37)) % 100 < s.percent
            })
            .filter_map(|s| Some((s.revision, s.function.upgrade()?)))
            .collect()
    }

    /// Records a served request's outcome, judging its revision when the
    /// rule asks to.
    pub fn outcome(&self, revision: u64, status: u16, elapsed: Duration) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        self.observe(revision, status >= 500, elapsed, None);
    }

    /// Records what a shadow copy did: its status, time and, when both it
    /// and the served request answered, their agreement.
    pub fn shadow_finished(
        &self,
        revision: u64,
        result: &Result<Message, InvokeError>,
        served: &Message,
        elapsed: Duration,
    ) {
        let labels = [self.name.as_str(), &revision.to_string()];
        let status = result.as_ref().map_or_else(InvokeError::status, |_| 200);
        // Every instance of the shadow was busy: the copy was skipped, which
        // says nothing of the shadow's answers.
        let skipped = matches!(result, Err(InvokeError::Overloaded(_)));
        let status_label = if skipped {
            "skipped".to_string()
        } else {
            status.to_string()
        };
        self.metrics
            .shadow_requests
            .with_label_values(&[labels[0], labels[1], &status_label])
            .inc();
        if skipped {
            return;
        }
        self.metrics
            .shadow_latency
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        let agreement = result
            .as_ref()
            .ok()
            .map(|answer| agreement::agreement(served, answer));
        self.observe(revision, status >= 500, elapsed, agreement);
    }

    fn observe(&self, revision: u64, failed: bool, elapsed: Duration, agreement: Option<f64>) {
        let plan = self.plan.read().unwrap_or_else(PoisonError::into_inner);
        let judged = plan.judged.get(&revision).copied();
        if judged.is_none() && plan.stable != Some(revision) {
            return;
        }
        let window = plan
            .rule
            .as_ref()
            .map_or(DEFAULT_WINDOW, |r| r.window as usize);
        let mut revisions = self
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = revisions
            .entry(revision)
            .or_insert_with(|| RevisionState::new(window));
        state.outcomes.push(Outcome {
            failed,
            seconds: elapsed.as_secs_f64(),
        });
        if let Some(value) = agreement {
            state.agreement.push(value);
        }
        let mean_agreement = state.agreement.mean();
        let compared = state.agreement.len();
        if let (Some(_), Some(mean)) = (agreement, mean_agreement) {
            self.metrics
                .shadow_agreement
                .with_label_values(&[&self.name, &revision.to_string()])
                .set(mean);
        }
        let (Some(rule), Some(shadow)) = (plan.rule.as_ref(), judged) else {
            return;
        };
        if state.ordered {
            return;
        }
        let summary = state.outcomes.summary();
        let stable = plan
            .stable
            .filter(|_| !shadow)
            .and_then(|s| revisions.get(&s))
            .map(|s| s.outcomes.summary());
        let agreement = mean_agreement.map(|mean| (compared, mean));
        let Some(reason) = window::breach(rule, &summary, stable.as_ref(), agreement) else {
            return;
        };
        if let Some(state) = revisions.get_mut(&revision) {
            state.ordered = true;
        }
        let order = RollbackOrder {
            function: self.name.clone(),
            revision,
            shadow,
            reason,
        };
        if self.verdicts.send(Verdict::Rollback(order)).is_err() {
            tracing::warn!(function = %self.name, revision, "no one carries out rollbacks on this host");
        }
    }

    /// A summary to fill for this request, when drift `settings` sample it:
    /// `sample` of all requests, spread evenly (the golden ratio's
    /// multiples fill the unit interval evenly).
    pub fn drift_sample(&self, settings: &Drift) -> Option<Sample> {
        if settings.sample <= 0.0 {
            return None;
        }
        if settings.sample < 1.0 {
            let n = self.drift_sequence.fetch_add(1, Ordering::Relaxed);
            let position = (n as f64 * 0.618_033_988_749_895).fract();
            if position >= settings.sample {
                return None;
            }
        }
        Some(Sample::default())
    }

    /// Adds a request's summary to `revision`'s drift, publishing changed
    /// scores and announcing crossings of the threshold.
    pub fn drift_observe(&self, revision: u64, sample: Sample, settings: &Drift) {
        let settings = drift::Settings::from(settings);
        let changed = {
            let mut all = self.drift.lock().unwrap_or_else(PoisonError::into_inner);
            let state = all
                .entry(revision)
                .or_insert_with(|| RevisionDrift::new(settings));
            if !state.has(&settings) {
                *state = RevisionDrift::new(settings);
            }
            state.observe(sample)
        };
        let number = revision.to_string();
        for scored in changed {
            self.metrics
                .drift_score
                .with_label_values(&[&self.name, &number, &scored.signal])
                .set(scored.score);
            if let Some(drifted) = scored.crossed {
                let alert = DriftAlert {
                    function: self.name.clone(),
                    revision,
                    signal: scored.signal,
                    score: scored.score,
                    threshold: settings.threshold,
                    drifted,
                };
                if self.verdicts.send(Verdict::Drift(alert)).is_err() {
                    tracing::warn!(function = %self.name, revision, "no one announces drift on this host");
                }
            }
        }
    }

    /// Makes `samples` (summaries of example inputs) `revision`'s drift
    /// reference, starting its window afresh.
    pub fn set_drift_reference(&self, revision: u64, samples: Vec<Sample>, settings: &Drift) {
        let settings = drift::Settings::from(settings);
        let state = RevisionDrift::uploaded(settings, samples);
        self.drift
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(revision, state);
    }

    /// Remembers what `revision` answered request `request_id`, when the
    /// function keeps `capacity` answers for feedback.
    pub fn remember(&self, request_id: &str, revision: u64, output: &Message, capacity: usize) {
        if capacity == 0 {
            return;
        }
        let Some(prediction) = feedback::prediction(output) else {
            return;
        };
        self.remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remember(request_id, revision, prediction, capacity);
    }

    /// Scores `feedback` against the answer it names, into the quality of
    /// the revision that gave it (over its last `capacity` feedbacks).
    pub fn feedback(&self, feedback: &Feedback, capacity: usize) -> Result<Scored, FeedbackError> {
        if capacity == 0 {
            return Err(FeedbackError::Off(self.name.clone()));
        }
        let mut remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((revision, prediction)) = remembered.take(&feedback.request_id) else {
            return Err(FeedbackError::Unknown {
                function: self.name.clone(),
                request_id: feedback.request_id.clone(),
                kept: capacity,
            });
        };
        let score = match feedback.score(&prediction) {
            Ok(score) => score,
            Err(why) => {
                // Not counted: the caller may send it again, right.
                remembered.remember(&feedback.request_id, revision, prediction, capacity);
                return Err(why);
            }
        };
        drop(remembered);
        let mut revisions = self
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = revisions
            .entry(revision)
            .or_insert_with(|| RevisionState::new(DEFAULT_WINDOW));
        state.quality.resize(capacity);
        let labels = [self.name.as_str(), &revision.to_string()];
        self.metrics.feedback.with_label_values(&labels).inc();
        let mut scored = Scored {
            revision,
            correct: None,
            absolute_error: None,
            accuracy: None,
            mean_absolute_error: None,
            window: 0,
        };
        match score {
            Score::Correct(right) => {
                if !state.labels {
                    state.quality.clear();
                    state.labels = true;
                }
                state.quality.push(if right { 1.0 } else { 0.0 });
                scored.correct = Some(right);
                scored.accuracy = state.quality.mean();
                if let Some(accuracy) = scored.accuracy {
                    self.metrics
                        .accuracy
                        .with_label_values(&labels)
                        .set(accuracy);
                }
            }
            Score::AbsoluteError(error) => {
                if state.labels {
                    state.quality.clear();
                    state.labels = false;
                }
                state.quality.push(error);
                scored.absolute_error = Some(error);
                scored.mean_absolute_error = state.quality.mean();
                if let Some(mean) = scored.mean_absolute_error {
                    self.metrics
                        .mean_absolute_error
                        .with_label_values(&labels)
                        .set(mean);
                }
            }
        }
        scored.window = state.quality.len();
        Ok(scored)
    }

    /// Each watched revision's accuracy (or mean absolute error) and
    /// shadow agreement, for the dashboard and `status`.
    pub fn quality(&self) -> Vec<RevisionQuality> {
        let mut all: std::collections::BTreeMap<u64, RevisionQuality> = Default::default();
        let blank = |revision: u64| RevisionQuality {
            revision,
            accuracy: None,
            mean_absolute_error: None,
            feedback: 0,
            agreement: None,
            compared: 0,
            drift_reference: 0,
            drift_reference_uploaded: false,
            drift: Default::default(),
        };
        {
            let revisions = self
                .revisions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (revision, state) in revisions.iter() {
                let quality = all.entry(*revision).or_insert_with(|| blank(*revision));
                quality.accuracy = state.quality.mean().filter(|_| state.labels);
                quality.mean_absolute_error = state.quality.mean().filter(|_| !state.labels);
                quality.feedback = state.quality.len();
                quality.agreement = state.agreement.mean();
                quality.compared = state.agreement.len();
            }
        }
        let drift = self.drift.lock().unwrap_or_else(PoisonError::into_inner);
        for (revision, state) in drift.iter() {
            let quality = all.entry(*revision).or_insert_with(|| blank(*revision));
            quality.drift_reference = state.reference_len();
            quality.drift_reference_uploaded = state.is_uploaded();
            quality.drift = state.scores().into_iter().collect();
        }
        all.into_values().collect()
    }
}

/// What is known of one revision's quality.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RevisionQuality {
    /// The revision.
    pub revision: u64,
    /// Share of right labels over its latest feedback.
    pub accuracy: Option<f64>,
    /// Mean absolute error over its latest feedback.
    pub mean_absolute_error: Option<f64>,
    /// Feedback in that window.
    pub feedback: usize,
    /// Mean agreement of its shadow answers with the served ones.
    pub agreement: Option<f64>,
    /// Comparisons in that window.
    pub compared: usize,
    /// Summaries in its drift reference so far.
    pub drift_reference: usize,
    /// Whether the reference came from example inputs.
    pub drift_reference_uploaded: bool,
    /// Each signal's drift score, once its window is full.
    pub drift: std::collections::BTreeMap<String, f64>,
}
