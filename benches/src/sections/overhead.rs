//! 1. Pipeline overhead: `embed` over HTTP (keep-alive, concurrency 1)
//! against the same three steps compiled natively in one process.

use crate::context::{Bench, invoke_url, median_p50, median_p99};
use crate::report::{Bar, Record, Section, num};
use crate::stats::{Latency, median};
use crate::wrk::Wrk;
use anyhow::Result;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "1. Pipeline overhead",
        "`embed` (bert-tokenizer → MiniLM-L3 → mean-pool) invoked over HTTP with keep-alive at \
         concurrency 1, against the same three steps compiled natively into one process \
         (`tokenizers` crate, tract's `model_for_path → into_optimized → into_runnable` on the \
         same ONNX file and output, mean pooling in Rust). Added latency is HTTP p50 minus native p50.",
    );
    let host = bench.host_with_examples(&[]);
    let url = invoke_url(&host, "embed");
    section.table.push(
        [
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
        let target = bench.target(url.clone(), "text/plain", file);
        section.commands.push(Wrk::command(
            1,
            bench.args.seconds,
            &format!("{url}   # body: {tokens}-token text"),
        ));
        // Warm both sides, then alternate native and HTTP runs.
        bench
            .native
            .measure(text, std::time::Duration::from_millis(500))?;
        bench
            .wrk
            .run(&target, 1, std::time::Duration::from_secs(1))?;
        let (mut native, mut http) = (Vec::new(), Vec::new());
        for _ in 0..bench.args.rounds {
            native.push(Latency::of(
                &bench.native.measure(text, bench.run_length())?,
            ));
            http.push(bench.wrk.run(&target, 1, bench.run_length())?);
        }
        let native_p50 = median(native.iter().map(|l| l.p50_us));
        let native_p99 = median(native.iter().map(|l| l.p99_us));
        let (http_p50, http_p99) = (median_p50(&http), median_p99(&http));
        let p50_ratio = http_p50 / native_p50;
        let p99_ratio = http_p99 / native_p99;
        let added_ms = (http_p50 - native_p50) / 1000.0;
        section.table.push(vec![
            format!("{tokens} tokens"),
            num(native_p50),
            num(native_p99),
            num(http_p50),
            num(http_p99),
            num(p50_ratio),
            num(p99_ratio),
            num(added_ms),
        ]);
        let suffix = if tokens == 32 {
            String::new()
        } else {
            format!("_{tokens}")
        };
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
                Bar::AtMost(0.5),
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
    let timing = host_timing(&host.url, &bench.bodies.text_32)?;
    section.notes.push(format!(
        "Where one 32-token request's time goes inside the host (its `Server-Timing` header): {timing}."
    ));
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
        .unwrap_or("absent")
        .to_string())
}
