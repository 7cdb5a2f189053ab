//! `cargo xtask`: set-up and build tasks, so a new user needs two commands.
//!
//! - `up`: install what is missing, build everything, run Cascade;
//! - `test`: install what is missing, build everything, run every test;
//! - `build`: build the guest components (wasm32-wasip2, release);
//! - `models`: fetch and verify the real models.

mod catalog;
mod guests;
mod models;
mod setup;

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <up|test|build|models>";

fn main() {
    if let Err(error) = run() {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let task = std::env::args().nth(1).ok_or_else(|| anyhow!(USAGE))?;
    let root = project_root()?;
    match task.as_str() {
        "build" => build_components(&root).map(drop),
        "models" => {
            let dir = models::ensure()?;
            eprintln!("xtask: models ready in {}", dir.display());
            Ok(())
        }
        "test" => test(&root),
        "up" => up(&root),
        other => bail!("unknown task `{other}`; {USAGE}"),
    }
}

fn project_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask lives in a workspace")
}

fn build_components(root: &Path) -> Result<PathBuf> {
    setup::wasm_target()?;
    let dir = guests::build(root).map_err(|e| anyhow!(e))?;
    for component in guests::COMPONENTS {
        let path = guests::artifact(root, component);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("missing {}", path.display()))?
            .len();
        eprintln!("xtask: built {} ({} KiB)", path.display(), size / 1024);
    }
    Ok(dir)
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    setup::nats_server()?;
    models::ensure()?;
    build_components(root)?;
    // The guests' shared library holds pure logic worth testing natively.
    let host_target = host_triple()?;
    cargo(
        root,
        &[
            "test",
            "--manifest-path",
            "components/Cargo.toml",
            "-p",
            "cascade-guest",
            "--target",
            &host_target,
        ],
    )?;
    cargo(root, &["test", "--workspace"])
}

fn up(root: &Path) -> Result<()> {
    models::ensure()?;
    build_components(root)?;
    cargo(root, &["build", "-p", "cascade-host"])?;
    let cascade = root.join("target/debug/cascade");
    eprintln!("\nxtask: Cascade is built. Serving (`cascade serve`) arrives with the Registry and");
    eprintln!("       Host runtime issues; meanwhile each component can be inspected:\n");
    for component in guests::COMPONENTS {
        let status = Command::new(&cascade)
            .arg("inspect")
            .arg(guests::artifact(root, component))
            .status()?;
        if !status.success() {
            bail!("`cascade inspect` failed for {component}");
        }
    }
    Ok(())
}

fn host_triple() -> Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}
