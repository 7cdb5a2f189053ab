//! The registry's HTTP routes: read, delete and roll back components,
//! models and functions, and hand publishing to [`crate::publish`]. Every
//! change is announced as a [`RegistryEvent`].

use crate::events::{Action, RegistryEvent};
use crate::http::{ApiError, Body, HttpState, blocking, file, full, json, read_body};
use crate::publish;
use crate::routes::{Matched, Route};
use cascade_registry::names::{Name, Reference};
use cascade_registry::traffic::Traffic;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

/// Serves the registry's routes (`/v1/components`, `/v1/models`, `/v1/functions`).
pub async fn route(
    state: &Arc<HttpState>,
    matched: &Matched<'_>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match (matched.route, matched.params.as_slice()) {
        (Route::PublishComponent, [name, version]) => {
            publish::component(state, reference(name, version)?, request).await
        }
        (Route::PublishModel, [name, version]) => {
            publish::model(state, reference(name, version)?, request).await
        }
        (Route::PublishFunction, [name]) => publish::function(state, name, request).await,
        (Route::Rollback, [name]) => rollback(state, name, request).await,
        (Route::SetTraffic, [name]) => set_traffic(state, name, request).await,
        (Route::Traffic, [name]) => traffic(state, name).await,
        (route, [name, version]) if is_component(route) => {
            component(state, route, reference(name, version)?).await
        }
        (route, [name, version, ..]) if is_model(route) => {
            model(state, route, reference(name, version)?, matched.param(2)).await
        }
        (route, params) => read_or_delete(state, route, params).await,
    }
}

fn is_component(route: Route) -> bool {
    matches!(
        route,
        Route::Component | Route::ComponentContent | Route::DeleteComponent
    )
}

fn is_model(route: Route) -> bool {
    matches!(
        route,
        Route::Model | Route::ModelContent | Route::ModelFile | Route::DeleteModel
    )
}

/// Routes on one component version.
async fn component(
    state: &Arc<HttpState>,
    route: Route,
    reference: Reference,
) -> Result<Response<Body>, ApiError> {
    let registry = &state.runtime.registry();
    match route {
        Route::ComponentContent => {
            let record = registry.component(&reference)?;
            file(&registry.blob_path(&record.digest), "application/wasm").await
        }
        Route::DeleteComponent => {
            let decided = match &state.cluster {
                Some(cluster) => Some(cluster.store()?.delete_component(&reference).await?),
                None => None,
            };
            let runtime = state.runtime.clone();
            let record = blocking(move || {
                let local = runtime.registry().delete_component(&reference);
                runtime.collect_compiled();
                decided_or_local(decided, local)
            })
            .await??;
            state.settle_cluster().await;
            state
                .events
                .emit(RegistryEvent::component(Action::Deleted, &record));
            ok(&record)
        }
        _ => ok(&registry.component(&reference)?),
    }
}

/// Routes on one model version (`file`: the extra file asked for, if any).
async fn model(
    state: &Arc<HttpState>,
    route: Route,
    reference: Reference,
    file_name: &str,
) -> Result<Response<Body>, ApiError> {
    let registry = &state.runtime.registry();
    match route {
        Route::ModelContent => {
            let record = registry.model(&reference)?;
            file(&registry.blob_path(&record.digest), OCTETS).await
        }
        Route::ModelFile => {
            let record = registry.model(&reference)?;
            let found = record
                .files
                .iter()
                .find(|f| f.name == file_name)
                .ok_or_else(|| {
                    ApiError::not_found(format!("model {reference} has no file {file_name:?}"))
                })?;
            file(&registry.blob_path(&found.digest), OCTETS).await
        }
        Route::DeleteModel => {
            let decided = match &state.cluster {
                Some(cluster) => Some(cluster.store()?.delete_model(&reference).await?),
                None => None,
            };
            let registry = Arc::clone(registry);
            let record =
                blocking(move || decided_or_local(decided, registry.delete_model(&reference)))
                    .await??;
            state.settle_cluster().await;
            state
                .events
                .emit(RegistryEvent::model(Action::Deleted, &record));
            ok(&record)
        }
        _ => ok(&registry.model(&reference)?),
    }
}

const OCTETS: &str = "application/octet-stream";

/// Listings, versions, function revisions and function deletes.
async fn read_or_delete(
    state: &Arc<HttpState>,
    route: Route,
    params: &[&str],
) -> Result<Response<Body>, ApiError> {
    let registry = &state.runtime.registry();
    match (route, params) {
        (Route::ListComponents, []) => ok(&registry.components()?),
        (Route::ComponentVersions, [name]) => ok(&registry.component_versions(&name.parse()?)?),
        (Route::ListModels, []) => ok(&registry.models()?),
        (Route::ModelVersions, [name]) => ok(&registry.model_versions(&name.parse()?)?),
        (Route::ListFunctions, []) => ok(&registry.functions()?),
        (Route::Function, [name]) => ok(&registry.function(name)?),
        (Route::FunctionRevisions, [name]) => ok(&registry.function_revisions(name)?),
        (Route::FunctionRevision, [name, revision]) => {
            ok(&registry.function_revision(name, revision_number(revision)?)?)
        }
        (Route::FunctionManifest, [name, revision]) => {
            let revision = registry.function_revision(name, revision_number(revision)?)?;
            let mut response = Response::new(full(revision.record.manifest));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/toml"));
            Ok(response)
        }
        (Route::DeleteFunction, [name]) => delete_function(state, name).await,
        (route, params) => Err(ApiError::internal(format!(
            "route {route:?} with parameters {params:?} reached the registry API"
        ))),
    }
}

