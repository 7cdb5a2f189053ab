//! `nn-infer`: an inferencer that runs a registry model through `wasi:nn`.
//!
//! The host grants the model in the manifest (`models = ["name@version"]`);
//! this component loads it by name once per instance, then maps each call's
//! tensors through it. A starting point for inferencers that add logic of
//! their own around the model (ensembles, early exits, caching).
//!
//! Config: `model` (name to load), or `model_file` (an ONNX file under
//! `/model` to `load` from its bytes, which the manifest must grant with
//! `nn_load_bytes = true`); exactly one of them. `outputs` (comma-separated
//! output names to keep; default all).

use cascade::inference::types::{Error, Tensor, TensorType};
use cascade_guest::Failure;
use std::cell::RefCell;
use wasi::nn::{errors, graph, inference, tensor};

wit_bindgen::generate!({ world: "inferencer", path: "../../wit", generate_all });
cascade_guest::component_glue!();

const KEYS: &[&str] = &["model", "model_file", "outputs"];

/// Loads the graph the config names: by name, or from a file's bytes.
fn load_graph(config: &cascade_guest::Config) -> Result<graph::Graph, Failure> {
    match (config.get("model"), config.get("model_file")) {
        (Some(model), None) => {
            graph::load_by_name(model).map_err(|e| nn_failure(&format!("loading {model}"), e))
        }
        (None, Some(file)) => {
            let bytes = std::fs::read(file)
                .map_err(|e| Failure::internal(format!("reading {file}: {e}")))?;
            graph::load(
                &[bytes],
                graph::GraphEncoding::Onnx,
                graph::ExecutionTarget::Cpu,
            )
            .map_err(|e| nn_failure(&format!("loading {file}"), e))
        }
        _ => Err(Failure::internal(
            "config needs exactly one of `model` and `model_file`",
        )),
    }
}

thread_local! {
    /// The graph, loaded on first use; an instance keeps it for its lifetime.
    static GRAPH: RefCell<Option<graph::Graph>> = const { RefCell::new(None) };
}

fn nn_failure(context: &str, error: errors::Error) -> Failure {
    let message = format!("{context}: {:?}: {}", error.code(), error.data());
    match error.code() {
        errors::ErrorCode::InvalidArgument => Failure::input(message),
        _ => Failure::internal(message),
    }
}

fn to_nn(ty: TensorType) -> tensor::TensorType {
    match ty {
        TensorType::Fp16 => tensor::TensorType::Fp16,
        TensorType::Fp32 => tensor::TensorType::Fp32,
        TensorType::Fp64 => tensor::TensorType::Fp64,
        TensorType::Bf16 => tensor::TensorType::Bf16,
        TensorType::U8 => tensor::TensorType::U8,
        TensorType::I32 => tensor::TensorType::I32,
        TensorType::I64 => tensor::TensorType::I64,
    }
}

fn from_nn(ty: tensor::TensorType) -> TensorType {
    match ty {
        tensor::TensorType::Fp16 => TensorType::Fp16,
        tensor::TensorType::Fp32 => TensorType::Fp32,
        tensor::TensorType::Fp64 => TensorType::Fp64,
        tensor::TensorType::Bf16 => TensorType::Bf16,
        tensor::TensorType::U8 => TensorType::U8,
        tensor::TensorType::I32 => TensorType::I32,
        tensor::TensorType::I64 => TensorType::I64,
    }
}

fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Failure> {
    let config = load_config(KEYS)?;
    let keep: Option<Vec<String>> = config
        .get("outputs")
        .map(|o| o.split(',').map(|s| s.trim().to_string()).collect());
    let context = GRAPH.with(
        |cell| -> Result<inference::GraphExecutionContext, Failure> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(load_graph(&config)?);
            }
            let graph = slot
                .as_ref()
                .ok_or_else(|| Failure::internal("graph missing"))?;
            graph
                .init_execution_context()
                .map_err(|e| nn_failure("creating a context", e))
        },
    )?;
    let named: Vec<(String, tensor::Tensor)> = inputs
        .into_iter()
        .map(|t| {
            (
                t.name,
                tensor::Tensor::new(&t.dimensions, to_nn(t.ty), &t.data),
            )
        })
        .collect();
    let outputs = context
        .compute(named)
        .map_err(|e| nn_failure("running the model", e))?;
    Ok(outputs
        .into_iter()
        .filter(|(name, _)| keep.as_ref().is_none_or(|k| k.contains(name)))
        .map(|(name, t)| Tensor {
            name,
            dimensions: t.dimensions(),
            ty: from_nn(t.ty()),
            data: t.data(),
        })
        .collect())
}

struct NnInfer;

impl exports::cascade::inference::infer::Guest for NnInfer {
    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        infer(inputs).map_err(Error::from)
    }
}

export!(NnInfer);
