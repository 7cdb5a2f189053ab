//! Section 2, against what users would pick instead: a FastAPI + uvicorn +
//! onnxruntime + `tokenizers` server serving the same two functions, against
//! Cascade running its models with ONNX Runtime (the default backend, on
//! the same wheel's library, so the ratio is what each platform adds).

use crate::context::{Bench, invoke_url, median_p99, median_rps};
use crate::model_ceiling::ModelCeiling;
use crate::process::{Spawned, answers};
use crate::report::{Bar, Record, Section, num};
use crate::stats::{Latency, median};
use crate::wrk::{Target, Wrk};
use anyhow::{Context, Result, ensure};
use cascade_tests::host::free_port;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Concurrencies compared.
const CONCURRENCY: [u32; 3] = [1, 4, 16];

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut section = Section::new(
        "2. Against a Python onnxruntime server",
        &format!(
            "The same `embed` (32-token text) and `orientation` (a rendered 26-character line, PNG) \
             served by FastAPI + uvicorn (`uvicorn[standard]`: uvloop and httptools) with {workers} \
             worker processes (one per core), onnxruntime with one intra-op thread per session, \
             the `tokenizers` package, numpy and Pillow (`benches/python/server.py`, versions in \
             `benches/python/requirements.txt`), against Cascade, all loaded by wrk at each concurrency \
             in turn. The targets compare equal work with equal resources: Cascade with its default \
             backend, ONNX Runtime from the same wheel's library (which `cargo xtask models` caches \
             and `cascade serve` finds), one thread per model run, lone runs included (`--onnxruntime-alone-threads 1`), at most one run per \
             core, and both examples exactly as `cargo xtask up` publishes them (`embed` with \
             `batch = 8` and `max_instances = 16`: requests that wait for the model together share \
             a run, which the Python server cannot do): the same kernels, threads and cores as the \
             Python server. Beside it, labelled and not a target: `cascade serve` with no flag at \
             all (lone runs may use every core). tract, the fallback, is in section 1. \
             Every measured run must be all 2xx with no socket error, or the section fails."
        ),
    );
    let python_port = free_port();
    let python = start_python(&bench.args.python, &bench.models, python_port, workers)?;
    let python_base = format!("http://127.0.0.1:{python_port}");
    let equal = bench.host_with_examples(&["--onnxruntime-alone-threads", "1"])?;
    let host = bench.host_with_examples(&[])?;
    check_same_answers(bench, &python_base, &equal.url)?;
    check_same_answers(bench, &python_base, &host.url)?;
    section.commands.push(
        "cascade serve --onnxruntime-alone-threads 1   # the others: \
         cascade serve"
            .into(),
    );
    section.commands.push(format!(
        "{} -m uvicorn server:app --app-dir benches/python --host 127.0.0.1 --port {python_port} --workers {workers} --no-access-log",
        bench.args.python.display()
    ));
    section.table.push(
        [
            "function",
            "concurrency",
            "Cascade req/s (equal)",
            "Python req/s",
            "req/s ×",
            "Cascade p99 ms (equal)",
            "Python p99 ms",
            "default req/s ×",
            "default p99 ms",
        ]
        .map(String::from)
        .to_vec(),
    );
    for (function, content_type, file) in [
        ("embed", "text/plain", "text_32.txt"),
        ("orientation", "image/png", "line.png"),
    ] {
        let contenders = Contenders {
            equal: bench.target(invoke_url(&equal, function), content_type, file),
            default: bench.target(invoke_url(&host, function), content_type, file),
            python: bench.target(format!("{python_base}/{function}"), content_type, file),
        };
        let mut rps = Vec::new();
        for c in CONCURRENCY {
            rps.push((c, compare(bench, &mut section, function, c, &contenders)?));
        }
        if function == "embed" {
            ceiling(bench, &mut section, &rps)?;
        }
    }
    drop(python);
    Ok(section)
}

