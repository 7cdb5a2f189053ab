//! Using idle cores for a lone request: a model run that starts while no
//! other ONNX Runtime run, and no other invocation, is in flight may use a
//! session with several threads — when that has proved faster for this
//! model. (Model runs alone are not enough: between two runs of a busy
//! host the next is often a few microseconds away, and a wide run it then
//! shares the cores with stretches the tail many times over.) It is for some
//! (MiniLM-L3: 2.8 → 1.7 ms on two threads) and not for others (the PP-OCR
//! classifier's layers are too small to split: 0.7 → 1.2 ms), so each model
//! times both widths on its first lone runs of each input size class and
//! keeps the faster for that class ([`WidthChooser`]). (Trying
//! the slower one again now and then cost orientation's p99 at c1 a third:
//! a wide run after a long pause is far slower than its best.)

use std::collections::BTreeMap;
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

/// Learns from one model's first lone runs which width is faster, for
/// each size class of input (element counts within a factor of two).
/// Sizes are learnt apart because a run's fixed cost weighs on a small
/// input's cost per element: a host whose first lone runs alternated
/// 3-token and 32-token texts had the wide runs on the short ones, kept
/// one thread for good, and served 32-token `embed` at 325 req/s where a
/// host warmed on 32-token texts alone served 472.
#[derive(Default)]
pub struct WidthChooser {
    state: Mutex<BTreeMap<u32, Samples>>,
}

/// Most size classes learnt; inputs of others run narrow.
const MAX_CLASSES: usize = 32;

#[derive(Default, Clone, Copy)]
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

/// The size class of an input of `elements` elements: its bit length.
fn class(elements: usize) -> u32 {
    usize::BITS - elements.leading_zeros()
}

impl WidthChooser {
    /// The width for the next lone run of an input of `elements`
    /// elements: each in turn until both have had `EXPLORE` runs of its
    /// size class, then the faster for that class.
    pub fn choose(&self, elements: usize) -> Width {
        let Ok(classes) = self.state.lock() else {
            return Width::Narrow;
        };
        let Samples { narrow, wide } = match classes.get(&class(elements)) {
            Some(samples) => *samples,
            None if classes.len() >= MAX_CLASSES => return Width::Narrow,
            None => Samples::default(),
        };
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

    /// Records what a lone run of `width` on `elements` elements cost,
    /// per element.
    pub fn record(&self, width: Width, elements: usize, cost: f64) {
        let Ok(mut classes) = self.state.lock() else {
            return;
        };
        let class = class(elements);
        if classes.len() >= MAX_CLASSES && !classes.contains_key(&class) {
            return;
        }
        let samples = classes.entry(class).or_default();
        match width {
            Width::Narrow => samples.narrow.add(cost),
            Width::Wide => samples.wide.add(cost),
        }
    }
}
