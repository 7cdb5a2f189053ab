//! A function served as several revisions at once: the prepared revisions
//! of its traffic split, and the choice of one for each request (by tag,
//! by sticky key, or spread by share).

use crate::error::InvokeError;
use crate::pipeline::PreparedFunction;
use cascade_registry::traffic::Traffic;
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

/// Splits `name@tag` into the function's name and the tag.
pub fn split_tag(target: &str) -> (&str, Option<&str>) {
    match target.split_once('@') {
        Some((name, tag)) => (name, Some(tag)),
        None => (target, None),
    }
}
