//! NATS load: request-reply latency at concurrency 1, throughput with
//! several requesters, and the raw responder Cascade is compared with.
//!
//! No NATS load generator ships as a Debian package, so these loops use
//! async-nats directly; the same loops drive both sides of each ratio.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// Serves `subject` (queue group `raw`) by replying with the request's
/// payload and doing nothing else, until the process is killed.
pub async fn respond(url: &str, subject: &str) -> Result<()> {
    let client = async_nats::connect(url).await?;
    let mut requests = client
        .queue_subscribe(subject.to_string(), "raw".into())
        .await?;
    while let Some(message) = requests.next().await {
        if let Some(reply) = message.reply {
            client.publish(reply, message.payload).await?;
        }
    }
    Ok(())
}

/// Latencies of back-to-back requests for `duration`; every reply must be a success.
pub async fn latencies(
    client: &async_nats::Client,
    subject: &str,
    payload: Bytes,
    duration: Duration,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = Instant::now();
        let reply = client
            .request(subject.to_string(), payload.clone())
            .await
            .with_context(|| format!("request on {subject}"))?;
        samples.push(started.elapsed());
        check(&reply)?;
    }
    Ok(samples)
}

/// Successful replies per second with `concurrency` requesters for `duration`.
pub async fn throughput(
    client: &async_nats::Client,
    subject: &str,
    payload: Bytes,
    concurrency: usize,
    duration: Duration,
) -> Result<f64> {
    let started = Instant::now();
    let end = started + duration;
    let workers = (0..concurrency).map(|_| {
        let (client, subject, payload) = (client.clone(), subject.to_string(), payload.clone());
        tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < end {
                let reply = client.request(subject.clone(), payload.clone()).await?;
                check(&reply)?;
                done += 1;
            }
            anyhow::Ok(done)
        })
    });
    let mut total = 0;
    for worker in futures_util::future::join_all(workers).await {
        total += worker??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Fails on a NATS micro error reply.
fn check(reply: &async_nats::Message) -> Result<()> {
    if let Some(code) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        bail!(
            "error reply {code}: {}",
            String::from_utf8_lossy(&reply.payload)
        );
    }
    Ok(())
}
