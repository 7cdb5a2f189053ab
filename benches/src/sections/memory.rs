//! Section 7, memory: resident set of an idle host with 100 published functions,
//! and what each warm instance adds.

use crate::context::{Bench, invoke_url, publish_echo, wait_for_snapshot};
use crate::process::rss_mb;
use crate::report::{Record, Section, num};
use anyhow::{Context, Result, ensure};
use cascade_tests::host::Host;
use std::time::{Duration, Instant};

/// Functions published for the idle figure.
const FUNCTIONS: usize = 100;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "7. Memory",
        &format!(
            "VmRSS of the `cascade serve --model-backend tract` process (from /proc) on a fresh \
             data directory: empty; \
             with {FUNCTIONS} functions published (each one `echo` stage, `min_instances` 0) and \
             idle; after one call to each (one warm instance per function). Then the example \
             functions are published, `embed` is called once, then until MiniLM's plan for 32 \
             tokens is specialised (what that plan adds), and `embed` is loaded with 4 connections until it \
             runs 4 warm instances of each stage: the growth per warm `embed` instance (tokenizer \
             with its vocabulary, mean-pool)."
        ),
    );
    // tract, so the figures stay comparable with earlier runs and the
    // shape-plan step has plans to measure (ONNX Runtime needs none).
    let host = Host::start_with(&["--model-backend", "tract"]);
    let pid = host.pid().context("host pid")?;
    settle();
    let empty = rss_mb(pid)?;
    publish_echo(&host, "echo-000", "")?;
    for i in 1..FUNCTIONS {
        let name = format!("echo-{i:03}");
        let manifest = format!("name = \"{name}\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n");
        let response = host.put(
            &format!("/v1/functions/{name}"),
            "application/toml",
            manifest,
        );
        ensure!(response.status().is_success(), "publishing {name}");
    }
    wait_served(&host, &format!("echo-{:03}", FUNCTIONS - 1))?;
    settle();
    let idle = rss_mb(pid)?;
    for i in 0..FUNCTIONS {
        let response = host.invoke(&format!("echo-{i:03}"), "text/plain", "hi");
        ensure!(response.status().is_success(), "echo-{i:03} answers");
    }
    settle();
    let warm = rss_mb(pid)?;
    host.publish_examples();
    wait_served(&host, "embed")?;
    // Its tokenizer's snapshot is part of a served `embed`'s steady state.
    wait_for_snapshot(&host, "embed")?;
    settle();
    let served = rss_mb(pid)?;
    let text = &bench.bodies.text_32;
    let response = host.invoke("embed", "text/plain", text.to_string());
    ensure!(response.status().is_success(), "embed answers");
    settle();
    let called = rss_mb(pid)?;
    specialise_embed(&host, text)?;
    settle();
    let before = (rss_mb(pid)?, embed_instances(&host)?);
    let target = bench.target(invoke_url(&host, "embed"), "text/plain", "text_32.txt");
    bench.wrk.run(&target, 4, Duration::from_secs(2))?;
    let after = (rss_mb(pid)?, embed_instances(&host)?);
    let per_embed = if after.1 > before.1 {
        (after.0 - before.0) / (after.1 - before.1) as f64
    } else {
        f64::NAN
    };
    section.table = vec![
        ["state", "RSS MiB"].map(String::from).to_vec(),
        vec!["empty host".into(), num(empty)],
        vec![format!("{FUNCTIONS} functions, idle"), num(idle)],
        vec![
            format!("{FUNCTIONS} functions, one warm instance each"),
            num(warm),
        ],
        vec!["+ examples published".into(), num(served)],
        vec!["+ one `embed` call".into(), num(called)],
        vec![
            format!(
                "+ MiniLM's plan for 32 tokens, embed at {} instances",
                before.1
            ),
            num(before.0),
        ],
        vec![format!("+ embed at {} instances", after.1), num(after.0)],
    ];
    section.records.extend([
        Record::info("idle_rss_mb_100_functions", idle, "MB"),
        Record::info("idle_rss_mb_empty", empty, "MB"),
        Record::info(
            "rss_mb_per_warm_echo_instance",
            (warm - idle) / FUNCTIONS as f64,
            "MB",
        ),
        Record::info("rss_mb_per_warm_embed_instance", per_embed, "MB"),
        Record::info("rss_mb_per_shape_plan_minilm", before.0 - called, "MB"),
    ]);
    section.notes.push(
        "The issue sets no bar for memory; these figures are for tracking regressions.".into(),
    );
    Ok(section)
}

/// Lets freed memory and background work settle before a reading.
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

fn wait_served(host: &Host, function: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host
        .get(&format!("/v1/functions/{function}/status"))
        .status()
        .is_success()
    {
        ensure!(Instant::now() < deadline, "{function} was never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Calls `embed` with `text` until the host has specialised MiniLM's plan
/// to its shape, so the growth per instance measured next leaves it out.
fn specialise_embed(host: &Host, text: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.metric("cascade_shape_plans{model=\"minilm-l3@1.0.0\"}") < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "MiniLM's plan was never specialised"
        );
        let response = host.invoke("embed", "text/plain", text.to_string());
        ensure!(response.status().is_success(), "embed answers");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Live instances of `embed`'s first (tokenizer) stage.
fn embed_instances(host: &Host) -> Result<u64> {
    let status: serde_json::Value = host.get("/v1/functions/embed/status").json()?;
    status["stages"][0]["instances"]
        .as_u64()
        .context("status lists the tokenizer stage")
}
