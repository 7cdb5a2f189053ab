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
    /// Asks the process to stop (SIGTERM) and gives it a moment before
    /// SIGKILL: a killed uvicorn master would leave its worker processes
    /// running, orphaned, through the rest of the run.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals our own child, which has not been reaped yet
            // (it is only waited for below), so the pid is still its own.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a stopped server may take to shut down its workers.
const STOP_GRACE: Duration = Duration::from_secs(10);

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
