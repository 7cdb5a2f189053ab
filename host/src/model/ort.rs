//! ONNX Runtime as a second model backend, chosen per host with
//! `cascade serve --onnxruntime LIB`: the shared library the `onnxruntime`
//! wheel ships, loaded at run time, so nothing is linked or downloaded at
//! build time. tract stays the default; this one runs the models with the
//! kernels a Python onnxruntime server would use.
//!
//! ONNX Runtime sessions are not safe to run from two threads at once, so a
//! model keeps a few sessions (at most one per core) and lends one to each
//! run; runs beyond that wait for one to come back. The sessions share the
//! model's packed weights and large initializers (`shared_initializers.rs`),
//! so each extra session costs its working memory, not another copy of the
//! model. A run that starts while no other is in flight may instead use
//! one session with more threads (`wide_runs.rs`).

use super::ModelError;
use super::optimized::{OptimizedCopy, Saving};
use super::shared_initializers::SharedInitializers;
use super::stop::Stop;
use super::tensors::{check_fills_shape, element_count, input_named};
use super::wide_runs::{InFlight, Width, WidthChooser};
use crate::bindings::{Tensor, TensorType};
use crate::error::StageError;
use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType, ValueType};
use prometheus::IntCounter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// How the host runs models with ONNX Runtime.
#[derive(Debug, Clone)]
pub struct OrtSettings {
    /// The shared library (`libonnxruntime.so.1.x.y`).
    pub library: PathBuf,
    /// Threads one run may use (ONNX Runtime's intra-op threads).
    pub threads: usize,
    /// Threads a run may use when no other run is in flight, if that is
    /// faster for the model (no more than `threads`: never).
    pub alone_threads: usize,
    /// The host found the library itself (no flag named it): if it does not
    /// load, models run with tract instead of failing.
    pub or_tract: bool,
}

/// Model runs by width, for `/metrics`.
pub struct RunCounts {
    /// Runs on `threads` threads.
    pub narrow: IntCounter,
    /// Lone runs on `alone_threads` threads.
    pub wide: IntCounter,
    /// Runs ended early because nobody waited for them any more.
    pub stopped: IntCounter,
}

/// Loads the library and creates the process's one ONNX Runtime
/// environment; later calls reuse it, and calls made while another is
/// loading it wait for that one.
pub fn init(library: &Path) -> Result<(), ModelError> {
    static LOADING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
    if ENVIRONMENT.get().is_some() {
        return Ok(());
    }
    let environment = ort::init_from(library)
        .map_err(|source| ModelError::OnnxRuntimeLibrary {
            library: library.to_path_buf(),
            source,
        })?
        .with_name("cascade")
        .build()
        .map_err(|source| ModelError::OnnxRuntime {
            doing: "cannot start ONNX Runtime".into(),
            source,
        })?;
    let _ = ENVIRONMENT.set(environment);
    Ok(())
}

/// One model file served by ONNX Runtime, with the sessions that run it.
pub struct OrtModel {
    file: ModelFile,
    threads: usize,
    inputs: Vec<(String, TensorElementType)>,
    outputs: Vec<String>,
    /// Packed weights and large constants shared by the model's sessions.
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    limit: usize,
    /// The session for lone runs, when `alone_threads` > `threads`.
    wide: Option<Arc<Wide>>,
    counts: RunCounts,
    /// Tells [`Later`] the first run is over (taken by that run).
    first_run: Mutex<Option<mpsc::Sender<()>>>,
    /// A run has finished: later runs skip the lock above.
    ran: AtomicBool,
}

/// How long [`Later`] waits for a model's first run before building its
/// other sessions anyway.
const FIRST_RUN_WAIT: Duration = Duration::from_secs(1);

/// What every session of one model shares instead of holding its own.
struct Shared {
    weights: PrepackedWeights,
    /// Read in the background after the first session is built, so a model
    /// serves without waiting for them; sessions built before hold their
    /// own copies and are retired once one that shares them exists.
    initializers: OnceLock<SharedInitializers>,
}

/// The narrow sessions, and the signal that one came back.
struct Pool {
    sessions: Mutex<Sessions>,
    returned: Condvar,
}

/// One session with more threads, for runs that have the host to themselves.
struct Wide {
    /// `None` while a run uses it, and until it is built: it is built in the
    /// background after the model loads, so a restart answers without
    /// waiting for a second session (lone runs take a narrow one meanwhile).
    runner: Mutex<Option<Runner>>,
    chooser: WidthChooser,
}

