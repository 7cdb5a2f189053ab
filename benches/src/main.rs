//! `cascade-bench`: the benchmark suite `cargo xtask bench` runs.
//!
//! `cascade-bench run` measures Cascade side by side with what users would
//! pick instead (native tract in one process, a FastAPI + onnxruntime
//! server, `wasmtime serve`, a raw NATS responder), in one run on one
//! machine, and writes `BENCHMARKS.md` and `target/bench/results.json`.
//! Each numbered section of the issue is one module under [`sections`].
//! `cascade-bench nats-responder` is the raw responder the NATS section
//! starts as a process of its own.

mod context;
mod model_ceiling;
mod native;
mod nats;
mod oip_load;
mod process;
mod report;
mod sections;
mod stats;
mod wrk;

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Cascade's benchmark suite (run it with `cargo xtask bench`)")]
enum Cli {
    /// Runs every section and writes the report.
    Run(RunArgs),
    /// Replies to every request on SUBJECT with its payload (the raw baseline).
    NatsResponder {
        /// NATS server URL.
        #[arg(long)]
        url: String,
        /// Subject to serve.
        #[arg(long)]
        subject: String,
    },
}

/// Options of `cascade-bench run`.
#[derive(Parser, Debug, Clone)]
pub struct RunArgs {
    /// Directory for results.json and scratch files.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// The Markdown report to rewrite.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub report: PathBuf,
    /// Python of the venv holding FastAPI, uvicorn and onnxruntime.
    #[arg(long)]
    pub python: PathBuf,
    /// Python of the venv holding MLServer (the OIP section's contender).
    #[arg(long)]
    pub mlserver_python: Option<PathBuf>,
    /// The `wasmtime` binary (wasmtime-cli at the version Cascade uses).
    #[arg(long)]
    pub wasmtime: PathBuf,
    /// Seconds per load run.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Side-by-side rounds per comparison (medians are taken over rounds).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Only these sections (1-12), comma-separated; all by default.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u8>,
    /// Text appended to the report (the optimisation log).
    #[arg(long)]
    pub appendix: Option<PathBuf>,
}

fn main() {
    let result = match Cli::parse() {
        Cli::Run(args) => sections::run_all(&args),
        Cli::NatsResponder { url, subject } => responder(&url, &subject),
    };
    if let Err(error) = result {
        eprintln!("cascade-bench: error: {error:#}");
        std::process::exit(1);
    }
}

fn responder(url: &str, subject: &str) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(nats::respond(url, subject))
}
