//! Section 10, tracing: `embed` over HTTP on a host that exports every
//! request's spans over OTLP (sampling 100 %) against a host with tracing
//! off, side by side in the same rounds.

use crate::context::{Bench, Pair, invoke_url};
use crate::report::{Bar, Record, Section, num};
use crate::wrk::Wrk;
use anyhow::{Result, ensure};
use cascade_tests::otlp::Receiver;

/// The traced host's answered `embed` requests.
const ANSWERED: &str = "cascade_requests_total{function=\"embed\",revision=\"1\",status=\"200\"}";

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "10. Tracing",
        "`embed` (32-token text) over HTTP on two hosts at once, loaded in turn round by round: \
         one with tracing off (no `--otlp-endpoint`), one exporting every request over \
         OTLP/HTTP (`OTEL_TRACES_SAMPLER=always_on`: an invocation span and a span per stage \
         for every request, batched every 100 ms) to a receiver in the bench process that \
         decodes each export with the OpenTelemetry protobuf definitions and counts its spans. \
         The receiver runs on the same cores as the hosts, so its decoding is charged to the \
         traced side.",
    );
    let receiver = Receiver::counting();
    let off = bench.host_with_examples(&[])?;
    // SAFETY: the bench's main thread sets this before any host starts
    // with it; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("OTEL_TRACES_SAMPLER", "always_on") };
    let on = bench.host_with_examples(&["--otlp-endpoint", &receiver.url])?;
    unsafe { std::env::remove_var("OTEL_TRACES_SAMPLER") };
    let targets = [
        bench.target(invoke_url(&off, "embed"), "text/plain", "text_32.txt"),
        bench.target(invoke_url(&on, "embed"), "text/plain", "text_32.txt"),
    ];
    section.table.push(
        [
            "connections",
            "off req/s",
            "on req/s",
            "on ÷ off req/s",
            "off p99 µs",
            "on p99 µs",
            "on ÷ off p99",
            "spans per request",
        ]
        .map(String::from)
        .to_vec(),
    );
    for connections in [1u32, 4] {
        section.commands.push(Wrk::command(
            connections,
            bench.args.seconds,
            &format!("{}   # and the same on the traced host", targets[0].url),
        ));
        let served = || on.metric(ANSWERED);
        let (spans_before, requests_before) = (receiver.count(), served());
        let runs = bench.side_by_side(&[&targets[0], &targets[1]], connections)?;
        // Spans of the last batch arrive within the 100 ms schedule.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let traced_requests = served() - requests_before;
        let spans = (receiver.count() - spans_before) as f64;
        ensure!(spans > 0.0, "the traced host exported no spans");
        let pair = Pair::of(&runs);
        let (off_rps, on_rps, off_p99, on_p99) =
            (pair.off_rps, pair.on_rps, pair.off_p99, pair.on_p99);
        let per_request = spans / traced_requests;
        let mut row = vec![connections.to_string()];
        row.extend(pair.cells());
        row.push(num(per_request));
        section.table.push(row);
        section.records.extend([
            Record::against(
                &format!("tracing_on_rps_ratio_c{connections}"),
                on_rps / off_rps,
                "ratio",
                Bar::AtLeast(0.9),
            ),
            Record::info(
                &format!("tracing_on_p99_ratio_c{connections}"),
                on_p99 / off_p99,
                "ratio",
            ),
            Record::info(
                &format!("tracing_spans_per_request_c{connections}"),
                per_request,
                "spans",
            ),
        ]);
    }
    section.notes.push(
        "Spans per request: spans received during the rounds over the requests the traced host \
         answered (its `cascade_requests_total`); 4 (invocation, three stages) means the batch \
         processor's queue dropped none."
            .into(),
    );
    Ok(section)
}
