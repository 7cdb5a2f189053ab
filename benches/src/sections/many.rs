//! Section 12, many functions: 1,000 functions published over 10
//! distinct components, each invoked once, then invoked at random, against
//! one hot function.

use crate::context::{Bench, timed_invoke};
use crate::process::rss_mb;
use crate::report::{Bar, Record, Section, num};
use crate::stats::median;
use anyhow::{Context, Result, ensure};
use cascade_tests::component_path;
use cascade_tests::host::Host;
use std::time::{Duration, Instant};

/// Functions published.
const FUNCTIONS: usize = 1000;
/// Distinct components they use.
const COMPONENTS: usize = 10;
/// Publishes at the end whose median is "the 1,000th".
const LAST_PUBLISHES: usize = 10;
/// Requests per side per round in the random-against-hot comparison.
const REQUESTS: usize = 1000;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(
        "12. Many functions",
        &format!(
            "One `cascade serve` on a fresh data directory (defaults). {COMPONENTS} distinct \
             components are published (the `echo` guest, each copy made distinct by a custom \
             section naming it, so each is its own digest and compiled artifact), then \
             {FUNCTIONS} functions, function i serving component i mod {COMPONENTS}, each PUT \
             timed (\"publish of the 1,000th\" is the median of the last {LAST_PUBLISHES}). Each \
             function is invoked once; after 1.5 s idle the host's VmRSS is read. `GET \
             /v1/functions` is timed 10 times. Then, in {rounds} rounds, one keep-alive client \
             sends {REQUESTS} requests to one hot function and {REQUESTS} to functions drawn at \
             random (a fixed-seed sequence); the ratio is of the medians of the per-round p50s.",
            rounds = bench.args.rounds,
        ),
    );
    let host = Host::start();
    let pid = host.pid().context("host pid")?;
    let echo = std::fs::read(component_path("echo")).context("reading the echo component")?;
    for k in 0..COMPONENTS {
        let response = host.put(
            &format!("/v1/components/echo-{k}/0.1.0"),
            "application/wasm",
            with_custom_section(&echo, &format!("copy-{k}")),
        );
        ensure!(
            response.status().is_success(),
            "publishing component echo-{k}: {}",
            response.text().unwrap_or_default()
        );
    }
    let mut publish_ms = Vec::with_capacity(FUNCTIONS);
    for i in 0..FUNCTIONS {
        let name = function(i);
        let manifest = format!(
            "name = \"{name}\"\n[[stages]]\ncomponent = \"echo-{}@0.1.0\"\n",
            i % COMPONENTS
        );
        let started = Instant::now();
        let response = host.put(
            &format!("/v1/functions/{name}"),
            "application/toml",
            manifest,
        );
        publish_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            response.status() == 201,
            "publishing {name}: {}",
            response.text().unwrap_or_default()
        );
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let call = |name: &str| timed_invoke(&client, &host.url, name, "text/plain", "hello");
    let first_calls = (0..FUNCTIONS)
        .map(|i| call(&function(i)))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(1500));
    let idle_rss = rss_mb(pid)?;
    let mut list_ms = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let listed: serde_json::Value = client
            .get(format!("{}/v1/functions", host.url))
            .send()?
            .json()?;
        list_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let count = listed
            .as_array()
            .or_else(|| listed["functions"].as_array())
            .map_or(0, Vec::len);
        ensure!(count == FUNCTIONS, "GET /v1/functions listed {count}");
    }
    let mut picks = Picks(0x9e37_79b9_7f4a_7c15);
    let (mut hot, mut random) = (Vec::new(), Vec::new());
    for _ in 0..bench.args.rounds {
        let mut samples = (0..REQUESTS)
            .map(|_| call(&function(0)))
            .collect::<Result<Vec<_>>>()?;
        hot.push(p50_ms(&mut samples));
        let mut samples = (0..REQUESTS)
            .map(|_| call(&function(picks.next(FUNCTIONS))))
            .collect::<Result<Vec<_>>>()?;
        random.push(p50_ms(&mut samples));
    }
    let (hot_p50, random_p50) = (median(hot), median(random));
    let last = median(publish_ms[FUNCTIONS - LAST_PUBLISHES..].to_vec());
    let first = median(publish_ms[..LAST_PUBLISHES].to_vec());
    let list = median(list_ms);
    let mut first_calls = first_calls;
    let first_call_p50 = p50_ms(&mut first_calls);
    section.commands.push(
        "cascade serve --listen 127.0.0.1:PORT --data DIR   # then PUT 10 components, 1000 functions".into(),
    );
    section.table = vec![
        ["measure", "value"].map(String::from).to_vec(),
        vec![
            format!("publish, median of the first {LAST_PUBLISHES} functions, ms"),
            num(first),
        ],
        vec![
            format!("publish, median of the last {LAST_PUBLISHES} (990th–1,000th), ms"),
            num(last),
        ],
        vec![
            "first call of each function, p50 ms".into(),
            num(first_call_p50),
        ],
        vec![
            format!("idle RSS with {FUNCTIONS} functions called once, MiB"),
            num(idle_rss),
        ],
        vec![
            "`GET /v1/functions` (1,000 entries), median ms".into(),
            num(list),
        ],
        vec!["one hot function, p50 ms".into(), num(hot_p50)],
        vec!["a random function of 1,000, p50 ms".into(), num(random_p50)],
    ];
    section.records.extend([
        Record::against(
            "idle_rss_mb_1000_functions",
            idle_rss,
            "MB",
            Bar::AtMost(200.0),
        ),
        Record::against(
            "random_function_p50_ratio_1000",
            random_p50 / hot_p50,
            "ratio",
            Bar::AtMost(1.2),
        ),
        Record::against("publish_1000th_function_ms", last, "ms", Bar::AtMost(50.0)),
        Record::against("list_functions_ms", list, "ms", Bar::AtMost(50.0)),
        Record::info("first_call_p50_ms_1000_functions", first_call_p50, "ms"),
    ]);
    Ok(section)
}

/// `fn-0000` … `fn-0999`.
fn function(i: usize) -> String {
    format!("fn-{i:04}")
}

/// The median of `samples`, in ms.
fn p50_ms(samples: &mut [Duration]) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// `wasm` with a custom section appended: the same component, other bytes.
fn with_custom_section(wasm: &[u8], name: &str) -> Vec<u8> {
    let mut contents = leb128(name.len());
    contents.extend_from_slice(name.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.extend(leb128(contents.len()));
    out.extend(contents);
    out
}

/// Unsigned LEB128.
fn leb128(mut value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A fixed-seed xorshift sequence of indices: the same draws every run.
struct Picks(u64);

impl Picks {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}
