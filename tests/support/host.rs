//! A real `cascade serve` process on a free loopback port, with its own data
//! directory, stopped when dropped.

use crate::{component_path, models_dir};
use reqwest::blocking::{Client, Response};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../xtask/src/examples.rs"]
mod examples;

/// The `cascade` binary cargo built beside this binary: in the same
/// directory (`target/<profile>/`, a bench driver) or one level up (a test
/// binary in `target/<profile>/deps/`).
pub fn cascade_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    let binary = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("cascade"))
        .find(|candidate| candidate.is_file());
    binary.unwrap_or_else(|| {
        panic!(
            "no `cascade` binary beside {}: build it with `cargo build -p cascade-host` (cargo xtask test does)",
            exe.display()
        )
    })
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running host.
pub struct Host {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    port: u16,
    extra: Vec<String>,
    env: Vec<(String, std::ffi::OsString)>,
    log: Option<PathBuf>,
    _owned: Option<tempfile::TempDir>,
}

impl Host {
    /// Starts a host on a fresh data directory.
    pub fn start() -> Host {
        Host::start_with(&[])
    }

    /// Starts a host on a fresh data directory with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start_in(dir.path(), extra);
        host._owned = Some(dir);
        host
    }

    /// Starts a host on `data` (kept after the host stops).
    pub fn start_in(data: &Path, extra: &[&str]) -> Host {
        let port = free_port();
        let mut host = Host {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            data: data.to_path_buf(),
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            log: None,
            _owned: None,
        };
        host.spawn();
        host
    }

    /// Starts a host whose log (at `info`) goes to a file; see [`Host::log`].
    pub fn start_logged() -> Host {
        Host::start_logged_with(&[])
    }

    /// [`Host::start_logged`] with extra `serve` flags.
    pub fn start_logged_with(extra: &[&str]) -> Host {
        Host::start_logged_in(extra, &[])
    }

    /// [`Host::start_logged_with`] with environment variables set for the
    /// host alone.
    pub fn start_logged_in(extra: &[&str], env: &[(&str, &Path)]) -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host {
            child: None,
            url: String::new(),
            data: dir.path().join("data"),
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_os_str().to_os_string()))
                .collect(),
            log: Some(dir.path().join("host.log")),
            _owned: Some(dir),
        };
        host.url = format!("http://127.0.0.1:{}", host.port);
        host.spawn();
        host
    }

    /// What a host started with [`Host::start_logged`] has logged so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn spawn(&mut self) {
        let (level, stderr) = match &self.log {
            Some(path) => (
                "info",
                Stdio::from(std::fs::File::create(path).expect("log file")),
            ),
            None => ("warn", Stdio::inherit()),
        };
        let child = Command::new(cascade_binary())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data",
            ])
            .arg(&self.data)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", level)
            // Hosts given an OTLP endpoint send spans within 0.1 s, not 5.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            // As on servers, where it is common: traps must still log one line.
            .env("RUST_BACKTRACE", if self.log.is_some() { "1" } else { "0" })
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("cascade serve starts");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the host is alive and has prepared the functions its
    /// registry held at start (`/readyz`'s `functions` check; the other
    /// checks, such as NATS, are left to the tests that care).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client().get(format!("{}/readyz", self.url)).send()
                && let Ok(body) = r.json::<serde_json::Value>()
                && body["checks"]["functions"] == true
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("cascade serve exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "cascade serve did not become healthy within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to 30 s for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Starts the same host again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs the `cascade` CLI against this host and asserts it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> std::process::Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cascade {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs the `cascade` CLI against this host.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(cascade_binary())
            .arg("--registry")
            .arg(&self.url)
            .args(args)
            .output()
            .expect("cascade runs")
    }

    /// Publishes the example functions exactly as `cargo xtask publish-examples` does.
    pub fn publish_examples(&self) {
        let (root, components) = example_dirs();
        examples::publish(
            &cascade_binary(),
            &self.url,
            &root,
            &components,
            &models_dir(),
        )
        .unwrap_or_else(|e| panic!("publishing the examples: {e}"));
    }

    /// Publishes the example functions through the CLI with `--token token`
    /// (for hosts that need one).
    pub fn publish_examples_with_token(&self, token: &str) {
        let (root, components) = example_dirs();
        for args in examples::publish_commands(&root, &components, &models_dir()) {
            let mut with_token = vec!["--token", token];
            with_token.extend(args.iter().map(String::as_str));
            let out = self.cli(&with_token);
            assert!(
                out.status.success(),
                "cascade {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Serves MiniLM alone (its token embeddings) as the function `name`,
    /// through `cascade serve-model` with `extra` flags.
    pub fn serve_minilm(&self, name: &str, extra: &[&str]) {
        let mut args = vec![
            "serve-model",
            "minilm-l3@1.0.0",
            "--name",
            name,
            "--output",
            "onnx::Shape_422",
        ];
        args.extend_from_slice(extra);
        let out = self.cli_ok(&args);
        let record: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("the printed record");
        assert_eq!(record["name"], name, "{record}");
    }

    /// Publishes one built component as `name@0.1.0` through the CLI.
    pub fn publish_component(&self, name: &str) {
        let wasm = component_path(name);
        let wasm = wasm.to_str().expect("utf-8 path");
        let out = self.cli(&[
            "publish",
            "component",
            wasm,
            "--name",
            name,
            "--version",
            "0.1.0",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Publishes `model` from the models cache as `reference`, with
    /// `file` (also from the cache) among its package's files and `extra`
    /// flags (`--input-shape ...`), through the CLI.
    pub fn publish_model(&self, model: &str, file: &str, extra: &[&str], reference: &str) {
        let (name, version) = reference.split_once('@').expect("name@version");
        let model = crate::model_file(model);
        let file = crate::model_file(file);
        let mut args = vec![
            "publish",
            "model",
            model.to_str().expect("utf-8 path"),
            "--file",
            file.to_str().expect("utf-8 path"),
            "--name",
            name,
            "--version",
            version,
        ];
        args.extend_from_slice(extra);
        self.cli_ok(&args);
    }

    /// Publishes the example components only (no models): quick set-up for
    /// tests that need some stages to reference.
    pub fn publish_examples_small(&self) {
        self.publish_component("bert-tokenizer");
        self.publish_component("mean-pool");
    }

    /// GET a path.
    pub fn get(&self, path: &str) -> Response {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET answers")
    }

    /// POST a body with a content type to `/v1/functions/{name}/invoke`.
    pub fn invoke(
        &self,
        function: &str,
        content_type: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> Response {
        client()
            .post(format!("{}/v1/functions/{function}/invoke", self.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .expect("invoke answers")
    }

    /// Publishes the function manifest `manifest` as `name`, which must be
    /// a new revision (201).
    pub fn publish_function(&self, name: &str, manifest: &str) {
        let response = self.put(
            &format!("/v1/functions/{name}"),
            "application/toml",
            manifest.to_string(),
        );
        assert_eq!(
            response.status(),
            201,
            "publishing {name}: {}",
            response.text().unwrap_or_default()
        );
    }

    /// PUT a body.
    pub fn put(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> Response {
        client()
            .put(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .expect("PUT answers")
    }

    /// The value of a Prometheus sample whose line starts with `prefix`, summed.
    pub fn metric(&self, prefix: &str) -> f64 {
        let text = self.get("/metrics").text().expect("metrics text");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The project's root and the directory of the built components.
fn example_dirs() -> (PathBuf, PathBuf) {
    let components = component_path("bert-tokenizer")
        .parent()
        .expect("dir")
        .to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .to_path_buf();
    (root, components)
}

/// A blocking HTTP client with a generous timeout.
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// The error body's message of a failed response, with its status.
pub fn error_of(response: Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().expect("JSON error body");
    (
        status,
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
