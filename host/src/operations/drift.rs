//! Drift: what a sampled share of requests looked like at each stage
//! boundary (message sizes; each tensor's mean, standard deviation and
//! norm; the class of score tensors and classification answers), a
//! revision's first summaries kept as its reference, and the latest ones
//! compared with it signal by signal.
//!
//! The score is the population stability index,
//! `PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ)`, where `eᵢ` is the reference's share
//! of bin `i` and `aᵢ` the window's. Numbers are binned at the
//! reference's deciles (fewer bins when values repeat), classes by class.
//! A share is never below half a summary (`0.5 / n`), so an empty bin does
//! not make it infinite. The usual reading: below 0.1 stable, 0.1–0.25 a
//! shift, above 0.25 drift.

use super::agreement::top_labels;
use super::window::Ring;
use crate::bindings::{Message, Tensor, TensorType};
use std::collections::BTreeMap;

/// Largest class count a score tensor may have to be read as classes.
const MAX_CLASSES: usize = 1000;

/// Most signals watched per revision: tensor names come from guests, and
/// each signal is a metric series.
const MAX_SIGNALS: usize = 64;

/// What one sampled request looked like: numeric signals and class signals.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    numbers: Vec<(String, f64)>,
    classes: Vec<(String, String)>,
}

impl Sample {
    /// The size of a message, as signal `signal`.
    pub fn size(&mut self, signal: &str, bytes: usize) {
        self.numbers.push((signal.to_string(), bytes as f64));
    }

    /// A tensor between stages: mean, std and norm of its values, and the
    /// class of a score tensor (`[rows, classes]` of floats: the arg max of
    /// its first row).
    pub fn tensor(&mut self, tensor: &Tensor) {
        let Some(values) = values(tensor) else {
            return;
        };
        if values.is_empty() {
            return;
        }
        let n = values.len() as f64;
        let (sum, squares) = values
            .iter()
            .fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
        let mean = sum / n;
        let variance = (squares / n - mean * mean).max(0.0);
        let name = &tensor.name;
        self.numbers.push((format!("{name}.mean"), mean));
        self.numbers.push((format!("{name}.std"), variance.sqrt()));
        self.numbers.push((format!("{name}.norm"), squares.sqrt()));
        let floats = matches!(tensor.ty, TensorType::Fp32 | TensorType::Fp64);
        if let ([_, classes], true) = (tensor.dimensions.as_slice(), floats) {
            let classes = *classes as usize;
            if (2..=MAX_CLASSES).contains(&classes) && values.len() >= classes {
                let first = &values[..classes];
                let best = (0..classes)
                    .max_by(|a, b| first[*a].total_cmp(&first[*b]))
                    .unwrap_or(0);
                self.classes
                    .push((format!("{name}.class"), best.to_string()));
            }
        }
    }

    /// The reply: its size, and its top label when it is a classification.
    pub fn answer(&mut self, message: &Message) {
        self.size("output.bytes", message.body.len());
        if message.content_type.contains("json")
            && let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&message.body)
            && let Some(labels) = top_labels(&answer)
            && let Some(first) = labels.into_iter().next()
        {
            self.classes.push(("output.class".into(), first));
        }
    }
}

/// A tensor's values as numbers (half floats are not read).
fn values(tensor: &Tensor) -> Option<Vec<f64>> {
    let data = &tensor.data;
    Some(match tensor.ty {
        TensorType::Fp32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .filter(|v| v.is_finite())
            .collect(),
        TensorType::Fp64 => data
            .chunks_exact(8)
            .filter_map(|c| Some(f64::from_le_bytes(c.try_into().ok()?)))
            .filter(|v| v.is_finite())
            .collect(),
        TensorType::I64 => data
            .chunks_exact(8)
            .filter_map(|c| Some(i64::from_le_bytes(c.try_into().ok()?) as f64))
            .collect(),
        TensorType::I32 => data
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        TensorType::U8 => data.iter().map(|b| f64::from(*b)).collect(),
        TensorType::Fp16 | TensorType::Bf16 => return None,
    })
}

