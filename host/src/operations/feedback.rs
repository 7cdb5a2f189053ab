//! Feedback on predictions: the answers a function gave lately, kept by
//! request id (which revision answered, and what it predicted), scored
//! against the true label or value a caller sends later.

use super::agreement::top_labels;
use crate::bindings::Message;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};

/// Longest request id remembered.
const MAX_ID_BYTES: usize = 128;

/// What an answer predicted.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// A classification's top-1 label (of its first row).
    Label(String),
    /// A single number (a score, a regression).
    Value(f64),
}

/// The prediction in an answer: a classification's top label, or the one
/// number of a JSON answer that holds exactly one.
pub fn prediction(output: &Message) -> Option<Prediction> {
    let answer: Value = serde_json::from_slice(&output.body).ok()?;
    if let Some(labels) = top_labels(&answer) {
        return labels.into_iter().next().map(Prediction::Label);
    }
    let mut numbers = Vec::new();
    super::agreement::numbers(&answer, &mut numbers);
    match numbers.as_slice() {
        [only] => Some(Prediction::Value(*only)),
        _ => None,
    }
}

/// One piece of feedback as a caller sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// The answer's request id (its `X-Request-Id`).
    pub request_id: String,
    /// The true label, for a classification.
    #[serde(default)]
    pub label: Option<String>,
    /// The true value, for a number.
    #[serde(default)]
    pub value: Option<f64>,
}

/// Why feedback was not counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    /// The function keeps no answers.
    #[error(
        "function {0} keeps no answers for feedback: set `[monitoring] feedback = N` in its manifest"
    )]
    Off(String),
    /// No answer with that id is remembered.
    #[error(
        "no answer of function {function} with request id {request_id:?} is remembered: feedback is taken once, for the last {kept} answers of its revisions whose manifest sets `[monitoring] feedback`"
    )]
    Unknown {
        /// The function.
        function: String,
        /// The id sent.
        request_id: String,
        /// How many answers it keeps.
        kept: usize,
    },
    /// The feedback does not fit the answer.
    #[error("{0}")]
    Mismatch(String),
}

/// How one answer scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Score {
    /// A label, right or wrong.
    Correct(bool),
    /// A number, this far off.
    AbsoluteError(f64),
}

impl Feedback {
    /// Scores `prediction` against this feedback's truth.
    pub fn score(&self, prediction: &Prediction) -> Result<Score, FeedbackError> {
        match (prediction, &self.label, self.value) {
            (Prediction::Label(predicted), Some(label), None) => {
                Ok(Score::Correct(predicted == label))
            }
            (Prediction::Value(predicted), None, Some(value)) if value.is_finite() => {
                Ok(Score::AbsoluteError((predicted - value).abs()))
            }
            (Prediction::Label(_), _, _) => Err(FeedbackError::Mismatch(
                "the answer was a label: send {\"request_id\": ..., \"label\": \"...\"}".into(),
            )),
            (Prediction::Value(_), _, _) => Err(FeedbackError::Mismatch(
                "the answer was a number: send {\"request_id\": ..., \"value\": N} with a finite N"
                    .into(),
            )),
        }
    }
}

/// The latest answers of one function, by request id.
#[derive(Debug, Default)]
pub struct Remembered {
    answers: HashMap<String, (u64, u64, Prediction)>,
    order: VecDeque<(u64, String)>,
    sequence: u64,
}

impl Remembered {
    /// Keeps the answer `request_id` got from `revision`, at most
    /// `capacity` answers in all (the oldest go first).
    pub fn remember(
        &mut self,
        request_id: &str,
        revision: u64,
        prediction: Prediction,
        capacity: usize,
    ) {
        // Ids are the caller's (NATS headers included): a long one is not
        // kept, so N answers stay small.
        if request_id.len() > MAX_ID_BYTES {
            return;
        }
        self.sequence += 1;
        self.answers.insert(
            request_id.to_string(),
            (self.sequence, revision, prediction),
        );
        self.order
            .push_back((self.sequence, request_id.to_string()));
        while self.answers.len() > capacity
            && let Some((sequence, id)) = self.order.pop_front()
        {
            // A repeated request id left an older entry in the order.
            if self
                .answers
                .get(&id)
                .is_some_and(|(s, _, _)| *s == sequence)
            {
                self.answers.remove(&id);
            }
        }
        // Entries of ids already taken or repeated stay in the order; keep
        // it bounded too.
        while self.order.len() > capacity.saturating_mul(2).max(16) {
            self.order.pop_front();
        }
    }

    /// Takes the answer `request_id` got: its revision and prediction.
    pub fn take(&mut self, request_id: &str) -> Option<(u64, Prediction)> {
        self.answers
            .remove(request_id)
            .map(|(_, revision, prediction)| (revision, prediction))
    }

    /// How many answers it holds.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Message {
        Message {
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn feedback(json: &str) -> Feedback {
        serde_json::from_str(json).expect("feedback")
    }

    #[test]
    fn predictions_are_top_labels_or_single_numbers() {
        let classified =
            json(r#"{"predictions":[[{"label":"180","score":0.8},{"label":"0","score":0.2}]]}"#);
        assert_eq!(
            prediction(&classified),
            Some(Prediction::Label("180".into()))
        );
        assert_eq!(
            prediction(&json(r#"{"score": 0.25}"#)),
            Some(Prediction::Value(0.25))
        );
        assert_eq!(prediction(&json("[[3.5]]")), Some(Prediction::Value(3.5)));
        assert_eq!(prediction(&json("[1, 2]")), None);
        assert_eq!(prediction(&json("not json")), None);
    }

    #[test]
    fn feedback_scores_labels_and_values() {
        let label = Prediction::Label("0".into());
        assert_eq!(
            feedback(r#"{"request_id":"a","label":"0"}"#).score(&label),
            Ok(Score::Correct(true))
        );
        assert_eq!(
            feedback(r#"{"request_id":"a","label":"180"}"#).score(&label),
            Ok(Score::Correct(false))
        );
        let why = feedback(r#"{"request_id":"a","value":1}"#)
            .score(&label)
            .expect_err("a label");
        assert!(why.to_string().contains("the answer was a label"), "{why}");
        let value = Prediction::Value(2.0);
        assert_eq!(
            feedback(r#"{"request_id":"a","value":2.5}"#).score(&value),
            Ok(Score::AbsoluteError(0.5))
        );
    }

    #[test]
    fn only_the_latest_answers_are_remembered_and_each_is_taken_once() {
        let mut kept = Remembered::default();
        for i in 0..10 {
            kept.remember(&format!("r{i}"), 1, Prediction::Value(f64::from(i)), 4);
        }
        assert_eq!(kept.len(), 4);
        assert_eq!(kept.take("r5"), None);
        assert_eq!(kept.take("r9"), Some((1, Prediction::Value(9.0))));
        assert_eq!(kept.take("r9"), None);
        // A repeated id keeps its newest answer through evictions.
        kept.remember("again", 1, Prediction::Value(1.0), 4);
        kept.remember("again", 2, Prediction::Value(2.0), 4);
        for i in 0..2 {
            kept.remember(&format!("x{i}"), 1, Prediction::Value(0.0), 4);
        }
        assert_eq!(kept.take("again"), Some((2, Prediction::Value(2.0))));
        kept.remember(&"x".repeat(200), 1, Prediction::Value(0.0), 4);
        assert_eq!(kept.take(&"x".repeat(200)), None, "a long id is not kept");
    }
}
