//! The one face of the model wing the pipeline sees: a [`ModelPlan`] runs
//! a model on tensors, whichever backend holds it, and the [`PlanCache`]
//! shares plans across functions by model digest and output selection.

use super::ModelError;
use super::fastest_runs::FastestRuns;
use super::optimized::OptimizedModels;
use super::ort::{OrtModel, OrtSettings, RunCounts};
use super::shape_plans::Specialisation;
use super::stop::Stop;
use super::tract::{InputShapes, TractPlan};
use crate::bindings::Tensor;
use crate::error::StageError;
use prometheus::{IntCounterVec, IntGaugeVec};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// An optimised, runnable model, and how fast its runs have been.
pub struct ModelPlan {
    engine: Engine,
    fastest: FastestRuns,
}

/// The backend holding a plan.
enum Engine {
    /// Run by tract.
    Tract(TractPlan),
    /// Run by ONNX Runtime.
    OnnxRuntime(Box<OrtModel>),
}

impl std::fmt::Debug for ModelPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.engine {
            Engine::Tract(plan) => write!(f, "ModelPlan::Tract({plan:?})"),
            Engine::OnnxRuntime(_) => f.write_str("ModelPlan::OnnxRuntime"),
        }
    }
}

impl From<Engine> for ModelPlan {
    fn from(engine: Engine) -> Self {
        ModelPlan {
            engine,
            fastest: FastestRuns::default(),
        }
    }
}

impl ModelPlan {
    /// Loads the model at `path` and optimises it with tract, computing
    /// only `outputs` (all when empty).
    pub fn load(
        path: &Path,
        shapes: &InputShapes,
        outputs: &[String],
        specialisation: Option<Specialisation>,
    ) -> Result<Self, ModelError> {
        TractPlan::load(path, shapes, outputs, specialisation).map(|p| Engine::Tract(p).into())
    }

    /// Loads an ONNX model given as bytes (what `wasi:nn`'s `load` hands
    /// over) and optimises it with tract, computing every output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        TractPlan::from_bytes(bytes).map(|p| Engine::Tract(p).into())
    }

    /// Runs the model on the tensors it needs, picked by name from `available`.
    pub fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
        self.run_stoppable(available, &Stop::default())
    }

    /// [`ModelPlan::run`], ended early once `stop` is stopped where the
    /// backend can (ONNX Runtime; tract runs to the end).
    pub fn run_stoppable(
        &self,
        available: &[Tensor],
        stop: &Stop,
    ) -> Result<Vec<Tensor>, StageError> {
        match &self.engine {
            Engine::Tract(plan) => plan.run(available),
            Engine::OnnxRuntime(model) => model.run_stoppable(available, stop),
        }
    }

    /// The names of the tensors the model takes.
    pub fn input_names(&self) -> Vec<String> {
        match &self.engine {
            Engine::Tract(plan) => plan.input_names(),
            Engine::OnnxRuntime(model) => model.input_names(),
        }
    }

    /// The fastest runs so far, shared by every queue in front of this plan.
    pub fn fastest_runs(&self) -> &FastestRuns {
        &self.fastest
    }
}

/// Which engine runs a host's models.
#[derive(Debug, Clone, Default)]
pub enum Backend {
    /// tract, in process (the default).
    #[default]
    Tract,
    /// ONNX Runtime, loaded from its shared library.
    OnnxRuntime(OrtSettings),
}

/// Model digest plus shape overrides, and the selected outputs.
type PlanKey = (String, Vec<String>);

/// Plans shared across functions, keyed by model digest and output selection.
pub struct PlanCache {
    plans: Mutex<HashMap<PlanKey, Arc<ModelPlan>>>,
    backend: Backend,
    shape_plans: usize,
    built: IntGaugeVec,
    ort_runs: IntCounterVec,
    ort_stopped: IntCounterVec,
    /// ONNX Runtime's optimised copies of the models.
    optimized: Option<OptimizedModels>,
}

impl PlanCache {
    /// An empty cache of plans run by `backend`; tract plans specialise
    /// themselves to at most `shape_plans` shapes each, counted in `built`
    /// by model; ONNX Runtime runs are counted in `ort_runs`, and those
    /// stopped early in `ort_stopped`.
    pub fn new(
        backend: Backend,
        shape_plans: usize,
        built: IntGaugeVec,
        ort_runs: IntCounterVec,
        ort_stopped: IntCounterVec,
    ) -> Self {
        PlanCache {
            plans: Mutex::new(HashMap::new()),
            backend,
            shape_plans,
            built,
            ort_runs,
            ort_stopped,
            optimized: None,
        }
    }

    /// Keeps ONNX Runtime's optimised copies of the models in `optimized`.
    pub fn with_optimized(mut self, optimized: OptimizedModels) -> Self {
        self.optimized = Some(optimized);
        self
    }

    /// The optimised copies, when kept.
    pub fn optimized(&self) -> Option<&OptimizedModels> {
        self.optimized.as_ref()
    }

    /// The plan for `digest` (known as `label`) with `outputs`, loading it
    /// from `path` on first use.
    pub fn get(
        &self,
        label: &str,
        digest: &str,
        path: &Path,
        shapes: &InputShapes,
        outputs: &[String],
    ) -> Result<Arc<ModelPlan>, ModelError> {
        let key = (format!("{digest}{shapes:?}"), outputs.to_vec());
        if let Some(plan) = self
            .plans
            .lock()
            .map_err(|_| ModelError::Poisoned)?
            .get(&key)
        {
            return Ok(plan.clone());
        }
        let tract = || {
            let specialisation = Specialisation {
                limit: self.shape_plans,
                label: label.to_string(),
                built: self.built.with_label_values(&[label]),
            };
            ModelPlan::load(path, shapes, outputs, Some(specialisation))
        };
        let plan = Arc::new(match &self.backend {
            Backend::Tract => tract()?,
            // A library the host found that did not load (it logged why).
            Backend::OnnxRuntime(settings)
                if settings.or_tract && super::ort::init(&settings.library).is_err() =>
            {
                tract()?
            }
            Backend::OnnxRuntime(settings) => {
                let counts = |threads: usize| {
                    self.ort_runs
                        .with_label_values(&[label, &threads.to_string()])
                };
                let counts = RunCounts {
                    narrow: counts(settings.threads),
                    wide: counts(settings.alone_threads),
                    stopped: self.ort_stopped.with_label_values(&[label]),
                };
                let copy = self
                    .optimized
                    .as_ref()
                    .map(|o| o.copy_of(digest, &settings.library));
                Engine::OnnxRuntime(Box::new(OrtModel::load(
                    path,
                    copy.as_ref(),
                    outputs,
                    settings,
                    counts,
                )?))
                .into()
            }
        });
        self.plans
            .lock()
            .map_err(|_| ModelError::Poisoned)?
            .insert(key, plan.clone());
        Ok(plan)
    }

    /// Forgets plans nothing serves any more (no stage or grant holds
    /// them); returns how many went.
    pub fn collect(&self) -> usize {
        let Ok(mut plans) = self.plans.lock() else {
            return 0;
        };
        let before = plans.len();
        plans.retain(|_, plan| Arc::strong_count(plan) > 1);
        before - plans.len()
    }
}
