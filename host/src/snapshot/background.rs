//! Where snapshots are made: one at a time, on threads at the lowest CPU
//! priority. Making one compiles the component twice, seconds of CPU that
//! must never be taken from the requests, loads and registry syncs beside
//! it: a snapshot only makes later cold starts cheaper.

use std::sync::mpsc;

/// Work for the background.
pub type Task = Box<dyn FnOnce() + Send>;

/// The nice value of the background's threads: the lowest priority.
const LOWEST: libc::c_int = 19;

/// One thread that runs tasks in the order given, inside a pool of threads
/// for wasmtime's parallel compiling; every one of them at nice
/// [`LOWEST`], so they run on cores nothing else wants.
pub struct Background {
    tasks: Option<mpsc::Sender<Task>>,
}

impl Background {
    /// Starts the thread; without it (the system refused a thread) no
    /// task ever runs and [`Background::run`] says so.
    pub fn start() -> Self {
        let (tasks, queue) = mpsc::channel::<Task>();
        let started = std::thread::Builder::new()
            .name("cascade-snapshot".into())
            .spawn(move || serve(queue));
        match started {
            Ok(_) => Background { tasks: Some(tasks) },
            Err(e) => {
                tracing::warn!("no thread for making snapshots ({e}); none will be made");
                Background { tasks: None }
            }
        }
    }

    /// Queues `task`; false when there is no thread to run it.
    pub fn run(&self, task: Task) -> bool {
        self.tasks.as_ref().is_some_and(|t| t.send(task).is_ok())
    }
}

/// Runs queued tasks until every sender is gone.
fn serve(queue: mpsc::Receiver<Task>) {
    lower_priority();
    // wasmtime compiles a component's functions in parallel on the rayon
    // pool it is called from: this one, not the global pool that
    // publishes and loads use at normal priority.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("cascade-snapshot-{i}"))
        .start_handler(|_| lower_priority())
        .build();
    if let Err(e) = &pool {
        tracing::warn!("no low-priority pool for snapshot compiles ({e}); using the shared one");
    }
    for task in queue {
        match &pool {
            Ok(pool) => pool.install(task),
            Err(_) => task(),
        }
    }
}

/// Lowers the calling thread's priority to [`LOWEST`] (on Linux a nice
/// value belongs to a thread, not to the whole process).
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // arguments, and a thread may always lower its own priority.
    let failed = unsafe {
        let thread = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, LOWEST) != 0
    };
    if failed {
        tracing::warn!(
            "snapshot threads keep normal priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    /// The calling thread's nice value.
    fn nice() -> libc::c_int {
        // SAFETY: as in `lower_priority`; getpriority only reads.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn tasks_and_their_parallel_work_run_in_order_at_the_lowest_priority() {
        let background = Background::start();
        let (seen, results) = channel();
        for n in 0..3 {
            let seen = seen.clone();
            assert!(background.run(Box::new(move || {
                let parallel: Vec<_> = (0..64).into_par_iter().map(|_| nice()).collect();
                let _ = seen.send((n, nice(), parallel));
            })));
        }
        for expected in 0..3 {
            let (n, own, parallel) = results
                .recv_timeout(Duration::from_secs(30))
                .expect("the task ran");
            assert_eq!(n, expected, "tasks run in the order given");
            assert_eq!(own, LOWEST);
            assert!(parallel.iter().all(|&p| p == LOWEST), "{parallel:?}");
        }
        assert_ne!(nice(), LOWEST, "the caller keeps its priority");
    }
}
