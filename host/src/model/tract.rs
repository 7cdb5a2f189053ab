//! Models run natively with tract: `model_for_path → into_optimized →
//! into_runnable`. tract checks every model at publish ([`inspect`]) and is
//! the pure-Rust backend of [`super::ModelPlan`]. Callers run plans where
//! blocking is allowed, never on the async reactor.

use super::ModelError;
use super::shape_plans::{ShapePlans, Specialisation};
use super::tensors::{check_fills_shape, input_named};
use crate::bindings::{Tensor, TensorType};
use crate::error::StageError;
use cascade_registry::records::{ModelSignature, TensorSpec};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, TValue, Tensor as TractTensor, TypedRunnableModel,
};
use tract_onnx::prelude::{InferenceModel, TDim, TypedModel};
use tract_onnx::tract_core::model::IntoRunnable;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, ShapeFactoid};

/// Input shapes fixed at publish time, by input name: numbers are fixed
/// dimensions, anything else names a dynamic one (e.g. `N,3,48,192`).
pub type InputShapes = BTreeMap<String, Vec<String>>;

/// Reads a model's inputs and outputs, proving it parses and optimises.
pub fn inspect(path: &Path, shapes: &InputShapes) -> Result<ModelSignature, ModelError> {
    let typed = optimise(declutter(load(path, shapes)?, shapes)?, shapes)?;
    Ok(ModelSignature {
        inputs: input_specs(&typed)?,
        outputs: output_specs(&typed)?,
    })
}

/// Translates to tract's typed graph and simplifies it: the form a plan is
/// optimised from, for the general plan and for each specialised one.
fn declutter(model: InferenceModel, shapes: &InputShapes) -> Result<TypedModel, ModelError> {
    model
        .into_typed()
        .and_then(|typed| typed.into_decluttered())
        .map_err(|e| not_optimisable(e, shapes))
}

fn optimise(model: TypedModel, shapes: &InputShapes) -> Result<TypedModel, ModelError> {
    model
        .into_optimized()
        .map_err(|e| not_optimisable(e, shapes))
}

fn not_optimisable(e: tract_onnx::prelude::TractError, shapes: &InputShapes) -> ModelError {
    let hint = if shapes.is_empty() {
        "; if its inputs have dynamic dimensions, fix them when publishing \
         (e.g. `cascade publish model --input-shape x=N,3,48,192`)"
    } else {
        ""
    };
    ModelError::NotOptimisable {
        error: format!("{e:#}"),
        hint,
    }
}

/// A tract failure in reading the model's graph, with what was being done.
fn graph_error(doing: &'static str) -> impl Fn(tract_onnx::prelude::TractError) -> ModelError {
    move |e| ModelError::Graph {
        doing,
        error: format!("{e:#}"),
    }
}

/// Parses the model, applies `shapes`, and names every remaining unnamed
/// dynamic input dimension, so exports that leave dimensions as `?` (e.g.
/// PaddleOCR's) get symbols tract can reason about.
fn load(path: &Path, shapes: &InputShapes) -> Result<InferenceModel, ModelError> {
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| ModelError::NotOnnx(format!("{e:#}")))?;
    with_shapes(model, shapes)
}

fn with_shapes(
    mut model: InferenceModel,
    shapes: &InputShapes,
) -> Result<InferenceModel, ModelError> {
    let names: Vec<String> = model
        .inputs
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    if let Some(unknown) = shapes.keys().find(|k| !names.contains(k)) {
        return Err(ModelError::UnknownInput {
            given: unknown.clone(),
            inputs: names,
        });
    }
    for (input, name) in names.iter().enumerate() {
        let mut fact = model
            .input_fact(input)
            .map_err(graph_error("reading an input"))?
            .clone();
        if let Some(dims) = shapes.get(name) {
            let dims = dims
                .iter()
                .map(|d| match d.parse::<usize>() {
                    Ok(n) => GenericFactoid::Only(TDim::from(n)),
                    Err(_) => GenericFactoid::Only(TDim::Sym(model.symbols.sym(d))),
                })
                .collect();
            fact.shape = ShapeFactoid::closed(dims);
        } else if fact.shape.is_open() {
            continue;
        }
        let unknown: Vec<usize> = fact
            .shape
            .dims()
            .enumerate()
            .filter(|(_, d)| d.concretize().is_none())
            .map(|(i, _)| i)
            .collect();
        for axis in unknown {
            let symbol = model.symbols.sym(&format!("in{input}_d{axis}"));
            fact.shape.set_dim(axis, TDim::Sym(symbol));
        }
        model
            .set_input_fact(input, fact)
            .map_err(graph_error("fixing an input shape"))?;
    }
    Ok(model)
}

