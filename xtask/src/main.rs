//! `cargo xtask`: set-up and build tasks, so a new user needs two commands.
//!
//! - `up`: install what is missing, build everything, run Cascade;
//! - `test`: install what is missing, build everything, run every test;
//! - `build`: build the guest components (wasm32-wasip2, release);
//! - `models`: fetch and verify the real models;
//! - `publish-examples --registry URL`: publish `embed` and `orientation`;
//! - `bench [ARGS]`: install what the benchmarks compare with, run them and
//!   rewrite BENCHMARKS.md (ARGS go to `cascade-bench run`, e.g. `--only 1,3`).

mod bench;
mod catalog;
mod examples;
mod guests;
mod models;
mod python_guests;
mod setup;
mod up_nats;
mod venv;

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str =
    "usage: cargo xtask <up|test|bench [ARGS]|build|models|publish-examples [--registry URL]>";

/// Where `cargo xtask up` serves.
const UP_ADDRESS: &str = "127.0.0.1:8080";

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
        "build" => {
            build_components(&root)?;
            python_guests::build(&root)
        }
        "models" => {
            let dir = models::ensure()?;
            eprintln!("xtask: models ready in {}", dir.display());
            Ok(())
        }
        "test" => test(&root),
        "up" => up(&root),
        "bench" => bench(&root, std::env::args().skip(2).collect()),
        "publish-examples" => {
            let args: Vec<String> = std::env::args().skip(2).collect();
            let registry = match args.as_slice() {
                [] => format!("http://{UP_ADDRESS}"),
                [flag, url] if flag == "--registry" => url.clone(),
                _ => bail!("{USAGE}"),
            };
            publish_examples(&root, &registry)
        }
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
    cargo_with(root, args, &[])
}

/// Runs cargo with `args` and the environment variables `env`.
fn cargo_with(root: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    setup::nats_server()?;
    setup::dejavu_fonts()?;
    setup::browser_and_prometheus()?;
    models::ensure()?;
    build_components(root)?;
    python_guests::build(root)?;
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
    // The reference OIP client, for tests/tests/oip_clients.rs.
    let requirements = root.join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let python = venv::ensure(&catalog::cache_dir(), "oip-venv", &wanted)?;
    cargo_with(
        root,
        &["test", "--workspace"],
        &[("CASCADE_OIP_PYTHON", python.as_os_str())],
    )
}

fn bench(root: &Path, extra: Vec<String>) -> Result<()> {
    setup::nats_server()?;
    setup::dejavu_fonts()?;
    models::ensure()?;
    build_components(root)?;
    let contenders = bench::prepare(root)?;
    // The test build makes `cascade` and `cascade-bench` (each has an
    // integration test) with the same features as `cargo xtask test`, so
    // after the README's set-up this compiles nothing.
    cargo(root, &["test", "--workspace", "--no-run"])?;
    let status = Command::new(root.join("target/debug/cascade-bench"))
        .current_dir(root)
        .arg("run")
        .arg("--python")
        .arg(contenders.python)
        .arg("--mlserver-python")
        .arg(contenders.mlserver_python)
        .arg("--wasmtime")
        .arg(contenders.wasmtime)
        .arg("--appendix")
        .arg(root.join("benches/optimisations.md"))
        .args(extra)
        .status()
        .context("running cascade-bench")?;
    if !status.success() {
        bail!("the benchmarks failed ({status})");
    }
    Ok(())
}

/// Builds `cascade` with the features the whole workspace unifies to, the
/// set `cargo test --workspace` uses: `-p cascade-host` alone resolves a
/// smaller set, and cargo would compile wasmtime-wasi, hyper, reqwest and the
/// host a second time after `cargo xtask test` (about 20 minutes on 2 cores).
fn cascade_binary(root: &Path) -> Result<PathBuf> {
    cargo(root, &["build", "--workspace", "--bin", "cascade"])?;
    Ok(root.join("target/debug/cascade"))
}

fn publish_examples(root: &Path, registry: &str) -> Result<()> {
    let models = models::ensure()?;
    let components = build_components(root)?;
    let cascade = cascade_binary(root)?;
    examples::publish(&cascade, registry, root, &components, &models).map_err(|e| anyhow!(e))?;
    eprintln!(
        "xtask: published {} to {registry}",
        examples::FUNCTIONS.join(", ")
    );
    Ok(())
}

fn up(root: &Path) -> Result<()> {
    setup::nats_server()?;
    let models = models::ensure()?;
    let components = build_components(root)?;
    let cascade = cascade_binary(root)?;
    if std::net::TcpStream::connect(UP_ADDRESS).is_ok() {
        bail!(
            "{UP_ADDRESS} is already in use: stop what listens there (another `cascade serve`?) and run again"
        );
    }
    let data = root.join("cascade-data");
    let nats = up_nats::UpNats::start(&root.join("cascade-nats"))?;
    // The default path: the host finds ONNX Runtime's library in the cache
    // `models::ensure` fills, and says so.
    let mut server = Command::new(&cascade)
        .args([
            "serve", "--listen", UP_ADDRESS, "--nats", &nats.url, "--data",
        ])
        .arg(&data)
        .spawn()
        .context("starting cascade serve")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(UP_ADDRESS).is_err() {
        if let Some(status) = server.try_wait()? {
            bail!("cascade serve exited early ({status})");
        }
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            bail!("cascade serve did not listen on {UP_ADDRESS} within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let registry = format!("http://{UP_ADDRESS}");
    if let Err(e) = examples::publish(&cascade, &registry, root, &components, &models) {
        let _ = server.kill();
        // Versions are immutable: a data directory from an older checkout
        // keeps that checkout's builds of the example components.
        if e.contains("already published with digest") {
            bail!(
                "{e}\n\n{} holds example components built by an older checkout under the \
                 same versions. Move or delete it (it is only this command's scratch \
                 registry) and run `cargo xtask up` again.",
                data.display()
            );
        }
        bail!(e);
    }
    let png = root.join("tests/fixtures/two_colours.png");
    eprintln!(
        "\nCascade is serving on {registry} with the example functions. Try:\n\n  \
         curl -s {registry}/v1/functions/embed/invoke -H 'content-type: text/plain' --data 'A man is eating food.'\n  \
         curl -s {registry}/v1/functions/embed/invoke -H 'content-type: application/json' --data '{{\"inputs\": [\"first\", \"second\"]}}'\n  \
         curl -s {registry}/v1/functions/orientation/invoke -H 'content-type: image/png' --data-binary @{}\n  \
         curl -s {registry}/v1/functions/embed/status\n  \
         curl -s {registry}/v2/models/embed   # the same function as an Open Inference Protocol model\n  \
         curl -s {registry}/metrics\n  \
         {} list\n\n\
         The dashboard is at {registry}/ui.\n\n\
         NATS with JetStream is on {nats}: request-reply on embed.requests and \
         orientation.requests; images published to the stream subject events.images.<anything> \
         get their predictions stored on predictions.orientation (README: JetStream).\n\n\
         Press Ctrl-C to stop.",
        png.display(),
        cascade.display(),
        nats = nats.url,
    );
    let status = server.wait()?;
    if !status.success() {
        bail!("cascade serve stopped ({status})");
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