/// One signal's history: its reference, then its latest values.
#[derive(Debug)]
struct Signal {
    /// Numbers, or class indices into `classes`.
    reference: Vec<f64>,
    latest: Ring<f64>,
    /// For a class signal: the classes seen, by index.
    classes: Option<Vec<String>>,
    /// Bin edges, once the reference is complete (numbers only).
    edges: Option<Vec<f64>>,
    score: Option<f64>,
    drifted: bool,
}

/// A drift score that changed, and whether it crossed the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The signal.
    pub signal: String,
    /// Its score now.
    pub score: f64,
    /// `Some(true)` when it rose above the threshold, `Some(false)` when it
    /// fell back below 80 % of it.
    pub crossed: Option<bool>,
}

/// How one revision's drift is watched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Summaries in the reference.
    pub reference: usize,
    /// Summaries in the window compared with it.
    pub window: usize,
    /// The score above which a signal has drifted.
    pub threshold: f64,
}

impl From<&cascade_registry::manifest::Drift> for Settings {
    fn from(drift: &cascade_registry::manifest::Drift) -> Self {
        Settings {
            reference: drift.reference as usize,
            window: drift.window as usize,
            threshold: drift.threshold,
        }
    }
}

/// Every signal of one revision.
#[derive(Debug)]
pub struct RevisionDrift {
    settings: Settings,
    signals: BTreeMap<String, Signal>,
    /// Summaries seen.
    samples: usize,
    /// Summaries that make the reference: the settings', or how many
    /// example inputs were uploaded.
    reference: usize,
    /// The reference was uploaded, not taken from the first requests.
    uploaded: bool,
}

impl RevisionDrift {
    /// Nothing seen yet.
    pub fn new(settings: Settings) -> Self {
        RevisionDrift {
            settings,
            signals: BTreeMap::new(),
            samples: 0,
            reference: settings.reference,
            uploaded: false,
        }
    }

    /// A reference made of `samples` (summaries of example inputs) instead
    /// of the first requests.
    pub fn uploaded(settings: Settings, samples: Vec<Sample>) -> Self {
        let mut drift = RevisionDrift::new(Settings {
            reference: samples.len(),
            ..settings
        });
        for sample in samples {
            drift.observe(sample);
        }
        drift.settings.reference = settings.reference;
        drift.uploaded = true;
        drift
    }

    /// Whether it was set up with `settings` (an uploaded reference keeps
    /// its own size).
    pub fn has(&self, settings: &Settings) -> bool {
        let Settings {
            reference,
            window,
            threshold,
        } = *settings;
        (self.uploaded || reference == self.settings.reference)
            && window == self.settings.window
            && threshold == self.settings.threshold
    }

    /// Whether the reference came from example inputs.
    pub fn is_uploaded(&self) -> bool {
        self.uploaded
    }