/// Selects `outputs` (all when empty) and declutters: the model a general
/// plan, and each plan specialised to a shape, is optimised from.
fn template(
    mut model: InferenceModel,
    shapes: &InputShapes,
    outputs: &[String],
) -> Result<TypedModel, ModelError> {
    if !outputs.is_empty() {
        let outlets = outputs
            .iter()
            .map(|name| {
                model
                    .find_outlet_label(name)
                    .or_else(|| model.node_by_name(name).ok().map(|n| n.id.into()))
                    .ok_or_else(|| ModelError::NoOutput(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        model
            .select_output_outlets(&outlets)
            .map_err(graph_error("selecting outputs"))?;
    }
    declutter(model, shapes)
}

/// Whether some input dimension is a bare symbol (what a shape plan binds).
fn has_symbolic_input(model: &TypedModel) -> bool {
    (0..model.inputs.len()).any(|i| {
        model
            .input_fact(i)
            .is_ok_and(|fact| fact.shape.iter().any(|d| matches!(d, TDim::Sym(_))))
    })
}

fn input_specs(model: &TypedModel) -> Result<Vec<TensorSpec>, ModelError> {
    (0..model.inputs.len())
        .map(|i| {
            let fact = model
                .input_fact(i)
                .map_err(graph_error("reading an input"))?;
            Ok(TensorSpec {
                name: model.node(model.inputs[i].node).name.clone(),
                ty: format!("{:?}", fact.datum_type).to_lowercase(),
                shape: fact.shape.iter().map(|d| d.to_string()).collect(),
            })
        })
        .collect()
}

fn output_specs(model: &TypedModel) -> Result<Vec<TensorSpec>, ModelError> {
    model
        .outputs
        .iter()
        .map(|&outlet| {
            let fact = model
                .outlet_fact(outlet)
                .map_err(graph_error("reading an output"))?;
            Ok(TensorSpec {
                name: output_name(model, outlet),
                ty: format!("{:?}", fact.datum_type).to_lowercase(),
                shape: fact.shape.iter().map(|d| d.to_string()).collect(),
            })
        })
        .collect()
}

fn output_name<F, O>(
    model: &tract_onnx::prelude::Graph<F, O>,
    outlet: tract_onnx::prelude::OutletId,
) -> String
where
    F: tract_onnx::prelude::Fact + Clone + 'static,
    O: std::fmt::Debug
        + std::fmt::Display
        + AsRef<dyn tract_onnx::prelude::Op>
        + AsMut<dyn tract_onnx::prelude::Op>
        + Clone
        + 'static,
{
    model
        .outlet_label(outlet)
        .unwrap_or(&model.node(outlet.node).name)
        .to_string()
}

/// A model optimised by tract.
pub struct TractPlan {
    /// The plan for any shape the model accepts.
    plan: Arc<TypedRunnableModel>,
    /// Plans for the shapes seen most, when the model has dynamic dimensions.
    shaped: Option<Arc<ShapePlans>>,
    inputs: Vec<(String, DatumType)>,
    outputs: Vec<String>,
}

impl std::fmt::Debug for TractPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractPlan")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl TractPlan {
    /// Loads the model at `path` and optimises it, computing only `outputs`
    /// (all when empty).
    pub fn load(
        path: &Path,
        shapes: &InputShapes,
        outputs: &[String],
        specialisation: Option<Specialisation>,
    ) -> Result<Self, ModelError> {
        let model = template(load(path, shapes)?, shapes, outputs)?;
        TractPlan::prepare(model, shapes, specialisation)
    }

    /// Loads an ONNX model given as bytes (what `wasi:nn`'s `load` hands
    /// over) and optimises it, computing every output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(|e| ModelError::NotOnnx(format!("{e:#}")))?;
        let shapes = InputShapes::new();
        let template = template(with_shapes(model, &shapes)?, &shapes, &[])?;
        TractPlan::prepare(template, &shapes, None)
    }

    /// The names of the tensors the model takes.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|(name, _)| name.clone()).collect()
    }

    fn prepare(
        template: TypedModel,
        shapes: &InputShapes,
        specialisation: Option<Specialisation>,
    ) -> Result<Self, ModelError> {
        // Keep the decluttered model only where shape plans can use it.
        let specialisation =
            specialisation.filter(|s| s.limit > 0 && has_symbolic_input(&template));
        let kept = specialisation.as_ref().map(|_| template.clone());
        let typed = optimise(template, shapes)?;
        let names: Vec<String> = typed
            .outputs
            .iter()
            .map(|&o| output_name(&typed, o))
            .collect();
        let inputs = (0..typed.inputs.len())
            .map(|i| {
                let fact = typed
                    .input_fact(i)
                    .map_err(graph_error("reading an input"))?;
                Ok((
                    typed.node(typed.inputs[i].node).name.clone(),
                    fact.datum_type,
                ))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let plan = typed
            .into_runnable()
            .map_err(graph_error("making the plan runnable"))?;
        let shaped = match (specialisation, kept) {
            (Some(s), Some(template)) => {
                let input_names: Vec<String> =
                    inputs.iter().map(|(name, _)| name.clone()).collect();
                ShapePlans::new(template, &input_names, s)?
            }
            _ => None,
        };
        Ok(TractPlan {
            plan,
            shaped,
            inputs,
            outputs: names,
        })
    }

    /// Runs the model on the tensors it needs, picked by name from `available`.
    pub fn run(&self, available: &[Tensor]) -> Result<Vec<Tensor>, StageError> {
        let inputs = self
            .inputs
            .iter()
            .map(|(name, datum)| to_tract(input_named(available, name)?, *datum).map(TValue::from))
            .collect::<Result<Vec<TValue>, StageError>>()?;
        let plan = match &self.shaped {
            Some(shaped) => shaped
                .plan_for(&inputs)
                .unwrap_or_else(|| self.plan.clone()),
            None => self.plan.clone(),
        };
        let outputs = plan
            .run(inputs.into_iter().collect())
            .map_err(|e| StageError::Internal(format!("inference failed: {e}")))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(value, name)| from_tract(name, value))
            .collect()
    }
}

fn datum_of(ty: TensorType) -> Option<DatumType> {
    Some(match ty {
        TensorType::Fp16 => DatumType::F16,
        TensorType::Fp32 => DatumType::F32,
        TensorType::Fp64 => DatumType::F64,
        TensorType::U8 => DatumType::U8,
        TensorType::I32 => DatumType::I32,
        TensorType::I64 => DatumType::I64,
        TensorType::Bf16 => return None,
    })
}

fn type_of(datum: DatumType) -> Option<TensorType> {
    Some(match datum {
        DatumType::F16 => TensorType::Fp16,
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::U8 => TensorType::U8,
        DatumType::I32 => TensorType::I32,
        DatumType::I64 => TensorType::I64,
        _ => return None,
    })
}

fn to_tract(tensor: &Tensor, expected: DatumType) -> Result<TractTensor, StageError> {
    let datum = datum_of(tensor.ty)
        .filter(|d| *d == expected)
        .ok_or_else(|| {
            StageError::InvalidInput(format!(
                "tensor {:?} is {:?}; the model needs {expected:?}",
                tensor.name, tensor.ty
            ))
        })?;
    check_fills_shape(tensor, datum.size_of())?;
    let shape: Vec<usize> = tensor.dimensions.iter().map(|&d| d as usize).collect();
    // SAFETY: `datum` is a plain numeric type for which every bit pattern is
    // valid, and the length was checked against the shape just above.
    unsafe { TractTensor::from_raw_dt(datum, &shape, &tensor.data) }
        .map_err(|e| StageError::Internal(format!("tensor {:?}: {e}", tensor.name)))
}

fn from_tract(name: &str, value: &TractTensor) -> Result<Tensor, StageError> {
    let ty = type_of(value.datum_type()).ok_or_else(|| {
        StageError::Internal(format!(
            "output {name:?} has unsupported type {:?}",
            value.datum_type()
        ))
    })?;
    Ok(Tensor {
        name: name.to_string(),
        dimensions: value.shape().iter().map(|&d| d as u32).collect(),
        ty,
        data: value.as_bytes().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensors::element_bytes;
    use proptest::prelude::*;

    fn tensor_type() -> impl Strategy<Value = TensorType> {
        prop_oneof![
            Just(TensorType::U8),
            Just(TensorType::Fp16),
            Just(TensorType::Bf16),
            Just(TensorType::Fp32),
            Just(TensorType::Fp64),
            Just(TensorType::I32),
            Just(TensorType::I64),
        ]
    }

    proptest! {
        /// Whatever a guest sends as a tensor, decoding it for a model
        /// never panics: bytes that fill the shape of the type the model
        /// wants decode and come back unchanged; anything else is a 400.
        #[test]
        fn any_tensor_decodes_exactly_or_is_refused_as_invalid_input(
            ty in tensor_type(),
            dimensions in proptest::collection::vec(
                prop_oneof![0u32..6, Just(u32::MAX), any::<u32>()],
                0..5,
            ),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            wanted in tensor_type(),
        ) {
            let tensor = Tensor { name: "x".into(), dimensions, ty, data };
            let Some(expected) = datum_of(wanted) else {
                return Ok(());
            };
            let fills = tensor
                .dimensions
                .iter()
                .try_fold(element_bytes(ty), |acc, &d| acc.checked_mul(d as usize))
                == Some(tensor.data.len());
            match to_tract(&tensor, expected) {
                Ok(decoded) => {
                    prop_assert!(fills && ty == wanted);
                    let back = from_tract("x", &decoded).expect("a type we decode");
                    prop_assert_eq!(back.ty, tensor.ty);
                    prop_assert_eq!(back.dimensions, tensor.dimensions);
                    prop_assert_eq!(back.data, tensor.data);
                }
                Err(StageError::InvalidInput(_)) => prop_assert!(!fills || ty != wanted),
                Err(other) => prop_assert!(false, "not a 400: {other}"),
            }
        }
    }
}
