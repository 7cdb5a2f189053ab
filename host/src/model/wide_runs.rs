//! Using idle cores for a lone request: a model run that starts while no
//! other ONNX Runtime run, and no other invocation, is in flight may use a
//! session with several threads — when that has proved faster for this
//! model. (Model runs alone are not enough: between two runs of a busy
//! host the next is often a few microseconds away, and a wide run it then
//! shares the cores with stretches the tail many times over.) It is for some
//! (MiniLM-L3: 2.8 → 1.7 ms on two threads) and not for others (the PP-OCR
//! classifier's layers are too small to split: 0.7 → 1.2 ms), so each model
//! times both widths on its first lone runs and keeps the faster. (Trying
//! the slower one again now and then cost orientation's p99 at c1 a third:
//! a wide run after a long pause is far slower than its best.)

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// ONNX Runtime runs in flight in this process, all models together.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Invocations in flight in this process, all functions together.
static REQUESTS: AtomicUsize = AtomicUsize::new(0);

/// Lone runs each width gets before the faster one is kept.
const EXPLORE: u32 = 4;

/// A run in flight, counted for as long as it lives.
pub struct InFlight {
    alone: bool,
}

impl InFlight {
    /// Counts a run in; notes whether it is the only one, for the only
    /// invocation (or for none: a run outside any invocation).
    pub fn enter() -> Self {
        let runs_before = IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        InFlight {
            alone: runs_before == 0 && REQUESTS.load(Ordering::Acquire) <= 1,
        }
    }

    /// Whether nothing else was in flight when this run started.
    pub fn alone(&self) -> bool {
        self.alone
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Invocations in flight on this host now.
pub fn requests_in_flight() -> usize {
    REQUESTS.load(Ordering::Acquire)
}

/// An invocation in flight, counted for as long as it lives.
pub struct RequestInFlight(());

impl RequestInFlight {
    /// Counts an invocation in.
    pub fn enter() -> Self {
        REQUESTS.fetch_add(1, Ordering::AcqRel);
        RequestInFlight(())
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        REQUESTS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many threads a lone run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// The threads every run gets (`--onnxruntime-threads`).
    Narrow,
    /// More (`--onnxruntime-alone-threads`).
    Wide,
}

/// Learns from one model's first lone runs which width is faster.
#[derive(Default)]
pub struct WidthChooser {
    state: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    narrow: Best,
    wide: Best,
}

/// The lowest cost per input element seen, and how many runs were seen:
/// the lowest, as first runs are slowed by cold caches and others by
/// neighbours, while the best shows what the width can do.
#[derive(Default, Clone, Copy)]
struct Best {
    cost: f64,
    count: u32,
}

impl Best {
    fn add(&mut self, cost: f64) {
        self.cost = if self.count == 0 {
            cost
        } else {
            self.cost.min(cost)
        };
        self.count = self.count.saturating_add(1);
    }
}

impl WidthChooser {
    /// The width for the next lone run: each in turn until both have had
    /// `EXPLORE` runs, then the faster.
    pub fn choose(&self) -> Width {
        let Ok(samples) = self.state.lock() else {
            return Width::Narrow;
        };
        let (narrow, wide) = (samples.narrow, samples.wide);
        if narrow.count < EXPLORE || wide.count < EXPLORE {
            if wide.count <= narrow.count {
                Width::Wide
            } else {
                Width::Narrow
            }
        } else if wide.cost < narrow.cost {
            Width::Wide
        } else {
            Width::Narrow
        }
    }

    /// Records what a lone run of `width` cost, per input element.
    pub fn record(&self, width: Width, cost: f64) {
        if let Ok(mut samples) = self.state.lock() {
            match width {
                Width::Narrow => samples.narrow.add(cost),
                Width::Wide => samples.wide.add(cost),
            }
        }
    }
}
