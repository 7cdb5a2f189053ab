//! The other servers a run starts (the Python server, `wasmtime serve`, the
//! raw NATS responder): child processes killed when dropped, and readiness
//! by polling.

use anyhow::{Context, Result, bail};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process, killed on drop.
pub struct Spawned {
    child: Child,
    name: String,
}

impl Spawned {
    /// Starts `command`, naming it `name` in errors.
    pub fn start(name: &str, command: &mut Command) -> Result<Spawned> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Spawned {
            child,
            name: name.into(),
        })
    }

    /// Waits until `ready` holds, failing when the process exits or `limit` passes.
    pub fn wait_until(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before it was ready ({status})", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} was not ready within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a POST of `body` to `url` answers 200.
pub fn answers(url: &str, content_type: &str, body: &[u8]) -> bool {
    reqwest::blocking::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_vec())
        .timeout(Duration::from_secs(10))
        .send()
        .is_ok_and(|r| r.status().is_success())
}

/// Resident set size of process `pid`, in MiB.
pub fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")?;
    Ok(kb / 1024.0)
}
