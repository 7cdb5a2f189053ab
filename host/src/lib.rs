//! The Cascade host: runs the stages of ML inference functions in wasmtime
//! sandboxes.
//!
//! Where things live, following the path of a request:
//! - [`engine`]: the one wasmtime `Engine` and its serving settings;
//! - [`bindings`]: generated bindings for the `cascade:inference` worlds;
//! - [`sandbox`]: what a guest may see (config, read-only model files, limits);
//! - [`stage`]: a compiled component stage and its live instances.
//!
//! ```no_run
//! use cascade_host::{engine, stage::{ComponentStage, Grant}};
//! # async fn example() -> anyhow::Result<()> {
//! let engine = engine::ServingEngine::new(&engine::EngineSettings::default())?;
//! let stage = ComponentStage::from_file(&engine, "mean_pool.wasm")?;
//! let mut instance = stage.instantiate(&Grant::default()).await?;
//! let message = instance.postprocess(vec![]).await?; // an invalid-input error: no tensors
//! # let _ = message; Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod access;
pub mod api;
pub mod bindings;
pub mod capacity;
pub mod client;
pub mod config;
pub mod engine;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod mirror;
pub mod model_queue;
pub mod model_threads;
pub mod nn;
pub mod onnxruntime;
pub mod pipeline;
pub mod pool;
pub mod routes;
pub mod runtime;
pub mod sandbox;
pub mod serve;
pub mod shape_plans;
pub mod shared_initializers;
pub mod stage;
pub mod trigger;
pub mod wide_runs;
