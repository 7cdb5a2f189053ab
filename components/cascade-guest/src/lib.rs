//! What every Cascade guest component shares, kept free of generated bindings
//! so each component keeps its own `wit_bindgen::generate!` and this crate
//! stays plain Rust:
//!
//! - [`Failure`]: the two ways a stage fails, mirroring the WIT `error` variant;
//! - [`Config`]: the stage's `wasi:config/store` values, parsed with messages
//!   that name the key;
//! - [`le`]: little-endian tensor payload encoding and decoding;
//! - [`PerInstance`]: what a stage prepares once per instance.

pub mod config;
pub mod le;

pub use config::Config;

/// Why a stage failed; each component maps it onto its generated WIT `error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The caller's input is unacceptable (HTTP 400).
    InvalidInput(String),
    /// The stage or its configuration is broken (HTTP 500).
    Internal(String),
}

impl Failure {
    /// Shorthand for [`Failure::InvalidInput`].
    pub fn input(message: impl Into<String>) -> Self {
        Failure::InvalidInput(message.into())
    }

    /// Shorthand for [`Failure::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Failure::Internal(message.into())
    }
}

/// What a stage prepares once per instance (its parsed configuration, a
/// tokenizer, labels). An instance's configuration and files cannot change
/// while it lives, and reading them through WASI on every call cost up to
/// 0.4 ms a call (benches/optimisations.md, entry 7). A `static` lives in
/// the instance's own linear memory, so a `static` of this is per instance.
pub struct PerInstance<T>(std::sync::OnceLock<Result<T, Failure>>);

impl<T> PerInstance<T> {
    /// An empty cell, for a `static`.
    pub const fn new() -> Self {
        PerInstance(std::sync::OnceLock::new())
    }

    /// The prepared value, made by `prepare` on first use; a failure is kept
    /// and returned again on every call.
    pub fn get(&self, prepare: impl FnOnce() -> Result<T, Failure>) -> Result<&T, Failure> {
        self.0.get_or_init(prepare).as_ref().map_err(Clone::clone)
    }
}

impl<T> PerInstance<T> {
    /// For an `initialize` export (WIT interface `initialize`): prepares
    /// now, then closes the preopened directories wasi-libc opened to read
    /// the files, because a snapshot of this instance cannot carry their
    /// handles. A later file access opens them again.
    pub fn initialize(&self, prepare: impl FnOnce() -> Result<T, Failure>) -> Result<(), Failure> {
        let prepared = self.get(prepare).map(drop);
        release_preopens();
        prepared
    }
}

#[cfg(all(target_os = "wasi", target_env = "p2"))]
fn release_preopens() {
    unsafe extern "C" {
        /// wasi-libc: closes every preopened directory and forgets them,
        /// so the next path lookup asks `wasi:filesystem/preopens` again.
        fn __wasilibc_reset_preopens();
    }
    // SAFETY: takes no arguments and only touches wasi-libc's own table,
    // under its lock; nothing here holds a descriptor from that table.
    unsafe { __wasilibc_reset_preopens() }
}

#[cfg(not(all(target_os = "wasi", target_env = "p2")))]
fn release_preopens() {}

impl<T> Default for PerInstance<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Number of elements a tensor of `dimensions` holds, or `None` on overflow.
pub fn element_count(dimensions: &[u32]) -> Option<usize> {
    dimensions
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
}

/// Glue every component needs around its own generated bindings: maps
/// [`Failure`] onto the WIT `error` and reads the stage's [`Config`].
///
/// Call it once at the crate root, after `wit_bindgen::generate!`.
#[macro_export]
macro_rules! component_glue {
    () => {
        impl From<$crate::Failure> for cascade::inference::types::Error {
            fn from(failure: $crate::Failure) -> Self {
                match failure {
                    $crate::Failure::InvalidInput(m) => Self::InvalidInput(m),
                    $crate::Failure::Internal(m) => Self::Internal(m),
                }
            }
        }

        /// This stage's configuration from `wasi:config/store`, checked against `known`.
        fn load_config(known: &[&str]) -> Result<$crate::Config, $crate::Failure> {
            let pairs = wasi::config::store::get_all()
                .map_err(|e| $crate::Failure::internal(format!("reading wasi:config: {e:?}")))?;
            $crate::Config::new(pairs, known)
        }
    };
}
