//! `mean-pool`: token embeddings + attention mask in, sentence embeddings out.
//!
//! Averages each sequence's token vectors over the positions its attention
//! mask marks, optionally scales the result to unit length, and answers
//! `application/json` `{"embeddings": [[…], …]}`.
//!
//! Config: `embeddings` (tensor name; default: the last rank-3 fp32 tensor,
//! i.e. the model's output), `mask` (default `attention_mask`),
//! `normalize` (L2, default false).

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::{Config, Failure, PerInstance, le};

wit_bindgen::generate!({ world: "postprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

const KEYS: &[&str] = &["embeddings", "mask", "normalize"];

fn find<'a>(tensors: &'a [Tensor], name: &str) -> Result<&'a Tensor, Failure> {
    tensors.iter().find(|t| t.name == name).ok_or_else(|| {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        Failure::input(format!(
            "no tensor named `{name}` (got: {})",
            names.join(", ")
        ))
    })
}

fn mask_values(mask: &Tensor) -> Result<Vec<f32>, Failure> {
    Ok(match mask.ty {
        TensorType::I64 => le::i64s(&mask.name, &mask.data)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        TensorType::I32 => le::i32s(&mask.name, &mask.data)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        TensorType::Fp32 => le::f32s(&mask.name, &mask.data)?,
        other => {
            return Err(Failure::input(format!(
                "tensor `{}` has type {other:?}; the mask must be i64, i32 or fp32",
                mask.name
            )));
        }
    })
}

/// Mean of each row's vectors over its masked positions, read straight from
/// the tensor's little-endian bytes (no decoded copy: at 128 tokens that
/// is 196 KB written and read again); a row with an empty mask pools to
/// zeros rather than dividing by zero.
fn mean_pool(
    embeddings: &[u8],
    mask: &[f32],
    (batch, seq, dim): (usize, usize, usize),
    normalize: bool,
) -> Vec<Vec<f32>> {
    const F32: usize = std::mem::size_of::<f32>();
    (0..batch)
        .map(|b| {
            let mut sum = vec![0f32; dim];
            let mut weight = 0f32;
            for s in 0..seq {
                let m = mask[b * seq + s];
                if m == 0.0 {
                    continue;
                }
                weight += m;
                let token = &embeddings[(b * seq + s) * dim * F32..][..dim * F32];
                for (acc, bytes) in sum.iter_mut().zip(token.chunks_exact(F32)) {
                    let v = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    *acc += m * v;
                }
            }
            let scale = if weight > 0.0 { 1.0 / weight } else { 0.0 };
            sum.iter_mut().for_each(|v| *v *= scale);
            if normalize {
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                sum.iter_mut().for_each(|v| *v /= norm);
            }
            sum
        })
        .collect()
}

/// The reply body. Serialised from `f32`s directly, each number is the
/// shortest text that reads back as that `f32` (`0.041237183`), not the
/// 17 digits of its widening to `f64` that a `serde_json::Value` would print.
#[derive(serde::Serialize)]
struct Reply<'a> {
    embeddings: &'a [Vec<f32>],
}

/// The configuration, read once per instance.
static CONFIG: PerInstance<Config> = PerInstance::new();

fn pool(tensors: Vec<Tensor>) -> Result<Message, Failure> {
    let config = CONFIG.get(|| load_config(KEYS))?;
    let embeddings = match config.get("embeddings") {
        Some(name) => find(&tensors, name)?,
        None => tensors
            .iter()
            .rev()
            .find(|t| t.dimensions.len() == 3 && t.ty == TensorType::Fp32)
            .ok_or_else(|| {
                Failure::input("no rank-3 fp32 tensor (batch × tokens × dims) to pool")
            })?,
    };
    let mask = find(&tensors, &config.string("mask", "attention_mask"))?;
    if embeddings.ty != TensorType::Fp32 || embeddings.dimensions.len() != 3 {
        return Err(Failure::input(format!(
            "tensor `{}` must be fp32 batch × tokens × dims, got {:?} {:?}",
            embeddings.name, embeddings.ty, embeddings.dimensions
        )));
    }
    let [batch, seq, dim] = [0, 1, 2].map(|i| embeddings.dimensions[i] as usize);
    if mask.dimensions != [batch as u32, seq as u32] {
        return Err(Failure::input(format!(
            "mask `{}` has shape {:?} but embeddings `{}` need [{batch}, {seq}]",
            mask.name, mask.dimensions, embeddings.name
        )));
    }
    let bytes = embeddings.data.len();
    if bytes % 4 != 0 {
        return Err(Failure::input(format!(
            "tensor `{}`: {bytes} bytes is not a whole number of 4-byte elements",
            embeddings.name
        )));
    }
    if bytes / 4 != batch * seq * dim {
        return Err(Failure::input(format!(
            "tensor `{}` holds {} values but its shape needs {}",
            embeddings.name,
            bytes / 4,
            batch * seq * dim
        )));
    }
    let mask_name = mask.name.clone();
    let mask = mask_values(mask)?;
    if mask.len() != batch * seq {
        return Err(Failure::input(format!(
            "mask `{mask_name}` holds {} values but its shape needs {}",
            mask.len(),
            batch * seq
        )));
    }
    let pooled = mean_pool(
        &embeddings.data,
        &mask,
        (batch, seq, dim),
        config.flag("normalize", false)?,
    );
    let body = serde_json::to_vec(&Reply {
        embeddings: &pooled,
    })
    .map_err(|e| Failure::internal(format!("encoding JSON: {e}")))?;
    Ok(Message {
        content_type: "application/json".into(),
        body,
    })
}

struct MeanPool;

impl exports::cascade::inference::postprocess::Guest for MeanPool {
    fn postprocess(tensors: Vec<Tensor>) -> Result<Message, Error> {
        pool(tensors).map_err(Error::from)
    }
}

export!(MeanPool);