/// Idle sessions, and how many exist.
struct Sessions {
    idle: Vec<Runner>,
    alive: usize,
    /// A session sharing the initializers exists: those holding their own
    /// copies are dropped instead of reused.
    retire_own: bool,
}

impl Sessions {
    /// Takes `runner` back, or drops it when it is due to retire.
    fn give_back(&mut self, runner: Runner) {
        if runner.own_initializers && self.retire_own {
            self.alive -= 1;
        } else {
            self.idle.push(runner);
        }
    }
}

/// A session with the run options that select the model's outputs.
struct Runner {
    session: Session,
    options: RunOptions<HasSelectedOutputs>,
    /// Built before the shared initializers were read.
    own_initializers: bool,
}

impl OrtModel {
    /// Loads the model at `path`, computing only `outputs` (every graph
    /// output when empty); fails clearly when an output is not one.
    ///
    /// `optimized` is where the model's optimised copy is kept: loaded from
    /// there when an earlier load saved it, else saved there in the
    /// background.
    pub fn load(
        path: &Path,
        optimized: Option<&OptimizedCopy>,
        outputs: &[String],
        settings: &OrtSettings,
        counts: RunCounts,
    ) -> Result<Self, ModelError> {
        init(&settings.library)?;
        let started = Instant::now();
        let shared = Arc::new(Shared {
            weights: PrepackedWeights::new(),
            initializers: OnceLock::new(),
        });
        let (session, file, save) = first_session(path, optimized, settings.threads, &shared)?;
        if let Some(copy) = save {
            save_copy_later(path, copy, shared.clone());
        }
        tracing::debug!(
            model = %file.path.display(),
            optimised_copy = file.optimised,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "ONNX Runtime session ready"
        );
        let outputs = selected_outputs(&session, outputs)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|input| match input.dtype() {
                ValueType::Tensor { ty, .. } => Ok((input.name().to_string(), *ty)),
                other => Err(ModelError::Unsupported(format!(
                    "input {:?} is a {other}, not a tensor",
                    input.name()
                ))),
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let wide = (settings.alone_threads > settings.threads).then(|| {
            Arc::new(Wide {
                runner: Mutex::new(None),
                chooser: WidthChooser::default(),
            })
        });
        let runner = runner(session, &outputs, true)?;
        let limit = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = Arc::new(Pool {
            sessions: Mutex::new(Sessions {
                idle: vec![runner],
                alive: 1,
                retire_own: false,
            }),
            returned: Condvar::new(),
        });
        let (first_run, after_first_run) = mpsc::channel();
        Later {
            after_first_run,
            file: file.clone(),
            threads: settings.threads,
            alone_threads: settings.alone_threads,
            outputs: outputs.clone(),
            shared: shared.clone(),
            pool: pool.clone(),
            wide: wide.clone(),
        }
        .spawn();
        Ok(OrtModel {
            file,
            threads: settings.threads,
            inputs,
            outputs,
            shared,
            pool,
            limit,
            wide,
            counts,
            first_run: Mutex::new(Some(first_run)),
            ran: AtomicBool::new(false),
        })
    }

    /// The names of the tensors the model takes.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Runs the model on the tensors it needs, picked by name from `available`.
    pub fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
        self.run_stoppable(available, &Stop::default())
    }

    /// [`OrtModel::run`], ended early by ONNX Runtime (between two nodes)
    /// once `stop` is stopped.
    pub fn run_stoppable(
        &self,
        available: &[Tensor],
        stop: &Stop,
    ) -> Result<Vec<Tensor>, StageError> {
        let outcome = self.run_picking(available, stop);
        if !self.ran.swap(true, Ordering::Relaxed)
            && let Some(first) = self.first_run.lock().ok().and_then(|mut f| f.take())
        {
            let _ = first.send(());
        }
        outcome
    }

