//! The NATS server `cargo xtask up` runs beside the host, with JetStream on
//! a store in the data directory, so the examples' NATS and JetStream
//! triggers work out of the box.

use anyhow::{Context, Result, bail};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// NATS's usual port, taken when free.
const USUAL_PORT: u16 = 4222;

/// A `nats-server -js` child, stopped when dropped.
pub struct UpNats {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
}

impl UpNats {
    /// Starts nats-server (the one `setup::nats_server` put on the PATH)
    /// on port 4222, or on a free port when something else holds 4222,
    /// storing JetStream data under `store`.
    pub fn start(store: &Path) -> Result<UpNats> {
        let port = if TcpStream::connect(("127.0.0.1", USUAL_PORT)).is_err() {
            USUAL_PORT
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        };
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server exited at start ({status}); its store is {}",
                    store.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("nats-server did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(UpNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }
}

impl Drop for UpNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
