//! `cascade`: the command line of the Cascade host. Thin: parses arguments
//! and calls into the library.

use anyhow::{Context, Result, bail};
use cascade_host::client::{self, RegistryClient, pack_model, paths};
use cascade_host::config::ServeConfig;
use cascade_host::logging::LogFormat;
use cascade_host::telemetry::Traces;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cascade",
    version,
    about = "Serverless WebAssembly platform for ML inference functions"
)]
struct Cli {
    /// Registry to talk to.
    #[arg(
        long,
        global = true,
        env = "CASCADE_REGISTRY",
        default_value = "http://127.0.0.1:8080"
    )]
    registry: String,
    /// Bearer token for the registry.
    #[arg(long, global = true, env = "CASCADE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How the log on stderr is written: `text` (colour only on a terminal)
    /// or `json` (one object per line).
    #[arg(
        long,
        global = true,
        env = "CASCADE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a host: the registry API and every published function.
    Serve(Box<ServeConfig>),
    /// Publishes a component, a model or a function.
    #[command(subcommand)]
    Publish(Publish),
    /// Lists what is published.
    List {
        /// Which kind (default: all).
        kind: Option<Kind>,
    },
    /// Shows one artifact: `NAME` (every version) or `NAME@VERSION`.
    Show {
        /// Which kind.
        kind: Kind,
        /// `NAME` or `NAME@VERSION` (functions: `NAME` or `NAME@REVISION`).
        name: String,
    },
    /// Deletes `NAME@VERSION` (functions: `NAME`, with all revisions).
    Delete {
        /// Which kind.
        kind: Kind,
        /// What to delete.
        name: String,
    },
    /// Serves an earlier revision of a function again.
    Rollback {
        /// Function name.
        name: String,
        /// Revision to restore.
        #[arg(long)]
        revision: u64,
    },
    /// Shows a function's traffic split, or sets it:
    /// `cascade traffic NAME 3=90 4=10 --tag candidate=4`.
    Traffic {
        /// Function name.
        name: String,
        /// `REVISION=PERCENT` targets (`latest=P` follows the head);
        /// none: show the split.
        targets: Vec<String>,
        /// `TAG=REVISION`: addressable as `NAME@TAG` (0 % if not a target).
        #[arg(long)]
        tag: Vec<String>,
        /// A request header whose value keeps a caller on one target.
        #[arg(long)]
        sticky_header: Option<String>,
    },
    /// Makes example inputs a function's drift reference: each FILE is one
    /// input, or with --lines each of its non-empty lines is.
    DriftReference {
        /// Function name.
        name: String,
        /// Files of example inputs.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Each non-empty line of each file is one (text) input.
        #[arg(long)]
        lines: bool,
        /// Content type of the inputs.
        #[arg(long, default_value = "text/plain")]
        content_type: String,
        /// The revision it is for (default: the head).
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Invokes a function and prints its reply.
    Invoke {
        /// Function name.
        name: String,
        /// Message body (text); reads standard input when neither this nor --file is given.
        #[arg(long)]
        data: Option<String>,
        /// Message body from a file.
        #[arg(long, conflicts_with = "data")]
        file: Option<PathBuf>,
        /// Content type of the message.
        #[arg(long, default_value = "text/plain")]
        content_type: String,
    },
    /// Serves a published model on its own, as a function of one model
    /// stage (an Open Inference Protocol model, like Triton's).
    ServeModel {
        /// The model, `NAME@VERSION`.
        model: String,
        /// The function's name (default: the model's name).
        #[arg(long)]
        name: Option<String>,
        /// An output to compute (repeatable; default: all).
        #[arg(long = "output")]
        outputs: Vec<String>,
        /// Rows of concurrent requests run together (dynamic batching).
        #[arg(long, default_value_t = 1)]
        batch: u32,
    },
    /// Works on a host's data directory directly (the host stopped).
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Tells which Cascade world a local component file implements.
    Inspect {
        /// Path to a `.wasm` component.
        component: PathBuf,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Copies every component, model and function of a data directory into
    /// the cluster registry's JetStream buckets (idempotent: what is there
    /// with the same bytes is left alone; other bytes are reported as
    /// conflicts and the command exits non-zero).
    Push {
        /// The data directory (of a stopped host).
        #[arg(long, env = "CASCADE_DATA", default_value = "./cascade-data")]
        data: PathBuf,
        /// NATS server URL(s), comma-separated.
        #[arg(long = "nats", env = "CASCADE_NATS_URL")]
        nats_url: String,
        /// NATS token.
        #[arg(long, env = "CASCADE_NATS_TOKEN", hide_env_values = true)]
        nats_token: Option<String>,
        /// The buckets.
        #[command(flatten)]
        buckets: cascade_host::config::BucketFlags,
    },
}

#[derive(Subcommand)]
enum Publish {
    /// A `.wasm` component.
    Component {
        /// The component file.
        file: PathBuf,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its version (semver).
        #[arg(long)]
        version: String,
    },
    /// An ONNX model with optional extra files (tokenizer.json, labels.txt).
    Model {
        /// The ONNX file.
        file: PathBuf,
        /// An extra file of the package (repeatable).
        #[arg(long = "file")]
        files: Vec<PathBuf>,
        /// Fixes an input's shape, `NAME=D1,D2,…` (numbers fixed, names dynamic; repeatable).
        #[arg(long = "input-shape")]
        input_shapes: Vec<String>,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its version (semver).
        #[arg(long)]
        version: String,
    },
    /// A function manifest (TOML).
    Function {
        /// The manifest file.
        manifest: PathBuf,
        /// Serve the new revision to this percent of requests (tagged
        /// `canary`), the previous revision to the rest.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Components,
    Models,
    Functions,
}

impl From<Kind> for client::Kind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Components => client::Kind::Components,
            Kind::Models => client::Kind::Models,
            Kind::Functions => client::Kind::Functions,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_));
    let code = match run(cli) {
        Ok(()) => 0,
        // `cascade list | head` closed the pipe: the reader has what it wanted.
        Err(error) if closed_stdout(&error) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    };
    if serving {
        exit_without_destructors(code);
    }
    std::process::exit(code);
}

