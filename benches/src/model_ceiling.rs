//! The most `embed` requests any server could answer per second on this
//! machine with ONNX Runtime: the model run alone, as Cascade's ONNX Runtime
//! host runs it (the same `OrtModel`, one thread per run), back to back on
//! every core, with no HTTP, no tokenizing and no pooling. Section 2 sets
//! both servers' throughput against it: a server that runs each request's
//! model once cannot pass it, so it bounds what a ratio between two such
//! servers can reach.

use crate::native::NativeEmbed;
use anyhow::{Result, anyhow};
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
        };
        let model = OrtModel::load(
            &models.join(crate::native::MODEL_FILE),
            &[output.to_string()],
            &settings,
            RunCounts {
                narrow: counter("narrow")?,
                wide: counter("wide")?,
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
        let (ids, mask) = native.encode(text)?;
        let tensor = |name: &str, values: &[i64]| Tensor {
            name: name.to_string(),
            dimensions: vec![1, values.len() as u32],
            ty: TensorType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let zeros = vec![0; ids.len()];
        let inputs = model
            .input_names()
            .iter()
            .map(|name| match name.as_str() {
                "input_ids" => tensor(name, &ids),
                "attention_mask" => tensor(name, &mask),
                _ => tensor(name, &zeros),
            })
            .collect();
        Ok(ModelCeiling { model, inputs })
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
