//! The most `embed` requests any server could answer per second on this
//! machine with ONNX Runtime: the model run alone, as Cascade's ONNX Runtime
//! host runs it (the same `OrtModel`, one thread per run), back to back on
//! every core, with no HTTP, no tokenizing and no pooling. Section 2 sets
//! both servers' throughput against it: a server that runs each request's
//! model once cannot pass it, so it bounds what a ratio between two such
//! servers can reach. With the tokenizer and pooling around it
//! ([`ModelCeiling::embed`]) it is also section 1's native baseline for
//! the ONNX Runtime backend. At one connection the ceiling is one lone run
//! after another ([`ModelCeiling::lone_runs`]).

use crate::native::NativeEmbed;
use anyhow::{Context, Result, anyhow};
use cascade_host::bindings::{Tensor, TensorType};
use cascade_host::model::ort::{OrtModel, OrtSettings, RunCounts};
use prometheus::IntCounter;
use std::path::Path;
use std::time::{Duration, Instant};

/// MiniLM loaded as the ONNX Runtime host loads it, with one input's tensors.
pub struct ModelCeiling {
    model: OrtModel,
    inputs: Vec<Tensor>,
}

impl ModelCeiling {
    /// Loads MiniLM from `models` with the ONNX Runtime library at
    /// `library`, computing only `output`, and prepares the tensors of
    /// `text` as `native` tokenizes it.
    pub fn load(
        native: &NativeEmbed,
        models: &Path,
        library: &Path,
        output: &str,
        text: &str,
    ) -> Result<ModelCeiling> {
        let counter = |name: &str| IntCounter::new(name, "unused").map_err(|e| anyhow!("{e}"));
        let settings = OrtSettings {
            library: library.to_path_buf(),
            threads: 1,
            alone_threads: 1,
            or_tract: false,
        };
        let model = OrtModel::load(
            &models.join(crate::native::MODEL_FILE),
            None,
            &[output.to_string()],
            &settings,
            RunCounts {
                narrow: counter("narrow")?,
                wide: counter("wide")?,
                stopped: counter("stopped")?,
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
        let (ids, mask) = native.encode(text)?;
        let inputs = tensors(&model, &ids, &mask);
        Ok(ModelCeiling { model, inputs })
    }

    /// One embedding of `text` natively on ONNX Runtime: `native`'s
    /// tokenizer, this model (one thread), mean pooling in Rust — `embed`
    /// with no sandbox, no copies between stages and no HTTP.
    pub fn embed(&self, native: &NativeEmbed, text: &str) -> Result<Vec<f32>> {
        let (ids, mask) = native.encode(text)?;
        let outputs = self
            .model
            .run(&tensors(&self.model, &ids, &mask))
            .map_err(|e| anyhow!("{e}"))?;
        let tokens = outputs.first().context("the model has no output")?;
        let dim = *tokens.dimensions.last().context("scalar output")? as usize;
        let values: Vec<f32> = tokens
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        crate::native::mean_pool(&values, dim, &mask)
    }

    /// Latencies of back-to-back [`ModelCeiling::embed`]s for `duration`.
    pub fn measure(
        &self,
        native: &NativeEmbed,
        text: &str,
        duration: Duration,
    ) -> Result<Vec<Duration>> {
        crate::native::time_each(duration, || self.embed(native, text))
    }

    /// Latencies of the model run alone, one run at a time on one thread,
    /// for `duration`: the ceiling of a server at one connection.
    pub fn lone_runs(&self, duration: Duration) -> Result<Vec<Duration>> {
        crate::native::time_each(duration, || {
            self.model.run(&self.inputs).map_err(|e| anyhow!("{e}"))
        })
    }

    /// Model runs per second over `duration`, one thread per core running
    /// back to back.
    pub fn runs_per_second(&self, duration: Duration) -> Result<f64> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let end = started + duration;
        let runs = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..cores)
                .map(|_| {
                    scope.spawn(|| -> Result<u64> {
                        let mut runs = 0;
                        while Instant::now() < end {
                            std::hint::black_box(
                                self.model.run(&self.inputs).map_err(|e| anyhow!("{e}"))?,
                            );
                            runs += 1;
                        }
                        Ok(runs)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().map_err(|_| anyhow!("a model thread panicked"))?)
                .sum::<Result<u64>>()
        })?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(runs as f64 / seconds)
    }
}

/// `model`'s inputs for one text: its ids, its mask, zeros for the rest.
fn tensors(model: &OrtModel, ids: &[i64], mask: &[i64]) -> Vec<Tensor> {
    let tensor = |name: &str, values: &[i64]| Tensor {
        name: name.to_string(),
        dimensions: vec![1, values.len() as u32],
        ty: TensorType::I64,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let zeros = vec![0; ids.len()];
    model
        .input_names()
        .iter()
        .map(|name| match name.as_str() {
            "input_ids" => tensor(name, ids),
            "attention_mask" => tensor(name, mask),
            _ => tensor(name, &zeros),
        })
        .collect()
}
