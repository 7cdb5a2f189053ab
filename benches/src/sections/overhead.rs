//! Section 1, pipeline overhead: `embed` over HTTP (keep-alive, concurrency 1)
//! against the same three steps compiled natively in one process, on each
//! model backend.

use crate::context::{Bench, invoke_url, median_p50, median_p99};
use crate::model_ceiling::ModelCeiling;
use crate::report::{Bar, Record, Section, num};
use crate::stats::{Latency, median};
use crate::wrk::Wrk;
use anyhow::{Context, Result};
use std::time::Duration;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "1. Pipeline overhead",
        "`embed` (bert-tokenizer → MiniLM-L3 → mean-pool) invoked over HTTP with keep-alive at \
         concurrency 1, against the same three steps compiled natively into one process \
         (the `tokenizers` crate, the same model file and output, mean pooling in Rust), with \
         the same engine on both sides. ONNX Runtime (the default backend): the host with \
         `--onnxruntime-alone-threads 1` and the native side on the host's own `OrtModel`, \
         both one thread per run. tract (`--model-backend tract`, the fallback, at 32 tokens; \
         labelled, not a target): tract's `model_for_path → into_optimized → into_runnable`, a plan per shape on both \
         sides. Added latency is HTTP p50 minus native p50.",
    );
    let library = cascade_tests::onnxruntime_library();
    let onnxruntime = bench.host_with_examples(&["--onnxruntime-alone-threads", "1"])?;
    let tract = bench.host_with_examples(&["--model-backend", "tract"])?;
    let ceiling = |text: &str| {
        ModelCeiling::load(
            &bench.native,
            &bench.models,
            &library,
            crate::native::TOKEN_EMBEDDINGS,
            text,
        )
    };
    let ort_native = ceiling(&bench.bodies.text_32)?;
    section.table.push(
        [
            "backend",
            "input",
            "native p50 µs",
            "native p99 µs",
            "Cascade p50 µs",
            "Cascade p99 µs",
            "p50 ×",
            "p99 ×",
            "added ms",
        ]
        .map(String::from)
        .to_vec(),
    );
    for (tokens, file, text) in [
        (32, "text_32.txt", &bench.bodies.text_32),
        (128, "text_128.txt", &bench.bodies.text_128),
    ] {
        let suffix = if tokens == 32 {
            String::new()
        } else {
            format!("_{tokens}")
        };
        // tract, the fallback, at 32 tokens only: the suite's time is bounded.
        let backends: &[&str] = if tokens == 32 {
            &["onnxruntime", "tract"]
        } else {
            &["onnxruntime"]
        };
        for &backend in backends {
            let host = if backend == "tract" {
                &tract
            } else {
                &onnxruntime
            };
            let url = invoke_url(host, "embed");
            let target = bench.target(url.clone(), "text/plain", file);
            section.commands.push(Wrk::command(
                1,
                bench.args.seconds,
                &format!("{url}   # {backend}, body: {tokens}-token text"),
            ));
            let native = |duration: Duration| {
                if backend == "tract" {
                    bench.native.measure(text, duration)
                } else {
                    ort_native.measure(&bench.native, text, duration)
                }
            };
            // Warm both sides, then alternate native and HTTP runs.
            native(Duration::from_millis(500))?;
            bench.wrk.run(&target, 1, Duration::from_secs(1))?;
            let (mut natives, mut http) = (Vec::new(), Vec::new());
            for _ in 0..bench.args.rounds {
                natives.push(Latency::of(&native(bench.run_length())?));
                http.push(bench.wrk.run(&target, 1, bench.run_length())?);
            }
            let native_p50 = median(natives.iter().map(|l| l.p50_us));
            let native_p99 = median(natives.iter().map(|l| l.p99_us));
            let (http_p50, http_p99) = (median_p50(&http), median_p99(&http));
            let p50_ratio = http_p50 / native_p50;
            let p99_ratio = http_p99 / native_p99;
            let added_ms = (http_p50 - native_p50) / 1000.0;
            section.table.push(vec![
                backend.into(),
                format!("{tokens} tokens"),
                num(native_p50),
                num(native_p99),
                num(http_p50),
                num(http_p99),
                num(p50_ratio),
                num(p99_ratio),
                num(added_ms),
            ]);
            if backend == "tract" {
                section.records.extend([
                    Record::info(
                        &format!("pipeline_overhead_added_ms_tract{suffix}"),
                        added_ms,
                        "ms",
                    ),
                    Record::info(
                        &format!("pipeline_overhead_p50_ratio_tract{suffix}"),
                        p50_ratio,
                        "ratio",
                    ),
                    Record::info(
                        &format!("native_embed_p50_us_tract{suffix}"),
                        native_p50,
                        "us",
                    ),
                ]);
                continue;
            }
            let added_bar = if tokens == 32 { 0.3 } else { 0.5 };
            section.records.extend([
                Record::against(
                    &format!("pipeline_overhead_p50_ratio{suffix}"),
                    p50_ratio,
                    "ratio",
                    Bar::AtMost(1.10),
                ),
                Record::against(
                    &format!("pipeline_overhead_added_ms{suffix}"),
                    added_ms,
                    "ms",
                    Bar::AtMost(added_bar),
                ),
                Record::against(
                    &format!("pipeline_overhead_p99_ratio{suffix}"),
                    p99_ratio,
                    "ratio",
                    Bar::AtMost(1.25),
                ),
                Record::info(&format!("native_embed_p50_us{suffix}"), native_p50, "us"),
                Record::info(&format!("http_embed_p50_us{suffix}"), http_p50, "us"),
            ]);
        }
    }
    let check = ort_native.embed(&bench.native, &bench.bodies.text_32)?;
    let reference = bench.native.embed(&bench.bodies.text_32)?;
    let cosine: f32 = check.iter().zip(&reference).map(|(a, b)| a * b).sum();
    anyhow::ensure!(
        cosine > 0.999,
        "the native ONNX Runtime and tract embeddings differ (cosine {cosine})"
    );
    for (backend, host) in [("onnxruntime", &onnxruntime), ("tract", &tract)] {
        let timing = host_timing(&host.url, &bench.bodies.text_32)?;
        section.notes.push(format!(
            "Where one 32-token request's time goes inside the {backend} host (its `Server-Timing` header): {timing}."
        ));
    }
    Ok(section)
}

/// The `Server-Timing` header of one `embed` call.
fn host_timing(base: &str, text: &str) -> Result<String> {
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/v1/functions/embed/invoke"))
        .header("content-type", "text/plain")
        .body(text.to_string())
        .send()?;
    Ok(response
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .context("no Server-Timing header")?
        .to_string())
}
