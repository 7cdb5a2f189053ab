//! The baseline of the pipeline-overhead figure: `embed`'s three steps
//! compiled natively into this process — the `tokenizers` crate (the same
//! code the `bert-tokenizer` guest runs), tract on the same ONNX file and
//! output, and mean pooling — with no sandbox, no copies between stages and
//! no HTTP. Like the host, it runs a plan optimised for the input's exact
//! shape, so the comparison isolates what the platform adds.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tract_onnx::prelude::{
    Framework, InferenceModelExt, IntoTValue, TDim, Tensor, TypedModel, TypedRunnableModel,
};

/// The output `embed` selects: MiniLM's token embeddings.
pub const TOKEN_EMBEDDINGS: &str = "onnx::Shape_422";
/// The model file in the models cache.
pub const MODEL_FILE: &str = "paraphrase-MiniLM-L3-v2.onnx";
/// Truncation, as in the `embed` manifest.
const MAX_LENGTH: usize = 128;

/// Tokenizer, decluttered model, its plans by sequence length, and the
/// model's input names.
pub struct NativeEmbed {
    tokenizer: Tokenizer,
    model: TypedModel,
    plans: Mutex<HashMap<usize, Arc<TypedRunnableModel>>>,
    inputs: Vec<String>,
}

impl NativeEmbed {
    /// Loads `tokenizer.json` and the model from `models`.
    pub fn load(models: &Path) -> Result<NativeEmbed> {
        let mut tokenizer = Tokenizer::from_file(models.join("tokenizer.json"))
            .map_err(|e| anyhow!("loading tokenizer.json: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_LENGTH,
                ..TruncationParams::default()
            }))
            .map_err(|e| anyhow!("truncation: {e}"))?;
        let model = tract_onnx::onnx()
            .model_for_path(models.join(MODEL_FILE))?
            .with_outputs_by_name([TOKEN_EMBEDDINGS])?
            .into_typed()?
            .into_decluttered()?;
        let inputs = model
            .inputs
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        Ok(NativeEmbed {
            tokenizer,
            model,
            plans: Mutex::new(HashMap::new()),
            inputs,
        })
    }

    /// The plan for one text of `seq` tokens, optimised on first use.
    fn plan(&self, seq: usize) -> Result<Arc<TypedRunnableModel>> {
        let mut plans = self.plans.lock().map_err(|e| anyhow!("{e}"))?;
        if let Some(plan) = plans.get(&seq) {
            return Ok(plan.clone());
        }
        // Every input is [batch, sequence]: bind what their dimensions name.
        let mut bindings = HashMap::new();
        for input in 0..self.model.inputs.len() {
            for (dim, value) in self.model.input_fact(input)?.shape.iter().zip([1, seq]) {
                if let TDim::Sym(symbol) = dim {
                    bindings.insert(symbol.clone(), TDim::Val(value as i64));
                }
            }
        }
        let plan = tract_onnx::prelude::IntoRunnable::into_runnable(
            self.model.set_symbols(&bindings)?.into_optimized()?,
        )?;
        plans.insert(seq, plan.clone());
        Ok(plan)
    }

    /// Number of tokens `text` becomes (with `[CLS]` and `[SEP]`).
    pub fn tokens(&self, text: &str) -> Result<usize> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.len())
    }

    /// A sentence-like text that becomes exactly `count` tokens.
    pub fn text_of_tokens(&self, count: usize) -> Result<String> {
        const WORDS: &[&str] = &[
            "the",
            "model",
            "turns",
            "every",
            "sentence",
            "into",
            "a",
            "vector",
            "so",
            "that",
            "similar",
            "meanings",
            "land",
            "close",
            "together",
            "while",
            "unrelated",
            "texts",
            "stay",
            "apart",
            "and",
            "search",
            "becomes",
            "fast",
        ];
        let mut text = String::new();
        for word in WORDS.iter().cycle().take(4 * count) {
            let candidate = if text.is_empty() {
                (*word).to_string()
            } else {
                format!("{text} {word}")
            };
            let n = self.tokens(&candidate)?;
            if n > count {
                break;
            }
            text = candidate;
            if n == count {
                return Ok(text);
            }
        }
        bail!("could not build a text of exactly {count} tokens")
    }

    /// Token ids and attention mask of `text`, as the model takes them.
    pub fn encode(&self, text: &str) -> Result<(Vec<i64>, Vec<i64>)> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let widen = |values: &[u32]| values.iter().map(|&v| i64::from(v)).collect();
        Ok((
            widen(encoding.get_ids()),
            widen(encoding.get_attention_mask()),
        ))
    }

    /// One embedding, L2-normalised, as `embed` computes it.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let (ids, mask) = self.encode(text)?;
        let seq = ids.len();
        let tensor = |values: &[i64]| Tensor::from_shape(&[1, seq], values);
        let inputs = self
            .inputs
            .iter()
            .map(|name| match name.as_str() {
                "input_ids" => tensor(&ids),
                "attention_mask" => tensor(&mask),
                _ => tensor(&vec![0; seq]),
            })
            .map(|t| t.map(IntoTValue::into_tvalue))
            .collect::<Result<tract_onnx::prelude::TVec<_>, _>>()?;
        let outputs = self.plan(seq)?.run(inputs)?;
        let tokens = outputs
            .first()
            .context("the plan has no output")?
            .to_plain_array_view::<f32>()?;
        let dim = *tokens.shape().last().context("scalar output")?;
        mean_pool(tokens.as_slice().context("contiguous")?, dim, &mask)
    }

    /// Latencies of back-to-back embeddings of `text` for `duration`.
    pub fn measure(&self, text: &str, duration: Duration) -> Result<Vec<Duration>> {
        time_each(duration, || self.embed(text))
    }
}

/// Latencies of back-to-back calls of `work` for `duration`.
pub fn time_each<T>(
    duration: Duration,
    mut work: impl FnMut() -> Result<T>,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = Instant::now();
        std::hint::black_box(work()?);
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Mean of the `dim`-wide token rows whose `mask` is set, L2-normalised:
/// what the `mean-pool` guest computes.
pub fn mean_pool(tokens: &[f32], dim: usize, mask: &[i64]) -> Result<Vec<f32>> {
    anyhow::ensure!(dim > 0, "token rows of width 0");
    let mut pooled = vec![0f32; dim];
    let mut count = 0f32;
    for (row, &m) in tokens.chunks_exact(dim).zip(mask) {
        if m != 0 {
            count += 1.0;
            pooled.iter_mut().zip(row).for_each(|(p, v)| *p += v);
        }
    }
    let norm = pooled
        .iter()
        .map(|v| (v / count.max(1.0)).powi(2))
        .sum::<f32>()
        .sqrt()
        .max(1e-12);
    Ok(pooled.iter().map(|v| v / count.max(1.0) / norm).collect())
}
