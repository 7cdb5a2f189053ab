//! The threads model stages run on.
//!
//! tokio's blocking pool hands each job to the thread that has been idle
//! longest, so back-to-back model runs rotate over its threads, each with
//! its own tract scratch buffers and cold caches. Here the thread that
//! became idle last takes the next run: at low concurrency one thread does
//! all the work with its working set warm (32-token `embed` over HTTP:
//! added latency ~1.1 → ~0.55 ms; benches/optimisations.md entry 19). With
//! none idle a new thread starts, up to [`MAX_THREADS`] (as many as tokio's
//! blocking pool allows; runs beyond wait in order), and threads idle for
//! [`KEEP_ALIVE`] exit.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How long an idle thread waits for work before it exits.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Most threads alive at once.
pub const MAX_THREADS: usize = 512;

/// Runs a model and returns how to hand its result over; the thread
/// lists itself idle before it does, so the next run the result leads to
/// finds it waiting.
type Job = Box<dyn FnOnce() -> Deliver + Send>;
type Deliver = Box<dyn FnOnce() + Send>;

/// A set of threads, the most recently idle one first in line.
pub struct ModelThreads {
    threads: Mutex<Threads>,
    keep_alive: Duration,
    max_threads: usize,
}

#[derive(Default)]
struct Threads {
    /// Waiting for work, the most recently idle last.
    idle: Vec<Arc<Worker>>,
    /// Runs waiting for a thread (only with `max_threads` alive).
    queued: VecDeque<Job>,
    alive: usize,
}

/// One thread's mailbox.
#[derive(Default)]
struct Worker {
    job: Mutex<Option<Job>>,
    ready: Condvar,
}

impl ModelThreads {
    /// At most `max_threads` threads that exit after `keep_alive` without work.
    pub fn new(keep_alive: Duration, max_threads: usize) -> Arc<ModelThreads> {
        Arc::new(ModelThreads {
            threads: Mutex::new(Threads::default()),
            keep_alive,
            max_threads: max_threads.max(1),
        })
    }

    /// The host's shared set.
    pub fn shared() -> &'static Arc<ModelThreads> {
        static SHARED: OnceLock<Arc<ModelThreads>> = OnceLock::new();
        SHARED.get_or_init(|| ModelThreads::new(KEEP_ALIVE, MAX_THREADS))
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

    /// Runs `work` on the most recently idle thread, or a new one, without
    /// waiting for it, then what `work` returns once the thread is listed
    /// idle again (so work that its result leads to finds it waiting);
    /// false when no thread could take it (`work` is dropped unrun). A
    /// panic in `work` is caught and logged.
    pub fn spawn<D: FnOnce() + Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce() -> D + Send + 'static,
    ) -> bool {
        self.execute(Box::new(move || {
            match catch_unwind(AssertUnwindSafe(work)) {
                Ok(deliver) => Box::new(deliver),
                Err(_) => {
                    tracing::error!("a model thread's work panicked");
                    Box::new(|| {})
                }
            }
        }))
    }

    /// Hands `job` to a thread; false when none could take it.
    fn execute(self: &Arc<Self>, job: Job) -> bool {
        let Ok(mut threads) = self.threads.lock() else {
            return false; // the job and its result sender drop: the caller sees `None`
        };
        if let Some(worker) = threads.idle.pop() {
            drop(threads);
            return match worker.job.lock() {
                Ok(mut slot) => {
                    *slot = Some(job);
                    worker.ready.notify_one();
                    true
                }
                Err(_) => false,
            };
        }
        if threads.alive >= self.max_threads {
            threads.queued.push_back(job);
            return true;
        }
        threads.alive += 1;
        drop(threads);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cascade-model".into())
            .spawn(move || pool.work(job));
        match spawned {
            Ok(_) => true,
            Err(e) => {
                // The job went with the closure: the caller sees `None`.
                tracing::error!("cannot start a model thread: {e}");
                if let Ok(mut threads) = self.threads.lock() {
                    threads.alive -= 1;
                }
                false
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

    /// Takes a queued run, or lists the thread idle; then hands the last
    /// result over and waits for the next job.
    fn wait_for_job(&self, worker: &Arc<Worker>, deliver: Deliver) -> Option<Job> {
        // Hold the mailbox while joining the idle list, so a job handed
        // over right away is not missed.
        let mut slot = worker.job.lock().ok()?;
        {
            let mut threads = self.threads.lock().ok()?;
            if let Some(job) = threads.queued.pop_front() {
                drop(threads);
                deliver();
                return Some(job);
            }
            threads.idle.push(worker.clone());
        }
        deliver();
        loop {
            if let Some(job) = slot.take() {
                return Some(job);
            }
            let (guard, timeout) = worker.ready.wait_timeout(slot, self.keep_alive).ok()?;
            slot = guard;
            if timeout.timed_out() && slot.is_none() {
                let mut threads = self.threads.lock().ok()?;
                // Still listed: nobody picked it, leave. Not listed: a job
                // is being handed over; take it.
                if let Some(at) = threads.idle.iter().position(|w| Arc::ptr_eq(w, worker)) {
                    threads.idle.remove(at);
                    threads.alive -= 1;
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
        let threads = ModelThreads::new(KEEP_ALIVE, MAX_THREADS);
        let first = threads.run(thread_id).await.expect("ran");
        for _ in 0..20 {
            assert_eq!(threads.run(thread_id).await, Some(first));
        }
    }

    #[tokio::test]
    async fn concurrent_runs_get_threads_of_their_own() {
        let threads = ModelThreads::new(KEEP_ALIVE, MAX_THREADS);
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
    async fn past_the_limit_runs_wait_for_a_thread() {
        let threads = ModelThreads::new(KEEP_ALIVE, 1);
        let runs = (0..3).map(|_| {
            threads.run(|| {
                std::thread::sleep(Duration::from_millis(10));
                thread_id()
            })
        });
        let ids: Vec<_> = futures_util::future::join_all(runs).await;
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "{ids:?}"
        );
        assert_eq!(threads.threads.lock().expect("lock").alive, 1);
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_the_thread_lives_on() {
        let threads = ModelThreads::new(KEEP_ALIVE, MAX_THREADS);
        let first = threads.run(thread_id).await.expect("ran");
        let panicked: Option<()> = threads.run(|| panic!("a model bug")).await;
        assert_eq!(panicked, None);
        assert_eq!(threads.run(thread_id).await, Some(first));
    }

    #[tokio::test]
    async fn idle_threads_exit_and_new_ones_start() {
        let threads = ModelThreads::new(Duration::from_millis(20), MAX_THREADS);
        let first = threads.run(thread_id).await.expect("ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
        {
            let state = threads.threads.lock().expect("lock");
            assert!(
                state.idle.is_empty() && state.alive == 0,
                "the idle thread exited"
            );
        }
        let second = threads.run(thread_id).await.expect("ran");
        assert_ne!(first, second);
    }
}
