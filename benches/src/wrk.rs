//! HTTP load with `wrk` (Debian's package): one POST body, keep-alive
//! connections, a Lua `done` hook that prints the figures as JSON.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct WrkRun {
    /// Responses received.
    pub requests: u64,
    /// Length of the run in microseconds.
    pub duration_us: u64,
    /// Responses with status >= 400.
    pub non2xx: u64,
    /// Socket errors of every kind.
    pub socket_errors: u64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
}

impl WrkRun {
    /// Responses per second that succeeded.
    pub fn ok_rps(&self) -> f64 {
        self.requests.saturating_sub(self.non2xx) as f64 / (self.duration_us as f64 / 1e6).max(1e-9)
    }
}

/// A POST target: URL, content type and the body file.
#[derive(Debug, Clone)]
pub struct Target {
    /// Full URL.
    pub url: String,
    /// `Content-Type` header.
    pub content_type: String,
    /// File holding the body.
    pub body: PathBuf,
}

const MARK: &str = "WRK-RESULT ";

/// The Lua script that sets the request and prints the result line.
fn script(target: &Target) -> String {
    format!(
        r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{MARK}{{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%f,"p99_us":%f}}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#,
        content_type = target.content_type,
        body = target.body.display(),
    )
}

/// Runs wrk against targets; scripts go to `dir`.
pub struct Wrk {
    dir: PathBuf,
}

impl Wrk {
    /// A runner keeping its scripts in `dir`.
    pub fn new(dir: &Path) -> Result<Wrk> {
        std::fs::create_dir_all(dir)?;
        Ok(Wrk { dir: dir.into() })
    }

    /// The command line of a run, as the report shows it.
    pub fn command(connections: u32, seconds: u64, url: &str) -> String {
        format!("wrk -t1 -c{connections} -d{seconds}s --latency -s post.lua {url}")
    }

    /// One run of `seconds` with `connections` keep-alive connections on one wrk thread.
    pub fn run(&self, target: &Target, connections: u32, duration: Duration) -> Result<WrkRun> {
        let script_path = self.dir.join("post.lua");
        std::fs::write(&script_path, script(target))?;
        let output = Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{}s", duration.as_secs().max(1)),
                "--timeout",
                "10s",
                "--latency",
                "-s",
            ])
            .arg(&script_path)
            .arg(&target.url)
            .output()
            .context("running wrk (apt-get install -y wrk; cargo xtask bench installs it)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(MARK)) else {
            bail!(
                "wrk printed no result for {} ({}): {}{}",
                target.url,
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let run: WrkRun = serde_json::from_str(line).context("parsing wrk's result line")?;
        if run.requests == 0 {
            bail!("wrk got no response from {}", target.url);
        }
        Ok(run)
    }

    /// A run that compares: every response 2xx and no socket error, or an
    /// error naming what went wrong (a run with errors is not a result:
    /// its throughput counts only successes while its latency counts all).
    pub fn run_clean(
        &self,
        target: &Target,
        connections: u32,
        duration: Duration,
    ) -> Result<WrkRun> {
        let run = self.run(target, connections, duration)?;
        if run.non2xx > 0 || run.socket_errors > 0 {
            bail!(
                "{} at {connections} connections: {} of {} responses were not 2xx and {} socket                  errors; a run with errors is not a result",
                target.url,
                run.non2xx,
                run.requests,
                run.socket_errors
            );
        }
        Ok(run)
    }
}
