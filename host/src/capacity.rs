//! What the engine's instance pools hold, and what each live instance takes
//! from them. A component's footprint (core instances, memories, tables)
//! is counted from its own binary, not assumed: a Rust wasip2 component
//! takes a few core instances, one built with componentize-py (Python)
//! fourteen. An instance reserves its footprint before it is created, so
//! running out is a 503 the caller can retry, never a 500 from inside the
//! pooling allocator.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use wasmparser::{Parser, Payload};

/// What one instance of a component takes from the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Footprint {
    /// Component instances (one per instance).
    pub component_instances: u32,
    /// Core module instances it instantiates.
    pub core_instances: u32,
    /// Linear memories those define.
    pub memories: u32,
    /// Tables those define.
    pub tables: u32,
}

/// Why a component's footprint could not be counted: its binary is malformed.
#[derive(Debug, thiserror::Error)]
pub enum FootprintError {
    /// A section of the component cannot be parsed.
    #[error("reading the component: {0}")]
    Component(#[source] wasmparser::BinaryReaderError),
    /// Its instance section cannot be parsed.
    #[error("reading instances: {0}")]
    Instances(#[source] wasmparser::BinaryReaderError),
}

impl Footprint {
    /// Counts the footprint of the component binary `wasm`: every core
    /// `instantiate` in it (nested components included) and every memory
    /// and table its core modules define.
    pub fn of(wasm: &[u8]) -> Result<Footprint, FootprintError> {
        let mut footprint = Footprint {
            component_instances: 1,
            ..Footprint::default()
        };
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(FootprintError::Component)? {
                Payload::InstanceSection(instances) => {
                    for instance in instances {
                        let instance = instance.map_err(FootprintError::Instances)?;
                        if matches!(instance, wasmparser::Instance::Instantiate { .. }) {
                            footprint.core_instances += 1;
                        }
                    }
                }
                Payload::MemorySection(memories) => footprint.memories += memories.count(),
                Payload::TableSection(tables) => footprint.tables += tables.count(),
                _ => {}
            }
        }
        Ok(footprint)
    }

    fn times(self, n: u32) -> Footprint {
        Footprint {
            component_instances: self.component_instances.saturating_mul(n),
            core_instances: self.core_instances.saturating_mul(n),
            memories: self.memories.saturating_mul(n),
            tables: self.tables.saturating_mul(n),
        }
    }

    fn fits_in(self, room: Footprint) -> bool {
        self.component_instances <= room.component_instances
            && self.core_instances <= room.core_instances
            && self.memories <= room.memories
            && self.tables <= room.tables
    }

    fn minus(self, other: Footprint) -> Footprint {
        Footprint {
            component_instances: self.component_instances - other.component_instances,
            core_instances: self.core_instances - other.core_instances,
            memories: self.memories - other.memories,
            tables: self.tables - other.tables,
        }
    }

    fn plus(self, other: Footprint) -> Footprint {
        Footprint {
            component_instances: self.component_instances + other.component_instances,
            core_instances: self.core_instances + other.core_instances,
            memories: self.memories + other.memories,
            tables: self.tables + other.tables,
        }
    }
}

/// Something holding idle instances it can give up to make room.
pub trait Reclaim: Send + Sync {
    /// Drops one idle instance it does not need (above its minimum);
    /// false when it has none.
    fn release_idle(&self) -> bool;
}

/// The engine's pools: their size, what live instances hold of them, and
/// who holds idle instances that could make room.
pub struct Capacity {
    total: Footprint,
    used: Mutex<Footprint>,
    holders: Mutex<Holders>,
}

/// The pools that may give an idle instance back, and where the next
/// search for one starts.
#[derive(Default)]
struct Holders {
    list: Vec<Weak<dyn Reclaim>>,
    /// The holder after the last one that gave an instance back: searches
    /// go round the list instead of rescanning the same empty pools from
    /// the start (with 1,000 functions that scan, and the list copied for
    /// it, cost more than the instance it found).
    next: usize,
}

impl std::fmt::Debug for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capacity")
            .field("total", &self.total)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

/// The pools have no room for another instance of this footprint now.
#[derive(Debug, thiserror::Error)]
#[error(
    "this host's instance pools are full ({used:?} of {total:?} in use; one more needs {needs:?}); retry later"
)]
pub struct Exhausted {
    /// What the instance needs.
    pub needs: Footprint,
    /// What is in use.
    pub used: Footprint,
    /// What the pools hold.
    pub total: Footprint,
}

impl Capacity {
    /// Pools of `total` size, all free.
    pub fn new(total: Footprint) -> Arc<Capacity> {
        Arc::new(Capacity {
            total,
            used: Mutex::new(Footprint::default()),
            holders: Mutex::new(Holders::default()),
        })
    }

    /// The pools' size.
    pub fn total(&self) -> Footprint {
        self.total
    }

    /// Why `count` instances of `footprint` could never live at once on
    /// this host, even with nothing else running; `None` if they can.
    pub fn never_fits(&self, footprint: Footprint, count: u32) -> Option<String> {
        let needed = footprint.times(count);
        (!needed.fits_in(self.total)).then(|| {
            format!(
                "{count} instance(s) of a component taking {footprint:?} need {needed:?}, \
                 more than this host's pools hold ({:?}; see --max-instances)",
                self.total
            )
        })
    }

    /// Lets `holder`'s idle instances be dropped to make room for others.
    pub fn register(&self, holder: Weak<dyn Reclaim>) {
        let mut holders = self.holders.lock().unwrap_or_else(PoisonError::into_inner);
        holders.list.retain(|h| h.strong_count() > 0);
        holders.list.push(holder);
        holders.next = 0;
    }

