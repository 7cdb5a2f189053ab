//! The threads model stages run on.
//!
//! tokio's blocking pool hands each job to the thread that has been idle
//! longest, so back-to-back model runs rotate over its threads, each with
//! its own tract scratch buffers and cold caches. Here the thread that
//! became idle last takes the next run: at low concurrency one thread does
//! all the work with its working set warm (32-token `embed` over HTTP:
//! added latency ~1.1 → ~0.55 ms; benches/optimisations.md entry 19). A run
//! never waits for a thread: with none idle a new one starts, and threads
//! idle for [`KEEP_ALIVE`] exit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How long an idle thread waits for work before it exits.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Runs a model and returns how to hand its result over; the thread
/// lists itself idle before it does, so the next run the result leads to
/// finds it waiting.
type Job = Box<dyn FnOnce() -> Deliver + Send>;
type Deliver = Box<dyn FnOnce() + Send>;

/// A set of threads, the most recently idle one first in line.
pub struct ModelThreads {
    idle: Mutex<Vec<Arc<Worker>>>,
    keep_alive: Duration,
}

/// One thread's mailbox.
#[derive(Default)]
struct Worker {
    job: Mutex<Option<Job>>,
    ready: Condvar,
}

impl ModelThreads {
    /// Threads that exit after `keep_alive` without work.
    pub fn new(keep_alive: Duration) -> Arc<ModelThreads> {
        Arc::new(ModelThreads {
            idle: Mutex::new(Vec::new()),
            keep_alive,
        })
    }

    /// The host's shared set.
    pub fn shared() -> &'static Arc<ModelThreads> {
        static SHARED: OnceLock<Arc<ModelThreads>> = OnceLock::new();
        SHARED.get_or_init(|| ModelThreads::new(KEEP_ALIVE))
    }

    /// Runs `work` on the most recently idle thread, or a new one, and
    /// gives its result; `None` if `work` panicked.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.execute(Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(work));
            Box::new(move || {
                // A panic drops `done`, which the caller sees as `None`.
                if let Ok(value) = outcome {
                    let _ = done.send(value);
                }
            })
        }));
        result.await.ok()
    }

    fn execute(self: &Arc<Self>, job: Job) {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(worker) => {
                if let Ok(mut slot) = worker.job.lock() {
                    *slot = Some(job);
                    worker.ready.notify_one();
                }
            }
            None => {
                let threads = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("cascade-model".into())
                    .spawn(move || threads.work(job));
                if let Err(e) = spawned {
                    // The job (and its result sender) is gone with the
                    // closure: the caller sees `None`.
                    tracing::error!("cannot start a model thread: {e}");
                }
            }
        }
    }

    /// Runs `job`, then whatever it is handed while idle, until it has
    /// waited `keep_alive` for nothing.
    fn work(self: Arc<Self>, job: Job) {
        let worker = Arc::new(Worker::default());
        let mut next = Some(job);
        while let Some(job) = next.take() {
            let deliver = job();
            next = self.wait_for_job(&worker, deliver);
        }
    }

    /// Lists the thread idle, hands the last result over, and waits for
    /// the next job.
    fn wait_for_job(&self, worker: &Arc<Worker>, deliver: Deliver) -> Option<Job> {
        // Hold the mailbox while joining the idle list, so a job handed
        // over right away is not missed.
        let mut slot = worker.job.lock().ok()?;
        self.idle.lock().ok()?.push(worker.clone());
        deliver();
        loop {
            if let Some(job) = slot.take() {
                return Some(job);
            }
            let (guard, timeout) = worker.ready.wait_timeout(slot, self.keep_alive).ok()?;
            slot = guard;
            if timeout.timed_out() && slot.is_none() {
                let mut idle = self.idle.lock().ok()?;
                // Still listed: nobody picked it, leave. Not listed: a job
                // is being handed over; take it.
                if let Some(at) = idle.iter().position(|w| Arc::ptr_eq(w, worker)) {
                    idle.remove(at);
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;

    fn thread_id() -> ThreadId {
        std::thread::current().id()
    }

    #[tokio::test]
    async fn the_last_idle_thread_takes_the_next_run() {
        let threads = ModelThreads::new(KEEP_ALIVE);
        let first = threads.run(thread_id).await.expect("ran");
        for _ in 0..20 {
            assert_eq!(threads.run(thread_id).await, Some(first));
        }
    }

    #[tokio::test]
    async fn concurrent_runs_get_threads_of_their_own() {
        let threads = ModelThreads::new(KEEP_ALIVE);
        let barrier = Arc::new(std::sync::Barrier::new(3));
        let runs = (0..3).map(|_| {
            let barrier = barrier.clone();
            threads.run(move || {
                barrier.wait();
                thread_id()
            })
        });
        let ids: std::collections::HashSet<_> = futures_util::future::join_all(runs)
            .await
            .into_iter()
            .map(|id| id.expect("ran"))
            .collect();
        assert_eq!(
            ids.len(),
            3,
            "three runs waiting on each other need three threads"
        );
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_the_thread_lives_on() {
        let threads = ModelThreads::new(KEEP_ALIVE);
        let first = threads.run(thread_id).await.expect("ran");
        let panicked: Option<()> = threads.run(|| panic!("a model bug")).await;
        assert_eq!(panicked, None);
        assert_eq!(threads.run(thread_id).await, Some(first));
    }

    #[tokio::test]
    async fn idle_threads_exit_and_new_ones_start() {
        let threads = ModelThreads::new(Duration::from_millis(20));
        let first = threads.run(thread_id).await.expect("ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            threads.idle.lock().expect("lock").is_empty(),
            "the idle thread exited"
        );
        let second = threads.run(thread_id).await.expect("ran");
        assert_ne!(first, second);
    }
}
