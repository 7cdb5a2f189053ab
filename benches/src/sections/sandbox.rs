//! Section 3, what the sandbox costs: warm instantiation + call of a trivial
//! component, and a trivial function over HTTP against `wasmtime serve`.

use crate::context::{Bench, invoke_url, median_p50, median_rps, publish_echo};
use crate::process::{Spawned, answers};
use crate::report::{Bar, Record, Section, num};
use crate::stats::Latency;
use crate::wrk::Wrk;
use anyhow::Result;
use cascade_host::bindings::Message;
use cascade_host::stage::Grant;
use cascade_tests::host::{Host, free_port};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Connections for the throughput comparison.
const CONNECTIONS: u32 = 16;

/// Manifest tables of the trivial `echo` function.
pub const ECHO_SCALING: &str = "[scaling]\nmin_instances = 1\nmax_instances = 8\n[triggers]\nhttp = true\nnats = { subject = \"echo.requests\" }\n";

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "3. Sandbox overhead",
        "First, in process: a fresh store and instance of the trivial `echo` component from its \
         `InstancePre` on the host's pooling engine, one `preprocess` call, and the drop that \
         returns the slot — what a request would pay if it got a new instance. Then over HTTP: \
         Cascade's `echo` function (one `echo` stage) against `wasmtime serve` (wasmtime-cli at \
         Cascade's wasmtime version, pooling allocator on) serving `http-echo`, a `wasi:http` \
         component answering the body. Not the same work, and labelled so: each platform runs \
         its own way, Cascade reusing warm instances (its default) and `wasmtime serve` making a \
         new instance per request (its only mode); what a new instance costs Cascade is the \
         in-process figure above.",
    );
    let (instantiate, call, release) = instantiate_call(bench)?;
    section.records.extend([
        Record::against(
            "instantiate_us_p50",
            instantiate.p50_us + call.p50_us,
            "us",
            Bar::AtMost(10.0),
        ),
        Record::info("instantiate_only_us_p50", instantiate.p50_us, "us"),
        Record::info("instantiate_call_only_us_p50", call.p50_us, "us"),
        Record::info("instance_drop_us_p50", release.p50_us, "us"),
    ]);
    let host = Host::start();
    publish_echo(&host, "echo", ECHO_SCALING)?;
    let port = free_port();
    let serve = start_wasmtime_serve(bench, port)?;
    let ours = bench.target(invoke_url(&host, "echo"), "text/plain", "echo.txt");
    let theirs = bench.target(
        format!("http://127.0.0.1:{port}/"),
        "text/plain",
        "echo.txt",
    );
    section.commands.extend([
        format!(
            "{} serve --addr 127.0.0.1:{port} -O pooling-allocator=y -S cli=y http_echo.wasm",
            bench.args.wasmtime.display()
        ),
        Wrk::command(
            CONNECTIONS,
            bench.args.seconds,
            &format!("{}   # and wasmtime serve", ours.url),
        ),
        Wrk::command(
            1,
            bench.args.seconds,
            "…   # the same pair at concurrency 1",
        ),
    ]);
    let busy = bench.side_by_side(&[&ours, &theirs], CONNECTIONS)?;
    let single = bench.side_by_side(&[&ours, &theirs], 1)?;
    drop(serve);
    section.table = vec![
        ["server", "req/s at c16", "p50 µs at c1"]
            .map(String::from)
            .to_vec(),
        vec![
            "Cascade `echo` (warm instances reused)".into(),
            num(median_rps(&busy[0])),
            num(median_p50(&single[0])),
        ],
        vec![
            "`wasmtime serve` `http-echo` (a new instance per request)".into(),
            num(median_rps(&busy[1])),
            num(median_p50(&single[1])),
        ],
    ];
    section.records.extend([
        Record::against(
            "vs_wasmtime_serve_rps_ratio",
            median_rps(&busy[0]) / median_rps(&busy[1]),
            "ratio",
            Bar::AtLeast(1.0),
        ),
        Record::info(
            "vs_wasmtime_serve_p50_ratio_c1",
            median_p50(&single[0]) / median_p50(&single[1]),
            "ratio",
        ),
    ]);
    Ok(section)
}

/// p50 of instantiation, of the call, and of dropping the instance, each
/// driven on one thread as the host's reactor drives them.
fn instantiate_call(bench: &Bench) -> Result<(Latency, Latency, Latency)> {
    let stage = cascade_tests::stage("echo");
    let grant = Grant::default();
    let message = || Message {
        content_type: "text/plain".into(),
        body: bench.bodies.echo.clone(),
    };
    let (mut made, mut called, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
    let end = Instant::now() + bench.run_length();
    cascade_tests::reactor().block_on(async {
        let mut round = 0usize;
        while Instant::now() < end || round < 1000 {
            let input = message();
            let started = Instant::now();
            let mut instance = stage.instantiate(&grant).await?;
            let instantiated = Instant::now();
            let output = instance.preprocess(input).await;
            let returned = Instant::now();
            drop(instance);
            let gone = Instant::now();
            anyhow::ensure!(output.is_ok_and(|t| t.len() == 1), "echo did not echo");
            // The first rounds fill caches and the pool's slots.
            if round >= 100 {
                made.push(instantiated - started);
                called.push(returned - instantiated);
                dropped.push(gone - returned);
            }
            round += 1;
        }
        anyhow::Ok(())
    })?;
    Ok((
        Latency::of(&made),
        Latency::of(&called),
        Latency::of(&dropped),
    ))
}

fn start_wasmtime_serve(bench: &Bench, port: u16) -> Result<Spawned> {
    let component = cascade_tests::component_path("http-echo");
    let mut serve = Spawned::start(
        "wasmtime serve",
        Command::new(&bench.args.wasmtime)
            .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
            // Pooling as Cascade has it; wasi:cli because Rust's std imports it.
            .args(["-O", "pooling-allocator=y", "-S", "cli=y"])
            .arg(component)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let url = format!("http://127.0.0.1:{port}/");
    serve.wait_until(Duration::from_secs(60), || {
        answers(&url, "text/plain", b"ready?")
    })?;
    Ok(serve)
}
