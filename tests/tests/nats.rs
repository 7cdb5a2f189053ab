//! The NATS trigger end to end: a real nats-server, real hosts, real models.

use async_nats::HeaderMap;
use bytes::Bytes;
use cascade_tests::host::{Host, client};
use cascade_tests::nats::NatsServer;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A reply without the micro services error header.
fn succeeded(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

fn host_on(nats: &NatsServer) -> Host {
    let host = Host::start_with(&["--nats", &nats.url()]);
    host.publish_examples();
    host
}

fn text_headers(content_type: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", content_type);
    headers
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    content_type: &str,
    body: &'static str,
) -> async_nats::Message {
    let request = client.request_with_headers(
        subject.to_string(),
        text_headers(content_type),
        Bytes::from_static(body.as_bytes()),
    );
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("answered in time")
        .expect("request succeeds")
}

/// Waits until the host's services answer (subscriptions are set up asynchronously).
async fn wait_for_service(client: &async_nats::Client, subject: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = client.request_with_headers(
            subject.to_string(),
            text_headers("text/plain"),
            Bytes::from_static(b"ping"),
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), attempt).await {
            return;
        }
        assert!(Instant::now() < deadline, "{subject} never answered");
    }
}

#[test]
fn request_reply_matches_http_and_errors_follow_the_micro_convention() {
    let nats = NatsServer::start();
    let host = host_on(&nats);
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        wait_for_service(&client, "embed.requests").await;
        let reply = request(
            &client,
            "embed.requests",
            "text/plain",
            "A man is eating food.",
        )
        .await;
        let over_nats: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        let over_http: Value = tokio::task::block_in_place(|| {
            host.invoke("embed", "text/plain", "A man is eating food.")
                .json()
        })
        .expect("JSON");
        assert_eq!(over_nats, over_http);
        assert_eq!(
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
            Some("application/json")
        );

        // The micro endpoint answers too.
        let reply = request(
            &client,
            "cascade.fn.embed",
            "text/plain",
            "A man is eating food.",
        )
        .await;
        assert_eq!(
            serde_json::from_slice::<Value>(&reply.payload).expect("JSON"),
            over_http
        );

        // $SRV.STATS counts what the endpoints really served.
        let stats = request(&client, "$SRV.STATS.cascade-embed", "text/plain", "").await;
        let stats: Value = serde_json::from_slice(&stats.payload).expect("stats JSON");
        let served: u64 = stats["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e["num_requests"].as_u64().unwrap_or(0))
            .sum();
        assert!(served >= 3, "stats count {served} requests: {stats}");

        let reply = request(&client, "orientation.requests", "image/png", "not an image").await;
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400")
        );
        let message = headers
            .get("Nats-Service-Error")
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        assert!(message.contains("not a PNG or JPEG"), "{message}");
    });
}

fn eventful() -> String {
    cascade_tests::embed_manifest(
        "eventful",
        r#"[triggers]
nats = { subject = "eventful.in", result_subject = "eventful.out" }
"#,
    )
}

/// Waits until `host` reports its NATS connection up (`/readyz`), which
/// [`Host`]'s own start leaves to the tests that care.
fn until_connected(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready: Value = host.get("/readyz").json().expect("JSON");
        if ready["checks"]["nats"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never connected to NATS: {ready}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fire_and_forget_results_errors_events_and_discovery() {
    let nats = NatsServer::start();
    let host = host_on(&nats);
    // An event published before the host connects waits in its client and
    // arrives late; this test is about what a connected host announces.
    until_connected(&host);
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut events = client
            .subscribe("cascade.events.registry.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let status = tokio::task::block_in_place(|| {
            host.put("/v1/functions/eventful", "application/toml", eventful())
                .status()
        });
        assert_eq!(status, 201);
        // Generous: the other tests of this file start hosts at the same
        // time on CI's two cores.
        let event = tokio::time::timeout(Duration::from_secs(15), events.next())
            .await
            .expect("event")
            .expect("message");
        assert_eq!(
            event.subject.as_str(),
            "cascade.events.registry.function.eventful"
        );
        let event: Value = serde_json::from_slice(&event.payload).expect("JSON");
        assert_eq!(
            (event["kind"].as_str(), event["revision"].as_u64()),
            (Some("function"), Some(1))
        );

        wait_for_service(&client, "cascade.fn.eventful").await;
        let mut results = client.subscribe("eventful.out").await.expect("subscribe");
        let mut errors = client
            .subscribe("eventful.in.errors")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        client
            .publish_with_headers(
                "eventful.in",
                text_headers("text/plain"),
                "one message".into(),
            )
            .await
            .expect("publish");
        client
            .publish_with_headers(
                "eventful.in",
                text_headers("application/json"),
                "{bad json".into(),
            )
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        let result = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("result")
            .expect("message");
        let value: Value = serde_json::from_slice(&result.payload).expect("JSON");
        assert_eq!(value["embeddings"][0].as_array().expect("row").len(), 384);
        let error = tokio::time::timeout(Duration::from_secs(10), errors.next())
            .await
            .expect("error")
            .expect("message");
        assert_eq!(
            error.payload.as_ref(),
            b"{bad json",
            "the original payload travels with the error"
        );
        assert_eq!(
            error
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.as_str()),
            Some("400")
        );
        // Exactly one of each.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), results.next())
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), errors.next())
                .await
                .is_err()
        );

        // $SRV.PING finds every function of the host.
        let inbox = client.new_inbox();
        let mut pongs = client.subscribe(inbox.clone()).await.expect("subscribe");
        client
            .publish_with_reply("$SRV.PING", inbox, Bytes::new())
            .await
            .expect("ping");
        let mut names = Vec::new();
        while let Ok(Some(pong)) =
            tokio::time::timeout(Duration::from_millis(500), pongs.next()).await
        {
            let pong: Value = serde_json::from_slice(&pong.payload).expect("JSON");
            names.push(pong["name"].as_str().unwrap_or_default().to_string());
        }
        names.sort();
        assert_eq!(
            names,
            ["cascade-embed", "cascade-eventful", "cascade-orientation"]
        );
    });
}

