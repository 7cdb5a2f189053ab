//! The bench driver's command line. Also makes `cargo test --workspace`
//! build the `cascade-bench` binary with the tests' feature set, which is
//! what `cargo xtask bench` runs (one build of the host, not two).

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cascade-bench"))
}

#[test]
fn a_run_without_its_contenders_is_refused_with_a_usage_message() {
    let output = bench().arg("run").output().expect("cascade-bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--python"), "{stderr}");
    assert!(stderr.contains("--wasmtime"), "{stderr}");
}

#[test]
fn the_raw_responder_fails_clearly_without_a_nats_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let output = bench()
        .args([
            "nats-responder",
            "--url",
            &format!("nats://127.0.0.1:{port}"),
            "--subject",
            "x",
        ])
        .output()
        .expect("cascade-bench runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("cascade-bench: error:"), "{stderr}");
}
