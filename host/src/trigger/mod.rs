//! Triggers: how requests reach functions. Each trigger turns its own wire
//! format into an invocation and maps [`crate::error::InvokeError`] back.

pub mod http;
pub mod jetstream;
pub mod nats;
pub mod subjects;
