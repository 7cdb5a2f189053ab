//! Section 6, NATS: `embed` request-reply over NATS against HTTP, and the trivial
//! `echo` function over NATS against a raw async-nats responder.

use crate::context::{Bench, invoke_url, median_p50, publish_echo};
use crate::nats::{latencies, throughput};
use crate::process::Spawned;
use crate::report::{Bar, Record, Section, num};
use crate::sections::sandbox::ECHO_SCALING;
use crate::stats::{Latency, median};
use anyhow::Result;
use bytes::Bytes;
use cascade_tests::nats::NatsServer;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Requesters of the throughput comparison.
const REQUESTERS: usize = 16;
const RAW_SUBJECT: &str = "bench.raw";

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "6. NATS",
        &format!(
            "A real nats-server on loopback. `embed` (32-token text) by request-reply on \
             `embed.requests` against the same call over HTTP (wrk, concurrency 1); the trivial \
             `echo` function on `echo.requests` against a raw async-nats responder in a process \
             of its own that replies with the payload and does nothing else \
             (`cascade-bench nats-responder`): p50 at concurrency 1, and throughput with \
             {REQUESTERS} concurrent requesters."
        ),
    );
    let nats = NatsServer::start();
    let host = bench.host_with_examples(&["--nats", &nats.url()])?;
    publish_echo(&host, "echo", ECHO_SCALING)?;
    let _raw = Spawned::start(
        "the raw NATS responder",
        Command::new(std::env::current_exe()?)
            .args([
                "nats-responder",
                "--url",
                &nats.url(),
                "--subject",
                RAW_SUBJECT,
            ])
            .stdout(Stdio::null()),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = runtime.block_on(async_nats::connect(nats.url()))?;
    let length = bench.run_length();
    let text = Bytes::from(bench.bodies.text_32.clone());
    let echo = Bytes::from(bench.bodies.echo.clone());
    // Wait until both echo subjects answer (the host subscribes after publishing).
    for subject in ["echo.requests", RAW_SUBJECT, "embed.requests"] {
        let payload = if subject == "embed.requests" {
            text.clone()
        } else {
            echo.clone()
        };
        let ready = runtime.block_on(async {
            for _ in 0..200 {
                if latencies(&client, subject, payload.clone(), Duration::from_millis(1))
                    .await
                    .is_ok()
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        });
        anyhow::ensure!(ready, "{subject} never answered");
    }
    let http_target = bench.target(invoke_url(&host, "embed"), "text/plain", "text_32.txt");
    let (mut embed_nats, mut embed_http, mut echo_p50, mut raw_p50, mut echo_rps, mut raw_rps) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..bench.args.rounds {
        let (a, b, c, d, e) = runtime.block_on(async {
            anyhow::Ok((
                Latency::of(&latencies(&client, "embed.requests", text.clone(), length).await?),
                Latency::of(&latencies(&client, "echo.requests", echo.clone(), length).await?),
                Latency::of(&latencies(&client, RAW_SUBJECT, echo.clone(), length).await?),
                throughput(&client, "echo.requests", echo.clone(), REQUESTERS, length).await?,
                throughput(&client, RAW_SUBJECT, echo.clone(), REQUESTERS, length).await?,
            ))
        })?;
        embed_nats.push(a.p50_us);
        echo_p50.push(b.p50_us);
        raw_p50.push(c.p50_us);
        echo_rps.push(d);
        raw_rps.push(e);
        embed_http.push(bench.wrk.run(&http_target, 1, length)?);
    }
    let (embed_nats, embed_http) = (median(embed_nats), median_p50(&embed_http));
    let (echo_p50, raw_p50) = (median(echo_p50), median(raw_p50));
    let (echo_rps, raw_rps) = (median(echo_rps), median(raw_rps));
    section.commands.push(format!(
        "nats-server -a 127.0.0.1 -p PORT; cascade serve --nats nats://127.0.0.1:PORT; \
         cascade-bench nats-responder --url nats://127.0.0.1:PORT --subject {RAW_SUBJECT}"
    ));
    section.table = vec![
        ["what", "p50 µs (c1)", "req/s (16 requesters)"]
            .map(String::from)
            .to_vec(),
        vec!["`embed` over NATS".into(), num(embed_nats), String::new()],
        vec!["`embed` over HTTP".into(), num(embed_http), String::new()],
        vec![
            "`echo` function over NATS".into(),
            num(echo_p50),
            num(echo_rps),
        ],
        vec![
            "raw async-nats responder".into(),
            num(raw_p50),
            num(raw_rps),
        ],
    ];
    section.records.extend([
        Record::against(
            "nats_vs_raw_p50_ratio",
            echo_p50 / raw_p50,
            "ratio",
            Bar::AtMost(1.5),
        ),
        Record::against(
            "nats_vs_raw_rps_ratio",
            echo_rps / raw_rps,
            "ratio",
            Bar::AtLeast(0.7),
        ),
        Record::info(
            "embed_nats_vs_http_p50_ratio",
            embed_nats / embed_http,
            "ratio",
        ),
    ]);
    drop(nats);
    Ok(section)
}