    /// Adds a summary: to the reference while it fills, then to the window.
    /// Scores are computed once the window is full, again every tenth of
    /// it; the changed ones are returned.
    pub fn observe(&mut self, sample: Sample) -> Vec<Scored> {
        let (reference, window) = (self.reference, self.settings.window);
        let in_reference = self.samples < reference;
        self.samples += 1;
        let numbers = sample
            .numbers
            .into_iter()
            .map(|(s, v)| (s, Value::Number(v)));
        let classes = sample
            .classes
            .into_iter()
            .map(|(s, c)| (s, Value::Class(c)));
        for (name, value) in numbers.chain(classes) {
            if self.signals.len() >= MAX_SIGNALS && !self.signals.contains_key(&name) {
                continue;
            }
            let signal = self.signals.entry(name).or_insert_with(|| Signal {
                reference: Vec::new(),
                latest: Ring::new(window),
                classes: matches!(value, Value::Class(_)).then(Vec::new),
                edges: None,
                score: None,
                drifted: false,
            });
            let number = match (value, signal.classes.as_mut()) {
                (Value::Number(v), None) => v,
                (Value::Class(class), Some(classes)) => {
                    match classes.iter().position(|c| *c == class) {
                        Some(index) => index as f64,
                        None if classes.len() < MAX_CLASSES => {
                            classes.push(class);
                            (classes.len() - 1) as f64
                        }
                        // Past the limit, new classes share the last index.
                        None => (MAX_CLASSES - 1) as f64,
                    }
                }
                // A signal changing kind between requests is not compared.
                _ => continue,
            };
            if in_reference {
                signal.reference.push(number);
            } else {
                signal.latest.push(number);
            }
        }
        let past_reference = self.samples.saturating_sub(reference);
        let step = (window / 10).max(1);
        if in_reference || past_reference < window || past_reference % step != 0 {
            return Vec::new();
        }
        let threshold = self.settings.threshold;
        let mut changed = Vec::new();
        for (name, signal) in &mut self.signals {
            if signal.reference.is_empty() || signal.latest.len() < window {
                continue;
            }
            let latest: Vec<f64> = signal.latest.iter().copied().collect();
            let score = match &signal.classes {
                Some(_) => psi_classes(&signal.reference, &latest),
                None => {
                    let edges = signal
                        .edges
                        .get_or_insert_with(|| deciles(&signal.reference));
                    psi_binned(edges, &signal.reference, &latest)
                }
            };
            let crossed = if !signal.drifted && score > threshold {
                signal.drifted = true;
                Some(true)
            } else if signal.drifted && score < 0.8 * threshold {
                signal.drifted = false;
                Some(false)
            } else {
                None
            };
            signal.score = Some(score);
            changed.push(Scored {
                signal: name.clone(),
                score,
                crossed,
            });
        }
        changed
    }

    /// Each signal's latest score.
    pub fn scores(&self) -> Vec<(String, f64)> {
        self.signals
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.score?)))
            .collect()
    }

    /// How many summaries the reference holds so far.
    pub fn reference_len(&self) -> usize {
        self.samples.min(self.reference)
    }
}

enum Value {
    Number(f64),
    Class(String),
}

/// The reference's deciles, without repeats.
fn deciles(reference: &[f64]) -> Vec<f64> {
    let mut sorted = reference.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = (1..10)
        .map(|d| sorted[(sorted.len() * d / 10).min(sorted.len() - 1)])
        .collect();
    edges.dedup();
    edges
}

/// Share of `n` in a bin of `count`, at least half a value.
fn share(count: usize, n: usize) -> f64 {
    (count as f64).max(0.5) / n as f64
}

