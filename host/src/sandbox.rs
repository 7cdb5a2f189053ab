//! What a guest may see: its configuration through `wasi:config/store`, its
//! model package's files read-only under `/model`, and a memory limit. Its
//! stdout and stderr go to the host's log, tagged with function and stage.
//! No other file system, no network, no environment.

use crate::guest_log::GuestLog;
use crate::model::ModelQueue;
use crate::model::wasi_nn::{self, Deadline};
use cascade_registry::records::World;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::Result;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::error::Context;
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

/// Where a guest finds its model package's files.
pub const MODEL_DIR: &str = "/model";

/// What the function manifest grants one stage.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `wasi:config/store` pairs.
    pub config: BTreeMap<String, String>,
    /// Host directory shown read-only at [`MODEL_DIR`], if any.
    pub model_dir: Option<PathBuf>,
    /// Linear-memory limit of the instance in bytes.
    pub memory_bytes: usize,
    /// How the guest's output is tagged in the log (function and stage).
    pub log_tag: String,
    /// Models the guest may `load-by-name` through `wasi:nn` (`name@version`),
    /// each run through its queue like a model stage's runs.
    pub models: Vec<(String, Arc<ModelQueue>)>,
    /// Whether `wasi:nn` `load` may build a model from bytes the guest
    /// supplies (the manifest's `nn_load_bytes`; off unless granted).
    pub load_bytes: bool,
}

impl Grant {
    /// Whether the guest may run models through `wasi:nn` (which blocks
    /// its thread while a model runs).
    pub fn runs_models(&self) -> bool {
        !self.models.is_empty() || self.load_bytes
    }
}

impl Default for Grant {
    fn default() -> Self {
        Grant {
            config: BTreeMap::new(),
            model_dir: None,
            memory_bytes: 128 << 20,
            log_tag: String::new(),
            models: Vec::new(),
            load_bytes: false,
        }
    }
}

/// The per-instance state a store carries.
pub struct StageState {
    wasi: WasiCtx,
    table: ResourceTable,
    config: WasiConfigVariables,
    limits: StoreLimits,
    nn: wasmtime_wasi_nn::wit::WasiNnCtx,
    /// When the running call (or instantiation) must stop; checked at every
    /// epoch tick, between which the guest yields to the reactor, and by
    /// `wasi:nn` compute while a model run waits.
    deadline: Deadline,
}

impl StageState {
    /// A fresh sandbox carrying exactly what `grant` allows.
    pub fn new(grant: &Grant) -> Result<Self> {
        let mut wasi = WasiCtxBuilder::new();
        let (function, stage) = grant
            .log_tag
            .split_once('/')
            .unwrap_or(("", grant.log_tag.as_str()));
        let (stdout, stderr) = GuestLog::pair(function, stage);
        wasi.stdout(stdout).stderr(stderr);
        // Sockets exist in the API but every address is refused and names never resolve.
        wasi.allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        if let Some(dir) = &grant.model_dir {
            wasi.preopened_dir(dir, MODEL_DIR, FsPerms::ReadOnly)
                .with_context(|| format!("opening model directory {}", dir.display()))?;
        }
        let deadline = Deadline::new();
        Ok(StageState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            config: grant.config.iter().collect(),
            limits: StoreLimitsBuilder::new()
                .memory_size(grant.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            nn: wasi_nn::context(
                &grant.models,
                grant.load_bytes,
                deadline.clone(),
                &grant.log_tag,
            ),
            deadline,
        })
    }

    /// Sets when the next call must stop.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline.set(deadline);
    }

    /// Whether the current call ran past its deadline.
    pub fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline.get()
    }

    /// Whether the guest holds any host resource (a file, a directory, a
    /// stream): a snapshot of its memory could not carry one.
    pub fn holds_handles(&self) -> bool {
        !self.table.is_empty()
    }

    /// The store limiter (registered with `Store::limiter`).
    pub fn limits(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }
}

impl WasiView for StageState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A linker holding the imports a stage of `world` may use: WASI (with no
/// files but its model's, no sockets, no environment), `wasi:config`, and
/// `wasi:nn` for inferencers only.
pub fn linker(engine: &Engine, world: World) -> Result<Linker<StageState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).context("adding WASI to the linker")?;
    wasmtime_wasi_config::add_to_linker(&mut linker, |s: &mut StageState| {
        WasiConfig::from(&s.config)
    })
    .context("adding wasi:config to the linker")?;
    if world == World::Inferencer {
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut StageState| {
            wasmtime_wasi_nn::wit::WasiNnView::new(&mut s.table, &mut s.nn)
        })
        .context("adding wasi:nn to the linker")?;
    }
    Ok(linker)
}
