//! How guest components are built; shared by xtask (`cargo xtask build`) and
//! the tests' build script through `#[path]`, so there is one recipe.
//! Plain `std` only.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates under `components/` that are components (the rest are libraries).
pub const COMPONENTS: &[&str] = &[
    "bert-tokenizer",
    "mean-pool",
    "image-preprocess",
    "classify",
    "misbehave",
    "nn-infer",
    "echo",
    "http-echo",
];

/// The WebAssembly target guests are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Where the built `.wasm` files land.
pub fn artifacts_dir(root: &Path) -> PathBuf {
    root.join("components/target").join(TARGET).join("release")
}

/// Path of one built component, e.g. `bert-tokenizer` → `…/bert_tokenizer.wasm`.
pub fn artifact(root: &Path, component: &str) -> PathBuf {
    artifacts_dir(root).join(format!("{}.wasm", component.replace('-', "_")))
}

/// Builds every component, release, locked, with paths remapped so the
/// bytes do not depend on where the clone or the cargo home lives.
pub fn build(root: &Path) -> Result<PathBuf, String> {
    let components = root.join("components");
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(&components).args([
        "build",
        "--release",
        "--locked",
        "--target",
        TARGET,
        "--workspace",
    ]);
    // An outer cargo (a build script, `cargo run`) leaves settings in the
    // environment that belong to its own build, not to this one.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let outer = key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS";
        if outer
            || ["RUSTFLAGS", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER"].contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    let mut flags = vec![format!("--remap-path-prefix={}=/cascade", root.display())];
    if let Some(home) = cargo_home() {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    command.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"));
    let status = command
        .status()
        .map_err(|e| format!("running cargo for the guest components: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the guest components failed ({status}); is the target installed? \
             run: rustup target add {TARGET}"
        ));
    }
    Ok(artifacts_dir(root))
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}
