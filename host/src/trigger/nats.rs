//! The NATS trigger: every served function is a NATS micro service
//! (`cascade-<function>`) with the endpoint `cascade.fn.<function>` and,
//! when its manifest sets `triggers.nats`, a second endpoint on that
//! subject. Both use the queue group `cascade.<function>`, so among several
//! hosts each message is handled once.
//!
//! A message with a reply subject gets the output (or the micro services
//! error headers); one without gets its output published to
//! `result_subject`, or its failure, with the original payload, to
//! `<subject>.errors`. Registry changes are announced by [`crate::events`].

use crate::bindings::Message as GuestMessage;
use crate::error::InvokeError;
use crate::pipeline::{PreparedFunction, Trigger};
use crate::runtime::Runtime;
use crate::trace_context::{self, NatsHeaders};
use crate::traffic::Choice;
use crate::trigger::subjects;
use async_nats::service::{Service, ServiceExt};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Token authentication.
    pub token: Option<String>,
    /// A `.creds` file.
    pub credentials: Option<std::path::PathBuf>,
    /// Require TLS.
    pub tls: bool,
}

/// The connection's state as the rest of the host sees it.
#[derive(Default)]
pub struct ConnectionState {
    /// Whether the client is connected now (for `/readyz`).
    pub connected: AtomicBool,
    /// Woken on every (re)connection: whoever follows events must catch up
    /// on what it missed while disconnected.
    pub reconnected: tokio::sync::Notify,
}

/// Why the host could not set up its NATS connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The `.creds` file cannot be read.
    #[error("reading NATS credentials {}: {source}", path.display())]
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client refused the options (a malformed URL, say).
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
    /// One URL of the list is malformed.
    #[error("NATS URL {url:?}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The servers of a comma-separated URL list (`nats://a:4222,nats://b:4222`).
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse().map_err(|source| ConnectError::Url {
                url: url.to_string(),
                source,
            })
        })
        .collect()
}

/// Connects, retrying in the background until the server is reachable.
pub async fn connect(
    options: &NatsOptions,
    state: Arc<ConnectionState>,
) -> Result<Client, ConnectError> {
    let flag = state.clone();
    let mut connect = ConnectOptions::new()
        .name("cascade")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| Duration::from_millis((100 * attempt as u64).min(1000)))
        .event_callback(move |event| {
            let flag = flag.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        flag.connected.store(true, Ordering::SeqCst);
                        flag.reconnected.notify_waiters();
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        flag.connected.store(false, Ordering::SeqCst)
                    }
                    _ => {}
                }
                tracing::info!("nats: {event}");
            }
        })
        .require_tls(options.tls);
    if let Some(token) = &options.token {
        connect = connect.token(token.clone());
    }
    if let Some(credentials) = &options.credentials {
        connect = connect
            .credentials_file(credentials)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: credentials.clone(),
                source,
            })?;
    }
    let client = connect.connect(server_addrs(&options.url)?).await?;
    if client.connection_state() == async_nats::connection::State::Connected {
        state.connected.store(true, Ordering::SeqCst);
    }
    Ok(client)
}

/// What a function's micro service is made of: while this stays the same
/// across revisions, the running service keeps serving (each message runs
/// on the revision current when it is handled), so a revision swap leaves
/// no moment without a responder.
#[derive(Debug, Clone, PartialEq)]
struct ServiceShape {
    subject: Option<String>,
    result_subject: Option<String>,
    capacity: u32,
}

impl ServiceShape {
    fn of(function: &PreparedFunction) -> Self {
        let nats = function.function().triggers.nats.as_ref();
        let scaling = &function.function().scaling;
        ServiceShape {
            subject: nats.map(|t| t.subject.clone()),
            result_subject: nats.and_then(|t| t.result_subject.clone()),
            capacity: scaling.max_instances + scaling.max_queue,
        }
    }
}

/// A running micro service and what its drain waits for.
struct Served {
    shape: ServiceShape,
    service: Service,
    /// The endpoint loops: they end once a stopped service's buffered
    /// messages are all taken.
    endpoints: Vec<tokio::task::JoinHandle<()>>,
    /// One permit per message being handled.
    capacity: Arc<Semaphore>,
}

impl Served {
    /// Stops taking messages, hands out those already received, and waits
    /// until every one of them has been answered.
    async fn drain(self, name: &str) {
        if let Err(e) = self.service.stop().await {
            tracing::warn!(function = %name, "stopping NATS service: {e}");
        }
        for endpoint in self.endpoints {
            let _ = endpoint.await;
        }
        let _ = self.capacity.acquire_many(self.shape.capacity).await;
    }
}

/// Keeps one micro service per served function in step with the runtime.
pub struct NatsTrigger {
    client: Client,
    runtime: Arc<Runtime>,
    served: Mutex<HashMap<String, Served>>,
}

