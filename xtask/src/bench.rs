//! `cargo xtask bench`: installs what the benchmarks compare Cascade with
//! (wrk, a Python venv with FastAPI + onnxruntime, one with MLServer,
//! wasmtime-cli at our wasmtime version), all cached outside the clone, then runs
//! `cascade-bench run`, which rewrites BENCHMARKS.md and target/bench/results.json.

use crate::{catalog, setup};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Features of wasmtime-cli that `wasmtime serve` needs; the rest of the
/// default set only lengthens a compile that already takes minutes.
const WASMTIME_FEATURES: &str =
    "serve,run,component-model-async,cranelift,pooling-allocator,parallel-compilation";

/// What the benchmarks run beside Cascade.
pub struct Contenders {
    /// Python of the venv with the FastAPI + onnxruntime server's packages.
    pub python: PathBuf,
    /// Python of the venv with MLServer (the OIP section's contender).
    pub mlserver_python: PathBuf,
    /// wasmtime-cli.
    pub wasmtime: PathBuf,
}

/// Installs wrk, the venvs and wasmtime-cli when missing.
pub fn prepare(root: &Path) -> Result<Contenders> {
    setup::wrk()?;
    // pip mostly waits on downloads and the wasmtime-cli compile on the
    // CPU, so on a fresh machine they run side by side.
    std::thread::scope(|scope| {
        let venvs = scope.spawn(|| {
            let python = python_venv(root, "requirements.txt", "bench-venv")?;
            let mlserver = python_venv(root, "mlserver-requirements.txt", "mlserver-venv")?;
            anyhow::Ok((python, mlserver))
        });
        let wasmtime = wasmtime_cli(root);
        let (python, mlserver_python) = venvs
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the venv set-up panicked")))?;
        Ok(Contenders {
            python,
            mlserver_python,
            wasmtime: wasmtime?,
        })
    })
}

/// A venv `name` with `benches/python/{requirements}`, rebuilt when they change.
fn python_venv(root: &Path, requirements: &str, name: &str) -> Result<PathBuf> {
    let requirements = root.join("benches/python").join(requirements);
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    crate::venv::ensure(&catalog::cache_dir(), name, &wanted)
}

/// wasmtime-cli at the version in Cargo.lock, compiled once into the cache.
fn wasmtime_cli(root: &Path) -> Result<PathBuf> {
    let version = locked_version(root, "wasmtime")?;
    let dir = catalog::cache_dir()
        .join("tools")
        .join(format!("wasmtime-{version}"));
    let binary = dir.join("bin/wasmtime");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: cargo install wasmtime-cli@{version} (features {WASMTIME_FEATURES}) into {}; \
         this compiles once and takes several minutes",
        dir.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::venv::run(
        Command::new(cargo)
            .args(["install", "wasmtime-cli", "--locked", "--version", &version])
            .args([
                "--no-default-features",
                "--features",
                WASMTIME_FEATURES,
                "--root",
            ])
            .arg(&dir)
            .arg("--target-dir")
            .arg(catalog::cache_dir().join("tools/target")),
        "cargo install wasmtime-cli",
    )?;
    let _ = std::fs::remove_dir_all(catalog::cache_dir().join("tools/target"));
    Ok(binary)
}

/// The version of `package` that Cargo.lock pins.
fn locked_version(root: &Path, package: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = lock
        .find(&needle)
        .with_context(|| format!("{package} is not in Cargo.lock"))?
        + needle.len();
    let version = lock[start..].split('"').next().unwrap_or_default();
    if version.is_empty() {
        bail!("no version for {package} in Cargo.lock");
    }
    Ok(version.to_string())
}