    /// Reserves room for one instance of `footprint`, released when the
    /// reservation is dropped. When the pools are full, idle instances
    /// other pools do not need are dropped first to make room: a request
    /// is refused only when everything is busy (or kept warm on purpose).
    pub fn reserve(self: &Arc<Self>, footprint: Footprint) -> Result<Reservation, Exhausted> {
        loop {
            match self.try_reserve(footprint) {
                Ok(reservation) => return Ok(reservation),
                Err(full) if !self.reclaim_one() => return Err(full),
                Err(_) => {}
            }
        }
    }

    fn try_reserve(self: &Arc<Self>, footprint: Footprint) -> Result<Reservation, Exhausted> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let after = used.plus(footprint);
        if !after.fits_in(self.total) {
            return Err(Exhausted {
                needs: footprint,
                used: *used,
                total: self.total,
            });
        }
        *used = after;
        Ok(Reservation {
            capacity: self.clone(),
            footprint,
        })
    }

    /// Asks the holders, round from where the last search stopped, for one
    /// idle instance. Under the holders' lock but never the `used` one:
    /// dropping the instance gives its reservation back (lock order:
    /// holders, then a pool's idle list, then `used`).
    fn reclaim_one(&self) -> bool {
        let mut holders = self.holders.lock().unwrap_or_else(PoisonError::into_inner);
        let count = holders.list.len();
        for step in 0..count {
            let at = (holders.next + step) % count;
            let released = holders.list[at]
                .upgrade()
                .is_some_and(|holder| holder.release_idle());
            if released {
                holders.next = (at + 1) % count;
                return true;
            }
        }
        false
    }

    /// What live instances hold now.
    pub fn used(&self) -> Footprint {
        *self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One instance's share of the pools, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    capacity: Arc<Capacity>,
    footprint: Footprint,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self
            .capacity
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *used = used.minus(self.footprint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Footprint = Footprint {
        component_instances: 1,
        core_instances: 3,
        memories: 1,
        tables: 2,
    };

    #[test]
    fn reservations_add_up_and_come_back() {
        let capacity = Capacity::new(TINY.times(2));
        let first = capacity.reserve(TINY).expect("room");
        let second = capacity.reserve(TINY).expect("room");
        let refused = capacity.reserve(TINY).expect_err("full");
        assert_eq!(refused.used, TINY.times(2));
        drop(first);
        let third = capacity.reserve(TINY).expect("room again");
        drop((second, third));
        assert_eq!(capacity.used(), Footprint::default());
    }

    /// Holds reservations as "idle instances" it gives up on request.
    struct IdleHolder(Mutex<Vec<Reservation>>);

    impl Reclaim for IdleHolder {
        fn release_idle(&self) -> bool {
            self.0.lock().expect("lock").pop().is_some()
        }
    }

    #[test]
    fn idle_instances_make_room_before_anyone_is_refused() {
        let capacity = Capacity::new(TINY.times(2));
        let idle = Arc::new(IdleHolder(Mutex::new(vec![
            capacity.reserve(TINY).expect("room"),
            capacity.reserve(TINY).expect("room"),
        ])));
        let holder: Arc<dyn Reclaim> = idle.clone();
        capacity.register(Arc::downgrade(&holder));
        let busy = capacity.reserve(TINY).expect("an idle one made room");
        let busy_too = capacity.reserve(TINY).expect("and another");
        assert!(capacity.reserve(TINY).is_err(), "nothing idle is left");
        drop((busy, busy_too));
    }

    #[test]
    fn reclaiming_goes_round_the_holders_instead_of_draining_the_first() {
        let capacity = Capacity::new(TINY.times(4));
        let holders: Vec<Arc<IdleHolder>> = (0..2)
            .map(|_| {
                let idle = Arc::new(IdleHolder(Mutex::new(vec![
                    capacity.reserve(TINY).expect("room"),
                    capacity.reserve(TINY).expect("room"),
                ])));
                let holder: Arc<dyn Reclaim> = idle.clone();
                capacity.register(Arc::downgrade(&holder));
                idle
            })
            .collect();
        let left = || -> Vec<usize> {
            holders
                .iter()
                .map(|h| h.0.lock().expect("lock").len())
                .collect()
        };
        let first = capacity.reserve(TINY).expect("an idle one made room");
        assert_eq!(left(), [1, 2]);
        let second = capacity.reserve(TINY).expect("the next holder's");
        assert_eq!(left(), [1, 1]);
        let third = capacity.reserve(TINY).expect("round again");
        assert_eq!(left(), [0, 1]);
        drop((first, second, third));
    }

    #[test]
    fn a_footprint_too_big_for_the_pools_is_named() {
        let capacity = Capacity::new(TINY.times(4));
        assert_eq!(capacity.never_fits(TINY, 4), None);
        let why = capacity.never_fits(TINY, 5).expect("too many");
        assert!(why.contains("5 instance(s)"), "{why}");
    }

    #[test]
    fn a_core_module_counts_its_memories_and_tables() {
        // A core module, not a component: no instantiations, one memory.
        let module = wat::parse_str("(module (memory 1) (table 1 funcref))").expect("wat");
        let footprint = Footprint::of(&module).expect("parses");
        assert_eq!(
            (
                footprint.core_instances,
                footprint.memories,
                footprint.tables
            ),
            (0, 1, 1)
        );
        assert!(Footprint::of(b"not wasm").is_err());
    }
}