/// PSI of `reference` against `latest`, each value put in one of `bins`
/// bins by `bin`.
fn psi(bins: usize, bin: impl Fn(f64) -> usize, reference: &[f64], latest: &[f64]) -> f64 {
    let count = |values: &[f64]| {
        let mut counts = vec![0usize; bins];
        values
            .iter()
            .for_each(|v| counts[bin(*v).min(bins - 1)] += 1);
        counts
    };
    let (expected, actual) = (count(reference), count(latest));
    expected
        .iter()
        .zip(&actual)
        .filter(|(e, a)| **e + **a > 0)
        .map(|(e, a)| {
            let (e, a) = (share(*e, reference.len()), share(*a, latest.len()));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// PSI of numbers binned at `edges` (a value on an edge goes below it).
fn psi_binned(edges: &[f64], reference: &[f64], latest: &[f64]) -> f64 {
    let bin = |v: f64| edges.partition_point(|e| *e < v);
    psi(edges.len() + 1, bin, reference, latest)
}

/// PSI of class indices.
fn psi_classes(reference: &[f64], latest: &[f64]) -> f64 {
    let classes = reference
        .iter()
        .chain(latest)
        .fold(1usize, |m, v| m.max(*v as usize + 1));
    psi(classes, |v| v as usize, reference, latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of uniform numbers in [0, 1).
    fn uniform(seed: u64) -> impl Iterator<Item = f64> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
    }

    fn settings() -> Settings {
        Settings {
            reference: 200,
            window: 200,
            threshold: 0.25,
        }
    }

    /// Every score computed while `values` are fed.
    fn feed(drift: &mut RevisionDrift, values: impl Iterator<Item = f64>) -> Vec<Scored> {
        let mut all = Vec::new();
        for v in values {
            let mut sample = Sample::default();
            sample.numbers.push(("x".into(), v));
            all.extend(drift.observe(sample));
        }
        all
    }

    fn crossings(scores: &[Scored]) -> Vec<bool> {
        scores.iter().filter_map(|s| s.crossed).collect()
    }

    #[test]
    fn the_same_distribution_stays_stable_and_a_shifted_one_drifts() {
        let mut drift = RevisionDrift::new(settings());
        // 200 to the reference, then a score every 20 once 200 more came.
        let same = feed(&mut drift, uniform(1).take(600));
        assert_eq!(same.len(), 11);
        assert!(same.iter().all(|s| s.score < 0.15), "{same:?}");
        assert!(crossings(&same).is_empty());
        let shifted = feed(&mut drift, uniform(2).map(|v| v + 0.5).take(200));
        let last = shifted.last().expect("scored");
        assert!(last.score > 1.0, "{shifted:?}");
        assert_eq!(drift.scores(), [("x".to_string(), last.score)]);
        // A crossing is said once, and so is the recovery.
        assert_eq!(crossings(&shifted), [true]);
        let back = feed(&mut drift, uniform(3).take(200));
        assert_eq!(crossings(&back), [false], "{back:?}");
    }

    #[test]
    fn an_uploaded_reference_is_compared_from_the_first_request() {
        let sample = |v: f64| {
            let mut sample = Sample::default();
            sample.numbers.push(("x".into(), v));
            sample
        };
        let examples: Vec<Sample> = uniform(4).take(50).map(sample).collect();
        let mut drift = RevisionDrift::uploaded(settings(), examples);
        assert_eq!(drift.reference_len(), 50);
        assert!(drift.is_uploaded() && drift.has(&settings()));
        let shifted = feed(&mut drift, uniform(5).map(|v| v + 2.0).take(200));
        assert_eq!(crossings(&shifted), [true]);
        assert_eq!(shifted.len(), 1, "scored once the first window is full");
    }

    #[test]
    fn a_revision_watches_a_bounded_number_of_signals() {
        let mut drift = RevisionDrift::new(settings());
        for i in 0..100 {
            let mut sample = Sample::default();
            sample.numbers.push((format!("tensor-{i}.mean"), 1.0));
            drift.observe(sample);
        }
        assert_eq!(drift.signals.len(), MAX_SIGNALS);
    }

    #[test]
    fn psi_of_two_known_histograms() {
        // Halves against a 90/10 split: (0.9−0.5)ln(1.8) + (0.1−0.5)ln(0.2).
        let reference: Vec<f64> = (0..100).map(|i| f64::from(i % 2)).collect();
        let latest: Vec<f64> = (0..100).map(|i| f64::from(u8::from(i % 10 == 0))).collect();
        let want = 0.4 * 1.8f64.ln() + (-0.4) * 0.2f64.ln();
        let got = psi_classes(&reference, &latest);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert_eq!(psi_classes(&reference, &reference), 0.0);
    }

    #[test]
    fn tensors_give_statistics_and_score_tensors_a_class() {
        let floats = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let scores = Tensor {
            name: "scores".into(),
            dimensions: vec![1, 3],
            ty: TensorType::Fp32,
            data: floats(&[0.1, 0.7, 0.2]),
        };
        let mut sample = Sample::default();
        sample.tensor(&scores);
        let mean = sample.numbers[0].1;
        assert!((mean - (1.0 / 3.0)).abs() < 1e-6, "{mean}");
        assert_eq!(sample.numbers[0].0, "scores.mean");
        assert_eq!(
            sample.classes,
            [("scores.class".to_string(), "1".to_string())]
        );
        let answer = Message {
            content_type: "application/json".into(),
            body: br#"{"predictions":[[{"label":"180","score":0.9}]]}"#.to_vec(),
        };
        sample.answer(&answer);
        assert!(
            sample
                .classes
                .contains(&("output.class".into(), "180".into()))
        );
    }
}
