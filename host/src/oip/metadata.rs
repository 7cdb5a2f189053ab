//! A function seen as an OIP model: what it takes and what it gives.
//!
//! A function whose first stage is a preprocessor takes one `BYTES` input,
//! [`MESSAGE`], holding the message body; one whose first stage is a model
//! takes that model's inputs. A postprocessor's message comes back as one
//! `BYTES` output, [`MESSAGE`]; a last model's outputs as themselves. An
//! inferencer's tensors are known only when it runs: its side is left open.

use super::datatypes::of_model_type;
use crate::pipeline::{PreparedFunction, PreparedStage};
use cascade_registry::records::{TensorSpec, World};
use serde::Serialize;

/// The name of the one `BYTES` tensor that carries a message.
pub const MESSAGE: &str = "message";

/// One tensor of a model's metadata (`-1` for a dynamic dimension).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorMetadata {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: String,
    /// Its shape.
    pub shape: Vec<i64>,
}

/// How a function takes its input.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A message in one `BYTES` input.
    Message,
    /// Tensors: these (a model's inputs), or any (`None`, an inferencer).
    Tensors(Option<Vec<TensorSpec>>),
}

/// How `function` takes its input.
pub fn entry(function: &PreparedFunction) -> Entry {
    match function.stages().first() {
        Some(PreparedStage::Component {
            world: World::Preprocessor,
            ..
        }) => Entry::Message,
        Some(PreparedStage::Model { signature, .. }) => {
            Entry::Tensors(Some(signature.inputs.clone()))
        }
        _ => Entry::Tensors(None),
    }
}

/// The inputs of `function`'s metadata.
pub fn inputs(function: &PreparedFunction) -> Vec<TensorMetadata> {
    match entry(function) {
        Entry::Message => vec![message()],
        Entry::Tensors(Some(specs)) => specs.iter().map(metadata).collect(),
        Entry::Tensors(None) => Vec::new(),
    }
}

/// The outputs of `function`'s metadata.
pub fn outputs(function: &PreparedFunction) -> Vec<TensorMetadata> {
    match function.stages().last() {
        Some(PreparedStage::Component {
            world: World::Postprocessor,
            ..
        }) => vec![message()],
        Some(PreparedStage::Model { signature, .. }) => {
            signature.outputs.iter().map(metadata).collect()
        }
        _ => Vec::new(),
    }
}

fn message() -> TensorMetadata {
    TensorMetadata {
        name: MESSAGE.into(),
        datatype: "BYTES".into(),
        shape: vec![1],
    }
}

/// A registry tensor spec as metadata: numbers stay, names become `-1`.
pub fn metadata(spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: of_model_type(&spec.ty).into(),
        shape: spec
            .shape
            .iter()
            .map(|d| d.parse::<i64>().unwrap_or(-1))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_dimensions_are_dynamic() {
        let spec = TensorSpec {
            name: "input_ids".into(),
            ty: "i64".into(),
            shape: vec!["batch".into(), "128".into(), "in0_d1".into()],
        };
        assert_eq!(
            metadata(&spec),
            TensorMetadata {
                name: "input_ids".into(),
                datatype: "INT64".into(),
                shape: vec![-1, 128, -1],
            }
        );
    }
}
