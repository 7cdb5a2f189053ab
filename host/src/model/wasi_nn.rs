//! `wasi:nn` for inferencer components (linked into no other world), backed
//! by the same plans and queues as model stages: a [`QueuedBackend`] plugged
//! into wasmtime-wasi-nn's `BackendInner`, and a [`GrantedGraphs`] registry
//! holding exactly the models the function's manifest grants the stage (for
//! `load-by-name`). Every compute waits its turn in the model's queue, at
//! most one run per core, and gives up at the invocation's deadline.

use super::plan::ModelPlan;
use super::queue::ModelQueue;
use crate::bindings::{Tensor, TensorType};

use crate::error::StageError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use wasmtime_wasi_nn::GraphRegistry;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::WasiNnCtx;
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType as NnType};
use wasmtime_wasi_nn::{Backend, ExecutionContext, Graph, Registry};

/// A `wasi:nn` context whose `load-by-name` finds `graphs` (by `name@version`
/// and by bare name) and whose `load` accepts ONNX bytes only when
/// `load_bytes` (the manifest's grant); computes stop at `deadline`.
pub fn context(
    graphs: &[(String, Arc<ModelQueue>)],
    load_bytes: bool,
    deadline: Deadline,
    log_tag: &str,
) -> WasiNnCtx {
    let mut named = HashMap::new();
    for (reference, queue) in graphs {
        let graph = QueuedGraph {
            queue: queue.clone(),
            deadline: deadline.clone(),
        };
        let graph = Graph::from(Box::new(graph) as Box<dyn BackendGraph>);
        if let Some((name, _)) = reference.split_once('@') {
            named.insert(name.to_string(), graph.clone());
        }
        named.insert(reference.clone(), graph);
    }
    WasiNnCtx::new(
        [Backend::from(QueuedBackend {
            load_bytes,
            deadline,
            log_tag: log_tag.to_string(),
        })],
        Registry::from(GrantedGraphs(named)),
    )
}

/// The models a stage may load by name.
struct GrantedGraphs(HashMap<String, Graph>);

impl GraphRegistry for GrantedGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.0.get_mut(name)
    }
}

/// Loads ONNX graphs from bytes, when granted.
struct QueuedBackend {
    load_bytes: bool,
    deadline: Deadline,
    /// Function and stage, for the log: wasi:nn shows the guest only a
    /// generic "Failed while accessing backend", so the why goes here.
    log_tag: String,
}

impl BackendInner for QueuedBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(
        &mut self,
        builders: &[&[u8]],
        _target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        if !self.load_bytes {
            tracing::warn!(
                stage = %self.log_tag,
                "wasi:nn load from bytes refused: not granted to this stage (use load-by-name \
                 with a model the manifest grants in `models`, or grant `nn_load_bytes = true`)"
            );
            return Err(backend_error(
                "loading a model from bytes is not granted to this stage",
            ));
        }
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        let plan = ModelPlan::from_bytes(bytes).map_err(backend_error)?;
        let graph = QueuedGraph {
            queue: ModelQueue::new(Arc::new(plan), 1, None),
            deadline: self.deadline.clone(),
        };
        Ok(Graph::from(Box::new(graph) as Box<dyn BackendGraph>))
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

/// A model a guest may run, and the deadline its runs are held to.
struct QueuedGraph {
    queue: Arc<ModelQueue>,
    deadline: Deadline,
}

impl BackendGraph for QueuedGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let context: Box<dyn BackendExecutionContext> = Box::new(QueuedContext {
            queue: self.queue.clone(),
            deadline: self.deadline.clone(),
            inputs: Vec::new(),
        });
        Ok(ExecutionContext::from(context))
    }
}

struct QueuedContext {
    queue: Arc<ModelQueue>,
    deadline: Deadline,
    inputs: Vec<Tensor>,
}

fn backend_error(error: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::format_err!("{error}"))
}

impl BackendExecutionContext for QueuedContext {
    fn set_input(&mut self, id: Id, tensor: &wasmtime_wasi_nn::Tensor) -> Result<(), BackendError> {
        let name = id
            .name()
            .ok_or_else(|| backend_error("inputs are named, not indexed"))?
            .to_string();
        self.inputs.retain(|t| t.name != name);
        self.inputs.push(from_nn(name, tensor)?);
        Ok(())
    }

    fn get_output(&mut self, _id: Id) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
        Err(backend_error("use compute with named inputs (wasi:nn 0.2)"))
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        if let Some(inputs) = inputs {
            for input in inputs {
                self.set_input(Id::Name(input.name), &input.tensor)?;
            }
        }
        // The guest's call runs on a blocking thread (see the pipeline), so
        // waiting here holds no reactor thread; a run still queued at the
        // deadline is given up and never starts.
        let run = self
            .queue
            .run(std::mem::take(&mut self.inputs), Some(self.deadline.get()));
        let until = tokio::time::Instant::from_std(self.deadline.get());
        let _span = tracing::info_span!("wasi-nn compute").entered();
        let answer = futures_executor::block_on(tokio::time::timeout_at(until, run));
        let outputs = match answer {
            Err(_) => Err(StageError::DeadlineExceeded),
            Ok(Err(e)) => Err(e),
            Ok(Ok(answer)) => answer.outputs,
        }
        .map_err(|e| match e {
            StageError::InvalidInput(m)
            | StageError::Internal(m)
            | StageError::Trap(m)
            | StageError::Capacity(m) => backend_error(m),
            StageError::DeadlineExceeded => backend_error("deadline exceeded"),
        })?;
        let named = outputs
            .into_iter()
            .map(|t| {
                Ok(NamedTensor {
                    name: t.name.clone(),
                    tensor: to_nn(t)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Some(named))
    }
}

fn from_nn(name: String, tensor: &wasmtime_wasi_nn::Tensor) -> Result<Tensor, BackendError> {
    let ty = match tensor.ty {
        NnType::Fp16 => TensorType::Fp16,
        NnType::Fp32 => TensorType::Fp32,
        NnType::Fp64 => TensorType::Fp64,
        NnType::Bf16 => TensorType::Bf16,
        NnType::U8 => TensorType::U8,
        NnType::I32 => TensorType::I32,
        NnType::I64 => TensorType::I64,
    };
    Ok(Tensor {
        name,
        dimensions: tensor.dimensions.clone(),
        ty,
        data: tensor.data.clone(),
    })
}

fn to_nn(tensor: Tensor) -> Result<wasmtime_wasi_nn::Tensor, BackendError> {
    let ty = match tensor.ty {
        TensorType::Fp16 => NnType::Fp16,
        TensorType::Fp32 => NnType::Fp32,
        TensorType::Fp64 => NnType::Fp64,
        TensorType::Bf16 => NnType::Bf16,
        TensorType::U8 => NnType::U8,
        TensorType::I32 => NnType::I32,
        TensorType::I64 => NnType::I64,
    };
    Ok(wasmtime_wasi_nn::Tensor::new(
        tensor.dimensions,
        ty,
        tensor.data,
    ))
}

/// The deadline of an instance's current call, shared between its store
/// and its `wasi:nn` context.
#[derive(Clone)]
pub struct Deadline(Arc<Mutex<Instant>>);

impl Deadline {
    pub(crate) fn new() -> Self {
        Deadline(Arc::new(Mutex::new(Instant::now())))
    }

    pub(crate) fn set(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = deadline;
    }

    /// When the current call must stop.
    pub fn get(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
