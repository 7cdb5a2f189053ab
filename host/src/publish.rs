//! Publishing: uploads stream to disk, and each artifact is checked before
//! the registry stores it — a component compiles, links and has one
//! Cascade world; a model parses and optimises; a manifest is parsed, once,
//! into the typed function the registry stores and the host serves.

use crate::capacity::Footprint;
use crate::events::{Action, RegistryEvent};
use crate::http::{ApiError, Body, HttpState, blocking, check_length, json, read_body};
use crate::model;
use crate::stage::{self, World};
use cascade_registry::blobs::StagedBlob;
use cascade_registry::names::Reference;
use cascade_registry::records::Use;
use cascade_registry::{ModelPackage, PACKAGE_MODEL_FILE};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Streams the request body into a staged blob, hashing as it goes.
async fn stage_body(state: &HttpState, request: Request<Incoming>) -> Result<StagedBlob, ApiError> {
    if let Err(refused) = check_length(&request, state.max_upload) {
        return Err(refused.refusing(request.into_body()));
    }
    let mut writer = state.runtime.registry().stage(state.max_upload)?;
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data()
            && let Err(e) = tokio::task::block_in_place(|| writer.write_chunk(&data))
        {
            return Err(ApiError::from(e).refusing(body));
        }
    }
    Ok(tokio::task::block_in_place(|| writer.finish())?)
}

fn created(created: bool, value: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    Ok(json(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        value,
    ))
}

/// `PUT /v1/components/{name}/{version}`.
pub async fn component(
    state: &Arc<HttpState>,
    reference: Reference,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let staged = stage_body(state, request).await?;
    let runtime = state.runtime.clone();
    let (staged, world, footprint) = blocking(move || {
        let world = component_world(&runtime, &staged)?;
        let bytes = std::fs::read(staged.path()).map_err(ApiError::internal)?;
        let footprint = Footprint::of(&bytes).map_err(ApiError::invalid)?;
        Ok::<_, ApiError>((staged, world, footprint))
    })
    .await??;
    let published = match &state.cluster {
        Some(cluster) => {
            let storing = cluster.in_flight.hold(Use::Component(reference.clone()));
            let published = cluster
                .store()?
                .publish_component(&reference, &staged, world)
                .await?;
            let registry = state.runtime.registry().clone();
            blocking(move || registry.mirror_component(&reference, staged, world)).await??;
            drop(storing);
            state.settle_cluster().await;
            published
        }
        None => {
            let registry = state.runtime.registry().clone();
            blocking(move || registry.publish_component(&reference, staged, world)).await??
        }
    };
    if published.created {
        state.events.emit(RegistryEvent::component(
            Action::Published,
            &published.record,
        ));
    }
    // What one instance takes from a host's pools, for sizing `--max-instances`.
    let mut body = serde_json::to_value(&published.record).map_err(ApiError::internal)?;
    body["footprint"] = serde_json::to_value(footprint).map_err(ApiError::internal)?;
    created(published.created, &body)
}

/// Checks that the bytes are a component of a Cascade world (compiling it
/// into the artifact cache on the way).
fn component_world(
    runtime: &crate::runtime::Runtime,
    staged: &StagedBlob,
) -> Result<World, ApiError> {
    let mut header = [0u8; 8];
    let read = std::fs::File::open(staged.path())
        .and_then(|mut f| std::io::Read::read(&mut f, &mut header))
        .map_err(ApiError::internal)?;
    if read < 8 || &header[..4] != b"\0asm" {
        return Err(ApiError::invalid(
            "not WebAssembly: the body does not start with the \\0asm magic",
        ));
    }
    if header[4..8] == [1, 0, 0, 0] {
        return Err(ApiError::invalid(
            "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
             (or wrap it with `wasm-tools component new`) and export a cascade:inference world",
        ));
    }
    let (component, cached) = runtime
        .engine()
        .load_component(staged.path(), &staged.digest, runtime.compiled_dir())
        .map_err(|e| ApiError::invalid(format!("invalid component: {e:#}")))?;
    runtime.count_load(cached);
    let engine = runtime.engine().engine();
    let world = stage::world_of(&component, engine).map_err(ApiError::invalid)?;
    stage::check_imports(world, &component, engine)
        .map_err(|e| ApiError::invalid(format!("invalid component: {e}")))?;
    Ok(world)
}

