//! The model wing: everything that runs ONNX models natively, behind one
//! face, [`ModelPlan`] (run tensors through a model, whichever backend holds
//! it) shared through a [`PlanCache`] and queued by a [`ModelQueue`].
//!
//! - [`plan`]: [`ModelPlan`], [`Backend`] and [`PlanCache`], what the pipeline sees;
//! - [`tract`]: the pure-Rust backend, and the publish-time checker [`inspect`];
//! - [`ort`]: ONNX Runtime, loaded from its shared library at run time;
//! - [`tensors`]: input lookup and size checks every backend shares;
//! - [`queue`], [`threads`], [`wide_runs`]: how runs wait, where they run, how many threads a lone one gets;
//! - [`shape_plans`], [`shared_initializers`]: tract plans per input shape, ONNX Runtime weights shared across sessions;
//! - [`wasi_nn`]: `wasi:nn` for inferencer components, on the same plans and queues;
//! - [`choice`]: which backend a host runs, ONNX Runtime when its library is found;
//! - [`memory`]: handing memory back after a burst of model work.

pub mod choice;
pub mod fastest_runs;
pub mod memory;
pub mod optimized;
pub mod ort;
pub mod plan;
pub mod queue;
pub mod shape_plans;
pub mod shared_initializers;
pub mod stop;
pub mod tensors;
pub mod threads;
pub mod tract;
pub mod wasi_nn;
pub mod wide_runs;

pub use plan::{Backend, ModelPlan, PlanCache};
pub use queue::ModelQueue;
pub use tract::{InputShapes, inspect};

/// Why a model could not be read, checked or loaded: at publish (a 400
/// naming the problem) or when a host prepares a function that uses it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bytes are not an ONNX model tract can parse.
    #[error("not a loadable ONNX model: {0}")]
    NotOnnx(String),
    /// tract parsed the model but cannot type or optimise it.
    #[error("the model does not optimise: {error}{hint}")]
    NotOptimisable {
        /// tract's account, with its causes.
        error: String,
        /// What a publisher can do about it, if anything.
        hint: &'static str,
    },
    /// A fixed input shape names an input the model does not have.
    #[error("input shape given for {given:?}, but the inputs are [{}]", inputs.join(", "))]
    UnknownInput {
        /// The name given.
        given: String,
        /// The model's inputs.
        inputs: Vec<String>,
    },
    /// An output selected by name does not exist.
    #[error("the model has no output {0:?}")]
    NoOutput(String),
    /// The model has an input or output this backend cannot serve as asked.
    #[error("{0}")]
    Unsupported(String),
    /// tract failed while reading or transforming the graph.
    #[error("{doing}: {error}")]
    Graph {
        /// What was being done.
        doing: &'static str,
        /// tract's account.
        error: String,
    },
    /// ONNX Runtime's shared library could not be loaded.
    #[error("cannot load ONNX Runtime from {}: {source}", library.display())]
    OnnxRuntimeLibrary {
        /// The library.
        library: std::path::PathBuf,
        /// Why.
        #[source]
        source: ::ort::LoadDynamicError,
    },
    /// ONNX Runtime failed to start, or to load the model.
    #[error("{doing}: {source}")]
    OnnxRuntime {
        /// What was being done.
        doing: String,
        /// ONNX Runtime's error.
        #[source]
        source: ::ort::Error,
    },
    /// The model file could not be read in a form ONNX Runtime sessions share.
    #[error("{doing}: {error}")]
    Initializers {
        /// What was being done.
        doing: String,
        /// Why.
        error: String,
    },
    /// ONNX Runtime's library has not been loaded on this host.
    #[error("ONNX Runtime is not loaded")]
    OnnxRuntimeNotLoaded,
    /// A lock of the plan cache was poisoned by a panic.
    #[error("the plan cache is poisoned by an earlier panic")]
    Poisoned,
}
