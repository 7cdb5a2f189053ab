//! 5. Cold start: host restart → first response with the compiled cache
//! warm, and publish → first response.

use crate::context::{Bench, publish_echo};
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
             (requests retried every millisecond). The target for `embed` is \
             {PLATFORM_BUDGET_MS} ms plus the time tract takes to optimise its model, measured \
             here with the host's own loader; `echo` has no model, so it shows the platform \
             alone. Publish → first response: a new function revision PUT to a running host, \
             then invoked until it answers."
        ),
    );
    let mut host = bench.host_with_examples(&[]);
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
    let embed_ms = restarts(&data, "embed", bench.bodies.text_32.as_bytes())?;
    let echo_ms = restarts(&data, "echo", &bench.bodies.echo)?;
    let host = Host::start_in(&data, &[]);
    let publish_ms = median(
        (0..3)
            .map(|i| {
                publish_to_first_response(&host, &format!("embed-new-{i}"), &bench.bodies.text_32)
            })
            .collect::<Result<Vec<_>>>()?,
    );
    section.commands.push(format!(
        "cascade serve --listen 127.0.0.1:PORT --data DIR   # then POST /v1/functions/embed/invoke every 1 ms until 200"
    ));
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
    ];
    section.records.extend([
        Record::against(
            "cold_start_ms",
            median(embed_ms),
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
fn restarts(data: &Path, function: &str, body: &[u8]) -> Result<Vec<f64>> {
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
