//! The JetStream trigger end to end: a real nats-server with JetStream on a
//! file store, real hosts killed with SIGKILL, the `misbehave` guest.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use cascade_tests::host::Host;
use cascade_tests::nats::NatsServer;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

/// The `misbehave` function `name` fed by the durable consumer `name` on
/// `events.<name>.>` of stream `EVENTS`, with `extra` trigger settings.
fn manifest(name: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[[stages]]
component = "misbehave@0.1.0"
[triggers.jetstream]
stream = "EVENTS"
subjects = ["events.{name}.>"]
durable = "{name}"
result_subject = "results.{name}"
dead_letter_subject = "dead.{name}"
{extra}
"#
    )
}

/// A host on `nats` serving the function `name`.
fn host_serving(nats: &NatsServer, name: &str, extra: &str) -> Host {
    publish(Host::start_with(&["--nats", &nats.url()]), name, extra)
}

/// Publishes `misbehave` and the function `name` on `host`.
fn publish(host: Host, name: &str, extra: &str) -> Host {
    host.publish_component("misbehave");
    host.publish_function(name, &manifest(name, extra));
    host
}

async fn context(nats: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats.url()).await.expect("connect"))
}

/// Creates the stream the functions consume, as a producer would.
async fn events_stream(js: &jetstream::Context) {
    js.get_or_create_stream(stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("the EVENTS stream");
}

/// Publishes `bodies` to `subject`, each acked by the stream.
async fn publish_all(js: &jetstream::Context, subject: &str, bodies: impl Iterator<Item = String>) {
    let mut acks = Vec::new();
    for body in bodies {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "text/plain");
        acks.push(
            js.publish_with_headers(subject.to_string(), headers, Bytes::from(body))
                .await
                .expect("published"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
}

/// Messages the stream capturing `subject` holds (0 while there is none).
async fn stored(js: &jetstream::Context, subject: &str) -> u64 {
    let Ok(name) = js.stream_by_subject(subject).await else {
        return 0;
    };
    match js.get_stream(name).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

/// Waits until the stream capturing `subject` holds `count` messages.
async fn wait_for(js: &jetstream::Context, subject: &str, count: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = stored(js, subject).await;
        if now >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subject}: {now} of {count} messages after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every message of the stream capturing `subject`: (headers, payload).
async fn read_all(js: &jetstream::Context, subject: &str) -> Vec<(HeaderMap, Bytes)> {
    let name = js.stream_by_subject(subject).await.expect("a stream");
    let stream = js.get_stream(name).await.expect("the stream");
    let count = stored(js, subject).await as usize;
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("an ordered consumer");
    let mut messages = reader.messages().await.expect("messages");
    let mut all = Vec::new();
    while all.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("read in time")
            .expect("a message")
            .expect("no error");
        all.push((
            message.headers.clone().unwrap_or_default(),
            message.payload.clone(),
        ));
    }
    all
}

/// The time of day of a log line (`2026-11-30T11:23:47.600059Z  INFO …`), in seconds.
fn seconds_of_day(line: &str) -> f64 {
    let time = line
        .split_once('T')
        .and_then(|(_, rest)| rest.split_once('Z'))
        .map(|(time, _)| time)
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    time.split(':')
        .map(|part| part.parse::<f64>().expect("a number"))
        .fold(0.0, |total, part| total * 60.0 + part)
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// The text a `misbehave` `echo:` answer holds.
fn echoed(payload: &[u8]) -> String {
    let reply: serde_json::Value = serde_json::from_slice(payload).expect("a JSON reply");
    cascade_tests::first_tensor_text(&reply)
}

#[test]
fn every_message_gets_exactly_one_result_when_a_host_dies_midway() {
    const COUNT: u64 = 2_000;
    // Every other message takes 10 ms, and each host runs two at a time,
    // so the kill finds work in flight.
    let body = |i: u64| {
        if i.is_multiple_of(2) {
            format!("echo:{i}")
        } else {
            "sleep:10".to_string()
        }
    };
    let nats = NatsServer::start_jetstream();
    let rt = runtime();
    let js = rt.block_on(context(&nats));
    // Published while no host runs.
    rt.block_on(async {
        events_stream(&js).await;
        publish_all(&js, "events.echo.in", (0..COUNT / 2).map(body)).await;
    });
    let extra = "ack_wait_ms = 1000\nmax_deliver = 10\nbackoff_ms = [50]\n\
                 [scaling]\nmax_instances = 2\nmax_queue = 2";
    let mut first = host_serving(&nats, "echo", extra);
    let second = host_serving(&nats, "echo", extra);
    rt.block_on(async {
        // Kill one host somewhere in the middle of the first half.
        let kill_after = 100 + u64::from(std::process::id() % 300);
        wait_for(&js, "results.echo", kill_after, Duration::from_secs(60)).await;
        first.kill9();
        let at_kill = stored(&js, "results.echo").await;
        assert!(
            at_kill < COUNT / 2,
            "the kill came after the work ({at_kill} results)"
        );
        publish_all(&js, "events.echo.in", (COUNT / 2..COUNT).map(body)).await;
    });
    first.restart();
    rt.block_on(async {
        wait_for(&js, "results.echo", COUNT, Duration::from_secs(120)).await;
        // Redeliveries of the killed host's messages may still be running:
        // give them time to (not) add duplicates.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let results = read_all(&js, "results.echo").await;
        assert_eq!(
            results.len() as u64,
            COUNT,
            "one result per message, no duplicate"
        );
        let mut by_sequence = BTreeMap::new();
        for (headers, payload) in &results {
            let sequence: u64 = header(headers, "Cascade-Stream-Sequence")
                .parse()
                .expect("a number");
            assert_eq!(header(headers, "Nats-Msg-Id"), format!("EVENTS:{sequence}"));
            assert_eq!(header(headers, "Cascade-Function"), "echo");
            assert!(
                by_sequence.insert(sequence, echoed(payload)).is_none(),
                "{sequence} twice"
            );
        }
        // Sequence n of the stream is message n - 1 as published.
        let expected: BTreeMap<u64, String> = (0..COUNT)
            .map(|i| {
                (
                    i + 1,
                    if i.is_multiple_of(2) {
                        i.to_string()
                    } else {
                        "slept".into()
                    },
                )
            })
            .collect();
        assert_eq!(by_sequence, expected);
        assert_eq!(
            stored(&js, "dead.echo").await,
            0,
            "nothing in the dead letters"
        );
    });
    drop(second);
}

#[test]
fn poison_goes_to_the_dead_letters_after_max_deliver_and_caller_errors_at_once() {
    let nats = NatsServer::start_jetstream();
    let rt = runtime();
    let js = rt.block_on(context(&nats));
    rt.block_on(events_stream(&js));
    let host = publish(
        Host::start_logged_with(&["--nats", &nats.url()]),
        "poison",
        "max_deliver = 3\nbackoff_ms = [400, 800]\nack_wait_ms = 5000",
    );
    rt.block_on(async {
        let started = Instant::now();
        publish_all(
            &js,
            "events.poison.traps",
            std::iter::once("panic".to_string()),
        )
        .await;
        publish_all(
            &js,
            "events.poison.bad",
            std::iter::once("no-such-command".to_string()),
        )
        .await;
        wait_for(&js, "dead.poison", 2, Duration::from_secs(30)).await;
        let took = started.elapsed();
        let dead = read_all(&js, "dead.poison").await;
        let find = |subject: &str| {
            dead.iter()
                .find(|(h, _)| header(h, "Cascade-Subject") == subject)
                .unwrap_or_else(|| panic!("no dead letter from {subject}"))
        };
        let (trap, payload) = find("events.poison.traps");
        assert_eq!(payload.as_ref(), b"panic", "the original payload");
        assert_eq!(header(trap, "Cascade-Attempts"), "3");
        assert_eq!(header(trap, "Cascade-Error-Code"), "500");
        assert!(header(trap, "Cascade-Error").contains("trap"), "{trap:?}");
        assert_eq!(header(trap, "Cascade-Function"), "poison");
        assert_eq!(header(trap, "Cascade-Revision"), "1");
        assert_eq!(header(trap, "Cascade-Stream"), "EVENTS");
        assert_eq!(header(trap, "Cascade-Stream-Sequence"), "1");
        assert_eq!(header(trap, "Content-Type"), "text/plain");
        // Two redeliveries, 400 ms then 800 ms after each failure.
        assert!(took >= Duration::from_millis(1200), "dead after {took:?}");
        let (bad, payload) = find("events.poison.bad");
        assert_eq!(payload.as_ref(), b"no-such-command");
        assert_eq!(
            header(bad, "Cascade-Attempts"),
            "1",
            "a caller error is not retried"
        );
        assert_eq!(header(bad, "Cascade-Error-Code"), "400");
        assert!(
            header(bad, "Cascade-Error").contains("unknown command"),
            "{bad:?}"
        );
        assert_eq!(stored(&js, "results.poison").await, 0);
    });
    // The deliveries, as the host logged each failure: spaced by the backoff.
    let log = host.log();
    let failures: Vec<f64> = log
        .lines()
        .filter(|l| {
            l.contains("EVENTS:1 failed (attempt")
                || l.contains("EVENTS:1 goes to the dead letters")
        })
        .map(seconds_of_day)
        .collect();
    assert_eq!(failures.len(), 3, "three deliveries of the poison:\n{log}");
    for (gap, backoff) in failures.windows(2).map(|w| w[1] - w[0]).zip([0.4, 0.8]) {
        assert!(
            (backoff..backoff + 0.6).contains(&gap),
            "{gap:.3} s between deliveries, backoff {backoff} s:\n{log}"
        );
    }
    // The lag is sampled (every delivery, and every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let ready: serde_json::Value = host.get("/readyz").json().expect("json");
        if ready["jetstream"]["poison"]["pending"] == 0 || Instant::now() > deadline {
            break ready;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        ready["jetstream"]["poison"],
        serde_json::json!({"bound": true, "pending": 0, "redeliveries": 2, "dead_letters": 2}),
        "{ready}"
    );
    let metrics = host.get("/metrics").text().expect("metrics");
    for line in [
        "cascade_jetstream_dead_letters_total{function=\"poison\"} 2",
        "cascade_jetstream_redeliveries_total{function=\"poison\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[test]
fn processing_resumes_by_itself_after_the_nats_server_restarts() {
    const COUNT: u64 = 400;
    let mut nats = NatsServer::start_jetstream();
    let rt = runtime();
    let js = rt.block_on(context(&nats));
    rt.block_on(events_stream(&js));
    let _host = host_serving(&nats, "steady", "ack_wait_ms = 1000\nbackoff_ms = [100]");
    rt.block_on(async {
        publish_all(
            &js,
            "events.steady.in",
            (0..COUNT).map(|_| "sleep:2".to_string()),
        )
        .await;
        wait_for(&js, "results.steady", 20, Duration::from_secs(60)).await;
    });
    drop(js);
    nats.stop();
    std::thread::sleep(Duration::from_millis(500));
    nats.resume();
    let js = rt.block_on(context(&nats));
    rt.block_on(async {
        wait_for(&js, "results.steady", COUNT, Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(stored(&js, "results.steady").await, COUNT, "no duplicate");
        assert_eq!(stored(&js, "dead.steady").await, 0);
    });
}

#[test]
fn a_bad_jetstream_trigger_is_refused_at_publish_with_the_field_named() {
    let host = Host::start();
    host.publish_component("misbehave");
    let response = host.put(
        "/v1/functions/bad",
        "application/toml",
        manifest("bad", "max_deliver = 2\nbackoff_ms = [100, 200, 300]"),
    );
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().expect("json");
    let error = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"));
    assert!(
        error.contains("`triggers.jetstream.backoff_ms` has 3 delays but `max_deliver = 2`"),
        "{error}"
    );
    // One durable feeds one function.
    host.publish_function("first", &manifest("first", ""));
    let second = manifest("second", "").replace("durable = \"second\"", "durable = \"first\"");
    let response = host.put("/v1/functions/second", "application/toml", second);
    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().expect("json");
    assert_eq!(
        body["error"]["message"],
        "`triggers.jetstream.durable` \"first\" on stream \"EVENTS\" already feeds function \
         first; each function needs a durable of its own"
    );
    // Its own new revision may keep it.
    host.publish_function("first", &manifest("first", "max_deliver = 7"));
}

#[test]
fn a_run_longer_than_ack_wait_is_kept_by_progress_acks_not_redelivered() {
    let nats = NatsServer::start_jetstream();
    let rt = runtime();
    let js = rt.block_on(context(&nats));
    rt.block_on(events_stream(&js));
    let _host = host_serving(
        &nats,
        "slow",
        "ack_wait_ms = 1000\n[limits]\ntimeout_ms = 10000",
    );
    rt.block_on(async {
        publish_all(
            &js,
            "events.slow.in",
            std::iter::once("sleep:2500".to_string()),
        )
        .await;
        wait_for(&js, "results.slow", 1, Duration::from_secs(30)).await;
        let stream = js.get_stream("EVENTS").await.expect("the stream");
        let mut consumer: consumer::PullConsumer = stream
            .get_consumer("slow")
            .await
            .expect("the durable consumer");
        let info = consumer.info().await.expect("consumer info");
        // One delivery: without progress acks JetStream would have
        // delivered it again after 1 s (each delivery takes a consumer
        // sequence number).
        assert_eq!(info.delivered.consumer_sequence, 1, "{info:?}");
        assert_eq!(info.delivered.stream_sequence, 1, "{info:?}");
        assert_eq!(echoed(&read_all(&js, "results.slow").await[0].1), "slept");
    });
}
