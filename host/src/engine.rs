//! The one wasmtime `Engine` of a host, configured for serving: component
//! model, pooling allocator, epoch interruption. Every engine setting lives
//! here, so compiled artifacts stay compatible across the host.

use crate::capacity::{Capacity, Footprint};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::Result;
use wasmtime::component::Component;
use wasmtime::error::Context;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the granularity of call deadlines, and how
/// long a guest runs before it yields to the reactor.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Capacity of the engine, fixed at start-up.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Component instances alive at once across all functions.
    pub max_instances: u32,
    /// Largest linear memory any instance may grow to, in MiB; functions set
    /// lower limits of their own.
    pub max_memory_mb: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_instances: 256,
            max_memory_mb: 1024,
        }
    }
}

/// Pool slots per component instance a host promises: room for components
/// that are not Rust (componentize-py's Python holds 14 core instances).
const CORE_INSTANCES_EACH: u32 = 16;
const MEMORIES_EACH: u32 = 2;
const TABLES_EACH: u32 = 16;

/// A wasmtime engine plus the thread that advances its epoch.
pub struct ServingEngine {
    engine: Engine,
    capacity: Arc<Capacity>,
    ticker: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl ServingEngine {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(settings: &EngineSettings) -> Result<Self> {
        let engine = Engine::new(&config(settings)?).context("creating the wasmtime engine")?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cascade-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .context("starting the epoch thread")?
        };
        Ok(ServingEngine {
            engine,
            capacity: Capacity::new(pools(settings)),
            ticker: Some(ticker),
            stop,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The instance pools and what live instances hold of them.
    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }
}

impl Drop for ServingEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

/// The pools' sizes: per promised component instance, room for one that
/// is not Rust. [`Capacity`] admits instances by their real footprint, so
/// running out is a 503, never an allocation failure.
fn pools(settings: &EngineSettings) -> Footprint {
    let each = |n: u32| settings.max_instances.saturating_mul(n);
    Footprint {
        component_instances: settings.max_instances,
        core_instances: each(CORE_INSTANCES_EACH),
        memories: each(MEMORIES_EACH),
        tables: each(TABLES_EACH),
    }
}

/// Freed instance slots reset together (see `config`).
const DECOMMIT_BATCH: usize = 16;

fn config(settings: &EngineSettings) -> Result<Config> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    let max_memory =
        usize::try_from(settings.max_memory_mb << 20).context("max_memory_mb is too large")?;
    let mut pool = PoolingAllocationConfig::default();
    let pools = pools(settings);
    pool.total_component_instances(pools.component_instances)
        .total_core_instances(pools.core_instances)
        .total_memories(pools.memories)
        .total_tables(pools.tables)
        .max_memory_size(max_memory)
        // Reset freed slots' memory in batches: one `process_madvise` (and
        // one TLB shootdown across cores) for many instances instead of one
        // each. The pool flushes early whenever it runs out of free slots.
        .decommit_batch_size(DECOMMIT_BATCH)
        // Where the kernel has PAGEMAP_SCAN (Linux 6.7+), a freed slot's
        // dirty pages, up to these sizes, are copied back to their initial
        // contents and stay mapped, so the next instance in the slot takes
        // no page faults and no `mprotect`: instantiate + first call
        // 11.4 -> 5.1 us. At most 128 KiB per slot stays resident.
        .linear_memory_keep_resident(128 << 10)
        .table_keep_resident(16 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(config)
}

impl ServingEngine {
    /// The component with `digest`, from the compiled-artifact cache in
    /// `cache_dir` when this engine configuration compiled it before, else
    /// compiled from `wasm` and cached. Returns whether the cache served it.
    pub fn load_component(
        &self,
        wasm: &Path,
        digest: &str,
        cache_dir: &Path,
    ) -> Result<(Component, bool)> {
        let cached = cache_dir.join(self.artifact_name(digest));
        if let Some(component) = self.cached_component(&cached) {
            return Ok((component, true));
        }
        let component = Component::from_file(&self.engine, wasm)
            .with_context(|| format!("compiling component {}", wasm.display()))?;
        cache_component(&component, &cached)?;
        Ok((component, false))
    }

    /// The name of the compiled artifact `stem` of this engine configuration.
    pub fn artifact_name(&self, stem: &str) -> String {
        format!("{stem}-{}.cwasm", self.fingerprint())
    }

    /// The compiled component in `path`, if it is there and loads.
    pub fn cached_component(&self, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file was written by `Component::serialize` of an
        // engine with this exact compatibility hash (its name says so),
        // into a directory only the host writes.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(
                    "ignoring unusable compiled artifact {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// Compiles the component `digest` into the cache in `cache_dir` unless
    /// it is there; says whether it compiled (without loading a cached one).
    pub fn precompile(&self, wasm: &Path, digest: &str, cache_dir: &Path) -> Result<bool> {
        if cache_dir.join(self.artifact_name(digest)).is_file() {
            return Ok(false);
        }
        self.load_component(wasm, digest, cache_dir)?;
        Ok(true)
    }

    /// Whether `file_name` in the compiled cache is an artifact of this
    /// engine configuration for a digest that `live` still wants.
    pub fn is_current_artifact(&self, file_name: &str, live: impl Fn(&str) -> bool) -> bool {
        let suffix = format!("-{}.cwasm", self.fingerprint());
        file_name.strip_suffix(&suffix).is_some_and(live)
    }

    /// Identifies the engine configuration, so artifacts of another
    /// configuration or wasmtime version are never loaded.
    fn fingerprint(&self) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

/// Saves `component` compiled to `path`, renamed into place whole.
pub fn cache_component(component: &Component, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .context("a compiled artifact's path has a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = component.serialize()?;
    let mut staged = tempfile::NamedTempFile::new_in(dir)?;
    staged.write_all(&bytes)?;
    staged.persist(path).map_err(|e| e.error)?;
    Ok(())
}
