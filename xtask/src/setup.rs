//! Installs what a fresh Debian machine with only the Rust toolchain lacks,
//! and says exactly what to do by hand when it cannot.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};

/// Makes sure the `wasm32-wasip2` standard library is installed.
pub fn wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context(
            "cannot run rustup; install the wasm32-wasip2 target for your toolchain by hand",
        )?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        return Ok(());
    }
    eprintln!("xtask: rustup target add wasm32-wasip2");
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status()?;
    if !status.success() {
        bail!("`rustup target add wasm32-wasip2` failed ({status}); run it by hand");
    }
    Ok(())
}

/// Makes sure `nats-server` is on the PATH, installing Debian's package as root.
pub fn nats_server() -> Result<()> {
    debian_package("nats-server", || on_path("nats-server"))
}

/// Makes sure the DejaVu fonts the orientation test renders text with exist.
pub fn dejavu_fonts() -> Result<()> {
    debian_package("fonts-dejavu-core", || Path::new(DEJAVU_SANS).is_file())
}

/// Makes sure the `wrk` load generator the benchmarks use is installed.
pub fn wrk() -> Result<()> {
    debian_package("wrk", || on_path("wrk"))
}

/// The font file the tests use.
const DEJAVU_SANS: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Installs `package` with apt-get when `present` says it is missing.
fn debian_package(package: &str, present: impl Fn() -> bool) -> Result<()> {
    if present() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        bail!("{package} is missing and this is not root; run: sudo apt-get install -y {package}");
    }
    eprintln!("xtask: apt-get install -y {package}");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", package][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("cannot run apt-get; install {package} by hand"))?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed ({status}); install {package} by hand",
                args.join(" ")
            );
        }
    }
    if !present() {
        bail!("{package} was installed but is still not found");
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
