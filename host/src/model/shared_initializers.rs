//! A model's large constant tensors (ONNX initializers), read once and lent
//! to every ONNX Runtime session of the model.
//!
//! A model keeps up to one session per core (sessions cannot run from two
//! threads) plus one for lone runs. Packed matrix weights are already shared
//! between them, but every session held its own copy of the other
//! initializers — for MiniLM-L3 the 47 MB word-embedding table, which only
//! a Gather reads. Handed to each session with `AddInitializer`, one copy
//! serves them all: an ONNX Runtime host serving the examples after `embed`
//! at 4 connections (two sessions plus the one for lone runs) went from 389
//! to 291-302 MB (benches/optimisations.md entry 23). Reading them costs
//! ~0.1 s more when a model loads.

use super::ModelError;
use ort::session::builder::SessionBuilder;
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::pb::TensorProto;
use tract_onnx::prelude::Framework;

/// Initializers smaller than this stay in each session: sharing them saves
/// little and every one is a lookup at session creation.
const SHARE_AT_LEAST: usize = 1 << 20;

/// ONNX's `TensorProto.DataLocation.EXTERNAL`: the data lives in another file.
const EXTERNAL: i32 = 1;

/// The initializers the sessions of one model share.
#[derive(Default)]
pub struct SharedInitializers(Vec<(String, Arc<DynValue>)>);

impl SharedInitializers {
    /// The initializers of the model at `path` of at least [`SHARE_AT_LEAST`]
    /// bytes, stored in the file as raw little-endian data of a plain
    /// numeric type; the others are left to each session.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(|e| {
            ModelError::Initializers {
                doing: "reading the model's initializers".into(),
                error: e.to_string(),
            }
        })?;
        let Some(graph) = proto.graph else {
            return Ok(SharedInitializers::default());
        };
        let mut shared = Vec::new();
        for initializer in &graph.initializer {
            if let Some(value) = shareable(initializer)? {
                shared.push((initializer.name.clone(), Arc::new(value)));
            }
        }
        Ok(SharedInitializers(shared))
    }

    /// The names of the shared initializers.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }

    /// `builder` told to use the shared copies instead of its own.
    pub fn lend(&self, builder: SessionBuilder) -> Result<SessionBuilder, ModelError> {
        self.0.iter().try_fold(builder, |builder, (name, value)| {
            builder
                .with_initializer(name, value.clone())
                .map_err(|source| ModelError::OnnxRuntime {
                    doing: format!("sharing initializer {name:?}"),
                    source: source.into(),
                })
        })
    }
}

/// `initializer` as an ONNX Runtime tensor over memory of ours (what
/// `AddInitializer` requires), if it is worth sharing and held in a form
/// this reads: raw little-endian data of a plain numeric type, in the file.
fn shareable(initializer: &TensorProto) -> Result<Option<DynValue>, ModelError> {
    let data = &initializer.raw_data;
    if data.len() < SHARE_AT_LEAST || initializer.data_location == Some(EXTERNAL) {
        return Ok(None);
    }
    let dims = initializer.dims.clone();
    let value = match initializer.data_type {
        1 => owned(dims, data, f32::from_le_bytes),
        2 => owned(dims, data, u8::from_le_bytes),
        3 => owned(dims, data, i8::from_le_bytes),
        6 => owned(dims, data, i32::from_le_bytes),
        7 => owned(dims, data, i64::from_le_bytes),
        11 => owned(dims, data, f64::from_le_bytes),
        _ => return Ok(None),
    };
    value.map_err(|source| ModelError::OnnxRuntime {
        doing: format!("initializer {:?}", initializer.name),
        source,
    })
}

/// A tensor of `dims` holding `data` decoded with `from`; `None` when the
/// bytes do not fill the shape (ONNX Runtime then reads the initializer
/// itself and reports the fault).
fn owned<T, const N: usize>(
    dims: Vec<i64>,
    data: &[u8],
    from: fn([u8; N]) -> T,
) -> ort::Result<Option<DynValue>>
where
    T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let elements = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
    if elements.and_then(|n| n.checked_mul(N)) != Some(data.len()) {
        return Ok(None);
    }
    let values: Vec<T> = data
        .chunks_exact(N)
        .map(|chunk| from(chunk.try_into().unwrap_or([0; N])))
        .collect();
    Ok(Some(Tensor::from_array((dims, values))?.into_dyn()))
}
