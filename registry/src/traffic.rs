//! How a function's requests split across its revisions: Knative's traffic
//! targets (a revision or `latest`, a percent, an optional tag), shadow
//! targets that get copies, the rule that rolls a failing canary back,
//! checked once when set, and the pure choice of an arm for one request.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most targets one function may split across.
pub const MAX_TARGETS: usize = 8;

/// Why a split was refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct TrafficError {
    /// The field, e.g. `targets[1].tag`.
    pub field: String,
    /// What is wrong.
    pub why: String,
}

fn refuse(field: impl Into<String>, why: impl Into<String>) -> TrafficError {
    TrafficError {
        field: field.into(),
        why: why.into(),
    }
}

/// Which revision a target serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RevisionRef {
    /// A fixed revision number.
    Number(u64),
    /// Whatever revision is the function's head (the string `"latest"`).
    Latest(Latest),
}

/// The word `latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Latest {
    /// The head revision.
    Latest,
}

impl RevisionRef {
    /// The revision number, with `head` for `latest`.
    pub fn resolve(self, head: u64) -> u64 {
        match self {
            RevisionRef::Number(n) => n,
            RevisionRef::Latest(_) => head,
        }
    }
}

/// One target of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficTarget {
    /// The revision served.
    pub revision: RevisionRef,
    /// Share of untagged requests, 0 to 100.
    pub percent: u8,
    /// A name that addresses this target alone (`name@tag`), even at 0 %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// A shadow serves no one: it runs a copy of `percent` % of the
    /// requests, its answers compared with the served ones and discarded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

/// When a canary (a target other than the stable one) or a shadow is taken
/// out of the split automatically: over its last `window` requests, once it
/// has seen `min_requests`, any limit breached routes it to 0 %.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRule {
    /// Requests a target must have answered before it is judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// How many of its latest requests it is judged on.
    #[serde(default = "default_window")]
    pub window: u32,
    /// Highest share of 5xx answers, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Highest p99 latency as a multiple of the stable target's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Lowest mean agreement of a shadow with the served answers, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agreement: Option<f64>,
}

fn default_min_requests() -> u32 {
    50
}

fn default_window() -> u32 {
    200
}

/// Longest window a rollback rule may keep per target.
pub const MAX_WINDOW: u32 = 10_000;

/// A function's traffic split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// The targets; their percents sum to 100.
    pub targets: Vec<TrafficTarget>,
    /// A request header whose value picks the target (the same value,
    /// the same target), instead of spreading requests evenly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// When canaries and shadows are rolled back automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackRule>,
}

impl Default for Traffic {
    /// Every request to the head revision.
    fn default() -> Self {
        Traffic {
            targets: vec![TrafficTarget {
                revision: RevisionRef::Latest(Latest::Latest),
                percent: 100,
                tag: None,
                shadow: false,
            }],
            sticky_header: None,
            rollback: None,
        }
    }
}

