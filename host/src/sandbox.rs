//! What a guest may see: its configuration through `wasi:config/store`, its
//! model package's files read-only under `/model`, captured stdout/stderr,
//! and a memory limit. No other file system, no network, no environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use wasmtime::Result;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::error::Context;
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

/// Where a guest finds its model package's files.
pub const MODEL_DIR: &str = "/model";

/// Bytes of stdout and of stderr kept per call; the rest is dropped.
pub const OUTPUT_CAPTURE_BYTES: usize = 64 * 1024;

/// What the function manifest grants one stage.
#[derive(Debug, Clone)]
pub struct Grant {
    /// `wasi:config/store` pairs.
    pub config: BTreeMap<String, String>,
    /// Host directory shown read-only at [`MODEL_DIR`], if any.
    pub model_dir: Option<PathBuf>,
    /// Linear-memory limit of the instance in bytes.
    pub memory_bytes: usize,
}

impl Default for Grant {
    fn default() -> Self {
        Grant {
            config: BTreeMap::new(),
            model_dir: None,
            memory_bytes: 128 << 20,
        }
    }
}

/// The per-instance state a store carries.
pub struct StageState {
    wasi: WasiCtx,
    table: ResourceTable,
    config: WasiConfigVariables,
    limits: StoreLimits,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl StageState {
    /// A fresh sandbox carrying exactly what `grant` allows.
    pub fn new(grant: &Grant) -> Result<Self> {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPTURE_BYTES);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPTURE_BYTES);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        // Sockets exist in the API but every address is refused and names never resolve.
        wasi.allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        if let Some(dir) = &grant.model_dir {
            wasi.preopened_dir(dir, MODEL_DIR, FsPerms::ReadOnly)
                .with_context(|| format!("opening model directory {}", dir.display()))?;
        }
        Ok(StageState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            config: grant.config.iter().collect(),
            limits: StoreLimitsBuilder::new()
                .memory_size(grant.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            stdout,
            stderr,
        })
    }

    /// The store limiter (registered with `Store::limiter`).
    pub fn limits(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// What the guest wrote to stdout and stderr (bounded), for the logs.
    pub fn output(&self) -> (String, String) {
        let text = |pipe: &MemoryOutputPipe| String::from_utf8_lossy(&pipe.contents()).into_owned();
        (text(&self.stdout), text(&self.stderr))
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

/// A linker holding every import a Cascade stage may use.
pub fn linker(engine: &Engine) -> Result<Linker<StageState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).context("adding WASI to the linker")?;
    wasmtime_wasi_config::add_to_linker(&mut linker, |s: &mut StageState| {
        WasiConfig::from(&s.config)
    })
    .context("adding wasi:config to the linker")?;
    Ok(linker)
}