    /// [`OrtModel::run`] on a wide session when alone and faster, else narrow.
    fn run_picking(&self, available: &[Tensor], stop: &Stop) -> Result<Vec<Tensor>, StageError> {
        let in_flight = InFlight::enter();
        let mut elements = 0usize;
        let inputs = self
            .inputs
            .iter()
            .map(|(name, ty)| {
                let tensor = input_named(available, name)?;
                elements = elements.saturating_add(element_count(tensor));
                Ok((name.as_str(), to_ort(tensor, *ty)?))
            })
            .collect::<Result<Vec<_>, StageError>>()?;
        if let (true, Some(wide)) = (in_flight.alone(), &self.wide) {
            let width = wide.chooser.choose(elements);
            let taken = match width {
                Width::Wide => wide.runner.lock().ok().and_then(|mut r| r.take()),
                Width::Narrow => None,
            };
            let started = Instant::now();
            let (used, outcome) = match taken {
                Some(mut runner) => {
                    let outcome = self.run_on(&mut runner, inputs, stop);
                    if let Ok(mut slot) = wide.runner.lock() {
                        *slot = Some(runner);
                    }
                    self.counts.wide.inc();
                    (Width::Wide, outcome)
                }
                None => (Width::Narrow, self.run_narrow(inputs, stop)),
            };
            if outcome.is_ok() {
                let cost = started.elapsed().as_nanos() as f64 / elements.max(1) as f64;
                wide.chooser.record(used, elements, cost);
            }
            return outcome;
        }
        self.run_narrow(inputs, stop)
    }

    /// Runs on a session of the narrow pool.
    fn run_narrow(
        &self,
        inputs: Vec<(&str, DynTensor)>,
        stop: &Stop,
    ) -> Result<Vec<Tensor>, StageError> {
        let mut lease = self.lease()?;
        let runner = lease.runner.as_mut().expect("a lease holds its runner");
        self.counts.narrow.inc();
        self.run_on(runner, inputs, stop)
    }

    fn run_on(
        &self,
        runner: &mut Runner,
        inputs: Vec<(&str, DynTensor)>,
        stop: &Stop,
    ) -> Result<Vec<Tensor>, StageError> {
        let flag = || Terminator(runner.options.ptr().cast_mut());
        // The flag stays on the options until cleared: whatever set it
        // last, it must not end a run someone waits for.
        flag().set(false);
        let terminate = flag();
        let (outcome, stopped) = stop.run(Box::new(move || terminate.set(true)), || {
            runner.session.run_with_options(inputs, &runner.options)
        });
        if stopped {
            flag().set(false);
            self.counts.stopped.inc();
            return Err(StageError::Internal(
                "the model run was stopped: nobody waited for it any more".into(),
            ));
        }
        let mut outputs =
            outcome.map_err(|e| StageError::Internal(format!("inference failed: {e}")))?;
        self.outputs
            .iter()
            .map(|name| {
                let value = outputs.remove(name.as_str()).ok_or_else(|| {
                    StageError::Internal(format!("ONNX Runtime returned no output {name:?}"))
                })?;
                from_ort(name, value)
            })
            .collect()
    }

    /// An idle session, a new one while fewer than `limit` exist, or else
    /// the next one returned.
    fn lease(&self) -> Result<Lease<'_>, StageError> {
        let poisoned = |_| StageError::Internal("the model's session pool is poisoned".into());
        let mut pool = self.pool.sessions.lock().map_err(poisoned)?;
        loop {
            if let Some(runner) = pool.idle.pop() {
                if runner.own_initializers && pool.retire_own {
                    pool.alive -= 1;
                    continue;
                }
                return Ok(Lease {
                    model: self,
                    runner: Some(runner),
                });
            }
            if pool.alive < self.limit {
                pool.alive += 1;
                drop(pool);
                let own = self.shared.initializers.get().is_none();
                let made = self
                    .file
                    .session(self.threads, &self.shared)
                    .and_then(|session| runner(session, &self.outputs, own));
                return match made {
                    Ok(runner) => Ok(Lease {
                        model: self,
                        runner: Some(runner),
                    }),
                    Err(e) => {
                        if let Ok(mut pool) = self.pool.sessions.lock() {
                            pool.alive -= 1;
                        }
                        Err(StageError::Internal(e.to_string()))
                    }
                };
            }
            pool = self.pool.returned.wait(pool).map_err(poisoned)?;
        }
    }
}

/// A session lent to one run; it goes back to the pool when dropped, even
/// when the run panicked.
struct Lease<'a> {
    model: &'a OrtModel,
    runner: Option<Runner>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(runner), Ok(mut pool)) = (self.runner.take(), self.model.pool.sessions.lock())
        {
            pool.give_back(runner);
            self.model.pool.returned.notify_one();
        }
    }
}

