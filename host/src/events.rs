//! Registry events: what changed in the registry (a publish, a delete, a
//! rollback), announced on `cascade.events.registry.<kind>.<name>` so
//! mirrors and operators follow changes as they happen.

use crate::trigger::subjects;
use async_nats::Client;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use cascade_registry::traffic::Traffic;
use serde::Serialize;

/// What kind of artifact changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A component version.
    Component,
    /// A model version.
    Model,
    /// A function (a revision of it).
    Function,
}

impl ArtifactKind {
    /// As the event subject spells it.
    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Component => "component",
            ArtifactKind::Model => "model",
            ArtifactKind::Function => "function",
        }
    }
}

/// What happened to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Newly published (identical re-publishes announce nothing).
    Published,
    /// Deleted.
    Deleted,
    /// A function's earlier revision is served again.
    RolledBack,
    /// A function's traffic split changed.
    TrafficSet,
}

/// What the registry announces on every publish, delete and rollback.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegistryEvent {
    /// What kind of artifact.
    pub kind: ArtifactKind,
    /// What changed.
    pub action: Action,
    /// Artifact name.
    pub name: String,
    /// Component or model version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Function revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Digest of what was published or deleted.
    pub digest: String,
}

impl RegistryEvent {
    /// A component version published or deleted.
    pub fn component(action: Action, record: &ComponentRecord) -> Self {
        RegistryEvent {
            kind: ArtifactKind::Component,
            action,
            name: record.name.clone(),
            version: Some(record.version.clone()),
            revision: None,
            digest: record.digest.clone(),
        }
    }

    /// A model version published or deleted (its package digest).
    pub fn model(action: Action, record: &ModelRecord) -> Self {
        RegistryEvent {
            kind: ArtifactKind::Model,
            action,
            name: record.name.clone(),
            version: Some(record.version.clone()),
            revision: None,
            digest: record.package_digest.clone(),
        }
    }

    /// A function revision published, rolled back to, or (the last one) deleted.
    pub fn function(action: Action, record: &FunctionRecord) -> Self {
        RegistryEvent {
            kind: ArtifactKind::Function,
            action,
            name: record.name.clone(),
            version: None,
            revision: Some(record.revision),
            digest: record.digest.clone(),
        }
    }
}

/// What happened to a function's traffic split on its own, announced on
/// `cascade.events.traffic.<name>`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrafficEvent {
    /// Always `rolled-back`: a target was taken out by the rollback rule.
    pub action: TrafficAction,
    /// The function.
    pub function: String,
    /// The revision the target served.
    pub revision: u64,
    /// Whether the target was a shadow.
    pub shadow: bool,
    /// What it breached.
    pub reason: String,
    /// The split now served.
    pub traffic: Traffic,
}

/// What happened to a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrafficAction {
    /// A target was routed to 0 % by the rollback rule.
    RolledBack,
}

/// A signal of a function's revision that drifted from its reference (or
/// came back), announced on `cascade.events.drift.<name>`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DriftEvent {
    /// Drifted or recovered.
    pub action: DriftAction,
    /// The function.
    pub function: String,
    /// The revision.
    pub revision: u64,
    /// The signal, e.g. `input_ids.mean` or `output.class`.
    pub signal: String,
    /// Its drift score (population stability index).
    pub score: f64,
    /// The manifest's threshold.
    pub threshold: f64,
}

/// Which way a drift score crossed its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftAction {
    /// It rose above the threshold.
    Drifted,
    /// It fell back below 80 % of it.
    Recovered,
}

/// Publishes registry events when NATS is configured.
#[derive(Clone, Default)]
pub struct Events {
    client: Option<Client>,
}

impl Events {
    /// Events through `client`.
    pub fn new(client: Option<Client>) -> Self {
        Events { client }
    }

    /// Announces `event` (fire and forget; a host without NATS does nothing).
    pub fn emit(&self, event: RegistryEvent) {
        let subject = subjects::registry_event(event.kind.name(), &event.name);
        self.send(subject, event);
    }

    /// Announces a traffic event.
    pub fn emit_traffic(&self, event: TrafficEvent) {
        self.send(subjects::traffic_event(&event.function), event);
    }

    /// Announces a drift event.
    pub fn emit_drift(&self, event: DriftEvent) {
        self.send(subjects::drift_event(&event.function), event);
    }

    fn send(&self, subject: String, event: impl Serialize + Send + 'static) {
        let Some(client) = self.client.clone() else {
            return;
        };
        tokio::spawn(async move {
            match serde_json::to_vec(&event) {
                Ok(payload) => {
                    if let Err(e) = client.publish(subject, payload.into()).await {
                        tracing::warn!("publishing an event: {e}");
                    }
                }
                Err(e) => tracing::warn!("encoding an event: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_wire_form() {
        let record = FunctionRecord {
            name: "embed".into(),
            revision: 3,
            digest: "abc".into(),
            manifest: String::new(),
            uses: Vec::new(),
            published_at: 0,
        };
        let event = RegistryEvent::function(Action::RolledBack, &record);
        assert_eq!(
            serde_json::to_value(&event).expect("json"),
            serde_json::json!({
                "kind": "function", "action": "rolled-back", "name": "embed",
                "revision": 3, "digest": "abc"
            })
        );
    }
}
