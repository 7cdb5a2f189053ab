//! Every NATS subject, queue group and service name Cascade uses, formatted
//! in this one place so hosts and tests never drift apart.

/// Queue group shared by every host serving `function`, so each message is
/// handled once.
pub fn queue_group(function: &str) -> String {
    format!("cascade.{function}")
}

/// The NATS micro service name of `function`.
pub fn service_name(function: &str) -> String {
    format!("cascade-{function}")
}

/// The micro service endpoint subject every function answers on.
pub fn endpoint_subject(function: &str) -> String {
    format!("cascade.fn.{function}")
}

/// Where failures of messages without a reply subject go.
pub fn errors_subject(subject: &str) -> String {
    format!("{subject}.errors")
}

/// Registry events: `cascade.events.registry.<kind>.<name>`.
pub fn registry_event(kind: &str, name: &str) -> String {
    format!("cascade.events.registry.{kind}.{name}")
}

/// Traffic events of a function (a target rolled back):
/// `cascade.events.traffic.<name>`.
pub fn traffic_event(name: &str) -> String {
    format!("cascade.events.traffic.{name}")
}

/// Drift events of a function: `cascade.events.drift.<name>`.
pub fn drift_event(name: &str) -> String {
    format!("cascade.events.drift.{name}")
}

/// Every registry event, for subscribers.
pub const REGISTRY_EVENTS: &str = "cascade.events.registry.>";

/// The header carrying a request id a caller chose (as over HTTP).
pub const REQUEST_ID: &str = "X-Request-Id";
/// The header carrying a message's content type.
pub const CONTENT_TYPE: &str = "Content-Type";
/// A request header naming a traffic target's tag (as `name@tag` over HTTP).
pub const TAG: &str = "Cascade-Tag";
/// The reply header naming the revision that answered.
pub const REVISION: &str = "Cascade-Revision";
/// The micro services convention's error code header.
pub const ERROR_CODE: &str = "Nats-Service-Error-Code";
/// The micro services convention's error message header.
pub const ERROR: &str = "Nats-Service-Error";
