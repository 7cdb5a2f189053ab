//! How a function is invoked besides HTTP: the `[triggers]` table of a
//! manifest, core NATS and durable JetStream, and the checks on every
//! subject and name in it.
//!
//! ```toml
//! [triggers]
//! nats = { subject = "embed.requests", result_subject = "embed.results" }
//! [triggers.jetstream]
//! stream = "EVENTS"              # created if missing (file storage), else bound
//! subjects = ["events.text.>"]   # the stream's subjects the function consumes
//! durable = "embed"              # the pull consumer every host shares
//! max_deliver = 5
//! backoff_ms = [200, 1000, 5000] # redelivery delays after a retryable failure
//! ack_wait_ms = 30000
//! result_subject = "predictions.embed"
//! dead_letter_subject = "dead.embed"
//! ```

use crate::RegistryError;
use serde::{Deserialize, Serialize};

/// Longest NATS subject a manifest may name.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Longest stream or durable consumer name.
pub const MAX_JETSTREAM_NAME: usize = 64;
/// Most deliveries of one message a trigger may ask for.
pub const MAX_DELIVER: u32 = 100;
/// Longest redelivery delay or ack wait (one hour).
pub const MAX_WAIT_MS: u64 = 3_600_000;
/// Shortest ack wait: below this a busy host's progress acks cannot keep up.
pub const MIN_ACK_WAIT_MS: u64 = 500;
/// Most subjects one JetStream trigger consumes.
pub const MAX_STREAM_SUBJECTS: usize = 16;

/// How a function is invoked.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Triggers {
    /// Invocable at `POST /v1/functions/{name}/invoke`.
    pub http: bool,
    /// Invocable by core NATS messages.
    pub nats: Option<NatsTrigger>,
    /// Fed by a durable JetStream consumer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamTrigger>,
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers {
            http: true,
            nats: None,
            jetstream: None,
        }
    }
}

/// The NATS side of a function.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTrigger {
    /// Subject the function listens on (queue group `cascade.<function>`).
    pub subject: String,
    /// Where results of messages without a reply subject go.
    pub result_subject: Option<String>,
}

/// A durable JetStream consumer feeding a function: at-least-once, with
/// retries, dead letters and de-duplicated results.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamTrigger {
    /// The stream: created with `subjects` when missing, bound when it exists.
    pub stream: String,
    /// The subjects of the stream this function consumes (wildcards allowed).
    pub subjects: Vec<String>,
    /// The durable pull consumer every host serving the function shares.
    pub durable: String,
    /// Deliveries of one message before it goes to the dead letters.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: u32,
    /// Delays before redelivery after the 1st, 2nd, … retryable failure
    /// (the last repeats).
    #[serde(default = "default_backoff")]
    pub backoff_ms: Vec<u64>,
    /// How long a delivered message may go without an ack or progress
    /// before JetStream hands it to another host.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_ms: u64,
    /// Where results go, published with JetStream (a stream must capture
    /// it; one is created when none does).
    pub result_subject: Option<String>,
    /// Where messages that cannot succeed go, with headers saying why.
    pub dead_letter_subject: Option<String>,
}

fn default_max_deliver() -> u32 {
    5
}

fn default_backoff() -> Vec<u64> {
    vec![1_000, 5_000, 30_000]
}

fn default_ack_wait() -> u64 {
    30_000
}

fn invalid(message: String) -> Result<(), RegistryError> {
    Err(RegistryError::Invalid(format!(
        "invalid manifest: {message}"
    )))
}

/// Checks every subject and name of the triggers.
pub fn check(triggers: &Triggers) -> Result<(), RegistryError> {
    if let Some(nats) = &triggers.nats {
        check_subject("triggers.nats.subject", &nats.subject)?;
        if let Some(result) = &nats.result_subject {
            check_subject("triggers.nats.result_subject", result)?;
        }
    }
    if let Some(jetstream) = &triggers.jetstream {
        check_jetstream(jetstream)?;
    }
    Ok(())
}

fn check_jetstream(t: &JetStreamTrigger) -> Result<(), RegistryError> {
    check_name("triggers.jetstream.stream", &t.stream)?;
    check_name("triggers.jetstream.durable", &t.durable)?;
    if t.subjects.is_empty() || t.subjects.len() > MAX_STREAM_SUBJECTS {
        return invalid(format!(
            "`triggers.jetstream.subjects` must list 1 to {MAX_STREAM_SUBJECTS} subjects"
        ));
    }
    for subject in &t.subjects {
        check_pattern("triggers.jetstream.subjects", subject)?;
    }
    if t.max_deliver == 0 || t.max_deliver > MAX_DELIVER {
        return invalid(format!(
            "`triggers.jetstream.max_deliver` must be 1 to {MAX_DELIVER}"
        ));
    }
    if t.backoff_ms.len() >= t.max_deliver as usize && !t.backoff_ms.is_empty() {
        return invalid(format!(
            "`triggers.jetstream.backoff_ms` has {} delays but `max_deliver = {}` redelivers \
             at most {} times (one delay per redelivery)",
            t.backoff_ms.len(),
            t.max_deliver,
            t.max_deliver - 1
        ));
    }
    if t.backoff_ms.iter().any(|&d| d == 0 || d > MAX_WAIT_MS) {
        return invalid(format!(
            "`triggers.jetstream.backoff_ms` delays must be 1 to {MAX_WAIT_MS} ms"
        ));
    }
    if !(MIN_ACK_WAIT_MS..=MAX_WAIT_MS).contains(&t.ack_wait_ms) {
        return invalid(format!(
            "`triggers.jetstream.ack_wait_ms` must be {MIN_ACK_WAIT_MS} to {MAX_WAIT_MS}"
        ));
    }
    let outlets = [
        ("triggers.jetstream.result_subject", &t.result_subject),
        (
            "triggers.jetstream.dead_letter_subject",
            &t.dead_letter_subject,
        ),
    ];
    for (field, subject) in outlets {
        let Some(subject) = subject else { continue };
        check_subject(field, subject)?;
        if let Some(pattern) = t.subjects.iter().find(|p| matches(p, subject)) {
            return invalid(format!(
                "`{field}` {subject:?} is one of the consumed subjects ({pattern:?}): \
                 every result would be consumed again"
            ));
        }
    }
    Ok(())
}

