//! The CLI's side of the registry API: a thin blocking HTTP client that
//! prints the server's error message and fails when the server says no.

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// Uploads larger than this show a progress bar.
const PROGRESS_THRESHOLD: u64 = 1 << 20;

/// A registry at `base` (e.g. `http://127.0.0.1:8080`).
pub struct RegistryClient {
    base: String,
    token: Option<String>,
    http: Client,
}

impl RegistryClient {
    /// A client for `base`, sending `token` as a bearer token when set.
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        Ok(RegistryClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    fn send(&self, builder: RequestBuilder) -> Result<Response> {
        let response = builder
            .send()
            .with_context(|| format!("cannot reach the registry at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{message} (HTTP {status})")
    }

    /// GET a JSON document.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self
            .send(self.request(reqwest::Method::GET, path))?
            .json()?)
    }

    /// DELETE, returning the JSON answer.
    pub fn delete(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self
            .send(self.request(reqwest::Method::DELETE, path))?
            .json()?)
    }

    /// POST a JSON body, returning the JSON answer.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let builder = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json");
        Ok(self.send(builder.body(body.to_string()))?.json()?)
    }

    /// PUT bytes, returning the JSON answer.
    pub fn put_bytes(
        &self,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<serde_json::Value> {
        let builder = self
            .request(reqwest::Method::PUT, path)
            .header("content-type", content_type);
        Ok(self.send(builder.body(bytes))?.json()?)
    }

    /// PUT a file, streamed, with a progress bar when it is large.
    pub fn put_file(
        &self,
        path: &str,
        content_type: &str,
        file: &Path,
    ) -> Result<serde_json::Value> {
        let opened = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let length = opened.metadata()?.len();
        let bar = if length > PROGRESS_THRESHOLD {
            ProgressBar::new(length)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let reader = Progress {
            inner: opened,
            bar: bar.clone(),
        };
        let builder = self
            .request(reqwest::Method::PUT, path)
            .header("content-type", content_type)
            .body(Body::sized(reader, length));
        let result = self.send(builder);
        bar.finish_and_clear();
        Ok(result?.json()?)
    }

    /// POST a message to a function and return its reply.
    pub fn invoke(&self, function: &str, content_type: &str, body: Vec<u8>) -> Result<Vec<u8>> {
        let builder = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/functions/{function}/invoke"),
            )
            .header("content-type", content_type)
            .body(body);
        Ok(self.send(builder)?.bytes()?.to_vec())
    }
}

struct Progress {
    inner: File,
    bar: ProgressBar,
}

impl Read for Progress {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Packs a model and its extra files into a package tar (model as `model.onnx`).
pub fn pack_model(model: &Path, files: &[std::path::PathBuf]) -> Result<tempfile::NamedTempFile> {
    let staged = tempfile::NamedTempFile::new()?;
    let mut builder = tar::Builder::new(staged.reopen()?);
    builder.append_path_with_name(model, crate::api::PACKAGE_MODEL_FILE)?;
    for file in files {
        let name = file
            .file_name()
            .with_context(|| format!("{} has no file name", file.display()))?;
        builder.append_path_with_name(file, name)?;
    }
    builder.into_inner()?.sync_all()?;
    Ok(staged)
}
