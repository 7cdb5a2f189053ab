//! The reference OIP client, tritonclient, works against the real binary
//! unchanged (`tests/python/oip_clients.py`). `cargo xtask test` installs it
//! in a cached venv and names its python in `CASCADE_OIP_PYTHON`; without
//! it the test is skipped, except under `CI=true`, where it fails.

use cascade_tests::host::{Host, free_port};
use cascade_tests::render_line;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("CASCADE_OIP_PYTHON").map(PathBuf::from);
    if python.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CASCADE_OIP_PYTHON is not set: run the tests with `cargo xtask test`"
        );
        eprintln!("skipped: CASCADE_OIP_PYTHON is not set (cargo xtask test sets it)");
    }
    python
}

#[test]
fn tritonclient_works_unchanged_over_http_and_grpc() {
    let Some(python) = python() else {
        return;
    };
    let grpc = format!("127.0.0.1:{}", free_port());
    let host = Host::start_with(&["--grpc-listen", &grpc]);
    host.publish_examples();
    host.serve_minilm("minilm", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let png = dir.path().join("line.png");
    std::fs::write(&png, render_line("Cascade reads this line", false)).expect("png");
    let png = png.to_str().expect("utf-8 path");
    let said = run_script(&python, &[&host.url, &grpc, png]);
    eprintln!("{said}");
}

/// Runs `tests/python/oip_clients.py` with `args`; returns what it printed,
/// which must start with `ok: `.
fn run_script(python: &Path, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/oip_clients.py");
    let run = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    stdout
}

#[test]
fn grpc_calls_need_the_tokens_rest_calls_need() {
    let Some(python) = python() else {
        return;
    };
    let grpc = format!("127.0.0.1:{}", free_port());
    let host = Host::start_with(&["--grpc-listen", &grpc, "--token", "s3cret", "--token-read"]);
    host.publish_examples_with_token("s3cret");
    run_script(&python, &["tokens", &grpc, "s3cret"]);
}
