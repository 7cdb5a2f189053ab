//! How a function's requests split across its revisions: Knative's traffic
//! targets (a revision or `latest`, a percent, an optional tag), checked
//! once when set, and the pure choice of an arm for one request.

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
}

/// A function's traffic split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// The targets; their percents sum to 100.
    pub targets: Vec<TrafficTarget>,
    /// A request header whose value picks the target (the same value,
    /// the same target), instead of spreading requests evenly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
}

impl Default for Traffic {
    /// Every request to the head revision.
    fn default() -> Self {
        Traffic {
            targets: vec![TrafficTarget {
                revision: RevisionRef::Latest(Latest::Latest),
                percent: 100,
                tag: None,
            }],
            sticky_header: None,
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
        let sum: u32 = self.targets.iter().map(|t| u32::from(t.percent)).sum();
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
        Ok(())
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
        for target in &self.targets {
            upto += u64::from(target.percent);
            if slot < upto {
                return target;
            }
        }
        // Percents sum to 100 (checked); kept total for an unchecked value.
        &self.targets[self.targets.len() - 1]
    }

    /// The target tagged `tag`.
    pub fn tagged(&self, tag: &str) -> Option<&TrafficTarget> {
        self.targets.iter().find(|t| t.tag.as_deref() == Some(tag))
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
}
