//! The queue in front of a model stage. At most one run per core goes at a
//! time; requests beyond that wait here, not on threads of their own, and a
//! thread that finishes a run takes the next queued one itself. Waking
//! another thread for it instead left cores idle for up to a run's length
//! at 4 connections (`embed`, ONNX Runtime host: the machine 90–94 % busy,
//! p99 13–16 ms; this way 100 % and ~10 ms, benches/optimisations.md
//! entry 28).
//!
//! With `batch = N` in the manifest, the queued requests whose inputs have
//! the same shapes apart from dimension 0 run as one batch of up to N rows.
//! Nothing waits on purpose: a request that finds a free runner runs at
//! once with whatever is already queued, so a lone request pays nothing,
//! and under load one run serves several requests (ONNX Runtime runs
//! MiniLM-L3 ~15 % cheaper per row at 2–4 rows than at 1).

use super::fastest_runs::FastestRuns;
use super::plan::ModelPlan;
use super::stop::{Stop, StopOnDrop};
use super::tensors::{check_fills_shape, element_bytes, element_count, input_position};
use super::threads::ModelThreads;
use crate::bindings::{Tensor, TensorType};
use crate::error::StageError;
use prometheus::IntCounter;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

/// What runs a model: [`ModelPlan`], or a fake in tests.
pub trait Model: Send + Sync + 'static {
    /// Runs on the tensors it needs, picked by name from `available`.
    fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError>;
    /// [`Model::run`], ended early once `stop` is stopped if it can be.
    fn run_stoppable(&self, available: &[Tensor], stop: &Stop) -> Result<Vec<Tensor>, StageError> {
        let _ = stop;
        self.run(available)
    }
    /// The names of the tensors it takes.
    fn input_names(&self) -> Vec<String>;
    /// Its fastest runs so far, if it keeps them.
    fn fastest_runs(&self) -> Option<&FastestRuns> {
        None
    }
}

impl Model for ModelPlan {
    fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
        ModelPlan::run(self, available)
    }

    fn run_stoppable(&self, available: &[Tensor], stop: &Stop) -> Result<Vec<Tensor>, StageError> {
        ModelPlan::run_stoppable(self, available, stop)
    }

    fn input_names(&self) -> Vec<String> {
        ModelPlan::input_names(self)
    }

    fn fastest_runs(&self) -> Option<&FastestRuns> {
        Some(ModelPlan::fastest_runs(self))
    }
}

/// How often requests shared a run, for `/metrics`.
pub struct BatchCounts {
    /// Runs that served two or more requests.
    pub batches: IntCounter,
    /// Requests served by those runs.
    pub requests: IntCounter,
}

/// A request's tensors back, with the model's outputs for it.
pub struct Answer {
    /// The tensors that flowed into the stage, given back.
    pub available: Vec<Tensor>,
    /// The model's outputs for this request.
    pub outputs: Result<Vec<Tensor>, StageError>,
    /// Requests in the run that served it (1: alone; 0: never run).
    pub batched: usize,
    /// When that run started, and how long the request waited for it.
    pub run: Option<(SystemTime, Duration)>,
}

/// Runs one model stage's requests, at most `runners` at a time, merging
/// queued ones into batches of up to `max_rows` rows.
pub struct ModelQueue<M: Model = ModelPlan> {
    model: Arc<M>,
    names: Vec<String>,
    max_rows: usize,
    runners: usize,
    state: Mutex<Queue>,
    counts: Option<BatchCounts>,
    threads: Arc<ModelThreads>,
}

impl<M: Model> std::fmt::Debug for ModelQueue<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelQueue")
            .field("inputs", &self.names)
            .field("max_rows", &self.max_rows)
            .field("runners", &self.runners)
            .finish_non_exhaustive()
    }
}

/// Runs going, and requests waiting for one.
struct Queue {
    running: usize,
    waiting: VecDeque<Request>,
}

/// One request: the tensors that flowed into the stage and where its
/// answer goes.
struct Request {
    available: Vec<Tensor>,
    /// Where the model's inputs are in `available`, in the model's order.
    picked: Vec<usize>,
    /// Type and dimensions past the first of each input: what must match.
    key: Vec<(TensorType, Vec<u32>)>,
    rows: usize,
    /// Elements of its inputs, all together (its size, for run times).
    elements: usize,
    done: oneshot::Sender<Answer>,
    /// When it joined the queue.
    queued: Instant,
    /// When its caller stops waiting, if ever.
    deadline: Option<Instant>,
    /// Stopped when its caller stops waiting.
    stop: Arc<Stop>,
}

