//! Section 5, cold start: host restart to first response with the
//! compiled cache warm, publish to first response, and the first request
//! after a stage scaled to zero.

use crate::context::{Bench, publish_echo, timed_invoke, wait_for_snapshot};
use crate::native::{MODEL_FILE, TOKEN_EMBEDDINGS};
use crate::report::{Bar, Record, Section, num};
use crate::stats::median;
use anyhow::{Context, Result, bail};
use cascade_host::model::{InputShapes, ModelPlan};
use cascade_tests::host::{Host, cascade_binary, free_port};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Restarts measured per function.
const RESTARTS: usize = 5;
/// `idle_timeout_ms` of the function scaled to zero.
const IDLE_MS: u64 = 100;
/// Warm calls, and calls after scaling to zero.
const WARM_CALLS: usize = 50;
const COLD_CALLS: usize = 7;
/// Budget for the platform's own part of a cold start.
const PLATFORM_BUDGET_MS: f64 = 100.0;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "5. Cold start",
        &format!(
            "A host with `embed`, `orientation` and `echo` published and served once is stopped \
             (SIGTERM); then, {RESTARTS} times, `cascade serve` is started on the same data \
             directory and the clock runs from the spawn to the first 200 of one function \
             (requests retried every millisecond), on the default backend (ONNX Runtime) and, \
             labelled, on tract (`--model-backend tract`), whose bar is {PLATFORM_BUDGET_MS} ms \
             plus the time tract takes to optimise its model, measured here with the host's own \
             loader; `echo` has no model, so it shows the platform alone. Publish → first \
             response: a new function revision PUT to a running host, then invoked until it \
             answers. Scale from zero: `embed` with `idle_timeout_ms = {IDLE_MS}` is called \
             {WARM_CALLS} times back to back (the warm p50), then {COLD_CALLS} times each after \
             its component stages have no instance left (status polled); the added time is the \
             cold median minus the warm p50, one keep-alive client for both. Both waits start \
             once the host has made the snapshot of `bert-tokenizer` after its `initialize` \
             (status `snapshot: true`), as a host does in the background after a publish."
        ),
    );
    let mut host = bench.host_with_examples(&[])?;
    publish_echo(&host, "echo", "")?;
    for (function, body) in [
        ("embed", bench.bodies.text_32.as_bytes()),
        ("echo", &bench.bodies.echo[..]),
    ] {
        let response = host.invoke(function, "text/plain", body.to_vec());
        anyhow::ensure!(
            response.status().is_success(),
            "{function} answers before the restarts"
        );
    }
    let data = host.data.clone();
    anyhow::ensure!(host.terminate(), "the host stops cleanly");
    let optimise_ms = median(
        (0..3)
            .map(|_| optimise_ms(&bench.models))
            .collect::<Result<Vec<_>>>()?,
    );
    let embed_ms = restarts(&data, &[], "embed", bench.bodies.text_32.as_bytes())?;
    let tract_ms = restarts(
        &data,
        &["--model-backend", "tract"],
        "embed",
        bench.bodies.text_32.as_bytes(),
    )?;
    let echo_ms = restarts(&data, &[], "echo", &bench.bodies.echo)?;
    let host = Host::start_in(&data, &[]);
    let publish_ms = median(
        (0..3)
            .map(|i| {
                publish_to_first_response(&host, &format!("embed-new-{i}"), &bench.bodies.text_32)
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let zero = scale_from_zero(&host, &bench.bodies.text_32)?;
    section.commands.push(
        "cascade serve --listen 127.0.0.1:PORT --data DIR   # then POST /v1/functions/embed/invoke every 1 ms until 200"
            .into(),
    );
    section.table = vec![
        ["measure", "median ms", "runs ms"]
            .map(String::from)
            .to_vec(),
        vec![
            "restart → first `embed`".into(),
            num(median(embed_ms.clone())),
            runs(&embed_ms),
        ],
        vec![
            "restart → first `embed`, tract".into(),
            num(median(tract_ms.clone())),
            runs(&tract_ms),
        ],
        vec![
            "restart → first `echo`".into(),
            num(median(echo_ms.clone())),
            runs(&echo_ms),
        ],
        vec![
            "tract optimisation of MiniLM-L3 (in process)".into(),
            num(optimise_ms),
            String::new(),
        ],
        vec![
            "publish → first `embed`".into(),
            num(publish_ms),
            String::new(),
        ],
        vec!["`embed`, warm p50".into(), num(zero.warm_ms), String::new()],
        vec![
            "`embed`, first request after scale to zero".into(),
            num(median(zero.cold_ms.clone())),
            runs(&zero.cold_ms),
        ],
    ];
    section.records.extend([
        Record::against(
            "restart_first_response_ms",
            median(embed_ms),
            "ms",
            Bar::AtMost(150.0),
        ),
        Record::against(
            "cold_start_ms",
            median(tract_ms),
            "ms",
            Bar::AtMost(PLATFORM_BUDGET_MS + optimise_ms),
        ),
        Record::info("cold_start_model_optimise_ms", optimise_ms, "ms"),
        Record::against(
            "cold_start_echo_ms",
            median(echo_ms),
            "ms",
            Bar::AtMost(PLATFORM_BUDGET_MS),
        ),
        Record::info("publish_to_first_response_ms", publish_ms, "ms"),
        Record::against(
            "scale_from_zero_added_ms",
            median(zero.cold_ms.clone()) - zero.warm_ms,
            "ms",
            Bar::AtMost(2.0),
        ),
    ]);
    Ok(section)
}

fn runs(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| num(*v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long the host's loader takes to parse and optimise MiniLM.
fn optimise_ms(models: &Path) -> Result<f64> {
    let started = Instant::now();
    ModelPlan::load(
        &models.join(MODEL_FILE),
        &InputShapes::new(),
        &[TOKEN_EMBEDDINGS.to_string()],
        None,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Milliseconds from spawning a host on `data` to the first 200 of `function`, per restart.
fn restarts(data: &Path, extra: &[&str], function: &str, body: &[u8]) -> Result<Vec<f64>> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    (0..RESTARTS)
        .map(|_| {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}/v1/functions/{function}/invoke");
            let started = Instant::now();
            let mut child = Command::new(cascade_binary())
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
                .arg(data)
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting cascade serve")?;
            let took = loop {
                let ok = client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(body.to_vec())
                    .send()
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break started.elapsed();
                }
                if started.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
                    let _ = child.kill();
                    bail!("{function} never answered after a restart");
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
            Ok(took.as_secs_f64() * 1000.0)
        })
        .collect()
}

/// Milliseconds from PUT of a new function to its first 200.
fn publish_to_first_response(host: &Host, name: &str, text: &str) -> Result<f64> {
    let manifest = cascade_tests::embed_manifest(name, "");
    let started = Instant::now();
    let response = host.put(
        &format!("/v1/functions/{name}"),
        "application/toml",
        manifest,
    );
    anyhow::ensure!(response.status().is_success(), "publishing {name}");
    loop {
        if host
            .invoke(name, "text/plain", text.to_string())
            .status()
            .is_success()
        {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{name} never answered after publishing");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Warm and after-scale-to-zero latencies of one `embed`.
struct ScaleFromZero {
    warm_ms: f64,
    cold_ms: Vec<f64>,
}

/// Publishes `embed` with a short idle timeout and times calls warm, and
/// each after its component stages dropped their last instance.
fn scale_from_zero(host: &Host, text: &str) -> Result<ScaleFromZero> {
    let name = "embed-idle";
    let manifest = cascade_tests::embed_manifest(
        name,
        &format!("[scaling]\nmin_instances = 0\nidle_timeout_ms = {IDLE_MS}\n"),
    );
    let response = host.put(
        &format!("/v1/functions/{name}"),
        "application/toml",
        manifest,
    );
    anyhow::ensure!(response.status().is_success(), "publishing {name}");
    wait_for_snapshot(host, name)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let call = || -> Result<f64> {
        let took = timed_invoke(&client, &host.url, name, "text/plain", text.to_string())?;
        Ok(took.as_secs_f64() * 1000.0)
    };
    for _ in 0..5 {
        call()?;
    }
    let warm = (0..WARM_CALLS)
        .map(|_| call())
        .collect::<Result<Vec<_>>>()?;
    let mut cold = Vec::new();
    for _ in 0..COLD_CALLS {
        let deadline = Instant::now() + Duration::from_secs(10);
        while live_instances(host, name)? > 0 {
            anyhow::ensure!(Instant::now() < deadline, "{name} never scaled to zero");
            std::thread::sleep(Duration::from_millis(20));
        }
        cold.push(call()?);
    }
    Ok(ScaleFromZero {
        warm_ms: median(warm),
        cold_ms: cold,
    })
}

/// Instances of every component stage of `function`, summed.
fn live_instances(host: &Host, function: &str) -> Result<u64> {
    let status: serde_json::Value = host
        .get(&format!("/v1/functions/{function}/status"))
        .json()?;
    Ok(status["stages"]
        .as_array()
        .context("status lists stages")?
        .iter()
        .filter_map(|stage| stage["instances"].as_u64())
        .sum())
}