async fn delete_function(state: &Arc<HttpState>, name: &str) -> Result<Response<Body>, ApiError> {
    let decided = match &state.cluster {
        Some(cluster) => Some(cluster.store()?.delete_function(name).await?),
        None => None,
    };
    let (runtime, name) = (state.runtime.clone(), name.to_string());
    let removed = blocking(move || {
        let removed = runtime.registry().delete_function(&name);
        let _ = runtime.reload(&name);
        removed
    })
    .await?;
    state.settle_cluster().await;
    if let Ok(Some(last)) = removed.as_ref().map(|r| r.last()) {
        state
            .events
            .emit(RegistryEvent::function(Action::Deleted, &last.record));
    }
    let revisions: Vec<u64> = match decided {
        // This host may not have held every revision the cluster had.
        Some(numbers) => numbers,
        None => removed?.iter().map(|r| r.record.revision).collect(),
    };
    ok(&serde_json::json!({ "deleted": revisions }))
}

/// The record a delete removed: the cluster's when it decided (this host
/// may not have had the artifact yet), else this host's.
fn decided_or_local<R>(
    decided: Option<R>,
    local: Result<R, cascade_registry::RegistryError>,
) -> Result<R, ApiError> {
    match (decided, local) {
        (Some(record), Ok(_) | Err(cascade_registry::RegistryError::NotFound(_))) => Ok(record),
        (_, Err(e)) => Err(e.into()),
        (None, Ok(record)) => Ok(record),
    }
}

async fn rollback(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Rollback {
        revision: u64,
    }
    let body = read_body(request.into_body(), 4096).await?;
    let Rollback { revision } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("expected JSON {{\"revision\": N}}: {e}")))?;
    let decided = match &state.cluster {
        Some(cluster) => Some(cluster.store()?.rollback(name, revision).await?),
        None => None,
    };
    let (runtime, name) = (state.runtime.clone(), name.to_string());
    let record = blocking(move || {
        let registry = runtime.registry();
        let record = match decided {
            Some(record) => {
                registry.mirror_revision(&record, true)?;
                registry.function(&name)?
            }
            None => registry.rollback(&name, revision)?,
        };
        runtime.reload(&name).map_err(ApiError::internal)?;
        Ok::<_, ApiError>(record)
    })
    .await??;
    state.settle_cluster().await;
    state
        .events
        .emit(RegistryEvent::function(Action::RolledBack, &record.record));
    ok(&record)
}

/// Largest traffic split accepted, in bytes.
const MAX_TRAFFIC_BYTES: u64 = 16 * 1024;

/// `PUT /v1/functions/{name}/traffic`: stores the split (checked against
/// the function's revisions) and serves it at once.
async fn set_traffic(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(request.into_body(), MAX_TRAFFIC_BYTES).await?;
    let split: Traffic = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "expected JSON {{\"targets\": [{{\"revision\": N or \"latest\", \"percent\": P, \"tag\": T, \"shadow\": B}}], \"sticky_header\": H, \"rollback\": R}}: {e}"
        ))
    })?;
    let named = match &state.cluster {
        Some(cluster) => cluster.store()?.set_traffic(name, &split).await?,
        None => Vec::new(),
    };
    let (runtime, function) = (state.runtime.clone(), name.to_string());
    let head = blocking(move || {
        for record in &named {
            runtime.registry().mirror_revision(record, false)?;
        }
        runtime.registry().set_traffic(&function, &split)?;
        runtime
            .refresh_split(&function)
            .map_err(ApiError::internal)?;
        Ok::<_, ApiError>(runtime.registry().function(&function)?)
    })
    .await??;
    state.settle_cluster().await;
    state
        .events
        .emit(RegistryEvent::function(Action::TrafficSet, &head.record));
    traffic(state, name).await
}

/// `GET /v1/functions/{name}/traffic`: the split, each target's revision
/// resolved (`latest` is the head).
async fn traffic(state: &Arc<HttpState>, name: &str) -> Result<Response<Body>, ApiError> {
    let registry = state.runtime.registry().clone();
    let name = name.to_string();
    let (head, split) = blocking(move || {
        let head = registry.function(&name)?.record.revision;
        Ok::<_, ApiError>((head, registry.traffic(&name)?))
    })
    .await??;
    let targets: Vec<serde_json::Value> = split
        .targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "revision": t.revision,
                "serves": t.revision.resolve(head),
                "percent": t.percent,
                "tag": t.tag,
                "shadow": t.shadow,
            })
        })
        .collect();
    ok(&serde_json::json!({
        "head": head,
        "targets": targets,
        "sticky_header": split.sticky_header,
        "rollback": split.rollback,
        // As stored, for mirrors to copy.
        "split": split,
    }))
}

fn ok(value: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, value))
}

fn reference(name: &str, version: &str) -> Result<Reference, ApiError> {
    let name: Name = name.parse()?;
    Ok(Reference::new(name, version.parse()?))
}

fn revision_number(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::invalid(format!("invalid revision {text:?}: expected a number")))
}
