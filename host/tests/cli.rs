//! The `cascade` binary's command line, run as a user runs it. (Being an
//! integration test of this package also makes `cargo test --workspace`
//! build `target/<profile>/cascade`, which the end-to-end tests drive.)

use std::process::Command;

fn cascade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(args)
        .output()
        .expect("cascade runs")
}

#[test]
fn inspect_refuses_a_file_that_is_not_a_component() {
    let out = cascade(&["inspect", "Cargo.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: compiling component Cargo.toml"),
        "{stderr}"
    );
}

#[test]
fn client_commands_say_when_the_registry_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let out = cascade(&["--registry", &format!("http://127.0.0.1:{port}"), "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot reach the registry at http://127.0.0.1:{port}"
        )),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_refused_with_usage() {
    let out = cascade(&["publish", "model", "m.onnx", "--name", "m"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--version"));
}