impl NatsTrigger {
    /// A trigger over `client`; call [`NatsTrigger::run`] to serve.
    pub fn new(client: Client, runtime: Arc<Runtime>) -> Arc<Self> {
        Arc::new(NatsTrigger {
            client,
            runtime,
            served: Mutex::new(HashMap::new()),
        })
    }

    /// Reconciles services with the served functions whenever they change
    /// (and every second, as a safety net) until `stop`; then stops taking
    /// messages and answers those already taken, for at most `grace`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, grace: Duration) {
        loop {
            self.reconcile().await;
            tokio::select! {
                () = self.runtime.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => break,
            }
        }
        let served: Vec<(String, Served)> = match self.served.lock() {
            Ok(mut served) => served.drain().collect(),
            Err(_) => Vec::new(),
        };
        let drained = futures_util::future::join_all(
            served
                .into_iter()
                .map(|(name, s)| async move { s.drain(&name).await }),
        );
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("NATS messages still in flight after {grace:?}");
        }
        if let Err(e) = self.client.flush().await {
            tracing::warn!("flushing NATS answers: {e}");
        }
    }

    async fn reconcile(self: &Arc<Self>) {
        let wanted: HashMap<String, Arc<PreparedFunction>> = self
            .runtime
            .served()
            .into_iter()
            .map(|f| (f.name().to_string(), f))
            .collect();
        let gone: Vec<(String, Served)> = {
            let Ok(mut served) = self.served.lock() else {
                return;
            };
            let names: Vec<String> = served
                .keys()
                .filter(|name| !wanted.contains_key(*name))
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|n| served.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (name, served) in gone {
            served.drain(&name).await;
        }
        for (name, function) in wanted {
            let shape = ServiceShape::of(&function);
            let unchanged = self
                .served
                .lock()
                .map(|s| s.get(&name).is_some_and(|s| s.shape == shape))
                .unwrap_or(true);
            if unchanged {
                continue;
            }
            // The new service starts before the old one stops: both share
            // the queue group meanwhile, so a responder is always there.
            match self.start(&function, shape).await {
                Ok(started) => {
                    let replaced = self
                        .served
                        .lock()
                        .ok()
                        .and_then(|mut served| served.insert(name.clone(), started));
                    if let Some(old) = replaced {
                        old.drain(&name).await;
                    }
                }
                Err(e) => tracing::warn!(function = %name, "cannot serve over NATS yet: {e}"),
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        function: &PreparedFunction,
        shape: ServiceShape,
    ) -> Result<Served, async_nats::Error> {
        let name = function.name().to_string();
        let service = self
            .client
            .service_builder()
            .description(format!("Cascade function {name}"))
            .queue_group(subjects::queue_group(&name))
            .start(subjects::service_name(&name), "0.1.0")
            .await?;
        // The host never pulls more work than the function can run or queue.
        let capacity = Arc::new(Semaphore::new(shape.capacity as usize));
        let mut subjects_to_serve = vec![subjects::endpoint_subject(&name)];
        if let Some(subject) = &shape.subject {
            subjects_to_serve.push(subject.clone());
        }
        let mut endpoints = Vec::new();
        for (i, subject) in subjects_to_serve.into_iter().enumerate() {
            let endpoint = service
                .endpoint_builder()
                .name(if i == 0 { "invoke" } else { "trigger" })
                .add(subject)
                .await?;
            let (this, name, capacity, result_subject) = (
                self.clone(),
                name.clone(),
                capacity.clone(),
                shape.result_subject.clone(),
            );
            endpoints.push(tokio::spawn(async move {
                let mut endpoint = endpoint;
                while let Some(request) = endpoint.next().await {
                    let Ok(permit) = capacity.clone().acquire_owned().await else {
                        break;
                    };
                    let (this, name, result_subject) =
                        (this.clone(), name.clone(), result_subject.clone());
                    tokio::spawn(async move {
                        this.handle(&name, request, result_subject.as_deref()).await;
                        drop(permit);
                    });
                }
            }));
        }
        Ok(Served {
            shape,
            service,
            endpoints,
            capacity,
        })
    }

    async fn handle(
        &self,
        name: &str,
        request: async_nats::service::Request,
        result_subject: Option<&str>,
    ) {
        let started = Instant::now();
        let message = &request.message;
        let request_id = request_id(message);
        let headers = NatsHeaders(message.headers.as_ref());
        let span = trace_context::invocation(Trigger::Nats, name, &request_id, &headers);
        trace_context::messaging(&span, message.subject.as_str(), None);
        let header = |name: &str| {
            let value = message.headers.as_ref()?.get(name)?;
            Some(value.as_str().to_string())
        };
        let tag = header(subjects::TAG);
        let key = self.runtime.sticky_header(name).and_then(|h| header(&h));
        let choice = Choice {
            tag: tag.as_deref(),
            sticky_key: key.as_deref().map(str::as_bytes),
        };
        let mut revision = None;
        let outcome = async {
            match self.runtime.choose_when_loaded(name, &choice).await {
                Ok(function) => {
                    revision = Some(function.revision());
                    let outcome = invoke(&function, message, &request_id).await;
                    let status = outcome.as_ref().map_or_else(InvokeError::status, |_| 200);
                    function.record(Trigger::Nats, &request_id, status, started.elapsed());
                    outcome
                }
                Err(unknown) => Err(unknown),
            }
        }
        .instrument(span.clone())
        .await;
        let sent = match (message.reply.is_some(), outcome) {
            (true, Ok(output)) => {
                let mut headers = content_type(&output.content_type);
                if let Some(revision) = revision {
                    headers.insert(subjects::REVISION, revision.to_string().as_str());
                }
                trace_context::carry_nats(&span, message.headers.as_ref(), &mut headers);
                request
                    .respond_with_headers(Ok(output.body.into()), headers)
                    .await
            }
            (true, Err(error)) => {
                let error = async_nats::service::error::Error {
                    status: header_text(&error.to_string()),
                    code: error.status() as usize,
                };
                request.respond(Err(error)).await
            }
            (false, Ok(output)) => match result_subject {
                Some(subject) => {
                    let mut headers = content_type(&output.content_type);
                    trace_context::carry_nats(&span, message.headers.as_ref(), &mut headers);
                    self.client
                        .publish_with_headers(subject.to_string(), headers, output.body.into())
                        .await
                }
                None => Ok(()),
            },
            (false, Err(error)) => {
                let mut headers = HeaderMap::new();
                headers.insert(subjects::ERROR_CODE, error.status().to_string().as_str());
                headers.insert(subjects::ERROR, header_text(&error.to_string()).as_str());
                trace_context::carry_nats(&span, message.headers.as_ref(), &mut headers);
                let subject = subjects::errors_subject(message.subject.as_str());
                self.client
                    .publish_with_headers(subject, headers, message.payload.clone())
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(function = name, "answering over NATS: {e}");
        }
    }
}

/// Runs `message` through `function` (its `Content-Type` header saying
/// what the payload is).
pub(crate) async fn invoke(
    function: &Arc<PreparedFunction>,
    message: &async_nats::Message,
    request_id: &str,
) -> Result<GuestMessage, InvokeError> {
    let limit = function.max_body();
    if message.payload.len() as u64 > limit {
        return Err(InvokeError::TooLarge {
            function: function.name().to_string(),
            limit,
        });
    }
    let content_type = message
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::CONTENT_TYPE))
        .map(|v| v.as_str().to_string())
        .unwrap_or_else(|| "application/octet-stream".into());
    let input = GuestMessage {
        content_type,
        body: Bytes::clone(&message.payload).to_vec(),
    };
    Ok(function.invoke(request_id, input).await?.output)
}

/// The message's `X-Request-Id` header, or its subject when it has none.
fn request_id(message: &async_nats::Message) -> String {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::REQUEST_ID))
        .map(|v| header_text(v.as_str()))
        .unwrap_or_else(|| message.subject.to_string())
}