/// How a session treats the model's graph.
#[derive(Clone, Copy)]
enum Graph<'a> {
    /// Optimises it.
    Optimise,
    /// Optimises it and writes the result to this file.
    OptimiseAndSave(&'a Path),
    /// Takes it as it is: an optimised copy.
    AsSaved,
}

/// The file a model's sessions are built from.
#[derive(Clone)]
struct ModelFile {
    path: PathBuf,
    /// It is an optimised copy: sessions take its graph as it is.
    optimised: bool,
}

impl ModelFile {
    fn new(path: &Path, optimised: bool) -> Self {
        ModelFile {
            path: path.to_path_buf(),
            optimised,
        }
    }

    /// A session of this file running on `threads` threads.
    fn session(&self, threads: usize, shared: &Shared) -> Result<Session, ModelError> {
        let graph = if self.optimised {
            Graph::AsSaved
        } else {
            Graph::Optimise
        };
        new_session(&self.path, graph, threads, shared)
    }
}

/// The model's first session and the file its later sessions are built
/// from: the optimised copy when there is one, else the model, with the
/// copy to save for the next load.
fn first_session(
    path: &Path,
    optimized: Option<&OptimizedCopy>,
    threads: usize,
    shared: &Shared,
) -> Result<(Session, ModelFile, Option<OptimizedCopy>), ModelError> {
    let model = ModelFile::new(path, false);
    let Some(copy) = optimized else {
        return Ok((model.session(threads, shared)?, model, None));
    };
    if copy.exists() {
        let saved = ModelFile::new(&copy.path, true);
        match saved.session(threads, shared) {
            Ok(session) => return Ok((session, saved, None)),
            Err(e) => {
                tracing::warn!(
                    model = %path.display(),
                    "the optimised copy {} does not load ({e}); optimising again",
                    copy.path.display()
                );
                copy.discard();
            }
        }
    }
    Ok((model.session(threads, shared)?, model, Some(copy.clone())))
}

/// Saves the optimised copy of the model at `path` to `copy`, on a thread
/// of its own: building the session that writes it took MiniLM-L3's first
/// load from 83 to 250 ms when done on the load path.
fn save_copy_later(path: &Path, copy: OptimizedCopy, shared: Arc<Shared>) {
    let path = path.to_path_buf();
    let saving = Saving::start();
    let spawned = std::thread::Builder::new()
        .name("ort-save".into())
        .spawn(move || {
            save_copy(&path, &copy, &shared);
            drop(saving);
        });
    if let Err(error) = spawned {
        tracing::warn!("no thread to save an optimised model: {error}");
    }
}

fn save_copy(path: &Path, copy: &OptimizedCopy, shared: &Shared) {
    let staged = match copy.staging() {
        Ok(staged) => staged,
        Err(e) => {
            tracing::warn!("no optimised copy of {}: {e}", path.display());
            return;
        }
    };
    match new_session(path, Graph::OptimiseAndSave(&staged.path), 1, shared) {
        Ok(_) => copy.keep(staged),
        Err(e) => tracing::warn!("no optimised copy of {}: {e}", path.display()),
    }
}

fn new_session(
    path: &Path,
    graph: Graph<'_>,
    threads: usize,
    shared: &Shared,
) -> Result<Session, ModelError> {
    let environment = ENVIRONMENT.get().ok_or(ModelError::OnnxRuntimeNotLoaded)?;
    let builder = Session::builder(environment).map_err(failed)?;
    let builder = match graph {
        Graph::Optimise => builder,
        Graph::OptimiseAndSave(to) => builder
            .with_optimized_model_path(to)
            .map_err(failed)?
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                super::optimized::WEIGHTS,
            )
            .map_err(failed)?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )
            .map_err(failed)?,
        Graph::AsSaved => builder
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(failed)?,
    };
    let builder = builder
        .with_intra_threads(threads.max(1))
        .map_err(failed)?
        .with_inter_threads(1)
        .map_err(failed)?
        .with_prepacked_weights(&shared.weights)
        .map_err(failed)?;
    match shared.initializers.get() {
        Some(initializers) => initializers.lend(builder)?,
        None => builder,
    }
    .commit_from_file(path)
    .map_err(failed)
}

