//! Warm instances per stage and admission per function.
//!
//! A request first passes the function's [`Gate`] (at most `max_instances`
//! at once, at most `max_queue` waiting, each for a bounded time), then
//! borrows one instance per component stage from its [`InstancePool`] as a
//! [`Lease`]: an idle one, or a new one from the `InstancePre` (a cold
//! start). Instances that trap are discarded; instances idle past the
//! timeout are reaped down to `min_instances`.

use crate::capacity::{Exhausted, Reclaim};
use crate::sandbox::Grant;
use crate::stage::{ComponentStage, StageError, StageInstance};
use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// The gauges and counters one pool feeds.
pub struct PoolMetrics {
    /// Live instances.
    pub instances: IntGauge,
    /// Busy instances.
    pub busy: IntGauge,
    /// Instances created on demand.
    pub cold_starts: IntCounter,
    /// Instances discarded after a trap, a missed deadline or an abandoned call.
    pub traps: IntCounter,
}

/// What `/status` shows of a stage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageStatus {
    /// The stage's label (`name@version`).
    pub stage: String,
    /// Live instances.
    pub instances: usize,
    /// Instances serving a request.
    pub busy: usize,
    /// Instances waiting for work.
    pub idle: usize,
    /// Whether new instances start from a snapshot taken after the
    /// component's `initialize` (see `crate::snapshot`).
    pub snapshot: bool,
}

struct Idle {
    instance: StageInstance,
    since: Instant,
}

/// Warm instances of one component stage of one function revision.
pub struct InstancePool {
    label: String,
    /// What new instances are made from; replaced once by its snapshot.
    stage: RwLock<Arc<ComponentStage>>,
    grant: Grant,
    min: usize,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    live: AtomicUsize,
    busy: AtomicUsize,
    metrics: PoolMetrics,
}

impl InstancePool {
    /// A pool of `stage` instances sandboxed by `grant`.
    pub fn new(
        label: String,
        stage: Arc<ComponentStage>,
        grant: Grant,
        min: usize,
        idle_timeout: Duration,
        metrics: PoolMetrics,
    ) -> Self {
        InstancePool {
            label,
            stage: RwLock::new(stage),
            grant,
            min,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Whether its guests may run models through `wasi:nn` (which blocks).
    pub fn grants_models(&self) -> bool {
        self.grant.runs_models()
    }

    /// Creates instances up to `min_instances`.
    pub async fn warm(&self) -> Result<(), StageError> {
        while self.live.load(Ordering::SeqCst) < self.min {
            let instance = self.create().await?;
            self.put_idle(instance);
        }
        Ok(())
    }

    /// An idle instance, or a new one (a cold start), lent until the
    /// [`Lease`] is dropped.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, StageError> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let instance = match reused {
            Some(idle) => idle.instance,
            None => {
                self.metrics.cold_starts.inc();
                let span = tracing::info_span!("cold start", stage = %self.label);
                self.create().instrument(span).await?
            }
        };
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.metrics.busy.inc();
        Ok(Lease {
            pool: self.clone(),
            instance: Some(instance),
            reusable: true,
        })
    }

