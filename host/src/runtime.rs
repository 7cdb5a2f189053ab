//! The functions a host serves: prepared from registry records, swapped
//! atomically when a revision changes (in-flight requests finish on the
//! old one), and reaped of idle instances in the background.

use crate::capacity::Reclaim;
use crate::engine::ServingEngine;
use crate::error::InvokeError;
use crate::error::StageError;
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::model::optimized::OptimizedModels;
use crate::model::queue::{BatchCounts, ModelQueue};
use crate::model::{Backend, PlanCache};
use crate::operations::{FunctionWatch, Verdict};
use crate::pipeline::{PreparedFunction, PreparedStage};
use crate::pool::{Gate, InstancePool, PoolMetrics};
use crate::sandbox::Grant;
use crate::snapshot::cache::{Snapshots, Start};
use crate::stage::ComponentStage;
use crate::traffic::{self, Choice, Split};
use cascade_registry::manifest::{ComponentStep, Function, ModelStep, Stage};
use cascade_registry::records::Revision;
use cascade_registry::traffic::Traffic;
use cascade_registry::{Registry, RegistryError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Why a function revision could not be prepared on this host: said on
/// `/readyz`, in the publish answer's warning, and in the 503 of its
/// invocations.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Preparing ran outside the host's tokio runtime.
    #[error("preparing a function needs the host's tokio runtime")]
    NoReactor,
    /// The registry could not hand over a record or a file.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A model could not be loaded or optimised.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A component could not be compiled or linked.
    #[error("{0:#}")]
    Component(wasmtime::Error),
    /// The engine's instance pools can never hold what the stage needs.
    #[error("stage {stage}: {why}")]
    Capacity {
        /// The stage.
        stage: String,
        /// What is too small.
        why: String,
    },
    /// Starting the stage's `min_instances` failed.
    #[error("{0}")]
    Warm(#[source] StageError),
    /// The table of served functions is poisoned by an earlier panic.
    #[error("the table of served functions is poisoned")]
    Poisoned,
}

/// Everything needed to run functions.
pub struct Runtime {
    engine: ServingEngine,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    plans: PlanCache,
    compiled_dir: PathBuf,
    components: Mutex<HashMap<String, Arc<ComponentStage>>>,
    /// Components' snapshots after `initialize`, per grant.
    snapshots: Snapshots,
    functions: RwLock<HashMap<String, Arc<PreparedFunction>>>,
    /// Functions served as several revisions (a traffic split other than
    /// "all to the head").
    splits: RwLock<HashMap<String, Arc<Split>>>,
    changes: tokio::sync::Notify,
    /// True until [`Runtime::load_all`] has prepared what the registry held at start.
    loading: AtomicBool,
    /// Functions whose current revision is stored but could not be
    /// prepared here: revision and why (for invocations, status, /readyz).
    unservable: Mutex<HashMap<String, (u64, String)>>,
    /// What is watched of each function, shared by its revisions.
    watches: Mutex<HashMap<String, Arc<FunctionWatch>>>,
    /// Where watches send their verdicts, and the other end until the
    /// host takes it ([`Runtime::take_verdicts`]).
    verdicts: UnboundedSender<Verdict>,
    pending_verdicts: Mutex<Option<UnboundedReceiver<Verdict>>>,
}

impl Runtime {
    /// A runtime over `registry`, caching compiled components in
    /// `compiled_dir`, running models with `backend` and specialising each
    /// tract plan to at most `shape_plans` input shapes.
    pub fn new(
        engine: ServingEngine,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        compiled_dir: PathBuf,
        backend: Backend,
        shape_plans: usize,
    ) -> Self {
        let (verdicts, pending_verdicts) = tokio::sync::mpsc::unbounded_channel();
        Runtime {
            engine,
            registry,
            plans: PlanCache::new(
                backend,
                shape_plans,
                metrics.shape_plans.clone(),
                metrics.onnxruntime_runs.clone(),
                metrics.onnxruntime_stopped.clone(),
            )
            .with_optimized(OptimizedModels::new(compiled_dir.join("onnxruntime"))),
            snapshots: Snapshots::new(compiled_dir.join("snapshots"), metrics.snapshots.clone()),
            metrics,
            compiled_dir,
            components: Mutex::new(HashMap::new()),
            functions: RwLock::new(HashMap::new()),
            splits: RwLock::new(HashMap::new()),
            changes: tokio::sync::Notify::new(),
            loading: AtomicBool::new(true),
            unservable: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            verdicts,
            pending_verdicts: Mutex::new(Some(pending_verdicts)),
        }
    }

    /// The verdicts of every function's watch; the first caller gets them
    /// (the host carries them out), later ones `None`.
    pub fn take_verdicts(&self) -> Option<UnboundedReceiver<Verdict>> {
        self.pending_verdicts.lock().ok()?.take()
    }

    /// What is watched of function `name`.
    pub fn watch(&self, name: &str) -> Arc<FunctionWatch> {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        watches
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(FunctionWatch::new(
                    name,
                    self.metrics.clone(),
                    self.verdicts.clone(),
                ))
            })
            .clone()
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &ServingEngine {
        &self.engine
    }

    /// The registry served from.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where compiled components are cached.
    pub fn compiled_dir(&self) -> &std::path::Path {
        &self.compiled_dir
    }

    /// The revision currently served, if any; a function stored but not
    /// servable here says why.
    pub fn function(&self, name: &str) -> Result<Arc<PreparedFunction>, InvokeError> {
        if let Some(function) = self
            .functions
            .read()
            .ok()
            .and_then(|f| f.get(name).cloned())
        {
            return Ok(function);
        }
        match self
            .unservable
            .lock()
            .ok()
            .and_then(|u| u.get(name).cloned())
        {
            Some((revision, reason)) => Err(InvokeError::Unservable {
                function: name.to_string(),
                revision,
                reason,
            }),
            None => Err(InvokeError::NotFound(name.to_string())),
        }
    }

    /// Functions stored but not servable here, with revision and reason.
    pub fn unservable(&self) -> Vec<(String, u64, String)> {
        let mut all: Vec<_> = self
            .unservable
            .lock()
            .map(|u| {
                u.iter()
                    .map(|(n, (r, why))| (n.clone(), *r, why.clone()))
                    .collect()
            })
            .unwrap_or_default();
        all.sort();
        all
    }

    fn mark_unservable(&self, name: &str, status: Option<(u64, String)>) {
        if let Ok(mut unservable) = self.unservable.lock() {
            match status {
                Some(why) => unservable.insert(name.to_string(), why),
                None => unservable.remove(name),
            };
        }
    }

    /// The revision served, waiting while the host is still preparing the
    /// functions it had at start: the listener opens before they are
    /// loaded, so a function answers as soon as its own stages are ready
    /// rather than after every other function's model is optimised.
    pub async fn function_when_loaded(
        &self,
        name: &str,
    ) -> Result<Arc<PreparedFunction>, InvokeError> {
        // The common case first: no waiter registration on the hot path.
        if let Ok(function) = self.function(name) {
            return Ok(function);
        }
        loop {
            let changed = self.changes.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.function(name) {
                Ok(function) => return Ok(function),
                Err(e) if !self.is_loading() => return Err(e),
                Err(_) => changed.await,
            }
        }
    }

    /// The revision that serves one request to `name`: its traffic split
    /// decides (a tag, the sticky key, or the shares), else the head.
    pub fn choose(
        &self,
        name: &str,
        choice: &Choice<'_>,
    ) -> Result<Arc<PreparedFunction>, InvokeError> {
        let split = self.splits.read().ok().and_then(|s| s.get(name).cloned());
        match (split, choice.tag) {
            (Some(split), _) => split.choose(name, choice),
            (None, Some(tag)) => {
                self.function(name)?;
                Err(traffic::unknown_tag(name, tag))
            }
            (None, None) => self.function(name),
        }
    }

    /// [`Runtime::choose`], waiting like [`Runtime::function_when_loaded`].
    pub async fn choose_when_loaded(
        &self,
        name: &str,
        choice: &Choice<'_>,
    ) -> Result<Arc<PreparedFunction>, InvokeError> {
        if let Ok(function) = self.choose(name, choice) {
            return Ok(function);
        }
        loop {
            let changed = self.changes.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.choose(name, choice) {
                Ok(function) => return Ok(function),
                Err(e) if !self.is_loading() => return Err(e),
                Err(_) => changed.await,
            }
        }
    }

    /// The header whose value keeps a caller of `name` on one target.
    pub fn sticky_header(&self, name: &str) -> Option<String> {
        let splits = self.splits.read().ok()?;
        splits.get(name)?.sticky_header().map(str::to_string)
    }

    /// The split `name` is served with, if not all to its head.
    pub fn split(&self, name: &str) -> Option<Arc<Split>> {
        self.splits.read().ok()?.get(name).cloned()
    }

    /// Serves `name` as its registry's traffic split says: prepares the
    /// revisions its targets name (blocking). All to the head: no split.
    pub fn refresh_split(&self, name: &str) -> Result<(), PrepareError> {
        let traffic = match self.registry.traffic(name) {
            Ok(traffic) => traffic,
            Err(RegistryError::NotFound(_)) => Traffic::default(),
            Err(e) => return Err(e.into()),
        };
        let head = self.function(name).ok();
        let (Some(head), false) = (head, traffic == Traffic::default()) else {
            if let Ok(mut splits) = self.splits.write() {
                splits.remove(name);
            }
            self.watch(name).follow::<PreparedFunction>(None);
            return Ok(());
        };
        let earlier = self.split(name);
        let mut revisions = HashMap::new();
        for target in &traffic.targets {
            let number = target.revision.resolve(head.revision());
            if revisions.contains_key(&number) {
                continue;
            }
            let prepared = if number == head.revision() {
                head.clone()
            } else if let Some(kept) = earlier.as_ref().and_then(|s| s.revision(number)) {
                kept
            } else {
                let revision = self.registry.function_revision(name, number)?;
                Arc::new(self.prepare(&revision)?)
            };
            revisions.insert(number, prepared);
        }
        self.watch(name)
            .follow(Some((&traffic, head.revision(), &revisions)));
        let split = Arc::new(Split::new(traffic, head.revision(), revisions));
        self.splits
            .write()
            .map_err(|_| PrepareError::Poisoned)?
            .insert(name.to_string(), split);
        self.changes.notify_waiters();
        tracing::info!(function = %name, "serving its traffic split");
        Ok(())
    }

    /// Whether the functions present at start are still being prepared.
    pub fn is_loading(&self) -> bool {
        self.loading.load(Ordering::SeqCst)
    }

    /// Resolves when the set of served functions next changes.
    pub async fn changed(&self) {
        self.changes.notified().await;
    }

    /// Names of served functions.
    pub fn served(&self) -> Vec<Arc<PreparedFunction>> {
        self.functions
            .read()
            .map(|f| f.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Prepares every published function (blocking).
    pub fn load_all(&self) {
        self.collect_compiled();
        match self.registry.functions() {
            Ok(revisions) => {
                for revision in revisions {
                    if let Err(e) = self.serve(&revision) {
                        let record = &revision.record;
                        tracing::error!(function = %record.name, "cannot serve revision {}: {e}", record.revision);
                    }
                }
            }
            Err(e) => tracing::error!("listing functions: {e}"),
        }
        self.loading.store(false, Ordering::SeqCst);
        self.changes.notify_waiters();
    }

    /// Serves the registry's current revision of `name`, or stops serving it
    /// when it was deleted (blocking).
    pub fn reload(&self, name: &str) -> Result<(), PrepareError> {
        match self.registry.function(name) {
            Ok(revision) => self.serve(&revision),
            Err(_) => {
                let removed = self
                    .functions
                    .write()
                    .ok()
                    .and_then(|mut functions| functions.remove(name));
                if let Ok(mut splits) = self.splits.write() {
                    splits.remove(name);
                }
                if let Ok(mut watches) = self.watches.lock() {
                    watches.remove(name);
                }
                if let Some(removed) = removed {
                    removed.retire();
                    self.metrics.forget_function(name);
                }
                self.mark_unservable(name, None);
                self.changes.notify_waiters();
                Ok(())
            }
        }
    }

    /// Prepares `revision` and serves it, if it is still the registry's
    /// current one when ready (blocking).
    pub fn serve(&self, revision: &Revision) -> Result<(), PrepareError> {
        let record = &revision.record;
        let current = self.function(&record.name).ok();
        if current.is_some_and(|c| c.revision() == record.revision) {
            // The head stays; its traffic split may have changed (a mirror
            // reloads a function whose split it copied).
            return self.refresh_split(&record.name);
        }
        let prepared = self.prepare(revision);
        crate::model::memory::release_freed_memory();
        let prepared = match prepared {
            Ok(prepared) => Arc::new(prepared),
            Err(why) => {
                // Said for the head only: an older revision's failure is moot.
                if self.head_of(&record.name) == Some(record.revision) {
                    let reason = why.to_string();
                    self.mark_unservable(&record.name, Some((record.revision, reason)));
                    self.changes.notify_waiters();
                }
                return Err(why);
            }
        };
        {
            let mut functions = self.functions.write().map_err(|_| PrepareError::Poisoned)?;
            // Preparations of one function may overlap (two publishes in a
            // row, a slow model and a quick one): only the registry's head
            // at the moment of the swap may be served, never a revision
            // whose preparation merely finished last. Checked under the lock
            // that every swap takes.
            if self.head_of(&record.name) != Some(record.revision) {
                tracing::info!(
                    function = %record.name,
                    revision = record.revision,
                    "not served: a newer change replaced it while it was prepared"
                );
                return Ok(());
            }
            functions.insert(record.name.clone(), prepared);
        }
        self.mark_unservable(&record.name, None);
        self.changes.notify_waiters();
        tracing::info!(function = %record.name, revision = record.revision, "serving");
        // A new head moves the split's `latest` targets.
        self.refresh_split(&record.name)
    }

    /// The registry's current revision number of `name`.
    fn head_of(&self, name: &str) -> Option<u64> {
        self.registry
            .function(name)
            .ok()
            .map(|head| head.record.revision)
    }

    /// Compiles, links and optimises what a revision needs, and starts its
    /// `min_instances`. Blocking: call it on a blocking thread of the host's
    /// tokio runtime, whose reactor the guests' asynchronous calls need.
    pub fn prepare(&self, revision: &Revision) -> Result<PreparedFunction, PrepareError> {
        let reactor = tokio::runtime::Handle::try_current().map_err(|_| PrepareError::NoReactor)?;
        let function = &revision.function;
        let stages = function
            .stages
            .iter()
            .map(|stage| match stage {
                Stage::Component(step) => self.prepare_component(function, step, &reactor),
                Stage::Model(step) => self.prepare_model(function, step),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = function.name.as_str();
        let gate = Gate::new(
            function.scaling.max_instances as usize,
            function.scaling.max_queue as usize,
            self.metrics.queued.with_label_values(&[name]),
        );
        Ok(PreparedFunction::new(
            revision.record.revision,
            function.clone(),
            stages,
            gate,
            self.metrics.clone(),
            self.watch(name),
        ))
    }

    /// A component stage: its compiled component in a pool of instances,
    /// `min_instances` of them started.
    fn prepare_component(
        &self,
        function: &Function,
        step: &ComponentStep,
        reactor: &tokio::runtime::Handle,
    ) -> Result<PreparedStage, PrepareError> {
        let component = &step.component;
        let (name, label) = (function.name.as_str(), component.to_string());
        let record = self.registry.component(component)?;
        let compiled = self.component(&record.digest)?;
        let world = compiled.world();
        let capacity = self.engine.capacity();
        let at_least = function.scaling.min_instances.max(1);
        if let Some(why) = capacity.never_fits(compiled.footprint(), at_least) {
            return Err(PrepareError::Capacity { stage: label, why });
        }
        let metrics = PoolMetrics {
            instances: self.metrics.instances.with_label_values(&[name, &label]),
            busy: self.metrics.busy.with_label_values(&[name, &label]),
            cold_starts: self.metrics.cold_starts.with_label_values(&[name, &label]),
            traps: self.metrics.traps.with_label_values(&[name, &label]),
        };
        let grant = self.grant(function, step)?;
        let snapshot = compiled
            .initializes()
            .then(|| (compiled.clone(), grant.clone()));
        let pool = Arc::new(InstancePool::new(
            label.clone(),
            compiled,
            grant,
            function.scaling.min_instances as usize,
            Duration::from_millis(function.scaling.idle_timeout_ms),
            metrics,
        ));
        if let Some((compiled, grant)) = snapshot {
            self.start_from_snapshot(&pool, &compiled, &record.digest, &grant);
        }
        let holder: Arc<dyn Reclaim> = pool.clone();
        capacity.register(Arc::downgrade(&holder));
        reactor.block_on(pool.warm()).map_err(PrepareError::Warm)?;
        Ok(PreparedStage::Component {
            label,
            world,
            pool,
            inputs: step.inputs.clone(),
        })
    }

    /// Lets `pool` start its instances from the snapshot of `compiled`
    /// under `grant`: now if one was made before, else once it is made.
    fn start_from_snapshot(
        &self,
        pool: &Arc<InstancePool>,
        compiled: &Arc<ComponentStage>,
        digest: &str,
        grant: &Grant,
    ) {
        let waiting = Arc::downgrade(pool);
        let ready = Box::new(move |snapshot: Arc<ComponentStage>| {
            if let Some(pool) = waiting.upgrade() {
                pool.start_from(snapshot);
            }
        });
        let wasm = self.registry.blob_path(digest);
        match self
            .snapshots
            .start(&self.engine, compiled, digest, &wasm, grant, ready)
        {
            Start::Snapshot(snapshot) => pool.start_from(snapshot),
            Start::Component => {}
        }
    }

    /// What a component stage's manifest grants its instances: config,
    /// model files, memory, and the models it may run through `wasi:nn`.
    fn grant(&self, function: &Function, step: &ComponentStep) -> Result<Grant, PrepareError> {
        let ComponentStep {
            component,
            files,
            config,
            models,
            load_bytes,
            ..
        } = step;
        let model_dir = match files {
            Some(files) => Some(self.registry.model_dir(&self.registry.model(files)?)?),
            None => None,
        };
        let models = models
            .iter()
            .map(|reference| {
                let record = self.registry.model(reference)?;
                let path = self.registry.blob_path(&record.digest);
                let label = reference.to_string();
                let plan =
                    self.plans
                        .get(&label, &record.digest, &path, &record.input_shapes, &[])?;
                Ok((label, ModelQueue::new(plan, 1, None)))
            })
            .collect::<Result<Vec<_>, PrepareError>>()?;
        Ok(Grant {
            config: config.clone(),
            model_dir,
            memory_bytes: (function.limits.memory_mb << 20) as usize,
            log_tag: format!("{}/{component}", function.name),
            models,
            load_bytes: *load_bytes,
        })
    }

    /// A model stage: its plan behind a queue (batching with `batch` > 1).
    fn prepare_model(
        &self,
        function: &Function,
        step: &ModelStep,
    ) -> Result<PreparedStage, PrepareError> {
        let ModelStep {
            model,
            outputs,
            batch,
        } = step;
        let record = self.registry.model(model)?;
        let path = self.registry.blob_path(&record.digest);
        let label = model.to_string();
        let plan = self
            .plans
            .get(&label, &record.digest, &path, &record.input_shapes, outputs)?;
        let counts = (*batch > 1).then(|| {
            let labels = [function.name.as_str(), label.as_str()];
            BatchCounts {
                batches: self.metrics.model_batches.with_label_values(&labels),
                requests: self
                    .metrics
                    .model_batched_requests
                    .with_label_values(&labels),
            }
        });
        let mut signature = record.signature.clone();
        if !outputs.is_empty() {
            signature.outputs = outputs
                .iter()
                .filter_map(|name| signature.outputs.iter().find(|o| &o.name == name))
                .cloned()
                .collect();
        }
        Ok(PreparedStage::Model {
            label,
            queue: ModelQueue::new(plan, *batch as usize, counts),
            signature,
        })
    }

    /// The compiled, linked component with `digest` (shared by every function).
    pub fn component(&self, digest: &str) -> Result<Arc<ComponentStage>, PrepareError> {
        if let Some(found) = self
            .components
            .lock()
            .ok()
            .and_then(|c| c.get(digest).cloned())
        {
            return Ok(found);
        }
        let wasm = self.registry.blob_path(digest);
        let (component, cached) = self
            .engine
            .load_component(&wasm, digest, &self.compiled_dir)
            .map_err(PrepareError::Component)?;
        self.count_load(cached);
        tracing::info!(digest, cached, "component loaded");
        let stage = Arc::new(
            ComponentStage::new(&self.engine, component, &wasm).map_err(PrepareError::Component)?,
        );
        if let Ok(mut components) = self.components.lock() {
            components.insert(digest.to_string(), stage.clone());
        }
        Ok(stage)
    }

    /// Counts a component load in the metrics, by where it came from.
    pub fn count_load(&self, cached: bool) {
        let source = if cached { "cache" } else { "compiled" };
        self.metrics.compiled.with_label_values(&[source]).inc();
    }

    /// Reaps idle instances of every function now, and lets go of model
    /// plans and compiled components no served revision uses any more
    /// (those of replaced revisions go once their last request is done).
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let reaped = self.served().iter().map(|f| f.reap(now)).sum();
        let plans = self.plans.collect();
        let components = self
            .components
            .lock()
            .map(|mut components| {
                let before = components.len();
                components.retain(|_, stage| Arc::strong_count(stage) > 1);
                before - components.len()
            })
            .unwrap_or(0);
        if plans + components > 0 {
            crate::model::memory::release_freed_memory();
        }
        reaped
    }

    /// Removes compiled artifacts of components no longer published (or
    /// of another engine configuration), and files a crash left half
    /// written.
    pub fn collect_compiled(&self) {
        let live: std::collections::HashSet<String> = match self.registry.components() {
            Ok(components) => components.into_iter().map(|c| c.digest).collect(),
            Err(e) => {
                tracing::warn!("listing components to collect compiled artifacts: {e}");
                return;
            }
        };
        self.collect_optimized_models();
        self.snapshots
            .collect(&self.engine, |digest| live.contains(digest));
        let Ok(entries) = std::fs::read_dir(&self.compiled_dir) else {
            return;
        };
        for entry in entries.flatten().filter(|e| e.path().is_file()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !self
                .engine
                .is_current_artifact(&name, |digest| live.contains(digest))
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!("removing compiled artifact {name}: {e}");
            }
        }
    }

    /// Removes ONNX Runtime's optimised copies of models no longer published.
    fn collect_optimized_models(&self) {
        let Some(optimized) = self.plans.optimized() else {
            return;
        };
        match self.registry.models() {
            Ok(models) => {
                let live: std::collections::HashSet<String> =
                    models.into_iter().map(|m| m.digest).collect();
                optimized.collect(|digest| live.contains(digest));
            }
            Err(e) => tracing::warn!("listing models to collect optimised copies: {e}"),
        }
    }
}