impl<M: Model> ModelQueue<M> {
    /// A queue for `model` with one runner per core on the host's model
    /// threads; `max_rows` > 1 batches, and `counts` counts the batches.
    pub fn new(model: Arc<M>, max_rows: usize, counts: Option<BatchCounts>) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_runners(
            model,
            max_rows,
            counts,
            cores,
            ModelThreads::shared().clone(),
        )
    }

    /// A queue running at most `runners` runs at once on `threads`.
    pub fn with_runners(
        model: Arc<M>,
        max_rows: usize,
        counts: Option<BatchCounts>,
        runners: usize,
        threads: Arc<ModelThreads>,
    ) -> Arc<Self> {
        Arc::new(ModelQueue {
            names: model.input_names(),
            model,
            max_rows: max_rows.max(1),
            runners: runners.max(1),
            state: Mutex::new(Queue {
                running: 0,
                waiting: VecDeque::new(),
            }),
            counts,
            threads,
        })
    }

    /// Runs the model on the tensors it needs from `available`, alone or
    /// in a batch, when a runner is free; gives `available` back with the
    /// outputs. A caller that stops waiting leaves the queue: its request
    /// is not run. Nor is one whose `deadline` is nearer than the fastest
    /// run of its size so far: it fails at once (or when a runner would
    /// take it), [`StageError::DeadlineExceeded`].
    pub async fn run(
        self: &Arc<Self>,
        available: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<Answer, StageError> {
        let (done, answer) = oneshot::channel();
        let stop = Arc::new(Stop::default());
        // A caller that leaves (deadline, disconnect) stops its run; one
        // that got its answer stops nothing.
        let _leaving = StopOnDrop(stop.clone());
        let request = self.request(available, done, stop, deadline)?;
        if self.hopeless(&request, Instant::now()) {
            return Err(StageError::DeadlineExceeded);
        }
        let start = {
            let mut queue = self.lock();
            queue.waiting.push_back(request);
            let start = queue.running < self.runners;
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            let queue = self.clone();
            let runner = move || {
                let last = queue.drain();
                move || last.send()
            };
            if !self.threads.spawn(runner) {
                self.no_runner();
            }
        }
        answer.await.map_err(|_| {
            StageError::Internal(
                "the model run ended without a result (it panicked; see the host log)".into(),
            )
        })
    }

    /// A runner: runs queued batches until none is left. The last batch's
    /// answers go out after the runner is free and its thread idle, so the
    /// request they lead to (the next of the same client, at 1 connection)
    /// runs on the same thread with its caches warm.
    fn drain(&self) -> Delivery {
        let mut group = match self.next_or_stop() {
            Some(group) => group,
            None => return Delivery::none(),
        };
        loop {
            let started = (Instant::now(), SystemTime::now());
            let outcomes =
                catch_unwind(AssertUnwindSafe(|| self.execute(&group))).unwrap_or_else(|_| {
                    let failed = || Err(StageError::Internal("the model run panicked".into()));
                    group.iter().map(|_| failed()).collect()
                });
            if let ([only], [Ok(_)], Some(fastest)) =
                (&group[..], &outcomes[..], self.model.fastest_runs())
            {
                fastest.record(only.elements, started.0.elapsed());
            }
            let answers = Delivery {
                answers: group.into_iter().zip(outcomes).collect(),
                started,
            };
            match self.next_or_stop() {
                Some(next) => {
                    answers.send();
                    group = next;
                }
                None => return answers,
            }
        }
    }

    /// The next batch to run, or none, and then this runner has stopped.
    fn next_or_stop(&self) -> Option<Vec<Request>> {
        let mut queue = self.lock();
        let group = self.next_group(&mut queue);
        if group.is_none() {
            queue.running -= 1;
        }
        group
    }

    /// The head of the queue and the requests that fit beside it: an even
    /// share of the queue among the runners, for whenever requests queue
    /// every runner is busy and each takes the next batch when it finishes.
    /// (Taking them all left the other core idle at 4 connections: 547
    /// req/s against 590 with no batching.) Requests whose callers stopped
    /// waiting are dropped.
    fn next_group(&self, queue: &mut Queue) -> Option<Vec<Request>> {
        queue.waiting.retain(|r| !r.done.is_closed());
        // In place: a request past hope is rare, and this holds the lock.
        let now = Instant::now();
        let mut i = 0;
        while i < queue.waiting.len() {
            if self.hopeless(&queue.waiting[i], now) {
                if let Some(request) = queue.waiting.remove(i) {
                    request.fail(StageError::DeadlineExceeded);
                }
            } else {
                i += 1;
            }
        }
        let head = queue.waiting.pop_front()?;
        if head.rows == 0 || head.rows >= self.max_rows {
            return Some(vec![head]);
        }
        let share = (queue.waiting.len() + 1).div_ceil(self.runners);
        let mut rows = head.rows;
        let mut group = vec![];
        let mut kept = VecDeque::with_capacity(queue.waiting.len());
        for request in queue.waiting.drain(..) {
            let fits = group.len() + 1 < share
                && request.rows > 0
                && request.key == head.key
                && rows + request.rows <= self.max_rows;
            if fits {
                rows += request.rows;
                group.push(request);
            } else {
                kept.push_back(request);
            }
        }
        queue.waiting = kept;
        group.insert(0, head);
        Some(group)
    }

    /// No thread could take a runner: fail what waits, if no runner is left
    /// to serve it.
    fn no_runner(&self) {
        let mut queue = self.lock();
        queue.running -= 1;
        if queue.running == 0 {
            for request in queue.waiting.drain(..) {
                request.fail(StageError::Internal(
                    "no thread could run the model (see the host log)".into(),
                ));
            }
        }
    }

    /// The queue's state stays consistent under the lock (nothing in it
    /// panics), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finds the model's inputs in `available` and checks they agree on rows.
    fn request(
        &self,
        available: Vec<Tensor>,
        done: oneshot::Sender<Answer>,
        stop: Arc<Stop>,
        deadline: Option<Instant>,
    ) -> Result<Request, StageError> {
        let picked = self
            .names
            .iter()
            .map(|name| input_position(&available, name))
            .collect::<Result<Vec<usize>, StageError>>()?;
        let inputs = || picked.iter().map(|&i| &available[i]);
        // Rows are cut out of a batch by byte offsets: a tensor whose bytes
        // do not fill its shape would shift every other request's rows.
        for tensor in inputs() {
            check_fills_shape(tensor, element_bytes(tensor.ty))?;
        }
        let rows: Vec<u32> = inputs()
            .map(|t| t.dimensions.first().copied().unwrap_or(0))
            .collect();
        if self.max_rows > 1 && rows.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(StageError::InvalidInput(format!(
                "the model batches along dimension 0, but its inputs have {rows:?} rows"
            )));
        }
        let key = inputs()
            .map(|t| (t.ty, t.dimensions.get(1..).unwrap_or_default().to_vec()))
            .collect();
        let elements = inputs().map(element_count).fold(0, usize::saturating_add);
        Ok(Request {
            rows: rows.first().map_or(0, |&r| r as usize),
            elements,
            key,
            picked,
            available,
            done,
            queued: Instant::now(),
            deadline,
            stop,
        })
    }

    /// Whether `request` cannot be answered by its deadline, judging by
    /// the model's fastest run of its size.
    fn hopeless(&self, request: &Request, now: Instant) -> bool {
        match (request.deadline, self.model.fastest_runs()) {
            (Some(deadline), Some(fastest)) => {
                fastest.cannot_end_within(request.elements, deadline.saturating_duration_since(now))
            }
            _ => false,
        }
    }

    /// One model run for the whole group: inputs stacked along dimension 0,
    /// outputs cut back into each request's rows.
    fn execute(&self, group: &[Request]) -> Vec<Result<Vec<Tensor>, StageError>> {
        // A lone request's run ends early when its caller leaves; a batch
        // runs to the end (all its callers would have to be gone).
        if let [only] = group {
            return vec![self.model.run_stoppable(&only.available, &only.stop)];
        }
        let total: usize = group.iter().map(|r| r.rows).sum();
        let stacked: Vec<Tensor> = (0..self.names.len())
            .map(|i| {
                let first = &group[0].available[group[0].picked[i]];
                let mut dimensions = first.dimensions.clone();
                dimensions[0] = total as u32;
                Tensor {
                    name: first.name.clone(),
                    dimensions,
                    ty: first.ty,
                    data: group
                        .iter()
                        .flat_map(|r| r.available[r.picked[i]].data.iter().copied())
                        .collect(),
                }
            })
            .collect();
        let outputs = match self.model.run(&stacked) {
            Ok(outputs) => outputs,
            Err(e) => {
                let message = format!("batched model run: {e}");
                return group
                    .iter()
                    .map(|_| Err(StageError::Internal(message.clone())))
                    .collect();
            }
        };
        if let Some(counts) = &self.counts {
            counts.batches.inc();
            counts.requests.inc_by(group.len() as u64);
        }
        match split(&outputs, group, total) {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(message) => group
                .iter()
                .map(|_| Err(StageError::Internal(message.clone())))
                .collect(),
        }
    }
}

