//! Section 9, JetStream: messages per second through `embed` fed by a
//! durable JetStream consumer (result stored with a PubAck before each
//! ack), with one host and with two sharing the consumer, against core NATS
//! request-reply to the same function at the same concurrency.

use crate::context::Bench;
use crate::nats::throughput;
use crate::report::{Bar, Record, Section, num};
use crate::stats::median;
use anyhow::{Context, Result, ensure};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use cascade_tests::host::Host;
use cascade_tests::nats::NatsServer;
use std::time::{Duration, Instant};

/// Messages one host holds at a time (`max_instances + max_queue`), and
/// the core NATS requesters it is compared with.
const IN_FLIGHT: usize = 16;
const FUNCTION: &str = "embed-events";
const SUBJECT: &str = "bench.text.in";
const RESULTS: &str = "bench.embedded";

/// The function: `embed` as the examples publish it, fed by JetStream.
fn manifest() -> String {
    cascade_tests::embed_manifest(
        FUNCTION,
        &format!(
            "[scaling]\nmax_instances = 4\nmax_queue = {queue}\n\
             [triggers.jetstream]\nstream = \"BENCH\"\nsubjects = [\"bench.text.>\"]\n\
             durable = \"{FUNCTION}\"\nresult_subject = \"{RESULTS}\"\n\
             dead_letter_subject = \"bench.dead\"\n",
            queue = IN_FLIGHT - 4
        ),
    )
}

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut section = Section::new(
        "9. JetStream",
        &format!(
            "A real nats-server 2.15 with JetStream on a file store. `embed` (32-token text) \
             fed by a `[triggers.jetstream]` durable consumer: each round publishes as many \
             messages as core NATS answered in one run, back to back (PubAcks awaited), and \
             times them until the result stream holds all their results (each result stored \
             with a PubAck before its message is acked). Against it: core NATS request-reply \
             to the same function (its `cascade.fn.{FUNCTION}` endpoint) with {IN_FLIGHT} \
             requesters, the same {IN_FLIGHT} messages a host holds at a time \
             (`max_instances + max_queue`). Then a second host joins the consumer. \
             This machine has {cores} cores and every host's model runs use all of them, so \
             two hosts share the cores one host already keeps busy."
        ),
    );
    let nats = NatsServer::start_jetstream();
    let first = host(bench, &nats)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = runtime.block_on(async_nats::connect(nats.url()))?;
    // The context spawns a task of its own: make it inside the runtime.
    let js = runtime.block_on(async { jetstream::new(client.clone()) });
    let text = Bytes::from(bench.bodies.text_32.clone());
    let endpoint = format!("cascade.fn.{FUNCTION}");
    runtime.block_on(async {
        js.get_or_create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.text.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        // Warm-up, and proof that both paths answer.
        drain(&js, text.clone(), 50).await?;
        throughput(
            &client,
            &endpoint,
            text.clone(),
            IN_FLIGHT,
            Duration::from_secs(1),
        )
        .await?;
        anyhow::Ok(())
    })?;
    let length = bench.run_length();
    let (mut core, mut one) = (Vec::new(), Vec::new());
    for _ in 0..bench.args.rounds {
        let (c, j) = runtime.block_on(async {
            let c = throughput(&client, &endpoint, text.clone(), IN_FLIGHT, length).await?;
            let count = (c * length.as_secs_f64()) as u64;
            let j = drain(&js, text.clone(), count.max(50)).await?;
            anyhow::Ok((c, j))
        })?;
        core.push(c);
        one.push(j);
    }
    let second = host(bench, &nats)?;
    let mut two = Vec::new();
    let count = (median(core.clone()) * length.as_secs_f64()) as u64;
    runtime.block_on(drain(&js, text.clone(), 50))?;
    for _ in 0..bench.args.rounds {
        two.push(runtime.block_on(drain(&js, text.clone(), count.max(50)))?);
    }
    drop((first, second));
    let (core, one, two) = (median(core), median(one), median(two));
    section.commands.push(format!(
        "nats-server -js -sd DIR; cascade serve --nats URL (one, then two hosts); \
         [triggers.jetstream] stream BENCH, subjects bench.text.>, result_subject {RESULTS}"
    ));
    section.table = vec![
        vec!["what".into(), "messages/s".into()],
        vec![
            format!("core NATS request-reply, {IN_FLIGHT} requesters, 1 host"),
            num(core),
        ],
        vec!["JetStream, 1 host".into(), num(one)],
        vec!["JetStream, 2 hosts".into(), num(two)],
    ];
    section.records.push(Record::against(
        "jetstream_vs_core_nats_rps_ratio",
        one / core,
        "ratio",
        Bar::AtLeast(0.8),
    ));
    let scaling = two / one;
    if cores >= 4 {
        section.records.push(Record::against(
            "jetstream_two_hosts_scaling",
            scaling,
            "ratio",
            Bar::AtLeast(1.7),
        ));
    } else {
        section.records.push(Record::info(
            "jetstream_two_hosts_scaling",
            scaling,
            "ratio",
        ));
        section.notes.push(format!(
            "Two hosts: {scaling:.2}× one host. Not held to the 1.7× target here: with {cores} \
             cores one host's model runners already use every core, so a second host on the \
             same machine has no core of its own."
        ));
    }
    Ok(section)
}

/// A host with the examples and the JetStream-fed function.
fn host(bench: &Bench, nats: &NatsServer) -> Result<Host> {
    let host = bench.host_with_examples(&["--nats", &nats.url()])?;
    let response = host.put(
        &format!("/v1/functions/{FUNCTION}"),
        "application/toml",
        manifest(),
    );
    ensure!(
        response.status().is_success(),
        "publishing {FUNCTION}: {}",
        response.text().unwrap_or_default()
    );
    Ok(host)
}

/// Publishes `count` messages and waits until their results are stored;
/// returns messages per second from the first publish to the last result.
async fn drain(js: &jetstream::Context, payload: Bytes, count: u64) -> Result<f64> {
    let before = stored(js).await;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        acks.push(js.publish(SUBJECT, payload.clone()).await?);
    }
    for ack in acks {
        ack.await.context("a PubAck")?;
    }
    let deadline = started + Duration::from_secs(120);
    while stored(js).await < before + count {
        ensure!(
            Instant::now() < deadline,
            "{count} JetStream messages were not all answered within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Results stored so far (0 before the host created their stream).
async fn stored(js: &jetstream::Context) -> u64 {
    let Ok(name) = js.stream_by_subject(RESULTS).await else {
        return 0;
    };
    match js.get_stream(name).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}