impl Traffic {
    /// Checks the split against the function's stored `revisions`; the
    /// message names the field at fault.
    pub fn check(&self, revisions: &[u64]) -> Result<(), TrafficError> {
        if self.targets.is_empty() || self.targets.len() > MAX_TARGETS {
            let why = format!(
                "between 1 and {MAX_TARGETS} targets, not {}",
                self.targets.len()
            );
            return Err(refuse("targets", why));
        }
        let sum: u32 = self.served().map(|t| u32::from(t.percent)).sum();
        if sum != 100 {
            return Err(refuse(
                "targets",
                format!("the percents sum to {sum}, not 100"),
            ));
        }
        for (i, target) in self.targets.iter().enumerate() {
            if let RevisionRef::Number(n) = target.revision
                && !revisions.contains(&n)
            {
                let why = format!("the function has no revision {n} (it has {revisions:?})");
                return Err(refuse(format!("targets[{i}].revision"), why));
            }
            if target.shadow && self.served().any(|t| t.revision == target.revision) {
                let why = "a shadow of a served revision would take its callers' instances";
                return Err(refuse(format!("targets[{i}].revision"), why));
            }
            if target.percent > 100 {
                let why = format!("{} is not a percent (0 to 100)", target.percent);
                return Err(refuse(format!("targets[{i}].percent"), why));
            }
            if let Some(tag) = &target.tag {
                let field = format!("targets[{i}].tag");
                if !is_tag(tag) {
                    let why = format!(
                        "{tag:?} is not a tag (1 to 32 lowercase letters, digits or '-', not only digits)"
                    );
                    return Err(refuse(field, why));
                }
                if self.targets[..i]
                    .iter()
                    .any(|t| t.tag.as_ref() == Some(tag))
                {
                    return Err(refuse(field, format!("{tag:?} is used twice")));
                }
            }
        }
        if let Some(header) = &self.sticky_header {
            let valid = !header.is_empty()
                && header.len() <= 64
                && header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(refuse(
                    "sticky_header",
                    format!("{header:?} is not a header name (letters, digits, '-', '_')"),
                ));
            }
        }
        if let Some(rule) = &self.rollback {
            rule.check()?;
        }
        Ok(())
    }

    /// The targets that serve callers (every one but the shadows).
    pub fn served(&self) -> impl Iterator<Item = &TrafficTarget> {
        self.targets.iter().filter(|t| !t.shadow)
    }

    /// The shadow targets with a share above 0.
    pub fn shadows(&self) -> impl Iterator<Item = &TrafficTarget> {
        self.targets.iter().filter(|t| t.shadow && t.percent > 0)
    }

    /// The index of the stable target, the one canaries are judged
    /// against: the served target with the largest share (the first of
    /// equals).
    pub fn stable(&self) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, target) in self.targets.iter().enumerate() {
            if !target.shadow && best.is_none_or(|b| target.percent > self.targets[b].percent) {
                best = Some(i);
            }
        }
        best
    }

    /// The split with target `index` routed to 0 %: a canary's share goes
    /// to the stable target; a shadow stops getting copies. The target
    /// stays, so its tag still reaches it.
    pub fn without(&self, index: usize) -> Traffic {
        let mut split = self.clone();
        let Some(target) = split.targets.get_mut(index) else {
            return split;
        };
        let share = std::mem::take(&mut target.percent);
        if !target.shadow
            && let Some(stable) = self.stable().filter(|s| *s != index)
        {
            split.targets[stable].percent += share;
        }
        split
    }

    /// The target an untagged request goes to: by the hash of its sticky
    /// key when it has one, else by `sequence` (a per-function counter),
    /// spread so every window of 100 requests holds each share exactly.
    pub fn pick(&self, sticky_key: Option<&[u8]>, sequence: u64) -> &TrafficTarget {
        let slot = match sticky_key {
            Some(key) => {
                let digest = Sha256::digest(key);
                let mut first = [0u8; 8];
                first.copy_from_slice(&digest[..8]);
                u64::from_be_bytes(first) % 100
            }
            // Multiplying by 37 (prime to 100) visits every slot once per
            // 100 requests, interleaving the targets' slots.
            None => (sequence.wrapping_mul(37)) % 100,
        };
        let mut upto = 0u64;
        let mut last = &self.targets[0];
        for target in self.served() {
            upto += u64::from(target.percent);
            if slot < upto {
                return target;
            }
            last = target;
        }
        // Percents sum to 100 (checked); kept total for an unchecked value.
        last
    }

    /// The target tagged `tag`.
    pub fn tagged(&self, tag: &str) -> Option<&TrafficTarget> {
        self.targets.iter().find(|t| t.tag.as_deref() == Some(tag))
    }
}

impl RollbackRule {
    fn check(&self) -> Result<(), TrafficError> {
        if self.window == 0 || self.window > MAX_WINDOW {
            let why = format!("between 1 and {MAX_WINDOW}, not {}", self.window);
            return Err(refuse("rollback.window", why));
        }
        if self.min_requests == 0 || self.min_requests > self.window {
            let why = format!(
                "between 1 and the window ({}), not {}",
                self.window, self.min_requests
            );
            return Err(refuse("rollback.min_requests", why));
        }
        for (field, value) in [
            ("max_error_rate", self.max_error_rate),
            ("min_agreement", self.min_agreement),
        ] {
            if let Some(value) = value
                && !(0.0..=1.0).contains(&value)
            {
                let why = format!("a fraction from 0 to 1, not {value}");
                return Err(refuse(format!("rollback.{field}"), why));
            }
        }
        if let Some(ratio) = self.max_p99_ratio
            && !(ratio.is_finite() && ratio >= 1.0)
        {
            let why = format!("a ratio of at least 1, not {ratio}");
            return Err(refuse("rollback.max_p99_ratio", why));
        }
        if self.max_error_rate.is_none()
            && self.max_p99_ratio.is_none()
            && self.min_agreement.is_none()
        {
            let why = "names no limit (max_error_rate, max_p99_ratio or min_agreement)";
            return Err(refuse("rollback", why));
        }
        Ok(())
    }
}

