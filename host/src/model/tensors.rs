//! Tensor checks every backend shares: finding an input by name, element
//! sizes, and whether a tensor's bytes fill its shape.

use crate::bindings::{Tensor, TensorType};
use crate::error::StageError;

/// The tensor named `name` in `available`, or an error naming what came.
pub fn input_named<'a>(available: &'a [Tensor], name: &str) -> Result<&'a Tensor, StageError> {
    input_position(available, name).map(|at| &available[at])
}

/// Where the tensor called `name` is in `available`, or an error naming
/// what there is instead.
pub fn input_position(available: &[Tensor], name: &str) -> Result<usize, StageError> {
    available
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = available.iter().map(|t| t.name.as_str()).collect();
            StageError::InvalidInput(format!(
                "the model needs tensor {name:?}; got [{}]",
                names.join(", ")
            ))
        })
}

/// Bytes of one element of a tensor of type `ty`.
pub fn element_bytes(ty: TensorType) -> usize {
    match ty {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

/// How many elements `tensor`'s shape holds (saturating): its size, for
/// the run times kept per input size.
pub fn element_count(tensor: &Tensor) -> usize {
    tensor
        .dimensions
        .iter()
        .fold(1usize, |acc, &d| acc.saturating_mul(d as usize))
}

/// Checks that `tensor`'s bytes exactly fill its shape, for elements of
/// `element_bytes` bytes.
pub fn check_fills_shape(tensor: &Tensor, element_bytes: usize) -> Result<(), StageError> {
    let needed = tensor
        .dimensions
        .iter()
        .try_fold(element_bytes, |acc, &d| acc.checked_mul(d as usize));
    if needed != Some(tensor.data.len()) {
        return Err(StageError::InvalidInput(format!(
            "tensor {:?} holds {} bytes but its shape {:?} needs {:?}",
            tensor.name,
            tensor.data.len(),
            tensor.dimensions,
            needed
        )));
    }
    Ok(())
}
