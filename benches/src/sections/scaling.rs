//! Section 4, scaling: `embed` throughput with one instance against two on this
//! machine's cores, and latency under a load beyond capacity.

use crate::context::{Bench, invoke_url, median_p99, median_rps};
use crate::report::{Bar, Record, Section, num};
use crate::stats::median;
use crate::wrk::Wrk;
use anyhow::{Result, ensure};

/// Connections for the 1-vs-2 comparison: more than either can serve at once.
const CONNECTIONS: u32 = 4;
/// Connections of the overload run.
const OVERLOAD: u32 = 64;
/// The overloaded function's bounds.
const OVERLOAD_INSTANCES: u32 = 2;
const OVERLOAD_QUEUE: u32 = 8;

fn scaled(name: &str, max_instances: u32, max_queue: u32) -> String {
    cascade_tests::embed_manifest(
        name,
        &format!(
            "[scaling]\nmin_instances = 1\nmax_instances = {max_instances}\nmax_queue = {max_queue}\n"
        ),
    )
}

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "4. Scaling",
        &format!(
            "`embed` (32-token text) published twice, with `max_instances` 1 and 2, loaded with \
             {CONNECTIONS} connections (more than either admits, queue 64); then `embed` with \
             `max_instances` {OVERLOAD_INSTANCES} and `max_queue` {OVERLOAD_QUEUE} under \
             {OVERLOAD} connections, far beyond capacity: requests past the queue must get 503 \
             at once, so the served requests' latency stays bounded instead of growing with a queue."
        ),
    );
    let host = bench.host_with_examples(&[])?;
    for (name, instances, queue) in [
        ("embed-1", 1, 64),
        ("embed-2", 2, 64),
        ("embed-bounded", OVERLOAD_INSTANCES, OVERLOAD_QUEUE),
    ] {
        let response = host.put(
            &format!("/v1/functions/{name}"),
            "application/toml",
            scaled(name, instances, queue),
        );
        ensure!(
            response.status().is_success(),
            "publishing {name}: {}",
            response.status()
        );
    }
    let one = bench.target(invoke_url(&host, "embed-1"), "text/plain", "text_32.txt");
    let two = bench.target(invoke_url(&host, "embed-2"), "text/plain", "text_32.txt");
    section.commands.push(Wrk::command(
        CONNECTIONS,
        bench.args.seconds,
        &format!("{}   # and embed-2", one.url),
    ));
    let runs = bench.side_by_side(&[&one, &two], CONNECTIONS)?;
    let ratio = median_rps(&runs[1]) / median_rps(&runs[0]);
    let ceiling = native_ceiling(bench)?;
    let bounded = bench.target(
        invoke_url(&host, "embed-bounded"),
        "text/plain",
        "text_32.txt",
    );
    section
        .commands
        .push(Wrk::command(OVERLOAD, bench.args.seconds, &bounded.url));
    let overload = bench.wrk.run(&bounded, OVERLOAD, bench.run_length())?;
    let share_503 = overload.non2xx as f64 / overload.requests as f64;
    section.table = vec![
        [
            "function",
            "connections",
            "ok req/s",
            "p99 ms",
            "rejected (503) share",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            "embed-1".into(),
            CONNECTIONS.to_string(),
            num(median_rps(&runs[0])),
            num(median_p99(&runs[0]) / 1000.0),
            num(rejected_share(&runs[0])),
        ],
        vec![
            "embed-2".into(),
            CONNECTIONS.to_string(),
            num(median_rps(&runs[1])),
            num(median_p99(&runs[1]) / 1000.0),
            num(rejected_share(&runs[1])),
        ],
        vec![
            "embed-bounded".into(),
            OVERLOAD.to_string(),
            num(overload.ok_rps()),
            num(overload.p99_us / 1000.0),
            num(share_503),
        ],
    ];
    section.records.extend([
        Record::against("scaling_2_vs_1_ratio", ratio, "ratio", Bar::AtLeast(1.8)),
        Record::info("scaling_1_instance_rps", median_rps(&runs[0]), "rps"),
        Record::info("scaling_native_2_vs_1_ratio", ceiling, "ratio"),
        Record::against(
            "overload_p99_ms",
            overload.p99_us / 1000.0,
            "ms",
            Bar::AtMost(250.0),
        ),
        Record::info("overload_503_share", share_503, "share"),
        Record::info("overload_ok_rps", overload.ok_rps(), "rps"),
    ]);
    section.notes.push(format!(
        "The machine's own ceiling: the native pipeline (section 1) embedding on two threads at \
         once gives {}× the embeddings/s of one thread (same text, alternating rounds, no HTTP), \
         so `embed-2` reaches {:.0} % of what two cores give here.",
        num(ceiling),
        100.0 * ratio / ceiling
    ));
    if overload.socket_errors > 0 {
        section.notes.push(format!(
            "The overload run saw {} socket errors.",
            overload.socket_errors
        ));
    }
    Ok(section)
}

/// Embeddings/s of the native pipeline on two threads at once over one
/// thread, in alternating rounds: how far two cores scale tract on this
/// machine with no platform in the way (shared caches, memory bandwidth or
/// vCPUs on one physical core would hold it under 2).
fn native_ceiling(bench: &Bench) -> Result<f64> {
    let rate = |threads: usize| -> Result<f64> {
        let length = bench.run_length();
        let counts = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| bench.native.measure(&bench.bodies.text_32, length)))
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("a native embedding thread panicked"))?
                        .map(|samples| samples.len())
                })
                .collect::<Result<Vec<usize>>>()
        })?;
        Ok(counts.iter().sum::<usize>() as f64 / length.as_secs_f64())
    };
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..bench.args.rounds {
        one.push(rate(1)?);
        two.push(rate(2)?);
    }
    Ok(median(two) / median(one))
}

/// The share of responses that were not 2xx over `runs`.
fn rejected_share(runs: &[crate::wrk::WrkRun]) -> f64 {
    let (rejected, all) = runs
        .iter()
        .fold((0, 0), |(r, a), run| (r + run.non2xx, a + run.requests));
    rejected as f64 / all.max(1) as f64
}
