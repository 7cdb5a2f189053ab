//! Guest components written in Python (`components/python/<name>/app.py`),
//! built with componentize-py from a venv in the cache into the same
//! directory as the Rust guests, so tests find them by name.

use crate::{catalog, guests, venv};
use anyhow::Result;
use std::path::Path;
use std::process::Command;

/// The build tool, pinned.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1\n";

/// Each Python guest and the Cascade world it implements.
pub const GUESTS: &[(&str, &str)] = &[("text-bytes", "preprocessor")];

/// Builds every Python guest (a few seconds each).
pub fn build(root: &Path) -> Result<()> {
    let python = venv::ensure(&catalog::cache_dir(), "guest-venv", COMPONENTIZE_PY)?;
    let componentize = python.with_file_name("componentize-py");
    for (name, world) in GUESTS {
        let out = guests::artifact(root, name);
        venv::run(
            Command::new(&componentize)
                .arg("-d")
                .arg(root.join("wit"))
                .args([
                    "-w",
                    &format!("cascade:inference/{world}@0.1.0"),
                    "componentize",
                ])
                .arg("-p")
                .arg(root.join("components/python").join(name))
                .arg("app")
                .arg("-o")
                .arg(&out),
            &format!("componentize-py for components/python/{name}"),
        )?;
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        eprintln!("xtask: built {} ({} KiB)", out.display(), size / 1024);
    }
    Ok(())
}
