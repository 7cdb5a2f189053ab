//! Stopping a model run nobody waits for any more.
//!
//! A caller that gives up (its deadline passed, its client left, a shadow
//! copy timed out) drops its future, but a model run already started on a
//! model thread went on to the end, holding a core for work no one would
//! read. A [`Stop`] joins the two: the run arms it with a way to end
//! itself early (ONNX Runtime's terminate flag), and the caller's side
//! stops it when it leaves.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Ends the run in progress (called from another thread).
type Terminate = Box<dyn Fn() + Send>;

/// One request's run, which its caller may stop.
#[derive(Default)]
pub struct Stop {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    stopped: bool,
    /// Set while a run that can end early is in progress.
    armed: Option<Terminate>,
}

impl Stop {
    /// Nobody waits for the run any more: ends it if one is in progress,
    /// and any run armed later ends at once.
    pub fn stop(&self) {
        let mut state = self.lock();
        state.stopped = true;
        if let Some(terminate) = &state.armed {
            terminate();
        }
    }

    /// Whether [`Stop::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Runs `work`, which `terminate` can end early from another thread,
    /// and says whether it was stopped meanwhile (then `terminate` may
    /// have been called, and the caller must clear what it set).
    pub fn run<T>(&self, terminate: Terminate, work: impl FnOnce() -> T) -> (T, bool) {
        {
            let mut state = self.lock();
            if state.stopped {
                terminate();
            }
            state.armed = Some(terminate);
        }
        let value = work();
        let mut state = self.lock();
        state.armed = None;
        (value, state.stopped)
    }

    /// Nothing in the state can be left half-changed by a panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stops a run when dropped: what a caller holds while it waits.
pub struct StopOnDrop(pub std::sync::Arc<Stop>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    fn counting() -> (Arc<AtomicUsize>, Terminate) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        (
            calls,
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    #[test]
    fn a_run_in_progress_is_terminated_when_stopped() {
        let stop = Arc::new(Stop::default());
        let (calls, terminate) = counting();
        let (started, wait) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let runner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                stop.run(terminate, || {
                    started.send(()).expect("the test waits");
                    released.recv().expect("the test releases");
                })
            })
        };
        wait.recv().expect("the run started");
        stop.stop();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "terminated while running");
        release.send(()).expect("the run waits");
        let ((), stopped) = runner.join().expect("no panic");
        assert!(stopped);
    }

    #[test]
    fn a_run_armed_after_the_stop_ends_at_once_and_a_finished_one_is_left_alone() {
        let stop = Stop::default();
        stop.stop();
        let (calls, terminate) = counting();
        let ((), stopped) = stop.run(terminate, || ());
        assert!(stopped);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let stop = Stop::default();
        let (calls, terminate) = counting();
        let ((), stopped) = stop.run(terminate, || ());
        stop.stop();
        assert!(!stopped);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no run is in progress");
    }
}
