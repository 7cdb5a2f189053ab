//! Section 5, cold start: host restart to first response with the
//! compiled cache warm, publish to first response, and the first request
//! after a stage scaled to zero.

use crate::context::{Bench, publish_echo, wait_for_snapshot};
use crate::model_ceiling::ModelCeiling;
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
const COLD_CALLS: usize = 15;
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
             its component stages have no instance left (status polled every 20 ms). After each \
             such call, a twin of `embed` that keeps one instance per stage \
             (`min_instances = 1`) is called after as long an idle time, polled the same way, and \
             after as long again the same three steps run natively in this process (tokenizer, \
             MiniLM on ONNX Runtime with one thread, pooling). Idleness alone slows the next \
             request (the model's weights leave the CPU caches, sleeping threads must be woken), \
             with or without instances, natively too, and the model stage's share of it varies \
             from call to call by several ms. So what scaling to zero adds \
             (`scale_from_zero_added_ms`) is taken where instances are started: the median time \
             of the component stages (tokenizer and pooling, from `Server-Timing`, instance \
             start included) in the cold calls minus that in the twin's. For reading, no bar: \
             the same difference end to end (`scale_from_zero_added_end_to_end_ms`), the cold \
             median over the back-to-back p50 (`scale_from_zero_over_back_to_back_ms`), and what idleness adds to the twin and to \
             the native steps over their back-to-back p50s (`scale_from_zero_idle_kept_added_ms`, \
             `native_idle_added_ms`). One keep-alive client throughout. The waits start \
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
    let zero = scale_from_zero(bench, &host)?;
    section.commands.push(
        "cascade serve --listen 127.0.0.1:PORT --data DIR   # then POST /v1/functions/embed/invoke every 1 ms until 200"
            .into(),
    );
    section.table = vec![
        ["measure", "median ms", "runs ms"]
            .map(String::from)
            .to_vec(),
        measured("restart → first `embed`", &embed_ms),
        measured("restart → first `embed`, tract", &tract_ms),
        measured("restart → first `echo`", &echo_ms),
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
        measured("`embed`, first request after scale to zero", &zero.cold_ms),
        measured(
            "`embed` twin keeping its instances, first request after as long idle",
            &zero.idle_kept_ms,
        ),
        measured(
            "component stages (`Server-Timing`), first request after scale to zero",
            &zero.cold_components_ms,
        ),
        measured(
            "component stages (`Server-Timing`), twin after as long idle",
            &zero.idle_kept_components_ms,
        ),
        vec![
            "the same steps natively in process, back to back p50".into(),
            num(zero.native_warm_ms),
            String::new(),
        ],
        measured(
            "the same steps natively in process, after as long idle",
            &zero.native_idle_ms,
        ),
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
            median(zero.cold_components_ms.clone()) - median(zero.idle_kept_components_ms.clone()),
            "ms",
            Bar::AtMost(2.0),
        ),
        Record::info(
            "scale_from_zero_added_end_to_end_ms",
            median(zero.cold_ms.clone()) - median(zero.idle_kept_ms.clone()),
            "ms",
        ),
        Record::info(
            "scale_from_zero_over_back_to_back_ms",
            median(zero.cold_ms.clone()) - zero.warm_ms,
            "ms",
        ),
        Record::info(
            "scale_from_zero_idle_kept_added_ms",
            median(zero.idle_kept_ms.clone()) - zero.warm_ms,
            "ms",
        ),
        Record::info(
            "native_idle_added_ms",
            median(zero.native_idle_ms.clone()) - zero.native_warm_ms,
            "ms",
        ),
    ]);
    Ok(section)
}