/// Ends a host that has stopped (its runtime, and with it the registry
/// and every task, already dropped) without running C++ static
/// destructors: ONNX Runtime's tear down its CPU tables while a thread of
/// its own may still be building a session in the background, which
/// aborts the process ("cpuinfo_get_cores_count called before cpuinfo is
/// initialized") and turns a graceful stop into a crash.
fn exit_without_destructors(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; what the host had to write
    // is written and flushed above.
    unsafe { libc::_exit(code) }
}

/// Whether `error` is a write to a stdout whose reader has gone away.
fn closed_stdout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes through a returned error rather than `println!`, which panics when the pipe is closed.
fn print(value: &serde_json::Value) -> Result<()> {
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(value)?
    )?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Traces only for a serving host; built inside the runtime (gRPC's
    // exporter needs it), before the log so its layer is in place.
    let traces = match &cli.command {
        Command::Serve(config) => {
            let _inside = runtime.enter();
            Traces::from_env(
                config.otlp_endpoint.as_deref(),
                config.otlp_protocol.as_deref(),
            )?
        }
        _ => None,
    };
    cascade_host::logging::init(cli.log_format, traces.as_ref());
    if let Some(traces) = &traces {
        tracing::info!("{}", traces.summary());
    }
    match cli.command {
        Command::Serve(config) => {
            let served = runtime.block_on(cascade_host::serve::run(*config));
            if let Some(traces) = traces {
                traces.shutdown();
            }
            served
        }
        Command::Inspect { component } => inspect(&component),
        Command::Registry(RegistryCommand::Push {
            data,
            nats_url,
            nats_token,
            buckets,
        }) => runtime.block_on(push(&data, &nats_url, nats_token, &buckets)),
        command => {
            let client = RegistryClient::new(&cli.registry, cli.token)?;
            runtime.block_on(talk(&client, command))
        }
    }
}

/// How long `cascade registry push` waits for NATS.
const PUSH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `cascade registry push`: the data directory into the buckets.
async fn push(
    data: &std::path::Path,
    nats_url: &str,
    token: Option<String>,
    buckets: &cascade_host::config::BucketFlags,
) -> Result<()> {
    let registry = cascade_registry::Registry::open(data).with_context(|| {
        format!(
            "opening the registry in {} (stop the host that uses it first)",
            data.display()
        )
    })?;
    let mut options = async_nats::ConnectOptions::new().connection_timeout(PUSH_CONNECT_TIMEOUT);
    if let Some(token) = token {
        options = options.token(token);
    }
    let client = options
        .connect(cascade_host::trigger::nats::server_addrs(nats_url)?)
        .await
        .with_context(|| format!("connecting to NATS at {nats_url}"))?;
    let jetstream = async_nats::jetstream::new(client);
    let store = cascade_host::cluster::ClusterStore::open(&jetstream, &buckets.buckets()).await?;
    let report = cascade_host::cluster::push::push(&registry, &store).await?;
    print(&serde_json::to_value(&report)?)?;
    if !report.conflicts.is_empty() {
        bail!(
            "{} item(s) are in the cluster registry with other content and were left as they are",
            report.conflicts.len()
        );
    }
    Ok(())
}