/// `PUT /v1/models/{name}/{version}`: an ONNX file, or a package tar.
pub async fn model(
    state: &Arc<HttpState>,
    reference: Reference,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let is_tar = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-tar"));
    let shapes = input_shapes(request.uri().query().unwrap_or(""))?;
    let staged = stage_body(state, request).await?;
    let runtime = state.runtime.clone();
    let max_upload = state.max_upload;
    let package = blocking(move || {
        let (model, files) = if is_tar {
            unpack_package(runtime.registry(), staged.path(), max_upload)?
        } else {
            (staged, Vec::new())
        };
        let signature = model::inspect(model.path(), &shapes)
            .map_err(|e| ApiError::invalid(format!("invalid ONNX model: {e}")))?;
        Ok::<_, ApiError>(ModelPackage {
            model,
            files,
            input_shapes: shapes,
            signature,
        })
    })
    .await??;
    let registry = state.runtime.registry().clone();
    let published = match &state.cluster {
        Some(cluster) => {
            let storing = cluster.in_flight.hold(Use::Model(reference.clone()));
            let published = cluster.store()?.publish_model(&reference, &package).await?;
            blocking(move || registry.mirror_model(&reference, package)).await??;
            drop(storing);
            state.settle_cluster().await;
            published
        }
        None => blocking(move || registry.publish_model(&reference, package)).await??,
    };
    created(published.created, &published.record)
}

/// `input_shape=x:N,3,48,192` query parameters (repeatable).
fn input_shapes(query: &str) -> Result<model::InputShapes, ApiError> {
    let mut shapes = model::InputShapes::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some(value) = pair.strip_prefix("input_shape=") else {
            return Err(ApiError::invalid(format!(
                "unknown query parameter {pair:?}"
            )));
        };
        let value = value
            .replace("%3A", ":")
            .replace("%3a", ":")
            .replace("%2C", ",")
            .replace("%2c", ",");
        let (name, dims) = value.split_once(':').ok_or_else(|| {
            ApiError::invalid(format!("input_shape {value:?}: expected NAME:D1,D2,..."))
        })?;
        let dims: Vec<String> = dims.split(',').map(|d| d.trim().to_string()).collect();
        if dims
            .iter()
            .any(|d| d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ApiError::invalid(format!(
                "input_shape {value:?}: dimensions are numbers or names"
            )));
        }
        shapes.insert(name.to_string(), dims);
    }
    Ok(shapes)
}

/// Splits a package tar into the model and its named files.
fn unpack_package(
    registry: &cascade_registry::Registry,
    tar: &std::path::Path,
    limit: u64,
) -> Result<(StagedBlob, Vec<(String, StagedBlob)>), ApiError> {
    let bad = |e: std::io::Error| ApiError::invalid(format!("invalid package tar: {e}"));
    let mut archive = tar::Archive::new(std::fs::File::open(tar).map_err(ApiError::internal)?);
    let mut model = None;
    let mut files = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").to_string();
        let mut writer = registry.stage(limit)?;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let read = std::io::Read::read(&mut entry, &mut chunk).map_err(bad)?;
            if read == 0 {
                break;
            }
            // Registry errors keep their status: 413 over the limit, 507 on a full disk.
            writer.write_chunk(&chunk[..read])?;
        }
        let staged = writer.finish()?;
        if name == PACKAGE_MODEL_FILE {
            model = Some(staged);
        } else {
            files.push((name, staged));
        }
    }
    let model = model
        .ok_or_else(|| ApiError::invalid(format!("the package tar has no {PACKAGE_MODEL_FILE}")))?;
    Ok((model, files))
}

/// `PUT /v1/functions/{name}`: a manifest, stored as the next revision
/// and served at once.
pub async fn function(
    state: &Arc<HttpState>,
    name: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if let Err(refused) = check_length(&request, MAX_MANIFEST_BYTES) {
        return Err(refused.refusing(request.into_body()));
    }
    let body = read_body(request.into_body(), MAX_MANIFEST_BYTES).await?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::invalid("the manifest is not UTF-8"))?;
    let manifest = cascade_registry::manifest::parse(&text)?;
    if manifest.function.name.as_str() != name {
        return Err(ApiError::invalid(format!(
            "the manifest names function {:?} but was sent to /v1/functions/{name}",
            manifest.function.name.as_str()
        )));
    }
    let published = match &state.cluster {
        Some(cluster) => publish_to_cluster(state, cluster, manifest).await?,
        None => {
            let runtime = state.runtime.clone();
            blocking(move || {
                check_durable_is_free(runtime.registry(), &manifest.function)?;
                Ok::<_, ApiError>(runtime.registry().publish_function(&manifest)?)
            })
            .await??
        }
    };
    let (runtime, revision) = (state.runtime.clone(), published.record.clone());
    let served = blocking(move || runtime.serve(&revision)).await?;
    if published.created {
        state.events.emit(RegistryEvent::function(
            Action::Published,
            &published.record.record,
        ));
    }
    let mut body = serde_json::to_value(&published.record).map_err(ApiError::internal)?;
    if let Err(e) = served {
        body["warning"] = format!("published, but the host cannot serve it: {e}").into();
    }
    created(published.created, &body)
}

