//! The Open Inference Protocol (KServe v2), so Triton and KServe clients
//! work unchanged: every function is a model, its revisions the model's
//! versions.
//!
//! - [`rest`]: the `/v2` routes on the host's listener;
//! - [`grpc`]: `GRPCInferenceService` on its own port (`--grpc-listen`);
//! - [`infer`]: one inference, whichever transport brought it;
//! - [`codec`]: requests and responses, JSON and the binary tensor data extension;
//! - [`metadata`]: a function seen as a model (its inputs and outputs);
//! - [`datatypes`]: the protocol's datatypes and Cascade's tensor types.

pub mod codec;
pub mod datatypes;
pub mod grpc;
pub mod infer;
pub mod metadata;
pub mod rest;