    /// Takes an instance back; one that may not serve again is dropped.
    fn checkin(&self, instance: StageInstance, reusable: bool) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
        self.metrics.busy.dec();
        if reusable {
            self.put_idle(instance);
        } else {
            self.metrics.traps.inc();
            self.drop_instance(instance);
        }
    }

    /// Drops instances idle longer than the timeout, keeping `min_instances`.
    pub fn reap(&self, now: Instant) -> usize {
        let Ok(mut idle) = self.idle.lock() else {
            return 0;
        };
        let since: Vec<Instant> = idle.iter().map(|i| i.since).collect();
        let surplus = surplus(
            &since,
            self.live.load(Ordering::SeqCst),
            self.min,
            now,
            self.idle_timeout,
        );
        // The oldest idle instances sit at the front.
        let dropped: Vec<Idle> = idle.drain(..surplus).collect();
        drop(idle);
        let count = dropped.len();
        for d in dropped {
            self.drop_instance(d.instance);
        }
        count
    }

    /// Live, busy and idle counts.
    pub fn status(&self) -> StageStatus {
        let idle = self.idle.lock().map_or(0, |i| i.len());
        StageStatus {
            stage: self.label.clone(),
            instances: self.live.load(Ordering::SeqCst),
            busy: self.busy.load(Ordering::SeqCst),
            idle,
            snapshot: self.stage().is_snapshot(),
        }
    }

    /// What new instances are made from now.
    fn stage(&self) -> Arc<ComponentStage> {
        self.stage
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes new instances from `stage` (a snapshot of the component) from
    /// now on; instances already made serve on.
    pub fn start_from(&self, stage: Arc<ComponentStage>) {
        *self.stage.write().unwrap_or_else(PoisonError::into_inner) = stage;
    }

    async fn create(&self) -> Result<StageInstance, StageError> {
        let stage = self.stage();
        let instance = stage.instantiate(&self.grant).await.map_err(|e| {
            match e.downcast_ref::<Exhausted>() {
                Some(full) => {
                    tracing::warn!(stage = %self.label, "no instance created: {full}");
                    StageError::Capacity(format!("{}: {full}", self.label))
                }
                None => StageError::Internal(format!("instantiating {}: {e:#}", self.label)),
            }
        })?;
        self.live.fetch_add(1, Ordering::SeqCst);
        self.metrics.instances.inc();
        Ok(instance)
    }

    fn put_idle(&self, instance: StageInstance) {
        match self.idle.lock() {
            Ok(mut idle) => idle.push(Idle {
                instance,
                since: Instant::now(),
            }),
            Err(_) => self.drop_instance(instance),
        }
    }

    fn drop_instance(&self, instance: StageInstance) {
        drop(instance);
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.metrics.instances.dec();
    }
}

impl Reclaim for InstancePool {
    fn release_idle(&self) -> bool {
        let Ok(mut idle) = self.idle.lock() else {
            return false;
        };
        if idle.is_empty() || self.live.load(Ordering::SeqCst) <= self.min {
            return false;
        }
        // The oldest idle instance sits at the front.
        let oldest = idle.remove(0);
        drop(idle);
        self.drop_instance(oldest.instance);
        true
    }
}

impl Drop for InstancePool {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().map(std::mem::take).unwrap_or_default();
        self.metrics.instances.sub(idle.len() as i64);
    }
}

/// An instance borrowed from its pool for one call.
///
/// Dropped, it goes back to the pool unless a call was started on it and
/// either left it unfit to serve (a trap, a deadline) or never settled (a
/// call abandoned half-way because its request was dropped): then the
/// instance is discarded.
pub struct Lease {
    pool: Arc<InstancePool>,
    instance: Option<StageInstance>,
    reusable: bool,
}

impl Lease {
    /// The borrowed instance, for a call: until [`Lease::settle`] records
    /// how the call ended, the instance counts as unfit to serve again.
    pub fn instance(&mut self) -> &mut StageInstance {
        self.reusable = false;
        self.instance
            .as_mut()
            .expect("a lease holds its instance until dropped")
    }

    /// Records how the call ended, which decides the instance's fate.
    pub fn settle<T>(&mut self, outcome: &Result<T, StageError>) {
        self.reusable = !outcome.as_ref().is_err_and(StageError::poisons_instance);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.pool.checkin(instance, self.reusable);
        }
    }
}

/// How many of the idle instances (oldest first, `idle_since` ascending) to
/// drop: those idle past `timeout`, but never below `min` live instances.
pub fn surplus(
    idle_since: &[Instant],
    live: usize,
    min: usize,
    now: Instant,
    timeout: Duration,
) -> usize {
    let expired = idle_since
        .iter()
        .take_while(|since| now.duration_since(**since) >= timeout)
        .count();
    expired.min(live.saturating_sub(min))
}