fn content_type(value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(subjects::CONTENT_TYPE, header_text(value).as_str());
    headers
}

/// Longest header value taken from what a guest wrote.
const MAX_HEADER_TEXT: usize = 1024;

/// Guest-controlled text made safe for a NATS header value: control
/// characters (CR and LF would end the header block) become spaces, and
/// the text is cut at [`MAX_HEADER_TEXT`] bytes.
pub fn header_text(text: &str) -> String {
    let mut safe = String::with_capacity(text.len().min(MAX_HEADER_TEXT));
    for c in text.chars() {
        if safe.len() + c.len_utf8() > MAX_HEADER_TEXT {
            break;
        }
        safe.push(if c.is_control() { ' ' } else { c });
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::{header_text, server_addrs};

    #[test]
    fn a_comma_separated_list_is_every_server_and_a_bad_one_is_named() {
        let servers = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").expect("list");
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].port(), 4223);
        let err = server_addrs("nats://127.0.0.1:4222,nats://127.0.0.1:x").expect_err("bad port");
        assert!(err.to_string().contains("nats://127.0.0.1:x"), "{err}");
    }

    #[test]
    fn guest_text_cannot_break_out_of_a_header() {
        assert_eq!(
            header_text("bad\r\nPUB evil 3\r\nabc"),
            "bad  PUB evil 3  abc"
        );
        assert_eq!(header_text("image/png"), "image/png");
        let long = "é".repeat(2000);
        let cut = header_text(&long);
        assert!(cut.len() <= 1024 && cut.chars().all(|c| c == 'é'));
    }
}