impl Request {
    /// Answers with `error`, unrun.
    fn fail(self, error: StageError) {
        let _ = self.done.send(Answer {
            available: self.available,
            outputs: Err(error),
            batched: 0,
            run: None,
        });
    }
}

/// Answers of one run, to send to their requests' callers.
struct Delivery {
    answers: Vec<(Request, Result<Vec<Tensor>, StageError>)>,
    /// When the run started (for waits), and on the wall clock (for traces).
    started: (Instant, SystemTime),
}

impl Delivery {
    fn none() -> Delivery {
        Delivery {
            answers: Vec::new(),
            started: (Instant::now(), SystemTime::now()),
        }
    }

    fn send(self) {
        let batched = self.answers.len();
        let (at, wall) = self.started;
        for (request, outputs) in self.answers {
            let _ = request.done.send(Answer {
                available: request.available,
                outputs,
                batched,
                run: Some((wall, at.saturating_duration_since(request.queued))),
            });
        }
    }
}

/// Each request's rows of every output; fails when an output's dimension 0
/// is not the batch.
fn split(outputs: &[Tensor], group: &[Request], total: usize) -> Result<Vec<Vec<Tensor>>, String> {
    let mut answers: Vec<Vec<Tensor>> = group.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        let rows = output.dimensions.first().copied().unwrap_or(0) as usize;
        if rows != total || output.data.len() % total != 0 {
            return Err(format!(
                "output {:?} has shape {:?} for a batch of {total} rows; `batch` needs \
                 dimension 0 of every output to be the batch",
                output.name, output.dimensions
            ));
        }
        let row_bytes = output.data.len() / total;
        let mut offset = 0;
        for (answer, request) in answers.iter_mut().zip(group) {
            let mut dimensions = output.dimensions.clone();
            dimensions[0] = request.rows as u32;
            let end = offset + request.rows * row_bytes;
            answer.push(Tensor {
                name: output.name.clone(),
                dimensions,
                ty: output.ty,
                data: output.data[offset..end].to_vec(),
            });
            offset = end;
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensors::input_named;
    use crate::model::threads::{KEEP_ALIVE, MAX_THREADS};
    use std::sync::mpsc;
    use std::thread::ThreadId;
    use std::time::Duration;

    /// Doubles its `x` input's bytes into `y`, noting each run's thread and
    /// rows; the first run waits for `release` when one is given, and a
    /// row holding 13 panics.
    #[derive(Default)]
    struct Doubler {
        runs: Mutex<Vec<(ThreadId, Vec<u8>)>>,
        gate: Mutex<Option<mpsc::Receiver<()>>>,
        busy: Mutex<(usize, usize)>,
        fastest: FastestRuns,
    }

    impl Model for Doubler {
        fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
            {
                let mut busy = self.busy.lock().expect("lock");
                busy.0 += 1;
                busy.1 = busy.1.max(busy.0);
            }
            if let Some(gate) = self.gate.lock().expect("lock").take() {
                gate.recv().expect("released");
            }
            std::thread::sleep(Duration::from_millis(2));
            let x = input_named(available, "x")?;
            self.runs
                .lock()
                .expect("lock")
                .push((std::thread::current().id(), x.data.clone()));
            self.busy.lock().expect("lock").0 -= 1;
            assert!(!x.data.contains(&13), "unlucky row");
            Ok(vec![Tensor {
                name: "y".into(),
                data: x.data.iter().map(|v| v * 2).collect(),
                ..x.clone()
            }])
        }

        fn input_names(&self) -> Vec<String> {
            vec!["x".into()]
        }

        fn fastest_runs(&self) -> Option<&FastestRuns> {
            Some(&self.fastest)
        }
    }

    fn row(value: u8) -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            dimensions: vec![1, 1],
            ty: TensorType::U8,
            data: vec![value],
        }]
    }

    fn queue(model: &Arc<Doubler>, max_rows: usize, runners: usize) -> Arc<ModelQueue<Doubler>> {
        let threads = ModelThreads::new(KEEP_ALIVE, MAX_THREADS);
        ModelQueue::with_runners(model.clone(), max_rows, None, runners, threads)
    }

    /// A model whose first run waits until the returned sender sends.
    fn gated() -> (Arc<Doubler>, mpsc::Sender<()>) {
        let (release, gate) = mpsc::channel();
        let model = Doubler {
            gate: Mutex::new(Some(gate)),
            ..Doubler::default()
        };
        (Arc::new(model), release)
    }

    type Pending = tokio::task::JoinHandle<Result<Answer, StageError>>;

    /// Queues a run of one row holding `value`.
    fn submit(queue: &Arc<ModelQueue<Doubler>>, value: u8) -> Pending {
        let queue = queue.clone();
        tokio::spawn(async move { queue.run(row(value), None).await })
    }

    /// Starts a run of `value` and waits until the model holds it.
    async fn start(queue: &Arc<ModelQueue<Doubler>>, model: &Doubler, value: u8) -> Pending {
        let pending = submit(queue, value);
        while model.busy.lock().expect("lock").0 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pending
    }

    async fn until_waiting<M: Model>(queue: &ModelQueue<M>, count: usize) {
        while queue.lock().waiting.len() < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The doubled bytes a run answered with.
    async fn doubled(pending: Pending) -> Vec<u8> {
        let answer = pending.await.expect("joined");
        answer_of(answer).expect("an answer")
    }

    fn answer_of(answer: Result<Answer, StageError>) -> Result<Vec<u8>, StageError> {
        Ok(answer?.outputs?.remove(0).data)
    }

    /// The rows of each run, in order.
    fn runs(model: &Doubler) -> Vec<Vec<u8>> {
        let runs = model.runs.lock().expect("lock");
        runs.iter().map(|(_, rows)| rows.clone()).collect()
    }

    #[tokio::test]
    async fn a_finishing_runner_takes_the_next_queued_run_itself() {
        let (model, release) = gated();
        let queue = queue(&model, 1, 1);
        let first = start(&queue, &model, 1).await;
        let later = [submit(&queue, 2), submit(&queue, 3)];
        until_waiting(&queue, 2).await;
        release.send(()).expect("released");
        assert_eq!(doubled(first).await, vec![2]);
        for (pending, value) in later.into_iter().zip([4, 6]) {
            assert_eq!(doubled(pending).await, vec![value]);
        }
        assert_eq!(runs(&model), vec![vec![1], vec![2], vec![3]], "in order");
        let threads = model.runs.lock().expect("lock");
        assert!(
            threads.iter().all(|(thread, _)| *thread == threads[0].0),
            "the thread that finished ran the queued runs"
        );
    }

    #[tokio::test]
    async fn a_deadline_nearer_than_the_fastest_run_fails_at_once_without_a_run() {
        let model = Arc::new(Doubler::default());
        let queue = queue(&model, 1, 1);
        let soon = || Some(Instant::now() + Duration::from_micros(500));
        let unmeasured = queue.run(row(1), soon()).await;
        assert_eq!(
            answer_of(unmeasured).expect("ran"),
            vec![2],
            "no run seen yet"
        );
        let refused = queue.run(row(2), soon()).await;
        assert!(
            matches!(refused, Err(StageError::DeadlineExceeded)),
            "a run takes 2 ms: {:?}",
            refused.map(|a| a.outputs)
        );
        let later = Some(Instant::now() + Duration::from_secs(10));
        assert_eq!(
            answer_of(queue.run(row(3), later).await).expect("ran"),
            vec![6]
        );
        assert_eq!(runs(&model), vec![vec![1], vec![3]], "2 never ran");
    }

    #[tokio::test]
    async fn a_queued_request_whose_deadline_can_no_longer_be_met_is_not_run() {
        let model = Arc::new(Doubler::default());
        let queue = queue(&model, 1, 1);
        assert_eq!(doubled(submit(&queue, 1)).await, vec![2]);
        let (release, gate) = mpsc::channel();
        *model.gate.lock().expect("lock") = Some(gate);
        let held = start(&queue, &model, 2).await;
        let deadline = Some(Instant::now() + Duration::from_millis(50));
        let waiting = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.run(row(3), deadline).await })
        };
        until_waiting(&queue, 1).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        release.send(()).expect("released");
        assert_eq!(doubled(held).await, vec![4]);
        let answer = waiting.await.expect("joined");
        assert!(
            matches!(answer_of(answer), Err(StageError::DeadlineExceeded)),
            "its deadline passed while it waited"
        );
        assert_eq!(runs(&model), vec![vec![1], vec![2]], "3 never ran");
    }

    #[tokio::test]
    async fn no_more_runs_go_at_once_than_runners() {
        let model = Arc::new(Doubler::default());
        let queue = queue(&model, 1, 2);
        let pending: Vec<Pending> = (1..=8).map(|v| submit(&queue, v)).collect();
        for (v, pending) in (1..=8u8).zip(pending) {
            assert_eq!(doubled(pending).await, vec![v * 2]);
        }
        assert_eq!(model.busy.lock().expect("lock").1, 2, "most runs at once");
        assert_eq!(queue.lock().running, 0, "every runner stopped");
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_is_not_run() {
        let (model, release) = gated();
        let queue = queue(&model, 1, 1);
        let first = start(&queue, &model, 1).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(5), queue.run(row(2), None)).await;
        assert!(gave_up.is_err(), "the second request was still queued");
        let third = submit(&queue, 3);
        until_waiting(&queue, 2).await;
        release.send(()).expect("released");
        doubled(first).await;
        assert_eq!(doubled(third).await, vec![6]);
        assert_eq!(runs(&model), vec![vec![1], vec![3]]);
    }

    #[tokio::test]
    async fn a_panicking_run_fails_its_request_and_the_queue_goes_on() {
        let model = Arc::new(Doubler::default());
        let queue = queue(&model, 1, 1);
        let failed = answer_of(queue.run(row(13), None).await).expect_err("the run failed");
        assert!(failed.to_string().contains("panicked"), "{failed}");
        assert_eq!(doubled(submit(&queue, 4)).await, vec![8]);
    }

    #[tokio::test]
    async fn queued_requests_share_a_run_and_get_their_own_rows() {
        let (model, release) = gated();
        let queue = queue(&model, 8, 1);
        let first = start(&queue, &model, 1).await;
        let later = [submit(&queue, 2), submit(&queue, 3), submit(&queue, 4)];
        until_waiting(&queue, 3).await;
        release.send(()).expect("released");
        doubled(first).await;
        for (pending, value) in later.into_iter().zip([4, 6, 8]) {
            assert_eq!(doubled(pending).await, vec![value]);
        }
        assert_eq!(runs(&model), vec![vec![1], vec![2, 3, 4]], "one batch");
    }

    #[tokio::test]
    async fn a_tensor_whose_bytes_do_not_fill_its_shape_never_joins_a_batch() {
        let (model, release) = gated();
        let queue = queue(&model, 8, 1);
        let first = start(&queue, &model, 1).await;
        let before = submit(&queue, 2);
        // Says one row, holds three bytes: stacked, it would hand the next
        // request two of its bytes as that request's row.
        let malformed = Tensor {
            name: "x".into(),
            dimensions: vec![1, 1],
            ty: TensorType::U8,
            data: vec![90, 91, 92],
        };
        let refused = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.run(vec![malformed], None).await.map(drop) })
        };
        let after = submit(&queue, 4);
        until_waiting(&queue, 2).await;
        release.send(()).expect("released");
        doubled(first).await;
        let refused = refused.await.expect("task");
        assert_eq!(doubled(before).await, vec![4]);
        assert_eq!(doubled(after).await, vec![8]);
        let message = refused.expect_err("refused").to_string();
        assert!(
            message.contains("holds 3 bytes but its shape [1, 1] needs Some(1)"),
            "{message}"
        );
        assert_eq!(runs(&model), vec![vec![1], vec![2, 4]]);
    }
}
