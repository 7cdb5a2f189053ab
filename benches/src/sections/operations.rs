//! Section 11, model operations: what drift monitoring at its default
//! sampling costs `embed`, and what a shadow whose every copy times out
//! does to the callers, each side by side with the same host without it.

use crate::context::{Bench, Pair, invoke_url};
use crate::report::{Bar, Record, Section};
use crate::wrk::{Wrk, WrkRun};
use anyhow::{Result, ensure};
use cascade_tests::host::Host;
use std::path::Path;

/// The example `embed` manifest with `extra` appended.
fn embed_with(extra: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no project root"))?
        .join("xtask/functions/embed.toml");
    Ok(format!("{}\n{extra}", std::fs::read_to_string(path)?))
}

fn publish(host: &Host, manifest: &str) -> Result<()> {
    let response = host.put(
        "/v1/functions/embed",
        "application/toml",
        manifest.to_string(),
    );
    ensure!(
        response.status().is_success(),
        "publishing embed: {}",
        response.text().unwrap_or_default()
    );
    Ok(())
}

fn set_traffic(host: &Host, split: &serde_json::Value) -> Result<()> {
    let response = host.put(
        "/v1/functions/embed/traffic",
        "application/json",
        split.to_string(),
    );
    ensure!(
        response.status().is_success(),
        "setting embed's split: {}",
        response.text().unwrap_or_default()
    );
    Ok(())
}

/// Every host's flags: one thread per model run, lone runs included.
const ONE_THREAD: &[&str] = &["--onnxruntime-alone-threads", "1"];

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "11. Model operations",
        "`embed` (32-token text) over HTTP, hosts loaded in turn round by round. Drift: a host \
         whose `embed` summarises 10 % of requests (`[monitoring.drift] sample = 0.1`, the \
         default) against one with `sample = 0`; both serve revision 2 of the same manifest \
         otherwise. Shadow: a host whose split copies every request (`shadow`, 100 %) to a \
         revision of `embed` with `timeout_ms = 1`, so no copy can answer in time and every one \
         fails (504): MiniLM's run alone takes longer, so a copy that reaches the model stage \
         is failed there without a run (the model's fastest run so far is the bound), against \
         the same host without the split. A copy runs on idle capacity only (fewer invocations in \
         flight than cores, a free shadow instance) and is otherwise skipped \
         (`status=\"skipped\"`), never queued. Every host runs a model on one thread \
         (`--onnxruntime-alone-threads 1`): with two for lone runs, a host whose background \
         work (a copy, a summary) overlaps the next request loses them and the ratio measures \
         that, not the work.",
    );
    let drift_off = bench.host_with_examples(ONE_THREAD)?;
    publish(
        &drift_off,
        &embed_with("[monitoring.drift]\nsample = 0.0\n")?,
    )?;
    let drift_on = bench.host_with_examples(ONE_THREAD)?;
    publish(
        &drift_on,
        &embed_with("[monitoring.drift]\nsample = 0.1\n")?,
    )?;
    let plain = bench.host_with_examples(ONE_THREAD)?;
    let timing_out = embed_with("")?.replace("timeout_ms = 5000", "timeout_ms = 1");
    let shadowed = bench.host_with_examples(ONE_THREAD)?;
    publish(&shadowed, &timing_out)?;
    let split = serde_json::json!({"targets": [
        {"revision": 1, "percent": 100},
        {"revision": 2, "percent": 100, "shadow": true}
    ]});
    set_traffic(&shadowed, &split)?;
    let target = |host: &Host| bench.target(invoke_url(host, "embed"), "text/plain", "text_32.txt");
    section.table.push(
        [
            "comparison",
            "connections",
            "without req/s",
            "with req/s",
            "with ÷ without req/s",
            "without p99 µs",
            "with p99 µs",
            "with ÷ without p99",
            "errors with",
        ]
        .map(String::from)
        .to_vec(),
    );
    for (label, key, without, with) in [
        (
            "drift, default sampling",
            "drift_default",
            &drift_off,
            &drift_on,
        ),
        (
            "shadow timing out, 100 %",
            "shadow_timeout",
            &plain,
            &shadowed,
        ),
    ] {
        for connections in [1u32, 4] {
            section.commands.push(Wrk::command(
                connections,
                bench.args.seconds,
                &format!(
                    "{}   # {label}: and the same on the other host",
                    invoke_url(without, "embed")
                ),
            ));
            let runs = bench.side_by_side(&[&target(without), &target(with)], connections)?;
            let pair = Pair::of(&runs);
            let (off_rps, on_rps, off_p99, on_p99) =
                (pair.off_rps, pair.on_rps, pair.off_p99, pair.on_p99);
            let errors: u64 = runs[1]
                .iter()
                .map(|r: &WrkRun| r.non2xx + r.socket_errors)
                .sum();
            let mut row = vec![label.to_string(), connections.to_string()];
            row.extend(pair.cells());
            row.push(errors.to_string());
            section.table.push(row);
            let (rps_bar, p99_bar) = match key {
                "drift_default" => (Some(Bar::AtLeast(0.97)), None),
                _ => (None, Some(Bar::AtMost(1.1))),
            };
            let ratio = |name: String, value: f64, bar: Option<Bar>| match bar {
                Some(bar) => Record::against(&name, value, "ratio", bar),
                None => Record::info(&name, value, "ratio"),
            };
            section.records.extend([
                ratio(
                    format!("{key}_rps_ratio_c{connections}"),
                    on_rps / off_rps,
                    rps_bar,
                ),
                ratio(
                    format!("{key}_p99_ratio_c{connections}"),
                    on_p99 / off_p99,
                    p99_bar,
                ),
                Record::against(
                    &format!("{key}_caller_errors_c{connections}"),
                    errors as f64,
                    "responses",
                    Bar::AtMost(0.0),
                ),
            ]);
        }
    }
    let count = |status: &str| {
        shadowed.metric(&format!(
            "cascade_shadow_requests_total{{function=\"embed\",revision=\"2\",status=\"{status}\""
        ))
    };
    let (timed_out, skipped) = (count("504"), count("skipped"));
    ensure!(timed_out > 0.0, "the shadow ran no copies");
    section.notes.push(format!(
        "The shadow: {timed_out} copies failed their 1 ms deadline (504), {skipped} were \
         skipped for want of idle capacity."
    ));
    section.notes.push(
        "Callers' errors: the `with` host's non-2xx answers and socket errors over all its rounds."
            .into(),
    );
    Ok(section)
}
