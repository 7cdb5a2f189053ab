//! What every section shares: options, the load generator, the native
//! baseline, the request bodies, and helpers to compare servers round by round.

use crate::RunArgs;
use crate::native::NativeEmbed;
use crate::stats::median;
use crate::wrk::{Target, Wrk, WrkRun};
use anyhow::Result;
use cascade_tests::host::Host;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

/// Request bodies, written once to files for wrk.
pub struct Bodies {
    /// A text of exactly 32 tokens.
    pub text_32: String,
    /// A text of exactly 128 tokens (embed's truncation length).
    pub text_128: String,
    /// A rendered line of upright text, PNG.
    pub line_png: Vec<u8>,
    /// What the trivial functions echo.
    pub echo: Vec<u8>,
}

/// Shared state of one run.
pub struct Bench {
    /// Options.
    pub args: RunArgs,
    /// The load generator.
    pub wrk: Wrk,
    /// Scratch directory.
    pub work: PathBuf,
    /// The models cache.
    pub models: PathBuf,
    /// The native embed baseline.
    pub native: NativeEmbed,
    /// Bodies.
    pub bodies: Bodies,
}

impl Bench {
    /// Prepares bodies and the baseline.
    pub fn new(args: &RunArgs) -> Result<Bench> {
        let work = args.out.join("work");
        std::fs::create_dir_all(&work)?;
        let models = cascade_tests::models_dir();
        let native = NativeEmbed::load(&models)?;
        let bodies = Bodies {
            text_32: native.text_of_tokens(32)?,
            text_128: native.text_of_tokens(128)?,
            line_png: cascade_tests::render_line("Cascade serves models fast", false),
            echo: b"hello, cascade".to_vec(),
        };
        std::fs::write(work.join("text_32.txt"), &bodies.text_32)?;
        std::fs::write(work.join("text_128.txt"), &bodies.text_128)?;
        std::fs::write(work.join("line.png"), &bodies.line_png)?;
        std::fs::write(work.join("echo.txt"), &bodies.echo)?;
        Ok(Bench {
            wrk: Wrk::new(&work)?,
            args: args.clone(),
            work,
            models,
            native,
            bodies,
        })
    }

    /// Length of one load run.
    pub fn run_length(&self) -> Duration {
        Duration::from_secs(self.args.seconds)
    }

    /// A wrk target POSTing the body file `file` (in the work directory).
    pub fn target(&self, url: String, content_type: &str, file: &str) -> Target {
        Target {
            url,
            content_type: content_type.into(),
            body: self.work.join(file),
        }
    }

    /// Runs every target in turn, `rounds` times, so each round compares
    /// them under the same machine conditions; returns runs per target.
    /// Any measured run with a non-2xx answer or a socket error fails it.
    pub fn side_by_side(&self, targets: &[&Target], connections: u32) -> Result<Vec<Vec<WrkRun>>> {
        self.in_rounds(targets, |target, length, clean| {
            if clean {
                self.wrk.run_clean(target, connections, length)
            } else {
                self.wrk.run(target, connections, length)
            }
        })
    }

    /// The rounds of [`Bench::side_by_side`] with any load generator:
    /// `run(target, length, clean)` loads one target once (`clean`: a
    /// measured run, which must fail on any error). A 1 s warm-up of each
    /// target comes first (instances, caches, connection pools).
    pub fn in_rounds<T>(
        &self,
        targets: &[T],
        mut run: impl FnMut(&T, Duration, bool) -> Result<WrkRun>,
    ) -> Result<Vec<Vec<WrkRun>>> {
        let mut runs = vec![Vec::new(); targets.len()];
        for target in targets {
            run(target, Duration::from_secs(1), false)?;
        }
        for _ in 0..self.args.rounds {
            for (i, target) in targets.iter().enumerate() {
                runs[i].push(run(target, self.run_length(), true)?);
            }
        }
        Ok(runs)
    }