/// Prints the world of a local component file.
fn inspect(component: &std::path::Path) -> Result<()> {
    let engine = cascade_host::engine::ServingEngine::new(&Default::default())
        .map_err(anyhow::Error::from)?;
    let stage = cascade_host::stage::ComponentStage::from_file(&engine, component)
        .map_err(anyhow::Error::from)?;
    writeln!(
        std::io::stdout().lock(),
        "{}: {}",
        component.display(),
        stage.world().name()
    )?;
    Ok(())
}

/// The commands that talk to a registry.
async fn talk(client: &RegistryClient, command: Command) -> Result<()> {
    match command {
        Command::Publish(publish) => self::publish(client, publish).await,
        Command::List { kind } => list(client, kind).await,
        Command::Show { kind, name } => {
            let path = match name.split_once('@') {
                Some((name, version)) => paths::version(kind.into(), name, version),
                None => paths::named(kind.into(), &name),
            };
            print(&client.get::<serde_json::Value>(&path).await?)
        }
        Command::Delete { kind, name } => {
            let path = match (kind, name.split_once('@')) {
                (Kind::Functions, None) => paths::function(&name),
                (Kind::Functions, Some(_)) => {
                    bail!("delete a function by NAME (it removes every revision)")
                }
                (_, Some((name, version))) => paths::version(kind.into(), name, version),
                (_, None) => bail!("delete takes NAME@VERSION"),
            };
            print(&client.delete(&path).await?)
        }
        Command::Rollback { name, revision } => print(
            &client
                .post_json(
                    &paths::rollback(&name),
                    &serde_json::json!({ "revision": revision }),
                )
                .await?,
        ),
        Command::Traffic {
            name,
            targets,
            tag,
            sticky_header,
        } => {
            let path = paths::traffic(&name);
            if targets.is_empty() && tag.is_empty() && sticky_header.is_none() {
                return print(&client.get::<serde_json::Value>(&path).await?);
            }
            let split = cascade_host::traffic::split_from_args(&targets, &tag, sticky_header)?;
            let body = serde_json::to_vec(&split)?;
            print(&client.put_bytes(&path, "application/json", body).await?)
        }
        Command::DriftReference {
            name,
            files,
            lines,
            content_type,
            revision,
        } => {
            let upload = drift_reference(&files, lines, &content_type, revision)?;
            let body = serde_json::to_vec(&upload)?;
            let path = paths::drift_reference(&name);
            print(&client.put_bytes(&path, "application/json", body).await?)
        }
        Command::Invoke {
            name,
            data,
            file,
            content_type,
        } => invoke(client, &name, data, file, &content_type).await,
        Command::ServeModel {
            model,
            name,
            outputs,
            batch,
        } => serve_model(client, &model, name, &outputs, batch).await,
        Command::Serve(_) | Command::Inspect { .. } | Command::Registry(_) => Ok(()),
    }
}

/// Invokes a function with `data`, the bytes of `file`, or standard input,
/// and prints its reply.
async fn invoke(
    client: &RegistryClient,
    name: &str,
    data: Option<String>,
    file: Option<PathBuf>,
    content_type: &str,
) -> Result<()> {
    let body = match (data, file) {
        (Some(data), _) => data.into_bytes(),
        (None, Some(file)) => {
            std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
        }
        (None, None) => {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)?;
            buffer
        }
    };
    let reply = client.invoke(name, content_type, body).await?;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        String::from_utf8_lossy(&reply)
    )?;
    Ok(())
}

/// Publishes a function of one model stage and prints its record.
async fn serve_model(
    client: &RegistryClient,
    model: &str,
    name: Option<String>,
    outputs: &[String],
    batch: u32,
) -> Result<()> {
    let reference: cascade_registry::names::Reference = model.parse()?;
    let name = name.unwrap_or_else(|| reference.name.to_string());
    let manifest = format!(
        "name = {}\n[[stages]]\nmodel = {}\noutputs = {}\nbatch = {batch}\n",
        toml_string(&name),
        toml_string(model),
        serde_json::to_string(outputs)?,
    );
    // Checked here first, so a mistake names the flag's value at once.
    cascade_registry::manifest::parse(&manifest)?;
    let published = client
        .put_bytes(
            &paths::function(&name),
            "application/toml",
            manifest.into_bytes(),
        )
        .await?;
    if let Some(warning) = published.get("warning").and_then(|w| w.as_str()) {
        eprintln!("warning: {warning}");
    }
    print(&published)
}