/// Admission to a function: bounded concurrency and a bounded queue.
///
/// A request holds its place from arrival until its [`Entry`] is dropped,
/// whether it is waiting or running, and at most `concurrency + max_queue`
/// places exist. Counting waiters alone would refuse a request that
/// arrives between a slot passing to a waiter and that waiter being polled
/// (the waiter still counted as queued), so a client exactly at capacity
/// would see spurious 503s.
pub struct Gate {
    permits: Arc<Semaphore>,
    places: Arc<AtomicUsize>,
    capacity: usize,
    waiting: AtomicUsize,
    queued: IntGauge,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is busy and the queue is full: refused at once (503).
    QueueFull,
    /// The request waited in the queue until its deadline (504).
    TimedOut,
}

/// An admitted request's slot and place, both given back when dropped.
pub struct Entry {
    _permit: OwnedSemaphorePermit,
    _place: Place,
}

/// A place among a gate's `concurrency + max_queue`.
struct Place {
    places: Arc<AtomicUsize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// Admits `concurrency` requests at once and `max_queue` waiting.
    pub fn new(concurrency: usize, max_queue: usize, queued: IntGauge) -> Self {
        Gate {
            permits: Arc::new(Semaphore::new(concurrency)),
            places: Arc::new(AtomicUsize::new(0)),
            capacity: concurrency + max_queue,
            waiting: AtomicUsize::new(0),
            queued,
        }
    }

    /// Waits at most `wait` for a slot. Cancel-safe: a caller that goes away
    /// while queued (its future dropped) gives its place back.
    pub async fn enter(&self, wait: Duration) -> Result<Entry, Refused> {
        let place = self.take_place().ok_or(Refused::QueueFull)?;
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(Entry {
                _permit: permit,
                _place: place,
            });
        }
        let _waiting = Waiting::count(self);
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Entry {
                _permit: permit,
                _place: place,
            }),
            // The semaphore is never closed; treat it as a full queue if it were.
            Ok(Err(_)) => Err(Refused::QueueFull),
            Err(_) => Err(Refused::TimedOut),
        }
    }

    /// A slot now, or `QueueFull` without waiting (for work that must
    /// never queue, such as shadow copies).
    pub fn try_enter(&self) -> Result<Entry, Refused> {
        let place = self.take_place().ok_or(Refused::QueueFull)?;
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::QueueFull)?;
        Ok(Entry {
            _permit: permit,
            _place: place,
        })
    }

    fn take_place(&self) -> Option<Place> {
        self.places
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |taken| {
                (taken < self.capacity).then_some(taken + 1)
            })
            .ok()
            .map(|_| Place {
                places: self.places.clone(),
            })
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// A request waiting for a slot, counted in the `queued` gauge until it
/// gets one, times out or is abandoned.
struct Waiting<'a> {
    gate: &'a Gate,
}

impl<'a> Waiting<'a> {
    fn count(gate: &'a Gate) -> Self {
        gate.waiting.fetch_add(1, Ordering::SeqCst);
        gate.queued.inc();
        Waiting { gate }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        self.gate.queued.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(concurrency: usize, max_queue: usize) -> Gate {
        let queued = IntGauge::new("queued", "test").expect("gauge");
        Gate::new(concurrency, max_queue, queued)
    }

    #[test]
    fn trying_to_enter_never_queues() {
        let gate = gate(1, 8);
        let first = gate.try_enter().expect("a free slot");
        assert_eq!(gate.try_enter().err(), Some(Refused::QueueFull));
        assert_eq!(gate.waiting(), 0);
        drop(first);
        assert!(gate.try_enter().is_ok());
    }

    #[tokio::test]
    async fn callers_who_leave_the_queue_give_their_place_back() {
        let gate = Arc::new(gate(1, 2));
        let held = gate
            .enter(Duration::from_secs(5))
            .await
            .expect("first slot");
        for _ in 0..10 {
            let waiter = {
                let gate = gate.clone();
                tokio::spawn(async move { gate.enter(Duration::from_secs(60)).await.map(drop) })
            };
            tokio::task::yield_now().await;
            assert_eq!(gate.waiting(), 1);
            waiter.abort();
            let _ = waiter.await;
        }
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.queued.get(), 0);
        drop(held);
        assert!(gate.enter(Duration::from_millis(1)).await.is_ok());
    }

