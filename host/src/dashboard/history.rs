//! The last minutes of the host's metrics, for the dashboard: snapshots
//! of the Prometheus histograms and counters taken every few seconds, so
//! rates and quantiles over a window are differences of two snapshots and
//! cost the request path nothing beyond the metrics it already records.

use crate::metrics::Metrics;
use prometheus::core::Collector;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a snapshot is taken.
pub const EVERY: Duration = Duration::from_secs(5);
/// How far back the dashboard looks.
pub const WINDOW: Duration = Duration::from_secs(300);

/// One histogram's cumulative bucket counts (Prometheus' `le` buckets).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    /// Upper bounds, seconds.
    pub bounds: Vec<f64>,
    /// Observations at or below each bound (cumulative).
    pub cumulative: Vec<u64>,
    /// All observations.
    pub count: u64,
}

impl Buckets {
    /// What was observed since `earlier` (the same histogram, older).
    fn since(&self, earlier: Option<&Buckets>) -> Buckets {
        let Some(earlier) = earlier.filter(|e| e.bounds == self.bounds) else {
            return self.clone();
        };
        Buckets {
            bounds: self.bounds.clone(),
            cumulative: self
                .cumulative
                .iter()
                .zip(&earlier.cumulative)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Adds `other`'s observations (the same buckets, another label set).
    fn add(&mut self, other: &Buckets) {
        if other.bounds != self.bounds {
            return;
        }
        for (sum, more) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *sum += more;
        }
        self.count += other.count;
    }

    /// The `q` quantile in seconds, interpolated within its bucket as
    /// PromQL's `histogram_quantile` does; `None` with no observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower_bound = 0.0;
        let mut below = 0u64;
        for (bound, cumulative) in self.bounds.iter().zip(&self.cumulative) {
            if *cumulative as f64 >= rank {
                let inside = (cumulative - below) as f64;
                let fraction = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return Some(lower_bound + (bound - lower_bound) * fraction);
            }
            lower_bound = *bound;
            below = *cumulative;
        }
        // Past the largest bound: the largest bound is all that is known.
        self.bounds.last().copied()
    }
}

/// Everything one snapshot holds, keyed by label values.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `cascade_request_duration_seconds` by function (every revision).
    pub requests: HashMap<String, Buckets>,
    /// `cascade_stage_duration_seconds` by (function, stage).
    pub stages: HashMap<(String, String), Buckets>,
    /// `cascade_requests_total` by (function, status), every revision.
    pub statuses: HashMap<(String, String), u64>,
}

impl Snapshot {
    /// The metrics as they are now.
    pub fn take(metrics: &Metrics) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (labels, buckets) in histograms(&metrics.latency) {
            if let [function, _revision] = labels.as_slice() {
                snapshot
                    .requests
                    .entry(function.clone())
                    .and_modify(|sum| sum.add(&buckets))
                    .or_insert(buckets);
            }
        }
        for (labels, buckets) in histograms(&metrics.stage_latency) {
            if let [function, stage] = labels.as_slice() {
                snapshot
                    .stages
                    .insert((function.clone(), stage.clone()), buckets);
            }
        }
        for family in metrics.requests.collect() {
            for metric in family.get_metric() {
                if let [function, _revision, status] = label_values(metric).as_slice() {
                    let count = metric.get_counter().get_value() as u64;
                    *snapshot
                        .statuses
                        .entry((function.clone(), status.clone()))
                        .or_default() += count;
                }
            }
        }
        snapshot
    }

    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            requests: self
                .requests
                .iter()
                .map(|(k, v)| (k.clone(), v.since(earlier.requests.get(k))))
                .collect(),
            stages: self
                .stages
                .iter()
                .map(|(k, v)| (k.clone(), v.since(earlier.stages.get(k))))
                .collect(),
            statuses: self
                .statuses
                .iter()
                .map(|(k, v)| {
                    let then = earlier.statuses.get(k).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(then))
                })
                .collect(),
        }
    }
}

/// Label values of a collected metric, in the vector's label order.
fn label_values(metric: &prometheus::proto::Metric) -> Vec<String> {
    metric
        .get_label()
        .iter()
        .map(|pair| pair.value().to_string())
        .collect()
}

fn histograms(vec: &prometheus::HistogramVec) -> Vec<(Vec<String>, Buckets)> {
    let mut out = Vec::new();
    for family in vec.collect() {
        for metric in family.get_metric() {
            let histogram = metric.get_histogram();
            let buckets = Buckets {
                bounds: histogram
                    .get_bucket()
                    .iter()
                    .map(|b| b.upper_bound())
                    .collect(),
                cumulative: histogram
                    .get_bucket()
                    .iter()
                    .map(|b| b.cumulative_count())
                    .collect(),
                count: histogram.get_sample_count(),
            };
            out.push((label_values(metric), buckets));
        }
    }
    out
}

