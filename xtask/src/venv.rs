//! Python venvs in the cache directory, each rebuilt only when what it
//! should hold changes: the bench's Python server, the Python guests'
//! build tool.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A venv named `name` in the cache holding the pip requirements in
/// `requirements` (the text of a requirements file); returns its python.
pub fn ensure(cache: &Path, name: &str, requirements: &str) -> Result<PathBuf> {
    let venv = cache.join(name);
    let stamp = venv.join("cascade-requirements.txt");
    let python = venv.join("bin/python");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == requirements) {
        return Ok(python);
    }
    eprintln!("xtask: python3 -m venv {}", venv.display());
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv (install python3-venv?)",
    )?;
    let file = venv.join("requirements.txt");
    std::fs::write(&file, requirements)?;
    eprintln!(
        "xtask: pip install into {}:\n{}",
        venv.display(),
        requirements.trim()
    );
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&file),
        &format!("pip install into {}", venv.display()),
    )?;
    std::fs::write(&stamp, requirements)?;
    Ok(python)
}

/// Runs `command`, failing with `what` when it does not succeed.
pub fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
