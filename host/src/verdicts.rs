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
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Who decides a rollback: this host's registry, the cluster's (every host
/// may order it; the split's compare-and-set lets one through), or nobody
/// here (a mirror: its source's rule decides).
#[derive(Clone)]
pub enum Decider {
    /// This host's registry is the registry of record.
    Local,
    /// The cluster's buckets are.
    Cluster(Arc<crate::cluster::Cluster>),
    /// A mirror of another host.
    Mirror,
}

/// Carries out `verdicts` until the runtime is gone.
pub async fn carry_out(
    runtime: Arc<Runtime>,
    events: Events,
    mut verdicts: UnboundedReceiver<Verdict>,
    decider: Decider,
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
        if matches!(decider, Decider::Mirror) {
            tracing::warn!(function = %function, revision, "breached the rollback rule ({reason}), but this host is a mirror: its source decides");
            continue;
        }
        match roll_back(&runtime, &order, &decider).await {
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
    decider: &Decider,
) -> Result<Option<(Traffic, FunctionRecord)>, RollbackError> {
    let (reader, read) = (runtime.clone(), order.clone());
    let planned = tokio::task::spawn_blocking(move || {
        let registry = reader.registry();
        let head = registry.function(&read.function)?.record;
        let traffic = registry.traffic(&read.function)?;
        let Some(index) = traffic.targets.iter().position(|t| {
            t.shadow == read.shadow
                && t.percent > 0
                && t.revision.resolve(head.revision) == read.revision
        }) else {
            return Ok::<_, RollbackError>(None);
        };
        Ok(Some((traffic.without(index), head)))
    })
    .await??;
    let Some((next, head)) = planned else {
        return Ok(None);
    };
    if let Decider::Cluster(cluster) = decider {
        cluster.store()?.set_traffic(&order.function, &next).await?;
    }
    let (runtime, function, stored) = (runtime.clone(), order.function.clone(), next.clone());
    tokio::task::spawn_blocking(move || {
        runtime.registry().set_traffic(&function, &stored)?;
        runtime.refresh_split(&function)?;
        Ok::<_, RollbackError>(())
    })
    .await??;
    Ok(Some((next, head)))
}