/// Measures the model-only ceiling of `embed` (`model_ceiling.rs`) in as
/// many rounds as the comparisons, right after them, and sets both servers'
/// figures (`rps`: Cascade's and Python's by concurrency) against it: at
/// one connection against one lone run after another, and where there are
/// enough connections to keep every core busy against runs on every core.
fn ceiling(bench: &Bench, section: &mut Section, rps: &[(u32, Req)]) -> Result<()> {
    let library = cascade_tests::onnxruntime_library();
    let ceiling = ModelCeiling::load(
        &bench.native,
        &bench.models,
        &library,
        crate::native::TOKEN_EMBEDDINGS,
        &bench.bodies.text_32,
    )?;
    ceiling.runs_per_second(Duration::from_secs(1))?;
    // A third of a load run each: the suite stays within 15 minutes, and a
    // model run alone varies far less than a server under load.
    let length = bench.run_length() / 3;
    let rounds = (0..bench.args.rounds)
        .map(|_| ceiling.runs_per_second(length))
        .collect::<Result<Vec<f64>>>()?;
    let runs = median(rounds);
    let lone = (0..bench.args.rounds)
        .map(|_| ceiling.lone_runs(length))
        .collect::<Result<Vec<_>>>()?;
    let lone_rps = median(
        lone.iter()
            .map(|runs| runs.len() as f64 / runs.iter().map(Duration::as_secs_f64).sum::<f64>()),
    );
    let lone_p99_us = median(lone.iter().map(|runs| Latency::of(runs).p99_us));
    section.records.extend([
        Record::info("embed_model_only_rps", runs, "req/s"),
        Record::info("embed_model_lone_rps", lone_rps, "req/s"),
        Record::info("embed_model_lone_p99_us", lone_p99_us, "us"),
    ]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut share = |c: u32, req: Req, most: f64| {
        section.records.extend([
            Record::info(
                &format!("model_only_over_python_rps_c{c}"),
                most / req.python,
                "ratio",
            ),
            Record::info(
                &format!("cascade_share_of_model_only_c{c}"),
                req.cascade / most,
                "ratio",
            ),
        ]);
        format!(
            "at c{c} Python reached {:.0} % of it and Cascade {:.0} %, so 1.3× Python needs {:.0} %",
            100.0 * req.python / most,
            100.0 * req.cascade / most,
            130.0 * req.python / most
        )
    };
    let c1 = rps
        .iter()
        .find(|(c, _)| *c == 1)
        .map(|&(_, req)| req)
        .context("no run at one connection")?;
    let at_c1 = share(1, c1, lone_rps);
    let shares: Vec<String> = rps
        .iter()
        .filter(|(c, _)| *c as usize > cores)
        .map(|&(c, req)| share(c, req, runs))
        .collect();
    let allowed_p99_ms = 0.8 * c1.python_p99_us / 1000.0;
    section.notes.push(format!(
        "The ceiling: MiniLM alone on the 32-token input as the ONNX Runtime host runs it (one \
         thread per run, in this process, no server around it), measured right after the `embed` \
         rounds (medians of {} rounds of {} s). At one connection a server has one request at a \
         time, so its ceiling is one lone run after another: {} runs per second, p99 {} ms; \
         {at_c1}. The p99 target at c1 is 0.8× Python's {} ms, {} ms, which leaves {} ms above \
         the model's own p99 for everything else a request needs (HTTP, tokenizing, pooling); \
         Cascade's p99 was {} ms. With more connections than cores the ceiling is one run per \
         core, back to back: {} runs per second; {}. A server that runs each request's model \
         once cannot answer faster. What is left between a server and the ceiling is its own \
         CPU per request (HTTP, tokenizing, pooling, hand-offs between threads) and moments a \
         core waits for work; batching (`batch`) is the only way past it.",
        bench.args.rounds,
        num(length.as_secs_f64()),
        num(lone_rps),
        num(lone_p99_us / 1000.0),
        num(c1.python_p99_us / 1000.0),
        num(allowed_p99_ms),
        num(allowed_p99_ms - lone_p99_us / 1000.0),
        num(c1.cascade_p99_us / 1000.0),
        num(runs),
        shares.join("; ")
    ));
    Ok(())
}

/// Median req/s and p99 (µs) of one comparison.
#[derive(Clone, Copy)]
struct Req {
    cascade: f64,
    python: f64,
    cascade_p99_us: f64,
    python_p99_us: f64,
}

/// The servers loaded in turn: Cascade with ONNX Runtime at equal
/// resources, `cascade serve` with no flag, Python.
struct Contenders {
    equal: Target,
    default: Target,
    python: Target,
}

/// Loads the three servers in turn at `c` connections, records the
/// ratios (targets at equal resources, the rest labelled info), and
/// returns the equal host's and Python's req/s.
fn compare(
    bench: &Bench,
    section: &mut Section,
    function: &str,
    c: u32,
    contenders: &Contenders,
) -> Result<Req> {
    section.commands.push(Wrk::command(
        c,
        bench.args.seconds,
        &format!(
            "{}   # and the default and Python URLs",
            contenders.equal.url
        ),
    ));
    let runs = bench.side_by_side(
        &[&contenders.equal, &contenders.default, &contenders.python],
        c,
    )?;
    let theirs = &runs[2];
    let rps_ratio = |runs| median_rps(runs) / median_rps(theirs);
    let p99_ms = |runs| median_p99(runs) / 1000.0;
    let p99_ratio = |runs| median_p99(runs) / median_p99(theirs);
    let (equal, default) = (&runs[0], &runs[1]);
    section.table.push(vec![
        function.into(),
        c.to_string(),
        num(median_rps(equal)),
        num(median_rps(theirs)),
        num(rps_ratio(equal)),
        num(p99_ms(equal)),
        num(p99_ms(theirs)),
        num(rps_ratio(default)),
        num(p99_ms(default)),
    ]);
    section.records.extend([
        Record::against(
            &format!("vs_python_equal_rps_ratio_{function}_c{c}"),
            rps_ratio(equal),
            "ratio",
            Bar::AtLeast(1.3),
        ),
        Record::against(
            &format!("vs_python_equal_p99_ratio_{function}_c{c}"),
            p99_ratio(equal),
            "ratio",
            Bar::AtMost(0.8),
        ),
    ]);
    section.records.extend([
        Record::info(
            &format!("vs_python_default_rps_ratio_{function}_c{c}"),
            rps_ratio(default),
            "ratio",
        ),
        Record::info(
            &format!("vs_python_default_p99_ratio_{function}_c{c}"),
            p99_ratio(default),
            "ratio",
        ),
    ]);
    Ok(Req {
        cascade: median_rps(equal),
        python: median_rps(theirs),
        cascade_p99_us: median_p99(equal),
        python_p99_us: median_p99(theirs),
    })
}

/// Starts uvicorn from the venv and waits until it answers.
fn start_python(python: &Path, models: &Path, port: u16, workers: usize) -> Result<Spawned> {
    let app_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let mut server = Spawned::start(
        "the Python server",
        Command::new(python)
            .args(["-m", "uvicorn", "server:app", "--app-dir"])
            .arg(&app_dir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--workers",
                &workers.to_string(),
                "--no-access-log",
                "--log-level",
                "warning",
            ])
            .env("CASCADE_MODELS", models)
            .env("ORT_THREADS", "1")
            .stdout(Stdio::null()),
    )?;
    let url = format!("http://127.0.0.1:{port}/embed");
    server.wait_until(Duration::from_secs(120), || {
        answers(&url, "text/plain", b"ready?")
    })?;
    Ok(server)
}