/// Checks that `subject` is a plain NATS subject a function may use: tokens
/// of printable characters without spaces, separated by single dots, no
/// wildcards, and none of the prefixes the host and NATS keep for
/// themselves (`cascade.`, `$…`, `_INBOX.`), so a function can neither
/// forge registry events nor answer JetStream or system requests.
fn check_subject(field: &str, subject: &str) -> Result<(), RegistryError> {
    check_tokens(field, subject)?;
    if subject.contains(['*', '>']) {
        return invalid(format!(
            "`{field}` {subject:?} contains a wildcard (`*` or `>`); a function's subjects are plain"
        ));
    }
    Ok(())
}

/// Like [`check_subject`], but wildcards may stand for whole tokens (`*`
/// anywhere, `>` last), as stream subjects take them.
fn check_pattern(field: &str, subject: &str) -> Result<(), RegistryError> {
    check_tokens(field, subject)?;
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let whole = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if token.contains(['*', '>']) && !whole {
            return invalid(format!(
                "`{field}` {subject:?}: a wildcard must be a whole token (`*`, or `>` last)"
            ));
        }
    }
    Ok(())
}

/// What every subject must be: printable tokens, no reserved prefix.
fn check_tokens(field: &str, subject: &str) -> Result<(), RegistryError> {
    let bad = |why: &str| invalid(format!("`{field}` {subject:?} {why}"));
    if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES {
        return bad(&format!("must be 1 to {MAX_SUBJECT_BYTES} bytes"));
    }
    if subject.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("contains a space or a control character (CR, LF, tab, ...)");
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return bad("has an empty token (a leading, trailing or doubled dot)");
    }
    let first = tokens[0];
    if first == "cascade" || first.starts_with('$') || first == "_INBOX" || first == ">" {
        return bad("uses a reserved prefix (`cascade.`, `$`, `_INBOX.`, or `>` for everything)");
    }
    Ok(())
}

/// A stream or consumer name: JetStream puts it in API subjects, so only
/// letters, digits, `-` and `_`.
fn check_name(field: &str, name: &str) -> Result<(), RegistryError> {
    let fine = !name.is_empty()
        && name.len() <= MAX_JETSTREAM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fine {
        Ok(())
    } else {
        invalid(format!(
            "`{field}` {name:?} must be 1 to {MAX_JETSTREAM_NAME} letters, digits, `-` or `_`"
        ))
    }
}

/// Whether the NATS subject pattern `pattern` matches the plain `subject`.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        if token == ">" {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(s) if token == "*" || token == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger() -> JetStreamTrigger {
        JetStreamTrigger {
            stream: "EVENTS".into(),
            subjects: vec!["events.images.>".into()],
            durable: "orientation".into(),
            max_deliver: 5,
            backoff_ms: vec![200, 1000, 5000],
            ack_wait_ms: 30_000,
            result_subject: Some("predictions.orientation".into()),
            dead_letter_subject: Some("dead.orientation".into()),
        }
    }

    fn error_of(change: impl FnOnce(&mut JetStreamTrigger)) -> String {
        let mut t = trigger();
        change(&mut t);
        match check_jetstream(&t) {
            Ok(()) => panic!("{t:?} passed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_jetstream_trigger_is_checked_field_by_field() {
        assert!(check_jetstream(&trigger()).is_ok());
        let cases: Vec<(String, &str)> = vec![
            (
                error_of(|t| t.stream = "EV.ENTS".into()),
                "`triggers.jetstream.stream` \"EV.ENTS\" must be",
            ),
            (
                error_of(|t| t.durable = String::new()),
                "`triggers.jetstream.durable`",
            ),
            (
                error_of(|t| t.subjects.clear()),
                "must list 1 to 16 subjects",
            ),
            (
                error_of(|t| t.subjects = vec!["events.im*".into()]),
                "whole token",
            ),
            (
                error_of(|t| t.subjects = vec!["events.>.x".into()]),
                "whole token",
            ),
            (
                error_of(|t| t.subjects = vec![">".into()]),
                "reserved prefix",
            ),
            (
                error_of(|t| t.subjects = vec!["$JS.API.>".into()]),
                "reserved prefix",
            ),
            (
                error_of(|t| t.max_deliver = 0),
                "`triggers.jetstream.max_deliver` must be 1 to 100",
            ),
            (
                error_of(|t| t.max_deliver = 3),
                "has 3 delays but `max_deliver = 3` redelivers at most 2 times",
            ),
            (error_of(|t| t.backoff_ms = vec![0]), "delays must be 1 to"),
            (
                error_of(|t| t.ack_wait_ms = 10),
                "`triggers.jetstream.ack_wait_ms` must be 500 to",
            ),
            (
                error_of(|t| t.result_subject = Some("events.images.out".into())),
                "would be consumed again",
            ),
            (
                error_of(|t| t.dead_letter_subject = Some("dead.*".into())),
                "wildcard",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.starts_with("invalid manifest: "), "{message}");
            assert!(message.contains(expected), "{message} lacks {expected}");
        }
    }

    #[test]
    fn patterns_match_as_nats_does() {
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
    }
}