#[test]
fn two_hosts_share_the_work_and_survive_a_kill() {
    let nats = NatsServer::start();
    let first = host_on(&nats);
    // The second host serves the first host's registry.
    let mut second = Host::start_with(&["--nats", &nats.url(), "--registry-url", &first.url]);
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        wait_for_service(&client, "embed.requests").await;
    });
    let count = |host: &Host| {
        host.metric("cascade_requests_total{function=\"embed\",revision=\"1\",status=\"200\"}")
    };
    let (a0, b0) = (count(&first), count(&second));
    let answered = runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        // A well-behaved client: at most 32 requests in flight.
        let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let client = client.clone();
            let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let body = Bytes::from(format!("request {i}"));
                let reply = client.request_with_headers("embed.requests", text_headers("text/plain"), body);
                matches!(tokio::time::timeout(Duration::from_secs(30), reply).await, Ok(Ok(m)) if succeeded(&m))
            }));
        }
        let mut answered = 0;
        for task in tasks {
            answered += usize::from(task.await.expect("task"));
        }
        answered
    });
    assert_eq!(answered, 1000);
    let (a, b) = (count(&first) - a0, count(&second) - b0);
    assert_eq!(a + b, 1000.0, "each request handled exactly once");
    assert!(a >= 200.0 && b >= 200.0, "shares {a} and {b}");

    second.kill9();
    let after_kill = runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut answered = 0;
        for i in 0..50 {
            let body = Bytes::from(format!("after the kill {i}"));
            let reply =
                client.request_with_headers("embed.requests", text_headers("text/plain"), body);
            if matches!(
                tokio::time::timeout(Duration::from_secs(10), reply).await,
                Ok(Ok(_))
            ) {
                answered += 1;
            }
        }
        answered
    });
    assert_eq!(
        after_kill, 50,
        "the surviving host answers everything sent after the kill"
    );
}

#[test]
fn hosts_ride_out_a_nats_restart() {
    let mut nats = NatsServer::start();
    let host = host_on(&nats);
    assert_eq!(host.get("/readyz").status(), 200);
    // HTTP load the whole time NATS is away and back.
    let loading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (url, loading) = (host.url.clone(), loading.clone());
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0u32, Vec::new());
            while loading.load(std::sync::atomic::Ordering::SeqCst) {
                let status = client()
                    .post(format!("{url}/v1/functions/embed/invoke"))
                    .body("load while NATS is away")
                    .send()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 200 {
                    served += 1;
                } else {
                    failed.push(status);
                }
            }
            (served, failed)
        })
    };
    nats.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.get("/readyz").status() != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the outage"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body: Value = host.get("/readyz").json().expect("JSON");
    assert_eq!(body["checks"]["nats"], false);
    std::thread::sleep(Duration::from_secs(3));
    nats.resume();
    let restarted = Instant::now();
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        loop {
            let reply = client.request_with_headers(
                "embed.requests",
                text_headers("text/plain"),
                "back again".into(),
            );
            if let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(500), reply).await {
                assert!(succeeded(&message), "no error headers");
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "no answer within 5 s of the restart"
            );
        }
    });
    assert_eq!(host.get("/readyz").status(), 200);
    loading.store(false, std::sync::atomic::Ordering::SeqCst);
    let (served, failed) = load.join().expect("load");
    assert!(
        failed.is_empty(),
        "HTTP invocations failed while NATS was away: {failed:?}"
    );
    assert!(served > 10, "only {served} HTTP invocations in ~4 s");
}