/// Snapshots over the last [`WINDOW`], oldest first.
pub struct History {
    snapshots: Mutex<VecDeque<(Instant, Snapshot)>>,
}

impl History {
    /// A history starting now, from nothing observed.
    pub fn new() -> History {
        let mut snapshots = VecDeque::new();
        snapshots.push_back((Instant::now(), Snapshot::default()));
        History {
            snapshots: Mutex::new(snapshots),
        }
    }

    /// Keeps `snapshot`, taken at `at`, forgetting what fell out of the window.
    pub fn keep(&self, at: Instant, snapshot: Snapshot) {
        let mut snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        snapshots.push_back((at, snapshot));
        while snapshots
            .front()
            .is_some_and(|(then, _)| at.duration_since(*then) > WINDOW)
        {
            snapshots.pop_front();
        }
    }

    /// What happened from the oldest snapshot to `now`, and over how long.
    pub fn window(&self, now: &Snapshot, at: Instant) -> (Snapshot, Duration) {
        let snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match snapshots.front() {
            Some((then, oldest)) => (now.since(oldest), at.duration_since(*then)),
            None => (now.clone(), Duration::ZERO),
        }
    }

    /// Takes a snapshot every [`EVERY`], for ever.
    pub async fn follow(&self, metrics: &Metrics) {
        let mut ticks = tokio::time::interval(EVERY);
        loop {
            ticks.tick().await;
            self.keep(Instant::now(), Snapshot::take(metrics));
        }
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(cumulative: &[u64]) -> Buckets {
        Buckets {
            bounds: vec![0.001, 0.01, 0.1, 1.0],
            cumulative: cumulative.to_vec(),
            count: *cumulative.last().unwrap_or(&0),
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_promql() {
        // 100 observations: 50 under 1 ms, 40 more under 10 ms, 10 under 100 ms.
        let b = buckets(&[50, 90, 100, 100]);
        assert_eq!(b.quantile(0.5), Some(0.001));
        // Rank 99 is the 9th of 10 in (0.01, 0.1]: 0.01 + 0.09 × 0.9.
        let p99 = b.quantile(0.99).unwrap_or_default();
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        assert_eq!(buckets(&[0, 0, 0, 0]).quantile(0.5), None);
    }

    #[test]
    fn a_snapshot_sums_every_revision_of_a_function() {
        let metrics = Metrics::new().expect("metrics");
        metrics.observe_request("embed", 1, 200, Duration::from_millis(2));
        metrics.observe_request("embed", 2, 200, Duration::from_millis(3));
        metrics.observe_request("embed", 2, 500, Duration::from_millis(4));
        let snapshot = Snapshot::take(&metrics);
        assert_eq!(snapshot.requests["embed"].count, 3);
        assert_eq!(snapshot.statuses[&("embed".into(), "200".into())], 2);
        assert_eq!(snapshot.statuses[&("embed".into(), "500".into())], 1);
    }

    #[test]
    fn a_window_is_the_difference_from_its_oldest_snapshot() {
        let history = History::new();
        let start = Instant::now();
        let mut old = Snapshot::default();
        old.requests
            .insert("embed".into(), buckets(&[10, 10, 10, 10]));
        old.statuses.insert(("embed".into(), "200".into()), 10);
        history.keep(start + WINDOW + Duration::from_secs(1), old.clone());
        let mut now = Snapshot::default();
        now.requests
            .insert("embed".into(), buckets(&[10, 30, 30, 30]));
        now.statuses.insert(("embed".into(), "200".into()), 30);
        now.statuses.insert(("embed".into(), "503".into()), 2);
        let at = start + WINDOW + Duration::from_secs(11);
        let (window, over) = history.window(&now, at);
        // The start-up snapshot fell out of the window; `old` is the base.
        assert_eq!(over, Duration::from_secs(10));
        assert_eq!(window.requests["embed"].count, 20);
        let p50 = window.requests["embed"].quantile(0.5).unwrap_or_default();
        assert!((p50 - 0.0055).abs() < 1e-12, "{p50}");
        assert_eq!(window.statuses[&("embed".into(), "200".into())], 20);
        assert_eq!(window.statuses[&("embed".into(), "503".into())], 2);
    }
}
