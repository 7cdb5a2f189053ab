//! The Cascade registry: it answers "what is function X, component Y, model Z"
//! and nothing else. Storage, validation and the manifest types arrive with
//! the Registry issue; this crate holds the place in the workspace layout.
#![warn(missing_docs)]
