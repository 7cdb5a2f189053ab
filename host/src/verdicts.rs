//! Carries out what the functions' watches decide.
//!
//! - A rollback: the failing target goes to 0 % in the registry's split (a
//!   canary's share to the stable target), the host serves the new split,
//!   and says why in the log, the metrics and a
//!   `cascade.events.traffic.<name>` event. Mirrors copy the split like any
//!   other; a mirror itself does not roll back (its registry is read-only:
//!   its source's rule decides).
//! - A drift: a log line and a `cascade.events.drift.<name>` event, on
//!   every host (each watches the requests it serves).

use crate::events::{
    Action, DriftAction, DriftEvent, Events, RegistryEvent, TrafficAction, TrafficEvent,
};
use crate::operations::{DriftAlert, RollbackOrder, Verdict};
use crate::runtime::{PrepareError, Runtime};
use cascade_registry::RegistryError;
use cascade_registry::records::FunctionRecord;
use cascade_registry::traffic::Traffic;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// Why a rollback could not be carried out.
#[derive(Debug, thiserror::Error)]
enum RollbackError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error("the rollback task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Carries out `verdicts` until the runtime is gone; `read_only` on mirrors.
pub async fn carry_out(
    runtime: Arc<Runtime>,
    events: Events,
    mut verdicts: UnboundedReceiver<Verdict>,
    read_only: bool,
) {
    while let Some(verdict) = verdicts.recv().await {
        let order = match verdict {
            Verdict::Rollback(order) => order,
            Verdict::Drift(alert) => {
                announce_drift(&events, alert);
                continue;
            }
        };
        let RollbackOrder {
            function,
            revision,
            shadow,
            reason,
        } = &order;
        if read_only {
            tracing::warn!(function = %function, revision, "breached the rollback rule ({reason}), but this host is a mirror: its source decides");
            continue;
        }
        match roll_back(&runtime, &order).await {
            Ok(Some((traffic, head))) => {
                runtime
                    .metrics()
                    .rollbacks
                    .with_label_values(&[function, &revision.to_string()])
                    .inc();
                tracing::warn!(function = %function, revision, shadow, "rolled back to 0 %: {reason}");
                events.emit(RegistryEvent::function(Action::TrafficSet, &head));
                events.emit_traffic(TrafficEvent {
                    action: TrafficAction::RolledBack,
                    function: function.clone(),
                    revision: *revision,
                    shadow: *shadow,
                    reason: reason.clone(),
                    traffic,
                });
            }
            Ok(None) => {
                tracing::info!(function = %function, revision, "not rolled back: the split no longer sends it traffic");
            }
            Err(e) => {
                tracing::error!(function = %function, revision, "rolling back ({reason}) failed: {e}");
            }
        }
    }
}

/// Logs a drift (or its end) and announces it.
fn announce_drift(events: &Events, alert: DriftAlert) {
    let DriftAlert {
        function,
        revision,
        signal,
        score,
        threshold,
        drifted,
    } = alert;
    let action = if drifted {
        tracing::warn!(function = %function, revision, signal = %signal, score, threshold, "drifted from its reference: {signal} scores {score:.3}, above {threshold}");
        DriftAction::Drifted
    } else {
        tracing::info!(function = %function, revision, signal = %signal, score, threshold, "back near its reference: {signal} scores {score:.3}");
        DriftAction::Recovered
    };
    events.emit_drift(DriftEvent {
        action,
        function,
        revision,
        signal,
        score,
        threshold,
    });
}

/// Takes the order's target out of the stored split and serves the
/// result; `None` when the split no longer has it above 0 %.
async fn roll_back(
    runtime: &Arc<Runtime>,
    order: &RollbackOrder,
) -> Result<Option<(Traffic, FunctionRecord)>, RollbackError> {
    let (runtime, order) = (runtime.clone(), order.clone());
    tokio::task::spawn_blocking(move || {
        let registry = runtime.registry();
        let head = registry.function(&order.function)?.record;
        let traffic = registry.traffic(&order.function)?;
        let Some(index) = traffic.targets.iter().position(|t| {
            t.shadow == order.shadow
                && t.percent > 0
                && t.revision.resolve(head.revision) == order.revision
        }) else {
            return Ok(None);
        };
        let next = traffic.without(index);
        registry.set_traffic(&order.function, &next)?;
        runtime.refresh_split(&order.function)?;
        Ok(Some((next, head)))
    })
    .await?
}
