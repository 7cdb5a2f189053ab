//! The Cascade registry: it answers "what is function X, component Y, model
//! Z" and nothing else.
//!
//! - [`names`]: artifact names, versions and `name@version` references;
//! - [`manifest`]: the function manifest (TOML) and its static validation;
//! - [`triggers`]: its `[triggers]` table (core NATS, JetStream) and their checks;
//! - [`records`]: what the registry stores about each artifact;
//! - [`checks`]: publish-time checks that a function's stages exist and fit together;
//! - [`blobs`]: content-addressed files, staged then renamed into place;
//! - [`store`]: the [`Registry`] itself on redb, where atomicity lives;
//! - [`tables`]: the redb table definitions, named in one place.
//!
//! ```no_run
//! use cascade_registry::{Registry, names::Reference};
//! # fn main() -> Result<(), cascade_registry::RegistryError> {
//! let registry = Registry::open("./cascade-data")?;
//! for component in registry.components()? {
//!     println!("{}@{} {}", component.name, component.version, component.world);
//! }
//! let tokenizer = registry.component(&"bert-tokenizer@0.1.0".parse::<Reference>()?)?;
//! # let _ = tokenizer; Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod blobs;
pub mod checks;
mod error;
pub mod manifest;
pub mod names;
pub mod records;
pub mod store;
mod tables;
pub mod traffic;
pub mod triggers;

pub use error::RegistryError;

/// The file name inside a model package tar that holds the ONNX model; the
/// package's other files are its extra files, by name.
pub const PACKAGE_MODEL_FILE: &str = "model.onnx";
pub use store::{ModelPackage, Published, Registry};
