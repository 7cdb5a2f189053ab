//! A function served as several revisions at once: the prepared revisions
//! of its traffic split, and the choice of one for each request (by tag,
//! by sticky key, or spread by share).

use crate::error::InvokeError;
use crate::pipeline::PreparedFunction;
use cascade_registry::traffic::{Latest, RevisionRef, Traffic, TrafficTarget};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a request says about where it should go.
#[derive(Debug, Default, Clone, Copy)]
pub struct Choice<'a> {
    /// A target's tag (`name@tag`, a `Cascade-Tag` header): that target only.
    pub tag: Option<&'a str>,
    /// The value of the split's sticky header, when the request has it.
    pub sticky_key: Option<&'a [u8]>,
}

/// A function's split, ready to serve: each target's revision prepared.
pub struct Split {
    traffic: Traffic,
    head: u64,
    revisions: HashMap<u64, Arc<PreparedFunction>>,
    sequence: AtomicU64,
}

impl Split {
    /// `traffic` over the prepared `revisions` (every revision it names,
    /// with `head` for `latest`).
    pub fn new(
        traffic: Traffic,
        head: u64,
        revisions: HashMap<u64, Arc<PreparedFunction>>,
    ) -> Self {
        Split {
            traffic,
            head,
            revisions,
            sequence: AtomicU64::new(0),
        }
    }

    /// The split.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// The prepared revision `number`, if the split serves it.
    pub fn revision(&self, number: u64) -> Option<Arc<PreparedFunction>> {
        self.revisions.get(&number).cloned()
    }

    /// Every revision the split serves (or shadows).
    pub fn revisions(&self) -> impl Iterator<Item = &Arc<PreparedFunction>> {
        self.revisions.values()
    }

    /// The header whose value keeps a caller on one target, if any.
    pub fn sticky_header(&self) -> Option<&str> {
        self.traffic.sticky_header.as_deref()
    }

    /// The revision that serves a request of `choice` to function `name`.
    pub fn choose(
        &self,
        name: &str,
        choice: &Choice<'_>,
    ) -> Result<Arc<PreparedFunction>, InvokeError> {
        let target = match choice.tag {
            Some(tag) => self
                .traffic
                .tagged(tag)
                .ok_or_else(|| unknown_tag(name, tag))?,
            None => {
                let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
                self.traffic.pick(choice.sticky_key, sequence)
            }
        };
        let revision = target.revision.resolve(self.head);
        self.revisions
            .get(&revision)
            .cloned()
            .ok_or_else(|| InvokeError::Unservable {
                function: name.to_string(),
                revision,
                reason: "the revision is not prepared on this host".into(),
            })
    }
}

/// A tag the function's split does not have.
pub fn unknown_tag(name: &str, tag: &str) -> InvokeError {
    InvokeError::UnknownTag {
        function: name.to_string(),
        tag: tag.to_string(),
    }
}

/// A `cascade traffic` argument that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArgument(String);

/// The split `cascade traffic NAME 3=90 4=10 --tag candidate=4` means:
/// `REVISION=PERCENT` targets (`latest=P` for the head), and tags naming a
/// revision, which join its target or add one at 0 %. Checked in full by
/// the registry.
pub fn split_from_args(
    targets: &[String],
    tags: &[String],
    sticky_header: Option<String>,
) -> Result<Traffic, BadArgument> {
    let revision = |text: &str| -> Result<RevisionRef, BadArgument> {
        match text {
            "latest" => Ok(RevisionRef::Latest(Latest::Latest)),
            number => number.parse().map(RevisionRef::Number).map_err(|_| {
                BadArgument(format!("{number:?} is not a revision number or `latest`"))
            }),
        }
    };
    let mut split = Vec::new();
    for target in targets {
        let (which, percent) = target.split_once('=').ok_or_else(|| {
            BadArgument(format!("{target:?}: expected REVISION=PERCENT, e.g. 3=90"))
        })?;
        let percent = percent.parse().map_err(|_| {
            BadArgument(format!(
                "{target:?}: {percent:?} is not a percent (0 to 100)"
            ))
        })?;
        split.push(TrafficTarget {
            revision: revision(which)?,
            percent,
            tag: None,
            shadow: false,
        });
    }
    for tag in tags {
        let (name, which) = tag.split_once('=').ok_or_else(|| {
            BadArgument(format!(
                "--tag {tag:?}: expected TAG=REVISION, e.g. candidate=4"
            ))
        })?;
        let which = revision(which)?;
        match split
            .iter_mut()
            .find(|t| t.revision == which && t.tag.is_none())
        {
            Some(target) => target.tag = Some(name.to_string()),
            None => split.push(TrafficTarget {
                revision: which,
                percent: 0,
                tag: Some(name.to_string()),
                shadow: false,
            }),
        }
    }
    Ok(Traffic {
        targets: split,
        sticky_header,
        rollback: None,
    })
}

/// Splits `name@tag` into the function's name and the tag.
pub fn split_tag(target: &str) -> (&str, Option<&str>) {
    match target.split_once('@') {
        Some((name, tag)) => (name, Some(tag)),
        None => (target, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_splits_become_targets_and_tags() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let split = split_from_args(
            &args(&["3=90", "latest=10"]),
            &args(&["stable=3", "candidate=5"]),
            Some("x-user".into()),
        )
        .expect("a split");
        let json = serde_json::to_value(&split).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "targets": [
                    {"revision": 3, "percent": 90, "tag": "stable"},
                    {"revision": "latest", "percent": 10},
                    {"revision": 5, "percent": 0, "tag": "candidate"}
                ],
                "sticky_header": "x-user"
            })
        );
        let bad = split_from_args(&args(&["3:90"]), &[], None).expect_err("no =");
        assert!(
            bad.to_string().contains("expected REVISION=PERCENT"),
            "{bad}"
        );
        let bad = split_from_args(&args(&["3=ninety"]), &[], None).expect_err("not a number");
        assert!(bad.to_string().contains("is not a percent"), "{bad}");
    }
}
