//! The one client of the registry's REST API, used by the CLI and by
//! mirrors alike: every path is formatted in [`paths`] and nowhere else,
//! and a refusal comes back as the server's own message and status.

use cascade_registry::names::Reference;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Uploads larger than this show a progress bar.
const PROGRESS_THRESHOLD: u64 = 1 << 20;

/// The registry API's paths, as its route table (`routes.rs`) matches them.
pub mod paths {
    use super::Kind;
    use cascade_registry::names::Reference;

    /// Every artifact of a kind.
    pub fn list(kind: Kind) -> String {
        format!("/v1/{}", kind.segment())
    }

    /// Every version (functions: the current revision) of one artifact.
    pub fn named(kind: Kind, name: &str) -> String {
        format!("/v1/{}/{name}", kind.segment())
    }

    /// One version of a component or model, or one revision of a function.
    pub fn version(kind: Kind, name: &str, version: &str) -> String {
        format!("/v1/{}/{name}/{version}", kind.segment())
    }

    /// One component or model version (where it is published, too).
    pub fn artifact(kind: Kind, reference: &Reference) -> String {
        version(
            kind,
            reference.name.as_str(),
            &reference.version.to_string(),
        )
    }

    /// The bytes of a component (`.wasm`) or a model (`.onnx`).
    pub fn content(kind: Kind, reference: &Reference) -> String {
        format!("{}/content", artifact(kind, reference))
    }

    /// One extra file of a model package.
    pub fn model_file(reference: &Reference, file: &str) -> String {
        format!("{}/files/{file}", artifact(Kind::Models, reference))
    }

    /// Where a model is published, with input shapes fixed as `(input, dims)`.
    pub fn publish_model(name: &str, version: &str, shapes: &[(&str, &str)]) -> String {
        let query: Vec<String> = shapes
            .iter()
            .map(|(input, dims)| format!("input_shape={input}:{dims}"))
            .collect();
        format!(
            "{}?{}",
            self::version(Kind::Models, name, version),
            query.join("&")
        )
    }

    /// Where a function's manifest is published.
    pub fn function(name: &str) -> String {
        named(Kind::Functions, name)
    }

    /// A function's rollback.
    pub fn rollback(name: &str) -> String {
        format!("{}/rollback", function(name))
    }

    /// A function's traffic split.
    pub fn traffic(name: &str) -> String {
        format!("{}/traffic", function(name))
    }

    /// A function's drift reference.
    pub fn drift_reference(name: &str) -> String {
        format!("{}/drift/reference", function(name))
    }

    /// A function's invocation.
    pub fn invoke(name: &str) -> String {
        format!("{}/invoke", function(name))
    }
}

/// The kinds of artifact the registry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// WebAssembly components.
    Components,
    /// ONNX model packages.
    Models,
    /// Function manifests.
    Functions,
}

impl Kind {
    /// The path segment under `/v1`.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Components => "components",
            Kind::Models => "models",
            Kind::Functions => "functions",
        }
    }
}

/// Why a call to the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry could not be reached, or the answer broke off.
    #[error("cannot reach the registry at {base}: {source}")]
    Unreachable {
        /// The registry's address.
        base: String,
        /// What the HTTP client saw.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("{message} (HTTP {status})")]
    Refused {
        /// The status.
        status: reqwest::StatusCode,
        /// The server's message.
        message: String,
    },
    /// The answer is not the JSON expected.
    #[error("unexpected answer from {path}: {source}")]
    Answer {
        /// The path asked.
        path: String,
        /// Why it does not decode.
        #[source]
        source: reqwest::Error,
    },
    /// A local file to upload could not be read.
    #[error("reading {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Setup(#[source] reqwest::Error),
}

/// A registry at `base` (e.g. `http://127.0.0.1:8080`).
pub struct RegistryClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl RegistryClient {
    /// A client for `base`, sending `token` as a bearer token when set.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(ClientError::Setup)?;
        Ok(RegistryClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// The registry's address.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends; an error status becomes [`ClientError::Refused`] with the
    /// server's message.
    async fn send(&self, builder: RequestBuilder) -> Result<Response, ClientError> {
        let response = builder
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(ClientError::Refused { status, message })
    }

    fn unreachable(&self, source: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            base: self.base.clone(),
            source,
        }
    }

    async fn decode<T: DeserializeOwned>(response: Response, path: &str) -> Result<T, ClientError> {
        response.json().await.map_err(|source| ClientError::Answer {
            path: path.to_string(),
            source,
        })
    }

