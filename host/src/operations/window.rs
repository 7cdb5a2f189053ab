//! A revision's latest outcomes, and the pure verdict of a rollback rule
//! over them.

use cascade_registry::traffic::RollbackRule;
use std::collections::VecDeque;

/// The last `capacity` values pushed, oldest first.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    values: VecDeque<T>,
    capacity: usize,
}

impl<T: Copy> Ring<T> {
    /// An empty ring keeping at most `capacity` values (at least one).
    pub fn new(capacity: usize) -> Self {
        Ring {
            values: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Keeps `value`, forgetting the oldest beyond the capacity.
    pub fn push(&mut self, value: T) {
        while self.values.len() >= self.capacity {
            self.values.pop_front();
        }
        self.values.push_back(value);
    }

    /// Changes the capacity, forgetting the oldest values beyond it.
    pub fn resize(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.values.len() > self.capacity {
            self.values.pop_front();
        }
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }

    /// Forgets every value.
    pub fn clear(&mut self) {
        self.values.clear();
    }
}

impl Ring<f64> {
    /// The mean, `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (!self.is_empty()).then(|| self.values.iter().sum::<f64>() / self.len() as f64)
    }
}

/// One finished request: whether it failed on the host's side (5xx) and
/// how long it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// A 5xx answer.
    pub failed: bool,
    /// Seconds.
    pub seconds: f64,
}

/// What a window of outcomes says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Requests in the window.
    pub count: usize,
    /// Share of them that failed.
    pub error_rate: f64,
    /// p99 latency of the successful ones, seconds (`None`: none succeeded).
    pub p99: Option<f64>,
}

impl Ring<Outcome> {
    /// The window's error rate and p99.
    pub fn summary(&self) -> Summary {
        let count = self.len();
        let failed = self.iter().filter(|o| o.failed).count();
        let mut times: Vec<f64> = self
            .iter()
            .filter(|o| !o.failed)
            .map(|o| o.seconds)
            .collect();
        times.sort_by(f64::total_cmp);
        let p99 = (!times.is_empty()).then(|| {
            let rank = ((times.len() as f64) * 0.99).ceil() as usize;
            times[rank.clamp(1, times.len()) - 1]
        });
        Summary {
            count,
            error_rate: if count == 0 {
                0.0
            } else {
                failed as f64 / count as f64
            },
            p99,
        }
    }
}

/// Why `rule` takes a target out of its split, judged on its own window
/// (`target`), the stable target's (`stable`, absent for a shadow judged
/// alone) and, for a shadow, its mean agreement over `agreements`
/// comparisons; `None` while it passes or has not seen enough requests.
pub fn breach(
    rule: &RollbackRule,
    target: &Summary,
    stable: Option<&Summary>,
    agreement: Option<(usize, f64)>,
) -> Option<String> {
    let enough = rule.min_requests as usize;
    if target.count < enough {
        return None;
    }
    if let Some(limit) = rule.max_error_rate
        && target.error_rate > limit
    {
        return Some(format!(
            "error rate {:.3} over its last {} requests exceeds max_error_rate {limit}",
            target.error_rate, target.count
        ));
    }
    if let (Some(limit), Some(stable)) = (rule.max_p99_ratio, stable)
        && stable.count >= enough
        && let (Some(own), Some(theirs)) = (target.p99, stable.p99)
        && theirs > 0.0
        && own / theirs > limit
    {
        return Some(format!(
            "p99 {:.2} ms is {:.2}× the stable revision's {:.2} ms, above max_p99_ratio {limit}",
            own * 1e3,
            own / theirs,
            theirs * 1e3
        ));
    }
    if let (Some(limit), Some((compared, mean))) = (rule.min_agreement, agreement)
        && compared >= enough
        && mean < limit
    {
        return Some(format!(
            "agreement {mean:.3} with the served answers over {compared} comparisons is below min_agreement {limit}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> RollbackRule {
        serde_json::from_str(json).expect("a rule")
    }

    fn window(outcomes: &[(bool, f64)]) -> Summary {
        let mut ring = Ring::new(200);
        for (failed, seconds) in outcomes {
            ring.push(Outcome {
                failed: *failed,
                seconds: *seconds,
            });
        }
        ring.summary()
    }

    #[test]
    fn a_ring_keeps_the_latest_values() {
        let mut ring = Ring::new(3);
        for v in 1..=5 {
            ring.push(f64::from(v));
        }
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), [3.0, 4.0, 5.0]);
        assert_eq!(ring.mean(), Some(4.0));
        ring.resize(1);
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), [5.0]);
    }

    #[test]
    fn the_p99_of_a_hundred_is_the_ninety_ninth() {
        let outcomes: Vec<(bool, f64)> = (1..=100).map(|ms| (false, f64::from(ms) / 1e3)).collect();
        let summary = window(&outcomes);
        assert_eq!(summary.p99, Some(0.099));
        assert_eq!(summary.error_rate, 0.0);
    }

    #[test]
    fn errors_breach_only_after_enough_requests() {
        let rule = rule(r#"{"min_requests":20,"max_error_rate":0.1}"#);
        let mut outcomes: Vec<(bool, f64)> = (0..10).map(|i| (i % 3 == 0, 0.001)).collect();
        assert_eq!(breach(&rule, &window(&outcomes), None, None), None);
        outcomes.extend((0..20).map(|i| (i % 3 == 0, 0.001)));
        let why = breach(&rule, &window(&outcomes), None, None).expect("breached");
        assert!(why.contains("exceeds max_error_rate 0.1"), "{why}");
    }

    #[test]
    fn slow_canaries_breach_against_the_stable_p99() {
        let rule = rule(r#"{"min_requests":10,"max_p99_ratio":2.0}"#);
        let fast = window(&[(false, 0.010); 20]);
        let slow = window(&[(false, 0.025); 20]);
        let close = window(&[(false, 0.015); 20]);
        let why = breach(&rule, &slow, Some(&fast), None).expect("2.5×");
        assert!(why.contains("2.50×"), "{why}");
        assert_eq!(breach(&rule, &close, Some(&fast), None), None);
        // A stable target with too few requests is no yardstick.
        let few = window(&[(false, 0.001); 3]);
        assert_eq!(breach(&rule, &slow, Some(&few), None), None);
    }

    #[test]
    fn shadows_breach_on_agreement() {
        let rule = rule(r#"{"min_requests":10,"min_agreement":0.9}"#);
        let fine = window(&[(false, 0.001); 20]);
        assert!(breach(&rule, &fine, None, Some((20, 0.1))).is_some());
        assert_eq!(breach(&rule, &fine, None, Some((20, 0.95))), None);
        assert_eq!(breach(&rule, &fine, None, Some((5, 0.1))), None);
    }
}