/// How long a function publish waits for the stages it names to reach
/// this host from the cluster (published on another host a moment ago).
const STAGES_ARRIVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Publishes a function through the cluster registry: checked here, numbered
/// there, then stored here.
async fn publish_to_cluster(
    state: &Arc<HttpState>,
    cluster: &crate::cluster::Cluster,
    manifest: cascade_registry::manifest::Manifest,
) -> Result<cascade_registry::Published<cascade_registry::records::Revision>, ApiError> {
    let store = cluster.store()?;
    let registry = state.runtime.registry().clone();
    let manifest = Arc::new(manifest);
    let deadline = tokio::time::Instant::now() + STAGES_ARRIVE_WITHIN;
    let prepared = loop {
        let (registry, manifest) = (registry.clone(), manifest.clone());
        let prepared = blocking(move || {
            check_durable_is_free(&registry, &manifest.function)?;
            Ok::<_, ApiError>(registry.prepare_function(&manifest, 0)?)
        })
        .await?;
        match prepared {
            Err(e)
                if e.status == StatusCode::NOT_FOUND && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => break other?,
        }
    };
    let published = store.publish_function(prepared).await?;
    let record = published.record.record.clone();
    blocking(move || registry.mirror_revision(&record, true)).await??;
    state.settle_cluster().await;
    Ok(published)
}

/// Two functions reading one durable consumer would each get the other's
/// messages: a JetStream trigger's stream and durable belong to one function.
/// (Checked against the functions stored when the publish starts.)
fn check_durable_is_free(
    registry: &cascade_registry::Registry,
    function: &cascade_registry::manifest::Function,
) -> Result<(), ApiError> {
    let Some(wanted) = &function.triggers.jetstream else {
        return Ok(());
    };
    for other in registry.functions()? {
        let taken = other.function.name != function.name
            && other
                .function
                .triggers
                .jetstream
                .as_ref()
                .is_some_and(|t| t.stream == wanted.stream && t.durable == wanted.durable);
        if taken {
            return Err(ApiError::new(
                hyper::StatusCode::CONFLICT,
                "conflict",
                format!(
                    "`triggers.jetstream.durable` {:?} on stream {:?} already feeds function {}; \
                     each function needs a durable of its own",
                    wanted.durable,
                    wanted.stream,
                    other.function.name.as_str()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Unpacked = Result<(StagedBlob, Vec<(String, StagedBlob)>), ApiError>;

    /// The package in `bytes`, unpacked into a registry in a directory
    /// that lives as long as the staged files are looked at.
    fn unpacked(bytes: &[u8]) -> (tempfile::TempDir, Unpacked) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = cascade_registry::Registry::open(dir.path()).expect("registry");
        let tar = dir.path().join("upload.tar");
        std::fs::write(&tar, bytes).expect("write");
        let unpacked = unpack_package(&registry, &tar, 1 << 20);
        (dir, unpacked)
    }

    proptest! {
        #[test]
        fn any_bytes_are_a_package_or_a_400(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            if let (_, Err(e)) = unpacked(&bytes) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
            }
        }

        #[test]
        fn any_tar_of_files_keeps_every_byte_or_is_a_400(
            entries in proptest::collection::vec(
                ("(model\\.onnx|[a-z./ ]{1,12})", proptest::collection::vec(any::<u8>(), 0..200)),
                0..5,
            ),
        ) {
            let mut builder = tar::Builder::new(Vec::new());
            for (name, data) in &entries {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                if header.set_path(name).is_err() {
                    return Ok(());
                }
                header.set_cksum();
                builder.append(&header, data.as_slice()).expect("append");
            }
            let bytes = builder.into_inner().expect("tar");
            let (_dir, unpacked) = unpacked(&bytes);
            match unpacked {
                Ok((model, files)) => {
                    let (_, data) = entries
                        .iter()
                        .rev()
                        .find(|(name, _)| name.trim_start_matches("./") == PACKAGE_MODEL_FILE)
                        .expect("a model entry");
                    prop_assert_eq!(std::fs::read(model.path()).expect("model"), data.clone());
                    prop_assert!(files.len() < entries.len());
                }
                Err(e) => prop_assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message),
            }
        }
    }
}
