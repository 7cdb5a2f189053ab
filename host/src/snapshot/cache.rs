//! Where compiled snapshots are kept, and how they are made off the
//! request path.
//!
//! A snapshot depends on the component and on everything its `initialize`
//! could read: the stage's configuration, its model files and its memory
//! limit. It is compiled once and kept as
//! `DATA/compiled/snapshots/<component digest>-<grant key>-<engine>.cwasm`,
//! so a restarted host starts snapshotted instances at once. A missing one
//! is made in the [`Background`], one at a time at the lowest CPU priority
//! (it compiles the component twice), while the stage serves from the
//! plain component; then every stage waiting for it switches over.

use super::background::Background;
use super::snapshot;
use crate::engine::{ServingEngine, cache_component};
use crate::sandbox::Grant;
use crate::stage::ComponentStage;
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Told when a snapshot stage is ready: a pool switches its new instances over.
pub type Ready = Box<dyn Fn(Arc<ComponentStage>) + Send>;

/// The snapshots of one host.
pub struct Snapshots {
    dir: PathBuf,
    /// Snapshots being made, by file name, with who waits for each.
    making: Arc<Mutex<HashMap<String, Vec<Ready>>>>,
    /// Makes them one at a time, on cores nothing else wants.
    background: Background,
    /// `cascade_snapshots_total{outcome}`: made, cached, refused.
    outcomes: IntCounterVec,
}

/// What a stage starts its instances from.
pub enum Start {
    /// A snapshot compiled before.
    Snapshot(Arc<ComponentStage>),
    /// The plain component; a snapshot is being made for it.
    Component,
}

impl Snapshots {
    /// Snapshots kept under `dir`, counted in `outcomes`.
    pub fn new(dir: PathBuf, outcomes: IntCounterVec) -> Self {
        Snapshots {
            dir,
            making: Arc::new(Mutex::new(HashMap::new())),
            background: Background::start(),
            outcomes,
        }
    }

    /// The snapshot of `stage` (component `digest`, binary at `wasm`)
    /// under `grant` if one was made before; else starts making it and
    /// hands it to `ready` when done.
    pub fn start(
        &self,
        engine: &ServingEngine,
        stage: &Arc<ComponentStage>,
        digest: &str,
        wasm: &Path,
        grant: &Grant,
        ready: Ready,
    ) -> Start {
        let path = self
            .dir
            .join(engine.artifact_name(&format!("{digest}-{}", grant_key(grant))));
        if let Some(component) = engine.cached_component(&path) {
            match stage.snapshot_of(component) {
                Ok(snapshot) => {
                    self.outcomes.with_label_values(&["cached"]).inc();
                    return Start::Snapshot(Arc::new(snapshot));
                }
                Err(e) => tracing::warn!("linking snapshot {}: {e:#}", path.display()),
            }
        }
        let name = file_name(&path);
        {
            let mut making = self.making.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(waiting) = making.get_mut(&name) {
                waiting.push(ready);
                return Start::Component;
            }
            making.insert(name.clone(), vec![ready]);
        }
        let job = Job {
            stage: stage.clone(),
            wasm: wasm.to_path_buf(),
            grant: grant.clone(),
            path,
            name: name.clone(),
            making: self.making.clone(),
            outcomes: self.outcomes.clone(),
        };
        if !self.background.run(Box::new(move || job.run())) {
            self.making
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
        }
        Start::Component
    }

    /// Removes snapshots of components `live` no longer wants, of another
    /// engine configuration, and files a crash left half written (after
    /// an hour: a job may be writing one now).
    pub fn collect(&self, engine: &ServingEngine, live: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && !abandoned(&entry) {
                continue; // a snapshot being written now
            }
            let current = engine.is_current_artifact(&name, |stem| {
                stem.rsplit_once('-')
                    .is_some_and(|(digest, _key)| live(digest))
            });
            if !current && let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("removing snapshot {name}: {e}");
            }
        }
    }
}