    #[tokio::test]
    async fn a_request_arriving_as_a_slot_passes_to_a_waiter_is_queued_not_refused() {
        let gate = Arc::new(gate(1, 1));
        let held = gate
            .enter(Duration::from_secs(5))
            .await
            .expect("first slot");
        let waiter = gate.enter(Duration::from_secs(5));
        tokio::pin!(waiter);
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        // The slot passes to the waiter, which has not run since.
        drop(held);
        let newcomer = gate.enter(Duration::from_secs(5));
        tokio::pin!(newcomer);
        assert!(
            futures_util::poll!(newcomer.as_mut()).is_pending(),
            "one running and one waiting fit a gate of 1 + 1"
        );
        let running = waiter.await.expect("the waiter's slot");
        drop(running);
        assert!(newcomer.await.is_ok());
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.queued.get(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_long_wait_times_out() {
        let gate = gate(1, 1);
        let _held = gate
            .enter(Duration::from_secs(5))
            .await
            .expect("first slot");
        let waiting = gate.enter(Duration::from_millis(100));
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        assert_eq!(
            gate.enter(Duration::from_secs(1)).await.map(drop),
            Err(Refused::QueueFull)
        );
        assert_eq!(waiting.await.map(drop), Err(Refused::TimedOut));
        assert_eq!(gate.waiting(), 0);
    }

    #[test]
    fn surplus_keeps_the_minimum_and_the_fresh() {
        let now = Instant::now();
        let old = now - Duration::from_secs(60);
        let fresh = now - Duration::from_secs(1);
        let timeout = Duration::from_secs(30);
        assert_eq!(surplus(&[old, old, fresh], 3, 0, now, timeout), 2);
        assert_eq!(surplus(&[old, old, fresh], 3, 2, now, timeout), 1);
        assert_eq!(surplus(&[fresh], 1, 0, now, timeout), 0);
        // Busy instances count as live but are not in the idle list.
        assert_eq!(surplus(&[old], 4, 3, now, timeout), 1);
        assert_eq!(surplus(&[old], 3, 3, now, timeout), 0);
        // Exactly at the timeout counts as expired.
        assert_eq!(surplus(&[now - timeout], 1, 0, now, timeout), 1);
    }

    proptest::proptest! {
        /// Whatever the pool looks like, reaping never goes below the
        /// minimum, never drops more than the idle, and drops only the
        /// oldest expired ones.
        #[test]
        fn surplus_never_breaks_the_minimum(
            ages in proptest::collection::vec(0u64..120, 0..12),
            busy in 0usize..6,
            min in 0usize..10,
        ) {
            let now = Instant::now() + Duration::from_secs(1000);
            let mut ages = ages;
            ages.sort_unstable_by(|a, b| b.cmp(a));
            let idle: Vec<Instant> = ages.iter().map(|&a| now - Duration::from_secs(a)).collect();
            let live = idle.len() + busy;
            let timeout = Duration::from_secs(30);
            let dropped = surplus(&idle, live, min, now, timeout);
            let expired = ages.iter().filter(|&&a| a >= 30).count();
            proptest::prop_assert!(dropped <= expired);
            proptest::prop_assert!(live - dropped >= min.min(live));
            proptest::prop_assert_eq!(dropped, expired.min(live.saturating_sub(min)));
        }
    }
}