/// Both servers must compute the same thing, or the comparison means nothing.
fn check_same_answers(bench: &Bench, python: &str, cascade: &str) -> Result<()> {
    let client = reqwest::blocking::Client::new();
    let post = |url: String, content_type: &str, body: Vec<u8>| -> Result<serde_json::Value> {
        let response = client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()?;
        ensure!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        Ok(response.json()?)
    };
    let text = bench.bodies.text_32.as_bytes().to_vec();
    let ours = post(
        format!("{cascade}/v1/functions/embed/invoke"),
        "text/plain",
        text.clone(),
    )?;
    let theirs = post(format!("{python}/embed"), "text/plain", text)?;
    let vector = |v: &serde_json::Value| -> Vec<f64> {
        v["embeddings"][0]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (a, b) = (vector(&ours), vector(&theirs));
    ensure!(
        a.len() == 384 && b.len() == 384,
        "embeddings of 384 numbers expected"
    );
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    ensure!(
        dot > 0.999,
        "Cascade and Python embeddings differ (cosine {dot})"
    );
    let png = bench.bodies.line_png.clone();
    let label =
        |v: &serde_json::Value| v["predictions"][0][0]["label"].as_str().map(str::to_string);
    let ours = post(
        format!("{cascade}/v1/functions/orientation/invoke"),
        "image/png",
        png.clone(),
    )?;
    let theirs = post(format!("{python}/orientation"), "image/png", png)?;
    ensure!(
        label(&ours).is_some() && label(&ours) == label(&theirs),
        "orientation labels differ: Cascade {ours}, Python {theirs}"
    );
    Ok(())
}