/// A snapshot to make, in the background.
struct Job {
    stage: Arc<ComponentStage>,
    wasm: PathBuf,
    grant: Grant,
    path: PathBuf,
    name: String,
    making: Arc<Mutex<HashMap<String, Vec<Ready>>>>,
    outcomes: IntCounterVec,
}

impl Job {
    fn run(self) {
        let made = self.make();
        let waiting = self
            .making
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name)
            .unwrap_or_default();
        match made {
            Ok(snapshot) => {
                self.outcomes.with_label_values(&["made"]).inc();
                tracing::info!(
                    stage = %self.grant.log_tag,
                    "snapshot made; new instances start from it"
                );
                for ready in waiting {
                    ready(snapshot.clone());
                }
            }
            Err(e) => {
                self.outcomes.with_label_values(&["refused"]).inc();
                tracing::warn!(
                    stage = %self.grant.log_tag,
                    "no snapshot, instances start from the component: {e:#}"
                );
            }
        }
    }

    fn make(&self) -> anyhow::Result<Arc<ComponentStage>> {
        let wasm = std::fs::read(&self.wasm)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let rewritten = runtime.block_on(snapshot(&self.stage, &wasm, &self.grant))?;
        let component = wasmtime::component::Component::new(self.stage.engine(), &rewritten)
            .map_err(|e| anyhow::anyhow!("compiling the snapshot: {e:#}"))?;
        cache_component(&component, &self.path)
            .map_err(|e| anyhow::anyhow!("saving the snapshot: {e:#}"))?;
        let stage = self
            .stage
            .snapshot_of(component)
            .map_err(|e| anyhow::anyhow!("linking the snapshot: {e:#}"))?;
        Ok(Arc::new(stage))
    }
}

/// Names what `initialize` could read under `grant`: configuration, model
/// files (by the package's digest) and the memory limit. Hex, 16 digits.
fn grant_key(grant: &Grant) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in &grant.config {
        for part in [key.as_bytes(), value.as_bytes()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    hasher.update([0xff]);
    // The package's digest, which names its directory: the same files
    // wherever the data directory is.
    if let Some(package) = grant.model_dir.as_deref().and_then(Path::file_name) {
        hasher.update(package.as_encoded_bytes());
    }
    hasher.update([0xff]);
    hasher.update((grant.memory_bytes as u64).to_le_bytes());
    hex::encode(&hasher.finalize()[..8])
}

/// Whether a half-written file is old enough that no job still writes it.
fn abandoned(entry: &std::fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_none_or(|age| age > std::time::Duration::from_secs(3600))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_what_initialize_could_read() {
        let base = Grant::default();
        let key = grant_key(&base);
        assert_eq!(key.len(), 16);
        assert_eq!(key, grant_key(&base.clone()));
        let mut config = base.clone();
        config.config.insert("max_length".into(), "64".into());
        let mut files = base.clone();
        files.model_dir = Some(PathBuf::from("/data/packages/abc"));
        let mut memory = base.clone();
        memory.memory_bytes *= 2;
        let mut tag = base.clone();
        tag.log_tag = "other/stage".into();
        let mut moved = files.clone();
        moved.model_dir = Some(PathBuf::from("/elsewhere/packages/abc"));
        for changed in [&config, &files, &memory] {
            assert_ne!(grant_key(changed), key);
        }
        assert_eq!(grant_key(&tag), key, "the log tag is not read by the guest");
        assert_eq!(
            grant_key(&moved),
            grant_key(&files),
            "the guest sees the same files in a moved data directory"
        );
    }

    #[test]
    fn config_pairs_cannot_run_into_each_other() {
        let mut a = Grant::default();
        a.config.insert("ab".into(), "c".into());
        let mut b = Grant::default();
        b.config.insert("a".into(), "bc".into());
        assert_ne!(grant_key(&a), grant_key(&b));
    }
}