/// `text` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

async fn publish(client: &RegistryClient, publish: Publish) -> Result<()> {
    match publish {
        Publish::Component {
            file,
            name,
            version,
        } => {
            let path = paths::version(client::Kind::Components, &name, &version);
            print(&client.put_file(&path, "application/wasm", &file).await?)
        }
        Publish::Model {
            file,
            files,
            input_shapes,
            name,
            version,
        } => {
            let shapes = input_shapes
                .iter()
                .map(|s| {
                    s.split_once('=')
                        .context("--input-shape takes NAME=D1,D2,...")
                })
                .collect::<Result<Vec<_>>>()?;
            let path = paths::publish_model(&name, &version, &shapes);
            if files.is_empty() {
                print(
                    &client
                        .put_file(&path, "application/octet-stream", &file)
                        .await?,
                )
            } else {
                let package = pack_model(&file, &files)?;
                print(
                    &client
                        .put_file(&path, "application/x-tar", package.path())
                        .await?,
                )
            }
        }
        Publish::Function { manifest, canary } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let parsed = cascade_registry::manifest::parse(&text)?;
            let name = parsed.function.name.as_str();
            let path = paths::function(name);
            let previous = match canary {
                Some(_) => Some(head_revision(client, name).await?),
                None => None,
            };
            let published = client
                .put_bytes(&path, "application/toml", text.into_bytes())
                .await?;
            // Stored, but this host cannot serve it (say, a model it cannot
            // load): the record is printed, the problem goes to stderr.
            if let Some(warning) = published.get("warning").and_then(|w| w.as_str()) {
                eprintln!("warning: {warning}");
            }
            print(&published)?;
            if let (Some(percent), Some(previous)) = (canary, previous) {
                let revision = published["revision"].as_u64().context("the new revision")?;
                anyhow::ensure!(
                    revision != previous,
                    "--canary: the manifest is the current revision {previous}; nothing to compare"
                );
                let split = serde_json::json!({"targets": [
                    {"revision": previous, "percent": 100 - percent, "tag": "stable"},
                    {"revision": revision, "percent": percent, "tag": "canary"},
                ]});
                let body = split.to_string().into_bytes();
                print(
                    &client
                        .put_bytes(&paths::traffic(name), "application/json", body)
                        .await?,
                )?;
            }
            Ok(())
        }
    }
}

/// The revision a function serves now (a canary needs one to compare with).
async fn head_revision(client: &RegistryClient, name: &str) -> Result<u64> {
    let current: serde_json::Value = client
        .get(&paths::function(name))
        .await
        .with_context(|| format!("--canary: function {name} has no earlier revision"))?;
    current["revision"].as_u64().context("the current revision")
}

async fn list(client: &RegistryClient, kind: Option<Kind>) -> Result<()> {
    let kinds = match kind {
        Some(kind) => vec![kind],
        None => vec![Kind::Components, Kind::Models, Kind::Functions],
    };
    for kind in kinds {
        let kind = client::Kind::from(kind);
        let listed: serde_json::Value = client.get(&paths::list(kind)).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}:", kind.segment())?;
        for item in listed.as_array().into_iter().flatten() {
            let version = item
                .get("version")
                .or_else(|| item.get("revision"))
                .cloned()
                .unwrap_or_default();
            let version = version
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| version.to_string());
            let digest = item["digest"].as_str().unwrap_or("");
            writeln!(
                out,
                "  {}@{version}  {}",
                item["name"].as_str().unwrap_or("?"),
                &digest[..digest.len().min(12)]
            )?;
        }
    }
    Ok(())
}

/// The body of `PUT .../drift/reference` for `cascade drift-reference`.
fn drift_reference(
    files: &[PathBuf],
    lines: bool,
    content_type: &str,
    revision: Option<u64>,
) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let mut inputs = Vec::new();
    let mut binary = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        if lines {
            let text = String::from_utf8(bytes)
                .with_context(|| format!("{} is not UTF-8 text", file.display()))?;
            inputs.extend(
                text.lines()
                    .filter(|line| !line.trim().is_empty())
                    .map(str::to_string),
            );
        } else {
            binary.push(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    Ok(serde_json::json!({
        "revision": revision,
        "content_type": content_type,
        "inputs": inputs,
        "inputs_base64": binary,
    }))
}