    /// GETs a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.request(Method::GET, path)).await?;
        Self::decode(response, path).await
    }

    /// GETs bytes, as a stream of chunks.
    pub async fn download(&self, path: &str) -> Result<Response, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    /// DELETEs, returning the JSON answer.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let response = self.send(self.request(Method::DELETE, path)).await?;
        Self::decode(response, path).await
    }

    /// POSTs a JSON body, returning the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let builder = self
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string());
        let response = self.send(builder).await?;
        Self::decode(response, path).await
    }

    /// PUTs bytes, returning the JSON answer.
    pub async fn put_bytes(
        &self,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, ClientError> {
        let builder = self
            .request(Method::PUT, path)
            .header("content-type", content_type)
            .body(bytes);
        let response = self.send(builder).await?;
        Self::decode(response, path).await
    }

    /// PUTs a file, streamed with its length, with a progress bar when it
    /// is large.
    pub async fn put_file(
        &self,
        path: &str,
        content_type: &str,
        file: &Path,
    ) -> Result<Value, ClientError> {
        let unreadable = |source| ClientError::File {
            path: file.to_path_buf(),
            source,
        };
        let opened = tokio::fs::File::open(file).await.map_err(unreadable)?;
        let length = opened.metadata().await.map_err(unreadable)?.len();
        let bar = progress_bar(file, length);
        let counted = bar.clone();
        let stream = tokio_util::io::ReaderStream::new(opened).inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                counted.inc(chunk.len() as u64);
            }
        });
        let builder = self
            .request(Method::PUT, path)
            .header("content-type", content_type)
            .header("content-length", length)
            .body(reqwest::Body::wrap_stream(stream));
        let sent = self.send(builder).await;
        bar.finish_and_clear();
        Self::decode(sent?, path).await
    }

    /// POSTs a message to a function and returns its reply.
    pub async fn invoke(
        &self,
        function: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let builder = self
            .request(Method::POST, &paths::invoke(function))
            .header("content-type", content_type)
            .body(body);
        let response = self.send(builder).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|source| self.unreachable(source))?;
        Ok(bytes.to_vec())
    }

    /// The current revision of every function.
    pub async fn functions(&self) -> Result<Vec<FunctionRecord>, ClientError> {
        self.get(&paths::list(Kind::Functions)).await
    }

    /// Every component version.
    pub async fn components(&self) -> Result<Vec<ComponentRecord>, ClientError> {
        self.get(&paths::list(Kind::Components)).await
    }

    /// Every model version.
    pub async fn models(&self) -> Result<Vec<ModelRecord>, ClientError> {
        self.get(&paths::list(Kind::Models)).await
    }

    /// One component version.
    pub async fn component(&self, reference: &Reference) -> Result<ComponentRecord, ClientError> {
        self.get(&paths::artifact(Kind::Components, reference))
            .await
    }

    /// One model version.
    pub async fn model(&self, reference: &Reference) -> Result<ModelRecord, ClientError> {
        self.get(&paths::artifact(Kind::Models, reference)).await
    }
}

fn progress_bar(file: &Path, length: u64) -> ProgressBar {
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
    bar
}

/// Packs a model and its extra files into a package tar (model as `model.onnx`).
pub fn pack_model(model: &Path, files: &[PathBuf]) -> std::io::Result<tempfile::NamedTempFile> {
    let staged = tempfile::NamedTempFile::new()?;
    let mut builder = tar::Builder::new(staged.reopen()?);
    builder.append_path_with_name(model, cascade_registry::PACKAGE_MODEL_FILE)?;
    for file in files {
        let name = file.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} has no file name", file.display()),
            )
        })?;
        builder.append_path_with_name(file, name)?;
    }
    builder.into_inner()?.sync_all()?;
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> Reference {
        text.parse().expect("a reference")
    }

    /// Every path this client formats resolves, in the host's route table,
    /// to the route that serves it.
    #[test]
    fn every_path_matches_its_route() {
        use crate::routes::{Route, resolve};
        let r = reference("bert-tokenizer@0.1.0");
        let cases = [
            ("GET", paths::list(Kind::Components), Route::ListComponents),
            ("GET", paths::list(Kind::Models), Route::ListModels),
            ("GET", paths::list(Kind::Functions), Route::ListFunctions),
            (
                "GET",
                paths::named(Kind::Components, "x"),
                Route::ComponentVersions,
            ),
            ("GET", paths::named(Kind::Models, "x"), Route::ModelVersions),
            ("GET", paths::function("embed"), Route::Function),
            (
                "GET",
                paths::version(Kind::Functions, "embed", "2"),
                Route::FunctionRevision,
            ),
            (
                "GET",
                paths::artifact(Kind::Components, &r),
                Route::Component,
            ),
            (
                "PUT",
                paths::artifact(Kind::Components, &r),
                Route::PublishComponent,
            ),
            (
                "DELETE",
                paths::artifact(Kind::Components, &r),
                Route::DeleteComponent,
            ),
            (
                "GET",
                paths::content(Kind::Components, &r),
                Route::ComponentContent,
            ),
            ("GET", paths::artifact(Kind::Models, &r), Route::Model),
            ("GET", paths::content(Kind::Models, &r), Route::ModelContent),
            ("GET", paths::model_file(&r, "vocab.txt"), Route::ModelFile),
            ("PUT", paths::function("embed"), Route::PublishFunction),
            ("DELETE", paths::function("embed"), Route::DeleteFunction),
            ("POST", paths::rollback("embed"), Route::Rollback),
            ("PUT", paths::traffic("embed"), Route::SetTraffic),
            ("GET", paths::traffic("embed"), Route::Traffic),
            (
                "PUT",
                paths::drift_reference("embed"),
                Route::DriftReference,
            ),
            ("POST", paths::invoke("embed"), Route::Invoke),
        ];
        for (method, path, route) in cases {
            let method: hyper::Method = method.parse().expect("a method");
            let matched = resolve(&method, &path).expect("a route");
            assert_eq!(matched.route, route, "{method} {path}");
        }
        let published = paths::publish_model("bert-tokenizer", "0.1.0", &[("x", "N,3")]);
        assert_eq!(
            published,
            "/v1/models/bert-tokenizer/0.1.0?input_shape=x:N,3"
        );
    }
}