/// What a model builds after it serves: its shared initializers and a
/// narrow session using them (replacing the first, which holds its own
/// copies), then the session for lone runs. Off the load path, so a
/// restart answers after one session instead of three and the reading.
struct Later {
    /// Ends when the model's first run is over: until then (or
    /// [`FIRST_RUN_WAIT`]) the work here would take cores from it, the
    /// first request after a restart.
    after_first_run: mpsc::Receiver<()>,
    file: ModelFile,
    threads: usize,
    alone_threads: usize,
    outputs: Vec<String>,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    wide: Option<Arc<Wide>>,
}

impl Later {
    /// Runs [`Later::build`] on a thread of its own.
    fn spawn(self) {
        let spawned = std::thread::Builder::new()
            .name("ort-sessions".into())
            .spawn(move || self.build());
        if let Err(error) = spawned {
            tracing::warn!("no thread to share a model's initializers: {error}");
        }
    }

    fn build(self) {
        if let Err(mpsc::RecvTimeoutError::Disconnected) =
            self.after_first_run.recv_timeout(FIRST_RUN_WAIT)
        {
            // The model was dropped before it ever ran.
            return;
        }
        let model = self.file.path.display();
        match SharedInitializers::read(&self.file.path) {
            Ok(initializers) => {
                let worth_it = initializers.names().next().is_some();
                let _ = self.shared.initializers.set(initializers);
                if worth_it {
                    self.replace_first();
                }
            }
            Err(error) => {
                tracing::warn!(%model, "sessions keep their own initializers: {error}");
            }
        }
        if let Some(wide) = &self.wide {
            let own = self.shared.initializers.get().is_none();
            let built = self
                .file
                .session(self.alone_threads, &self.shared)
                .and_then(|s| runner(s, &self.outputs, own));
            match built {
                Ok(runner) => {
                    if let Ok(mut slot) = wide.runner.lock() {
                        *slot = Some(runner);
                    }
                }
                Err(error) => tracing::warn!(
                    %model,
                    "no {}-thread session for lone runs ({error}); they run on one",
                    self.alone_threads
                ),
            }
        }
    }

    /// Adds a narrow session that shares the initializers and retires those
    /// that hold their own (now, if idle; when given back, if in use).
    fn replace_first(&self) {
        let built = self
            .file
            .session(self.threads, &self.shared)
            .and_then(|s| runner(s, &self.outputs, false));
        let runner = match built {
            Ok(runner) => runner,
            Err(error) => {
                tracing::warn!(
                    model = %self.file.path.display(),
                    "the first session keeps its own initializers: {error}"
                );
                return;
            }
        };
        let Ok(mut pool) = self.pool.sessions.lock() else {
            return;
        };
        pool.alive += 1;
        pool.idle.push(runner);
        pool.retire_own = true;
        let before = pool.idle.len();
        pool.idle.retain(|r| !r.own_initializers);
        pool.alive -= before - pool.idle.len();
        self.pool.returned.notify_all();
    }
}

/// `outputs` (every graph output when empty), each one the graph has.
fn selected_outputs(session: &Session, outputs: &[String]) -> Result<Vec<String>, ModelError> {
    let graph_outputs: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    if outputs.is_empty() {
        return Ok(graph_outputs);
    }
    if let Some(missing) = outputs.iter().find(|o| !graph_outputs.contains(o)) {
        return Err(ModelError::Unsupported(format!(
            "the model has no output {missing:?}; ONNX Runtime can return its graph outputs [{}]",
            graph_outputs.join(", ")
        )));
    }
    Ok(outputs.to_vec())
}

/// ONNX Runtime's refusal to build a session for the model.
fn failed(source: impl Into<ort::Error>) -> ModelError {
    ModelError::OnnxRuntime {
        doing: "ONNX Runtime cannot load the model".into(),
        source: source.into(),
    }
}

fn runner(
    session: Session,
    outputs: &[String],
    own_initializers: bool,
) -> Result<Runner, ModelError> {
    let selector = outputs
        .iter()
        .fold(OutputSelector::no_default(), |s, name| s.with(name.clone()));
    let options = RunOptions::new()
        .map_err(|source| ModelError::OnnxRuntime {
            doing: "ONNX Runtime run options".into(),
            source,
        })?
        .with_outputs(selector);
    Ok(Runner {
        session,
        options,
        own_initializers,
    })
}