    /// A host with the example functions published, once it has made
    /// the snapshot of `embed`'s tokenizer: until then a background job
    /// compiles on spare cores, which measurements would share.
    pub fn host_with_examples(&self, extra: &[&str]) -> Result<Host> {
        let host = Host::start_with(extra);
        host.publish_examples();
        wait_for_snapshot(&host, "embed")?;
        Ok(host)
    }
}

/// Waits until the first stage of `function` (`bert-tokenizer`) starts its
/// instances from the snapshot the host makes in the background after
/// publishing: part of a warm compiled cache.
pub fn wait_for_snapshot(host: &Host, function: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: serde_json::Value = host
            .get(&format!("/v1/functions/{function}/status"))
            .json()?;
        if status["stages"][0]["snapshot"] == serde_json::Value::Bool(true) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{function}'s tokenizer never started from a snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two targets run side by side, the first without something and the
/// second with it: their median req/s and p99.
pub struct Pair {
    /// Without, req/s.
    pub off_rps: f64,
    /// With, req/s.
    pub on_rps: f64,
    /// Without, p99 µs.
    pub off_p99: f64,
    /// With, p99 µs.
    pub on_p99: f64,
}

impl Pair {
    /// The medians of `runs` (from [`Bench::side_by_side`] over two targets).
    pub fn of(runs: &[Vec<WrkRun>]) -> Pair {
        Pair {
            off_rps: median_rps(&runs[0]),
            on_rps: median_rps(&runs[1]),
            off_p99: median_p99(&runs[0]),
            on_p99: median_p99(&runs[1]),
        }
    }

    /// Table cells: both req/s and their ratio, both p99 and their ratio.
    pub fn cells(&self) -> Vec<String> {
        use crate::report::num;
        vec![
            num(self.off_rps),
            num(self.on_rps),
            num(self.on_rps / self.off_rps),
            num(self.off_p99),
            num(self.on_p99),
            num(self.on_p99 / self.off_p99),
        ]
    }
}

/// Median successful requests per second over runs.
pub fn median_rps(runs: &[WrkRun]) -> f64 {
    median(runs.iter().map(WrkRun::ok_rps))
}

/// Median p50 latency over runs, µs.
pub fn median_p50(runs: &[WrkRun]) -> f64 {
    median(runs.iter().map(|r| r.p50_us))
}

/// Median p99 latency over runs, µs.
pub fn median_p99(runs: &[WrkRun]) -> f64 {
    median(runs.iter().map(|r| r.p99_us))
}

/// Publishes the `echo` component and a function serving it as `name`.
pub fn publish_echo(host: &Host, name: &str, extra: &str) -> Result<()> {
    host.publish_component("echo");
    let manifest = format!("name = \"{name}\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n{extra}");
    let response = host.put(
        &format!("/v1/functions/{name}"),
        "application/toml",
        manifest,
    );
    anyhow::ensure!(
        response.status().is_success(),
        "publishing {name}: {}",
        response.text().unwrap_or_default()
    );
    Ok(())
}

/// `http://…/v1/functions/{name}/invoke` on `host`.
pub fn invoke_url(host: &Host, name: &str) -> String {
    format!("{}/v1/functions/{name}/invoke", host.url)
}

/// Time from sending a POST of `body` to `function`'s invoke URL on `base`
/// to the end of its 2xx answer's body, over `client`'s kept-alive
/// connection.
pub fn timed_invoke(
    client: &reqwest::blocking::Client,
    base: &str,
    function: &str,
    content_type: &str,
    body: impl Into<reqwest::blocking::Body>,
) -> Result<std::time::Duration> {
    let started = std::time::Instant::now();
    let response = client
        .post(format!("{base}/v1/functions/{function}/invoke"))
        .header("content-type", content_type)
        .body(body)
        .send()?;
    anyhow::ensure!(
        response.status().is_success(),
        "{function}: {}",
        response.status()
    );
    response.bytes()?;
    Ok(started.elapsed())
}
