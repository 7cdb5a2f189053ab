//! Drift monitoring through the real binary and real models: `embed` fed
//! English sentences stays below its threshold, then text of another
//! script crosses it and the event fires; `orientation` does the same on
//! its class histogram when upright lines turn upside down.

use cascade_tests::host::Host;
use cascade_tests::nats::NatsServer;
use futures_util::StreamExt;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The example manifest `name` with every request summarised and
/// `summaries` in both the reference and the window.
fn watched(name: &str, summaries: u32) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join(format!("xtask/functions/{name}.toml"));
    let text = std::fs::read_to_string(root).expect("the example manifest");
    format!(
        "{text}\n[monitoring.drift]\nsample = 1.0\nreference = {summaries}\nwindow = {summaries}\n"
    )
}

/// A deterministic stream of numbers below `bound`.
fn numbers(seed: u64, bound: u64) -> impl Iterator<Item = u64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % bound
    })
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "serves",
    "requests",
    "quickly",
    "and",
    "every",
    "answer",
    "is",
    "checked",
    "against",
    "a",
    "reference",
    "while",
    "operators",
    "watch",
    "latency",
    "of",
    "functions",
    "running",
    "in",
    "sandboxes",
    "with",
    "small",
    "memory",
    "people",
    "read",
    "books",
    "about",
    "rivers",
    "mountains",
    "cities",
    "weather",
    "today",
    "tomorrow",
    "we",
    "build",
    "fast",
    "safe",
    "simple",
    "systems",
    "for",
    "teams",
    "who",
    "ship",
    "machine",
    "learning",
    "to",
    "production",
];