/// Sets or clears the terminate flag of a run's options from any thread.
///
/// `RunOptions` with selected outputs is not `Sync` in the `ort` crate
/// (options holding pre-allocated outputs must not be shared), so the
/// flag is reached through ONNX Runtime's C API, which documents
/// `RunOptionsSetTerminate` as the way to stop a run from another thread.
struct Terminator(*mut ort::sys::OrtRunOptions);

// SAFETY: the pointer is only used with ONNX Runtime's terminate calls,
// which are safe from any thread, and only while the options live: a
// `Stop` drops the closure holding it before the run that armed it returns.
unsafe impl Send for Terminator {}

impl Terminator {
    fn set(&self, on: bool) {
        let api = ort::api();
        // SAFETY: `self.0` points to the live options of a runner (see above).
        let status = unsafe {
            if on {
                (api.RunOptionsSetTerminate)(self.0)
            } else {
                (api.RunOptionsUnsetTerminate)(self.0)
            }
        };
        if !status.0.is_null() {
            tracing::warn!("ONNX Runtime refused to change a run's terminate flag");
            // SAFETY: a non-null status is ours to release, once.
            unsafe { (api.ReleaseStatus)(status.0) };
        }
    }
}

fn element_of(ty: TensorType) -> TensorElementType {
    match ty {
        TensorType::Fp16 => TensorElementType::Float16,
        TensorType::Fp32 => TensorElementType::Float32,
        TensorType::Fp64 => TensorElementType::Float64,
        TensorType::Bf16 => TensorElementType::Bfloat16,
        TensorType::U8 => TensorElementType::Uint8,
        TensorType::I32 => TensorElementType::Int32,
        TensorType::I64 => TensorElementType::Int64,
    }
}

fn type_of(element: TensorElementType) -> Option<TensorType> {
    Some(match element {
        TensorElementType::Float16 => TensorType::Fp16,
        TensorElementType::Float32 => TensorType::Fp32,
        TensorElementType::Float64 => TensorType::Fp64,
        TensorElementType::Bfloat16 => TensorType::Bf16,
        TensorElementType::Uint8 => TensorType::U8,
        TensorElementType::Int32 => TensorType::I32,
        TensorElementType::Int64 => TensorType::I64,
        _ => return None,
    })
}

/// Copies `tensor` into a tensor ONNX Runtime allocated, after checking its
/// type and that its bytes fill its shape.
fn to_ort(tensor: &Tensor, expected: TensorElementType) -> Result<DynTensor, StageError> {
    let element = element_of(tensor.ty);
    if element != expected {
        return Err(StageError::InvalidInput(format!(
            "tensor {:?} is {:?}; the model needs {expected:?}",
            tensor.name, tensor.ty
        )));
    }
    let shape: Vec<i64> = tensor.dimensions.iter().map(|&d| i64::from(d)).collect();
    let element_bytes = element.byte_size(1).unwrap_or(0);
    check_fills_shape(tensor, element_bytes)?;
    let mut value = DynTensor::new(&Allocator::default(), element, shape)
        .map_err(|e| StageError::Internal(format!("tensor {:?}: {e}", tensor.name)))?;
    if !tensor.data.is_empty() {
        // SAFETY: ONNX Runtime allocated `value` on the CPU for exactly this
        // element type and shape, which was checked above to be
        // `tensor.data.len()` bytes; the regions cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                tensor.data.as_ptr(),
                value.data_ptr_mut().cast::<u8>(),
                tensor.data.len(),
            );
        }
    }
    Ok(value)
}

fn from_ort(name: &str, value: ort::value::DynValue) -> Result<Tensor, StageError> {
    let tensor = value
        .downcast::<DynTensorValueType>()
        .map_err(|e| StageError::Internal(format!("output {name:?} is not a tensor: {e}")))?;
    let element = *tensor.data_type();
    let ty = type_of(element).ok_or_else(|| {
        StageError::Internal(format!("output {name:?} has unsupported type {element:?}"))
    })?;
    let dimensions = tensor
        .shape()
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| StageError::Internal(format!("output {name:?} has a dimension over 2^32")))?;
    let len = tensor.size().unwrap_or(0);
    let data = if len == 0 {
        Vec::new()
    } else {
        // SAFETY: the CPU execution provider left the output in CPU memory,
        // `size` bytes long, and `tensor` keeps it alive while it is copied.
        unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), len) }.to_vec()
    };
    Ok(Tensor {
        name: name.to_string(),
        dimensions,
        ty,
        data,
    })
}
