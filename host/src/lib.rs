//! The Cascade host: runs the stages of ML inference functions in wasmtime
//! sandboxes.
//!
//! Where things live, following the path of a request:
//! - [`serve`]: `cascade serve` — opens the registry, prepares functions, runs the triggers, shuts down;
//! - [`config`]: its flags and environment, validated once;
//! - [`trigger`]: how requests arrive — [`trigger::http`] (listener, invoke), [`trigger::nats`] (micro services), [`trigger::subjects`];
//! - [`routes`]: every HTTP route and the scope it needs; [`access`]: tokens and scopes;
//! - [`http`]: HTTP plumbing shared by the triggers and the registry API (bodies, errors, limits, state);
//! - [`oip`]: the Open Inference Protocol's REST routes (`/v2`), for Triton and KServe clients;
//! - [`registry_api`]: the registry's routes (read, delete, roll back);
//! - [`publish`]: publish-time checks (component world, model, the manifest parsed once);
//! - [`events`]: typed registry events, announced over NATS;
//! - [`runtime`]: the functions served, prepared from typed registry revisions and swapped by revision; [`traffic`]: several revisions of one function at once, by share, tag or sticky key;
//! - [`pipeline`]: one invocation through a function's stages, recorded once whatever the trigger;
//! - [`error`]: the request path's errors ([`error::StageError`], [`error::InvokeError`]);
//! - [`pool`]: admission per function and warm instances per stage;
//! - [`capacity`]: what the engine's pools hold and what each instance takes;
//! - [`stage`]: a compiled component stage and its live instances; [`bindings`]: the generated WIT bindings;
//! - [`sandbox`]: what a guest may see (config, read-only model files, limits);
//! - [`engine`]: the one wasmtime `Engine` and its serving settings;
//! - [`model`]: the model wing — plans (tract, ONNX Runtime), queues, threads, `wasi:nn`;
//! - [`metrics`]: every Prometheus metric name; [`dashboard`]: `/ui` and the last minutes of them;
//! - [`logging`], [`log_json`], [`guest_log`]: the host's log and the guests' lines in it;
//! - [`telemetry`]: the OTLP trace exporter; [`trace_context`]: W3C trace context through every trigger;
//! - [`client`]: the one client of the registry API (CLI and mirrors); [`mirror`]: a serving host's copy of another host's registry.
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
pub mod bindings;
pub mod capacity;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod events;
pub mod guest_log;
pub mod http;
pub mod log_json;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod oip;
pub mod operations;
pub mod operations_api;
pub mod pipeline;
pub mod pool;
pub mod publish;
pub mod registry_api;
pub mod routes;
pub mod runtime;
pub mod sandbox;
pub mod serve;
pub mod snapshot;
pub mod stage;
pub mod telemetry;
pub mod trace_context;
pub mod traffic;
pub mod trigger;
pub mod verdicts;
