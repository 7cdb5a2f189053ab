//! `cascade`: the command line of the Cascade host. Thin: parses arguments
//! and calls into the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cascade",
    version,
    about = "Serverless WebAssembly platform for ML inference functions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tells which Cascade world a component file implements.
    Inspect {
        /// Path to a `.wasm` component.
        component: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Inspect { component } => {
            let engine = cascade_host::engine::ServingEngine::new(&Default::default())?;
            let stage = cascade_host::stage::ComponentStage::from_file(&engine, &component)?;
            println!("{}: {}", component.display(), stage.world().name());
        }
    }
    Ok(())
}