#[test]
fn a_mirror_serves_what_its_source_publishes_within_two_seconds() {
    let nats = NatsServer::start();
    let source = host_on(&nats);
    let mirror = Host::start_with(&["--nats", &nats.url(), "--registry-url", &source.url]);
    assert_eq!(
        mirror
            .invoke("embed", "text/plain", "copied at start")
            .status(),
        200
    );
    within(
        Duration::from_secs(10),
        "the mirror connected to NATS",
        || mirror.get("/readyz").status() == 200,
    );
    let mirrored: Value = mirror
        .get("/v1/models/minilm-l3/1.0.0")
        .json()
        .expect("JSON");
    let original: Value = source
        .get("/v1/models/minilm-l3/1.0.0")
        .json()
        .expect("JSON");
    assert_eq!(mirrored["package_digest"], original["package_digest"]);

    let published = Instant::now();
    assert_eq!(
        source
            .put("/v1/functions/eventful", "application/toml", eventful())
            .status(),
        201
    );
    while mirror.invoke("eventful", "text/plain", "hello").status() != 200 {
        assert!(
            published.elapsed() < Duration::from_secs(2),
            "not served by the mirror within 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "published on the source, served by the mirror after {:?}",
        published.elapsed()
    );

    let (status, body) = {
        let r = mirror.put("/v1/functions/eventful", "application/toml", eventful());
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    assert_eq!(status, 409);
    assert!(body.contains("publish there"), "{body}");

    assert!(
        client()
            .delete(format!("{}/v1/functions/eventful", source.url))
            .send()
            .expect("delete")
            .status()
            .is_success()
    );
    let deleted = Instant::now();
    loop {
        let response = mirror.invoke("eventful", "text/plain", "hello");
        let status = response.status();
        if status == 404 {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(2),
            "the mirror still serves a deleted function: {status} {:?}",
            response.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `misbehave` on NATS subject `misbehave.in`; `REVISION` is replaced so
/// each publish makes a new revision with the same NATS trigger.
const MISBEHAVE_NATS: &str = r#"
name = "misbehave"
[[stages]]
component = "misbehave@0.1.0"
config = {}
[scaling]
max_instances = 4
max_queue = 64
[limits]
timeout_ms = 5000
memory_mb = REVISION
[triggers]
nats = { subject = "misbehave.in" }
"#;

fn misbehave_on_nats(nats: &NatsServer) -> Host {
    let host = Host::start_with(&["--nats", &nats.url()]);
    host.publish_component("misbehave");
    let manifest = MISBEHAVE_NATS.replace("REVISION", "32");
    let response = host.put("/v1/functions/misbehave", "application/toml", manifest);
    assert_eq!(response.status(), 201);
    host
}

/// The text of a misbehave answer (its `echo` tensor's bytes).
fn echoed(message: &async_nats::Message) -> String {
    let value: Value = serde_json::from_slice(&message.payload).expect("JSON");
    cascade_tests::first_tensor_text(&value)
}

#[test]
fn sigterm_answers_the_nats_messages_already_taken() {
    let nats = NatsServer::start();
    let mut host = misbehave_on_nats(&nats);
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        wait_for_service(&client, "misbehave.in").await;
        // Three slow requests in flight when the host is told to stop.
        let pending: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    request(&client, "misbehave.in", "text/plain", "sleep:700").await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stopped = tokio::task::spawn_blocking(move || host.terminate());
        for answer in pending {
            let answer = answer.await.expect("task");
            assert!(succeeded(&answer), "{:?}", answer.headers);
            assert_eq!(echoed(&answer), "slept");
        }
        assert!(stopped.await.expect("task"), "the host exits cleanly");
    });
}

#[test]
fn no_nats_request_is_lost_across_twenty_revision_swaps_under_load() {
    let nats = NatsServer::start();
    let host = misbehave_on_nats(&nats);
    let url = host.url.clone();
    runtime().block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        wait_for_service(&client, "misbehave.in").await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let senders: Vec<_> = (0..4)
            .map(|sender| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sent = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && sent < 5000 {
                        let text = format!("echo:{sender}-{sent}");
                        let answer = tokio::time::timeout(
                            Duration::from_secs(10),
                            client.request_with_headers(
                                "misbehave.in".to_string(),
                                text_headers("text/plain"),
                                Bytes::from(text.clone().into_bytes()),
                            ),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("{text}: no answer within 10 s"))
                        .unwrap_or_else(|e| panic!("{text}: {e}"));
                        assert!(succeeded(&answer), "{text}: {:?}", answer.headers);
                        assert_eq!(echoed(&answer), text.trim_start_matches("echo:"));
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        let swaps = tokio::task::spawn_blocking(move || {
            for revision in 0..20 {
                let manifest = MISBEHAVE_NATS.replace("REVISION", &(33 + revision).to_string());
                let response = client_put(&url, manifest);
                assert_eq!(response, 201, "swap {revision}");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        swaps.await.expect("swaps");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut answered = 0;
        for sender in senders {
            answered += sender.await.expect("every request answered");
        }
        assert!(
            answered > 40,
            "only {answered} requests went through the swaps"
        );
    });
    let status: Value = host
        .get("/v1/functions/misbehave/status")
        .json()
        .expect("status");
    assert_eq!(status["revision"], 21);
}

fn client_put(url: &str, manifest: String) -> u16 {
    client()
        .put(format!("{url}/v1/functions/misbehave"))
        .body(manifest)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name of the first tensor a preprocessor-only function answers.
fn first_tensor(host: &Host, function: &str) -> Option<String> {
    let response = host.invoke(function, "text/plain", "echo:x");
    if response.status() != 200 {
        return None;
    }
    let value: Value = response.json().ok()?;
    value["tensors"][0]["name"].as_str().map(str::to_string)
}

fn publish_wasm(host: &Host, component: &str, as_name: &str) {
    let wasm = std::fs::read(cascade_tests::component_path(component)).expect("built");
    let response = host.put(
        &format!("/v1/components/{as_name}/0.1.0"),
        "application/wasm",
        wasm,
    );
    assert_eq!(response.status(), 201);
}

#[test]
fn a_mirror_syncs_what_it_can_reports_the_rest_and_follows_republished_bytes() {
    let nats = NatsServer::start();
    let source = host_on(&nats);
    publish_wasm(&source, "misbehave", "shape");
    let light = "name = \"light\"\n[[stages]]\ncomponent = \"shape@0.1.0\"\n";
    assert_eq!(
        source
            .put("/v1/functions/light", "application/toml", light)
            .status(),
        201
    );
    let swap = "name = \"swap\"\n[[stages]]\ncomponent = \"shape@0.1.0\"\n";
    assert_eq!(
        source
            .put("/v1/functions/swap", "application/toml", swap)
            .status(),
        201
    );

    // The mirror cannot hold MiniLM (over 1 MiB), so not `embed`, but copies
    // the rest (`orientation`'s classifier is smaller).
    let mirror = Host::start_with(&[
        "--nats",
        &nats.url(),
        "--registry-url",
        &source.url,
        "--max-upload-mb",
        "1",
    ]);
    within(Duration::from_secs(10), "light served", || {
        first_tensor(&mirror, "light").as_deref() == Some("echo")
    });
    assert_eq!(mirror.invoke("embed", "text/plain", "x").status(), 404);
    let ready = mirror.get("/readyz");
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().expect("JSON");
    assert_eq!(ready["checks"]["mirror"], false, "{ready}");
    assert_eq!(mirror.metric("cascade_mirror_sync_failures"), 1.0);
    assert_eq!(
        mirror
            .invoke(
                "orientation",
                "image/png",
                std::fs::read(cascade_tests::fixture("two_colours.png")).expect("fixture")
            )
            .status(),
        200
    );

    // A deletion at the source reaches the mirror despite those failures.
    let deleted = client()
        .delete(format!("{}/v1/functions/light", source.url))
        .send()
        .expect("delete");
    assert!(deleted.status().is_success());
    within(
        Duration::from_secs(3),
        "light deleted on the mirror",
        || mirror.invoke("light", "text/plain", "echo:x").status() == 404,
    );

    // shape@0.1.0 deleted and published again with other bytes at the source:
    // the mirror serves the new bytes, not its old copy.
    let deleted = client()
        .delete(format!("{}/v1/functions/swap", source.url))
        .send()
        .expect("delete");
    assert!(deleted.status().is_success());
    let deleted = client()
        .delete(format!("{}/v1/components/shape/0.1.0", source.url))
        .send()
        .expect("delete");
    assert!(deleted.status().is_success(), "{:?}", deleted.text());
    publish_wasm(&source, "echo", "shape");
    assert_eq!(
        source
            .put("/v1/functions/swap", "application/toml", swap)
            .status(),
        201
    );
    within(
        Duration::from_secs(3),
        "the republished bytes served",
        || first_tensor(&mirror, "swap").as_deref() == Some("body"),
    );
    let mirrored: Value = mirror
        .get("/v1/components/shape/0.1.0")
        .json()
        .expect("JSON");
    let original: Value = source
        .get("/v1/components/shape/0.1.0")
        .json()
        .expect("JSON");
    assert_eq!(mirrored["digest"], original["digest"]);
}
