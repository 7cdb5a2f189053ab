//! Generated bindings for the `cascade:inference` worlds, kept out of sight.
//!
//! Exports are called asynchronously, so a guest yields to the reactor at
//! every epoch tick instead of holding a thread. Only the exports are used
//! here: imports (`wasi:config`, WASI) are added to the linker by their own
//! crates in [`crate::sandbox`].

#![allow(missing_docs)]

mod preprocessor {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "cascade:inference/preprocessor",
        exports: { default: async },
    });
}

mod postprocessor {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "cascade:inference/postprocessor",
        with: { "cascade:inference/types": super::preprocessor::cascade::inference::types },
        exports: { default: async },
    });
}

mod inferencer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "cascade:inference/inferencer",
        with: { "cascade:inference/types": super::preprocessor::cascade::inference::types },
        exports: { default: async },
    });
}

pub use inferencer::{Inferencer, InferencerPre};
pub use postprocessor::{Postprocessor, PostprocessorPre};
pub use preprocessor::cascade::inference::types::{
    Error as GuestError, Message, Tensor, TensorType,
};
pub use preprocessor::{Preprocessor, PreprocessorPre};

/// Fully qualified names of the interfaces each world exports, used to tell
/// which world a component implements.
pub mod export_names {
    /// Exported by `preprocessor` components.
    pub const PREPROCESS: &str = "cascade:inference/preprocess@0.1.0";
    /// Exported by `postprocessor` components.
    pub const POSTPROCESS: &str = "cascade:inference/postprocess@0.1.0";
    /// Exported by `inferencer` components.
    pub const INFER: &str = "cascade:inference/infer@0.1.0";
    /// Exported by components whose start-up work a host may snapshot.
    pub const INITIALIZE: &str = "cascade:inference/initialize@0.1.0";
}
