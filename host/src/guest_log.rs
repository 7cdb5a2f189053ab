//! A guest's stdout and stderr in the host's log: each line one event with
//! the function and stage it came from, rate-limited per instance so a
//! chatty guest cannot flood the log, and never blocking or failing the
//! guest.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest piece of one guest write that reaches the log.
pub const LOG_WRITE_BYTES: usize = 4096;
/// Bytes a guest may write at once (it writes more in several calls).
const WRITE_PERMIT: usize = 64 * 1024;
/// Lines per second one instance may log, sustained.
pub const LINES_PER_SECOND: u32 = 50;
/// Lines one instance may log in a burst.
pub const LINES_BURST: u32 = 200;

/// One instance's stdout or stderr.
#[derive(Clone)]
pub struct GuestLog {
    function: Arc<str>,
    stage: Arc<str>,
    stream: &'static str,
    budget: Arc<Budget>,
}

/// Lines an instance may still log, shared by its two streams.
struct Budget {
    limiter: DefaultDirectRateLimiter,
    dropped: AtomicU64,
}

impl GuestLog {
    /// The stdout and stderr of one instance of `stage` in `function`.
    pub fn pair(function: &str, stage: &str) -> (GuestLog, GuestLog) {
        let quota = Quota::per_second(NonZeroU32::new(LINES_PER_SECOND).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(LINES_BURST).unwrap_or(NonZeroU32::MIN));
        let budget = Arc::new(Budget {
            limiter: RateLimiter::direct(quota),
            dropped: AtomicU64::new(0),
        });
        let log = |stream| GuestLog {
            function: function.into(),
            stage: stage.into(),
            stream,
            budget: budget.clone(),
        };
        (log("stdout"), log("stderr"))
    }

    /// Logs each non-empty line of `text`, within the budget; says how many
    /// lines were dropped once lines pass again.
    fn lines(&self, text: &str) {
        for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            if self.budget.limiter.check().is_err() {
                self.budget.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let dropped = self.budget.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(
                    target: "cascade::guest",
                    function = %self.function,
                    stage = %self.stage,
                    "{dropped} guest log lines dropped (more than {LINES_PER_SECOND} a second)"
                );
            }
            tracing::info!(
                target: "cascade::guest",
                function = %self.function,
                stage = %self.stage,
                stream = self.stream,
                "{line}"
            );
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    /// Written during the guest's own call (wasmtime's default adapter
    /// would write from a task of its own), so each line is logged inside
    /// the request's span and carries its request and trace ids.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestLog {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.lines(&String::from_utf8_lossy(
            &bytes[..bytes.len().min(LOG_WRITE_BYTES)],
        ));
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.lines(&String::from_utf8_lossy(
            &buf[..buf.len().min(LOG_WRITE_BYTES)],
        ));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
