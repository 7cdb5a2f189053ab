//! The fastest run a model has made, per input size: a lower bound on how
//! long the next run of that size takes. A request whose deadline is
//! nearer than that is answered 504 at once instead of taking a core for
//! a run nobody will read. (A shadow copy with a 1 ms deadline in front of
//! MiniLM's 2.6 ms ran 1.3–4 ms before its stop landed, beside every live
//! request: benches/optimisations.md entry 44.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Size classes: the bit length of an input's element count, so sizes
/// within a factor of two share one (any `usize` fits).
const CLASSES: usize = usize::BITS as usize + 1;

/// The fastest finished run per size class, in nanoseconds (`u64::MAX`:
/// none yet). Shared by every queue in front of one model.
pub struct FastestRuns {
    nanos: [AtomicU64; CLASSES],
}

impl Default for FastestRuns {
    fn default() -> Self {
        FastestRuns {
            nanos: [const { AtomicU64::new(u64::MAX) }; CLASSES],
        }
    }
}

impl FastestRuns {
    /// Notes a finished run over `elements` input elements that took `took`.
    pub fn record(&self, elements: usize, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX - 1);
        self.nanos[class(elements)].fetch_min(nanos, Ordering::Relaxed);
    }

    /// The fastest run seen for inputs of about `elements` elements.
    pub fn fastest(&self, elements: usize) -> Option<Duration> {
        match self.nanos[class(elements)].load(Ordering::Relaxed) {
            u64::MAX => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Whether a run over `elements` elements cannot end within `remaining`,
    /// judging by the fastest such run so far (none seen: it may).
    pub fn cannot_end_within(&self, elements: usize, remaining: Duration) -> bool {
        self.fastest(elements)
            .is_some_and(|fastest| remaining < fastest)
    }
}

/// The size class of `elements`: the smaller class holds the smaller
/// inputs, whose runs are no slower, so the bound stays a lower one.
fn class(elements: usize) -> usize {
    (usize::BITS - elements.leading_zeros()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_run_of_a_size_class_bounds_that_class_only() {
        let runs = FastestRuns::default();
        assert_eq!(runs.fastest(64), None);
        assert!(
            !runs.cannot_end_within(64, Duration::ZERO),
            "nothing seen yet"
        );
        runs.record(64, Duration::from_millis(3));
        runs.record(100, Duration::from_millis(2));
        runs.record(70, Duration::from_millis(4));
        assert_eq!(runs.fastest(127), Some(Duration::from_millis(2)));
        assert!(runs.cannot_end_within(64, Duration::from_micros(1_999)));
        assert!(!runs.cannot_end_within(64, Duration::from_millis(2)));
        assert_eq!(runs.fastest(128), None, "twice the size is another class");
        assert_eq!(runs.fastest(usize::MAX), None);
    }
}
