//! The example functions (`embed`, `orientation`) and how to publish them
//! with the `cascade` CLI; shared by `cargo xtask up`, `cargo xtask
//! publish-examples` and the end-to-end tests through `#[path]`, so all
//! three publish the same way. Plain `std` only.

use std::path::Path;
use std::process::Command;

/// The example functions' names.
pub const FUNCTIONS: &[&str] = &["embed", "orientation"];

/// `cascade` argument lists that publish every example artifact, in order.
pub fn publish_commands(root: &Path, components: &Path, models: &Path) -> Vec<Vec<String>> {
    let s = |p: &Path| p.display().to_string();
    let mut commands = Vec::new();
    for component in [
        "bert-tokenizer",
        "mean-pool",
        "image-preprocess",
        "classify",
    ] {
        let file = components.join(format!("{}.wasm", component.replace('-', "_")));
        commands.push(vec![
            "publish".into(),
            "component".into(),
            s(&file),
            "--name".into(),
            component.into(),
            "--version".into(),
            "0.1.0".into(),
        ]);
    }
    commands.push(vec![
        "publish".into(),
        "model".into(),
        s(&models.join("paraphrase-MiniLM-L3-v2.onnx")),
        "--file".into(),
        s(&models.join("tokenizer.json")),
        "--name".into(),
        "minilm-l3".into(),
        "--version".into(),
        "1.0.0".into(),
    ]);
    commands.push(vec![
        "publish".into(),
        "model".into(),
        s(&models.join("ch_ppocr_mobile_v2.0_cls_infer.onnx")),
        "--file".into(),
        s(&root.join("xtask/functions/ppocr-cls/labels.txt")),
        "--input-shape".into(),
        "x=1,3,48,192".into(),
        "--name".into(),
        "ppocr-cls".into(),
        "--version".into(),
        "2.0.0".into(),
    ]);
    for function in FUNCTIONS {
        let manifest = root
            .join("xtask/functions")
            .join(format!("{function}.toml"));
        commands.push(vec!["publish".into(), "function".into(), s(&manifest)]);
    }
    commands
}

/// Publishes every example to the registry at `registry` with the `cascade`
/// binary; re-publishing identical artifacts is harmless.
pub fn publish(
    cascade: &Path,
    registry: &str,
    root: &Path,
    components: &Path,
    models: &Path,
) -> Result<(), String> {
    for args in publish_commands(root, components, models) {
        let output = Command::new(cascade)
            .arg("--registry")
            .arg(registry)
            .args(&args)
            .output()
            .map_err(|e| format!("running {}: {e}", cascade.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!(
                "`cascade {}` failed: {}",
                args.join(" "),
                stderr.trim()
            ));
        }
        // A function stored but not served (`warning: ...`) is a failure
        // here: the examples are what `up` and the bench serve.
        if let Some(warning) = stderr.lines().find(|l| l.starts_with("warning: ")) {
            return Err(format!("`cascade {}`: {warning}", args.join(" ")));
        }
    }
    Ok(())
}