/// `count` English sentences of 5 to 16 words.
fn english(count: usize, seed: u64) -> Vec<String> {
    let mut pick = numbers(seed, 1 << 20);
    (0..count)
        .map(|_| {
            let length = 5 + pick.next().unwrap_or(0) % 12;
            (0..length)
                .map(|_| WORDS[pick.next().unwrap_or(0) as usize % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// `count` lines of 5 to 30 CJK ideographs.
fn ideographs(count: usize, seed: u64) -> Vec<String> {
    let mut pick = numbers(seed, 1 << 20);
    (0..count)
        .map(|_| {
            let length = 5 + pick.next().unwrap_or(0) % 26;
            (0..length)
                .filter_map(|_| char::from_u32(0x4E00 + (pick.next().unwrap_or(0) % 0x5000) as u32))
                .collect()
        })
        .collect()
}

/// Posts each body to `function` from four threads; every answer is 200.
fn feed(host: &Host, function: &str, content_type: &str, bodies: Vec<Vec<u8>>) {
    let chunk = bodies.len().div_ceil(4);
    std::thread::scope(|scope| {
        for part in bodies.chunks(chunk) {
            scope.spawn(move || {
                for body in part {
                    let response = host.invoke(function, content_type, body.clone());
                    assert_eq!(response.status(), 200, "{function}");
                }
            });
        }
    });
}

/// Each drift signal's score for `revision`, from `status`.
fn scores(host: &Host, function: &str, revision: u64) -> Vec<(String, f64)> {
    let status: Value = host
        .get(&format!("/v1/functions/{function}/status"))
        .json()
        .expect("JSON");
    let quality = status["quality"].as_array().expect("quality");
    let Some(entry) = quality.iter().find(|q| q["revision"] == revision) else {
        return Vec::new();
    };
    entry["drift"]
        .as_object()
        .expect("drift")
        .iter()
        .map(|(signal, score)| (signal.clone(), score.as_f64().expect("a score")))
        .collect()
}

/// The drift events received so far (waiting up to `wait` for the first).
fn drain(
    runtime: &tokio::runtime::Runtime,
    events: &mut async_nats::Subscriber,
    wait: Duration,
) -> Vec<Value> {
    runtime.block_on(async {
        let mut all = Vec::new();
        let mut wait = wait;
        while let Ok(Some(message)) = tokio::time::timeout(wait, events.next()).await {
            all.push(serde_json::from_slice(&message.payload).expect("JSON"));
            wait = Duration::from_millis(300);
        }
        all
    })
}

#[test]
fn drift_stays_quiet_on_like_inputs_and_fires_on_another_script_or_orientation() {
    let nats = NatsServer::start();
    let host = Host::start_logged_with(&["--nats", &nats.url()]);
    host.publish_examples();
    host.publish_function("embed", &watched("embed", 300));
    host.publish_function("orientation", &watched("orientation", 60));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let mut events = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let events = client
            .subscribe("cascade.events.drift.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        // The client lives as long as the subscription needs it.
        std::mem::forget(client);
        events
    });

    // 1,000 English sentences: 300 form the reference; the windows after
    // it stay well below the threshold of 0.25.
    let bytes = |lines: Vec<String>| lines.into_iter().map(String::into_bytes).collect();
    feed(&host, "embed", "text/plain", bytes(english(1000, 7)));
    let quiet = scores(&host, "embed", 2);
    eprintln!("embed on English: {quiet:?}");
    assert!(quiet.len() >= 10, "signals scored: {quiet:?}");
    for (signal, score) in &quiet {
        assert!(
            *score < 0.25,
            "{signal} scored {score} on English like its reference"
        );
    }
    assert!(
        quiet.iter().any(|(s, _)| s == "input_ids.mean"),
        "{quiet:?}"
    );
    assert_eq!(
        drain(&runtime, &mut events, Duration::from_millis(500)),
        Vec::<Value>::new()
    );

    // 1,000 lines of CJK ideographs: the token ids and sizes move.
    feed(&host, "embed", "text/plain", bytes(ideographs(1000, 11)));
    let fired = drain(&runtime, &mut events, Duration::from_secs(10));
    let drifted: Vec<&str> = fired
        .iter()
        .filter(|e| e["function"] == "embed" && e["action"] == "drifted" && e["revision"] == 2)
        .filter_map(|e| e["signal"].as_str())
        .collect();
    assert!(drifted.contains(&"input_ids.mean"), "{fired:?}");
    assert!(drifted.contains(&"input.bytes"), "{fired:?}");
    let loud = scores(&host, "embed", 2);
    eprintln!("embed on ideographs: {loud:?}");
    let input_ids = loud
        .iter()
        .find(|(s, _)| s == "input_ids.mean")
        .map(|(_, score)| *score)
        .expect("scored");
    assert!(input_ids > 0.25, "{loud:?}");
    let drift_metric = host
        .metric(r#"cascade_drift_score{function="embed",revision="2",signal="input_ids.mean"}"#);
    assert_eq!(drift_metric, input_ids);
    assert!(
        host.log()
            .contains("drifted from its reference: input_ids.mean"),
        "no drift line in the log"
    );

    // `orientation`: 120 upright lines, then 60 upside down.
    let lines = [
        "Cascade serves models",
        "The quick brown fox 42",
        "Drift watch 7",
    ];
    let images = |rotate: bool, count: usize| -> Vec<Vec<u8>> {
        let rendered: Vec<Vec<u8>> = lines
            .iter()
            .map(|text| cascade_tests::render_line(text, rotate))
            .collect();
        rendered.iter().cycle().take(count).cloned().collect()
    };
    feed(&host, "orientation", "image/png", images(false, 120));
    let upright = scores(&host, "orientation", 2);
    assert!(
        upright.iter().any(|(s, _)| s == "output.class"),
        "{upright:?}"
    );
    assert!(
        upright.iter().all(|(_, score)| *score < 0.25),
        "{upright:?}"
    );
    feed(&host, "orientation", "image/png", images(true, 60));
    let fired = drain(&runtime, &mut events, Duration::from_secs(10));
    let drifted: Vec<&str> = fired
        .iter()
        .filter(|e| e["function"] == "orientation" && e["action"] == "drifted")
        .filter_map(|e| e["signal"].as_str())
        .collect();
    assert!(drifted.contains(&"output.class"), "{fired:?}");
    // Turning a line over keeps its pixels: the image statistics stay put.
    let turned = scores(&host, "orientation", 2);
    eprintln!("orientation upright: {upright:?}\nupside down: {turned:?}");
    let image_mean = turned
        .iter()
        .find(|(s, _)| s == "x.mean")
        .map(|(_, score)| *score)
        .expect("x.mean scored");
    assert!(image_mean < 0.25, "{turned:?}");
}

#[test]
fn an_uploaded_reference_of_example_inputs_replaces_the_first_requests() {
    let host = Host::start();
    host.publish_examples();
    host.publish_function("orientation", &watched("orientation", 40));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (i, text) in ["Cascade serves models", "The quick brown fox 42"]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("upright-{i}.png"));
        std::fs::write(&path, cascade_tests::render_line(text, false)).expect("written");
        files.push(path.display().to_string());
    }
    // 40 example inputs: each file twenty times.
    let mut args = vec![
        "drift-reference",
        "orientation",
        "--content-type",
        "image/png",
    ];
    for _ in 0..20 {
        args.extend(files.iter().map(String::as_str));
    }
    let out = host.cli_ok(&args);
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (answer["revision"].as_u64(), answer["summaries"].as_u64()),
        (Some(2), Some(40))
    );
    let status: Value = host
        .get("/v1/functions/orientation/status")
        .json()
        .expect("JSON");
    let quality = &status["quality"][0];
    assert_eq!(quality["drift_reference"], 40);
    assert_eq!(quality["drift_reference_uploaded"], true);

    // The very first 40 requests, upside down, already fill a window.
    let rotated: Vec<Vec<u8>> = ["Cascade serves models", "The quick brown fox 42"]
        .iter()
        .map(|text| cascade_tests::render_line(text, true))
        .cycle()
        .take(40)
        .collect();
    feed(&host, "orientation", "image/png", rotated);
    let turned = scores(&host, "orientation", 2);
    let class = turned
        .iter()
        .find(|(s, _)| s == "output.class")
        .map(|(_, score)| *score)
        .expect("output.class scored");
    assert!(class > 0.25, "{turned:?}");

    // Too few inputs, and a revision not served, are refused by name.
    let out = host.cli(&[
        "drift-reference",
        "orientation",
        "--content-type",
        "image/png",
        &files[0],
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("a drift reference takes 20 to 10000 example inputs, not 1"),
        "{said}"
    );
    let mut args = vec!["drift-reference", "orientation", "--revision", "1"];
    for _ in 0..20 {
        args.push(&files[0]);
    }
    let out = host.cli(&args);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("does not serve revision 1 on this host"),
        "{said}"
    );
}