/// A table row: what was timed, its median and every run.
fn measured(what: &str, values: &[f64]) -> Vec<String> {
    vec![
        what.into(),
        num(median(values.iter().copied())),
        runs(values),
    ]
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

/// Warm and after-scale-to-zero latencies of one `embed`, of a twin that
/// keeps its instances, and of the same steps natively, each called after
/// the same idle time.
struct ScaleFromZero {
    warm_ms: f64,
    cold_ms: Vec<f64>,
    /// After the same idle time, instances kept: what idleness alone adds
    /// (threads and caches gone cold), apart from starting instances.
    idle_kept_ms: Vec<f64>,
    /// The component stages' own time (`Server-Timing`) in the cold calls
    /// and in the twin's: what starting instances adds, without the
    /// model's and the network's idle-time noise.
    cold_components_ms: Vec<f64>,
    idle_kept_components_ms: Vec<f64>,
    /// The same three steps natively in this process (ONNX Runtime, one
    /// thread): back to back, and after as long an idle time.
    native_warm_ms: f64,
    native_idle_ms: Vec<f64>,
}

/// Publishes `embed` with a short idle timeout and a twin that keeps one
/// instance per stage, and times calls warm; then, in turn, one after the
/// first's component stages dropped their last instance, one to the twin
/// after as long an idle time, and one natively after as long again.
fn scale_from_zero(bench: &Bench, host: &Host) -> Result<ScaleFromZero> {
    let text = bench.bodies.text_32.as_str();
    let name = "embed-idle";
    let kept = "embed-idle-kept";
    for (function, min) in [(name, 0), (kept, 1)] {
        let manifest = cascade_tests::embed_manifest(
            function,
            &format!("[scaling]\nmin_instances = {min}\nidle_timeout_ms = {IDLE_MS}\n"),
        );
        let response = host.put(
            &format!("/v1/functions/{function}"),
            "application/toml",
            manifest,
        );
        anyhow::ensure!(response.status().is_success(), "publishing {function}");
        wait_for_snapshot(host, function)?;
    }
    let native = ModelCeiling::load(
        &bench.native,
        &bench.models,
        &cascade_tests::onnxruntime_library(),
        crate::native::TOKEN_EMBEDDINGS,
        text,
    )?;
    let native_call = || -> Result<f64> {
        let started = Instant::now();
        std::hint::black_box(native.embed(&bench.native, text)?);
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // Milliseconds end to end, and in the component stages (the first
    // and last: the tokenizer and the pooling) by `Server-Timing`.
    let call = |function: &str| -> Result<(f64, f64)> {
        let started = Instant::now();
        let response = client
            .post(format!("{}/v1/functions/{function}/invoke", host.url))
            .header("content-type", "text/plain")
            .body(text.to_string())
            .send()?;
        anyhow::ensure!(
            response.status().is_success(),
            "{function}: {}",
            response.status()
        );
        let timing = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(stage_ms)
            .context("a Server-Timing header")?;
        response.bytes()?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        let components = match timing.as_slice() {
            [tokenizer, _model, pool] => tokenizer + pool,
            other => bail!("{function}: {} stages in Server-Timing", other.len()),
        };
        Ok((took, components))
    };
    for _ in 0..5 {
        call(name)?;
        call(kept)?;
    }
    let warm = (0..WARM_CALLS)
        .map(|_| call(name).map(|(took, _)| took))
        .collect::<Result<Vec<_>>>()?;
    let native_warm = (0..WARM_CALLS)
        .map(|_| native_call())
        .collect::<Result<Vec<_>>>()?;
    let (mut cold, mut idle_kept, mut native_idle) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cold_components, mut kept_components) = (Vec::new(), Vec::new());
    for _ in 0..COLD_CALLS {
        let idle_from = Instant::now();
        let deadline = idle_from + Duration::from_secs(10);
        while live_instances(host, name)? > 0 {
            anyhow::ensure!(Instant::now() < deadline, "{name} never scaled to zero");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (took, components) = call(name)?;
        cold.push(took);
        cold_components.push(components);
        // The same wait, polled the same way, so the host's threads are
        // woken as often as while waiting for the scale to zero.
        let idle_for = idle_from.elapsed();
        poll_status(host, kept, idle_for)?;
        let (took, components) = call(kept)?;
        idle_kept.push(took);
        kept_components.push(components);
        poll_status(host, kept, idle_for)?;
        native_idle.push(native_call()?);
    }
    Ok(ScaleFromZero {
        warm_ms: median(warm),
        cold_ms: cold,
        idle_kept_ms: idle_kept,
        cold_components_ms: cold_components,
        idle_kept_components_ms: kept_components,
        native_warm_ms: median(native_warm),
        native_idle_ms: native_idle,
    })
}

/// The durations in a `Server-Timing` value, in order, in ms.
fn stage_ms(header: &str) -> Vec<f64> {
    header
        .split(',')
        .filter_map(|entry| {
            entry
                .split(';')
                .find_map(|part| part.trim().strip_prefix("dur="))
                .and_then(|ms| ms.parse().ok())
        })
        .collect()
}

/// Reads `function`'s status every 20 ms for `wait`, as the wait for a
/// scale to zero does.
fn poll_status(host: &Host, function: &str, wait: Duration) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < wait {
        live_instances(host, function)?;
        std::thread::sleep(Duration::from_millis(20).min(wait.saturating_sub(started.elapsed())));
    }
    Ok(())
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
