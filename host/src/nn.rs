//! `wasi:nn` for inferencer components, backed by the same tract plans as
//! model stages: a [`TractBackend`] plugged into wasmtime-wasi-nn's
//! `BackendInner`, and a [`GrantedGraphs`] registry holding exactly the
//! models the function's manifest grants the stage (for `load-by-name`).

use crate::bindings::{Tensor, TensorType};
use crate::inference::ModelPlan;
use crate::stage::StageError;
use std::collections::HashMap;
use std::sync::Arc;
use wasmtime_wasi_nn::GraphRegistry;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::WasiNnCtx;
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType as NnType};
use wasmtime_wasi_nn::{Backend, ExecutionContext, Graph, Registry};

/// A `wasi:nn` context whose `load-by-name` finds `graphs` (by `name@version`
/// and by bare name) and whose `load` accepts ONNX bytes.
pub fn context(graphs: &[(String, Arc<ModelPlan>)]) -> WasiNnCtx {
    let mut named = HashMap::new();
    for (reference, plan) in graphs {
        let graph = Graph::from(Box::new(TractGraph(plan.clone())) as Box<dyn BackendGraph>);
        if let Some((name, _)) = reference.split_once('@') {
            named.insert(name.to_string(), graph.clone());
        }
        named.insert(reference.clone(), graph);
    }
    WasiNnCtx::new(
        [Backend::from(TractBackend)],
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

/// Loads ONNX graphs with tract.
struct TractBackend;

impl BackendInner for TractBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(
        &mut self,
        builders: &[&[u8]],
        _target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        let plan = ModelPlan::from_bytes(bytes)
            .map_err(|e| BackendError::BackendAccess(wasmtime::format_err!(e)))?;
        Ok(Graph::from(
            Box::new(TractGraph(Arc::new(plan))) as Box<dyn BackendGraph>
        ))
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

struct TractGraph(Arc<ModelPlan>);

impl BackendGraph for TractGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let context: Box<dyn BackendExecutionContext> = Box::new(TractContext {
            plan: self.0.clone(),
            inputs: Vec::new(),
        });
        Ok(ExecutionContext::from(context))
    }
}

struct TractContext {
    plan: Arc<ModelPlan>,
    inputs: Vec<Tensor>,
}

fn backend_error(error: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::format_err!("{error}"))
}

impl BackendExecutionContext for TractContext {
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
        let outputs = self
            .plan
            .run(&std::mem::take(&mut self.inputs))
            .map_err(|e| match e {
                StageError::InvalidInput(m) | StageError::Internal(m) | StageError::Trap(m) => {
                    backend_error(m)
                }
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