/// Tags are short names: lowercase letters, digits and '-', not only
/// digits (a number names a revision).
fn is_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 32
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !tag.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(json: &str) -> Traffic {
        serde_json::from_str(json).expect("a traffic split")
    }

    #[test]
    fn ninety_ten_is_exact_over_every_hundred_requests() {
        let traffic =
            split(r#"{"targets":[{"revision":1,"percent":90},{"revision":2,"percent":10}]}"#);
        assert_eq!(traffic.check(&[1, 2]), Ok(()));
        for start in [0u64, 7, 1000] {
            let second = (start..start + 100)
                .filter(|n| traffic.pick(None, *n).revision == RevisionRef::Number(2))
                .count();
            assert_eq!(second, 10, "from {start}");
        }
    }

    #[test]
    fn a_sticky_key_always_picks_the_same_target() {
        let traffic = split(
            r#"{"targets":[{"revision":1,"percent":50},{"revision":"latest","percent":50}]}"#,
        );
        let first = traffic.pick(Some(b"alice"), 0).clone();
        for n in 1..50 {
            assert_eq!(traffic.pick(Some(b"alice"), n), &first);
        }
        let picked: std::collections::HashSet<_> = (0..64)
            .map(|i| {
                traffic
                    .pick(Some(format!("user-{i}").as_bytes()), 0)
                    .revision
            })
            .collect();
        assert_eq!(picked.len(), 2, "keys spread over both targets");
    }

    #[test]
    fn bad_splits_name_their_field() {
        let cases = [
            (
                r#"{"targets":[{"revision":1,"percent":90}]}"#,
                "the percents sum to 90",
            ),
            (
                r#"{"targets":[{"revision":9,"percent":100}]}"#,
                "targets[0].revision: the function has no revision 9",
            ),
            (
                r#"{"targets":[{"revision":1,"percent":100,"tag":"A"}]}"#,
                "targets[0].tag: \"A\" is not a tag",
            ),
            (
                r#"{"targets":[{"revision":1,"percent":50,"tag":"x"},{"revision":2,"percent":50,"tag":"x"}]}"#,
                "targets[1].tag: \"x\" is used twice",
            ),
            (
                r#"{"targets":[{"revision":1,"percent":100}],"sticky_header":"a b"}"#,
                "sticky_header",
            ),
        ];
        for (json, want) in cases {
            let why = split(json).check(&[1, 2]).expect_err(json).to_string();
            assert!(why.contains(want), "{json}: {why}");
        }
        assert!(
            serde_json::from_str::<Traffic>(r#"{"targets":[{"revision":"newest","percent":100}]}"#)
                .is_err()
        );
    }

    #[test]
    fn shadows_take_no_share_and_are_never_picked() {
        let traffic = split(
            r#"{"targets":[{"revision":1,"percent":100},{"revision":2,"percent":30,"shadow":true}]}"#,
        );
        assert_eq!(traffic.check(&[1, 2]), Ok(()));
        assert!((0..100).all(|n| traffic.pick(None, n).revision == RevisionRef::Number(1)));
        assert_eq!(traffic.shadows().count(), 1);
        assert_eq!(traffic.stable(), Some(0));
        let off = traffic.without(1);
        assert_eq!(off.targets[0].percent, 100);
        assert_eq!(off.targets[1].percent, 0);
        assert_eq!(off.shadows().count(), 0);
        let only_shadow = split(r#"{"targets":[{"revision":1,"percent":100,"shadow":true}]}"#);
        let why = only_shadow.check(&[1]).expect_err("nothing served");
        assert!(why.to_string().contains("sum to 0"), "{why}");
    }

    #[test]
    fn a_rolled_back_canary_gives_its_share_to_the_stable_target() {
        let traffic = split(
            r#"{"targets":[{"revision":1,"percent":80},{"revision":2,"percent":15,"tag":"candidate"},{"revision":3,"percent":5}]}"#,
        );
        assert_eq!(traffic.stable(), Some(0));
        let back = traffic.without(1);
        let shares: Vec<u8> = back.targets.iter().map(|t| t.percent).collect();
        assert_eq!(shares, [95, 0, 5]);
        assert_eq!(back.targets[1].tag.as_deref(), Some("candidate"));
        assert_eq!(back.check(&[1, 2, 3]), Ok(()));
    }

    #[test]
    fn rollback_rules_name_their_field() {
        let with_rule = |rule: &str| {
            split(&format!(
                r#"{{"targets":[{{"revision":1,"percent":100}}],"rollback":{rule}}}"#
            ))
        };
        assert_eq!(with_rule(r#"{"max_error_rate":0.1}"#).check(&[1]), Ok(()));
        let rule = with_rule(r#"{"max_error_rate":0.1}"#)
            .rollback
            .expect("a rule");
        assert_eq!((rule.min_requests, rule.window), (50, 200));
        for (rule, want) in [
            (r#"{"max_error_rate":1.5}"#, "rollback.max_error_rate"),
            (r#"{"max_p99_ratio":0.5}"#, "rollback.max_p99_ratio"),
            (r#"{"min_agreement":-1}"#, "rollback.min_agreement"),
            (
                r#"{"window":10,"min_requests":20,"max_error_rate":0.1}"#,
                "rollback.min_requests",
            ),
            (r#"{"window":0,"max_error_rate":0.1}"#, "rollback.window"),
            (r#"{}"#, "names no limit"),
        ] {
            let why = with_rule(rule).check(&[1]).expect_err(rule).to_string();
            assert!(why.contains(want), "{rule}: {why}");
        }
    }
}
