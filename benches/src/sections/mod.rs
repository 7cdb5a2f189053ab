//! The numbered sections of the benchmark issue, one module each, and the
//! run that strings them together and writes the report.

mod cold_start;
mod jetstream;
mod many;
mod memory;
mod messaging;
mod oip;
mod operations;
mod overhead;
mod python;
mod sandbox;
mod scaling;
mod tracing;

use crate::RunArgs;
use crate::context::Bench;
use crate::report::{self, Section};
use anyhow::{Context, Result};
use std::process::Command;
use std::time::Instant;

type SectionFn = fn(&Bench) -> Result<Section>;

const SECTIONS: &[(u8, &str, SectionFn)] = &[
    (1, "pipeline overhead", overhead::run),
    (2, "Python onnxruntime server", python::run),
    (3, "sandbox overhead", sandbox::run),
    (4, "scaling", scaling::run),
    (5, "cold start", cold_start::run),
    (6, "NATS", messaging::run),
    (7, "memory", memory::run),
    (8, "Open Inference Protocol", oip::run),
    (9, "JetStream", jetstream::run),
    (10, "tracing", tracing::run),
    (11, "model operations", operations::run),
    (12, "many functions", many::run),
];

/// Runs the selected sections and writes `results.json` and the report.
pub fn run_all(args: &RunArgs) -> Result<()> {
    let started = Instant::now();
    let bench = Bench::new(args)?;
    let mut sections = Vec::new();
    for (number, name, run) in SECTIONS {
        if !args.only.is_empty() && !args.only.contains(number) {
            continue;
        }
        eprintln!("cascade-bench: {number}. {name}…");
        let section_started = Instant::now();
        let section = run(&bench).with_context(|| format!("section {number} ({name})"))?;
        for r in &section.records {
            eprintln!(
                "cascade-bench:   {} = {} {} {}",
                r.name,
                report::num(r.value),
                r.unit,
                match r.met {
                    Some(true) => "(met)",
                    Some(false) => "(NOT met)",
                    None => "",
                }
            );
        }
        eprintln!(
            "cascade-bench:   took {:.0} s",
            section_started.elapsed().as_secs_f64()
        );
        sections.push(section);
    }
    let json = args.out.join("results.json");
    report::write_json(&json, &sections)?;
    let appendix = match &args.appendix {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    let header = header(args, started.elapsed().as_secs_f64());
    std::fs::write(
        &args.report,
        report::markdown(&header, &sections, &appendix),
    )
    .with_context(|| format!("writing {}", args.report.display()))?;
    eprintln!(
        "cascade-bench: wrote {} and {} in {:.0} s",
        args.report.display(),
        json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The report's opening: what ran where, and how to read it.
fn header(args: &RunArgs, seconds: f64) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("unknown".into(), |kb| format!("{:.0} GiB", kb / 1048576.0));
    let output = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    format!(
        "# Cascade benchmarks\n\n\
         Written by `cargo xtask bench` (do not edit by hand: the next run rewrites it; \
         the optimisation log at the end comes from `benches/optimisations.md`).\n\n\
         - Machine: {cores} cores, {cpu}, {memory} RAM, {kernel}\n\
         - Toolchain: {rustc}; wasmtime 48; models on ONNX Runtime 1.32.0 (the default backend, the `onnxruntime` wheel's library) and tract-onnx 0.23.9 where labelled; host built in the dev profile \
         with dependencies at opt-level 2 without their debug assertions (the profile the tests use)\n\
         - Load generator: {wrk}, one thread, keep-alive connections; NATS load from \
         `benches/src/nats.rs` (async-nats)\n\
         - Method: every comparison runs its contenders in turn, round after round \
         ({rounds} rounds of {secs} s, after a 1 s warm-up each), on the same machine in the \
         same run; figures are medians over rounds and ratios are taken between those medians. \
         Absolute times on this shared machine are noisy; the ratios are what to compare.\n\
         - Command: `cargo xtask bench` (this run took {seconds:.0} s of measuring)\n",
        kernel = output("uname", "-sr"),
        rustc = output("rustc", "--version"),
        wrk = output("wrk", "--version").lines().next().unwrap_or("wrk"),
        rounds = args.rounds,
        secs = args.seconds,
    )
}
