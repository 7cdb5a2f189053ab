//! The host runtime end to end: the real `cascade` binary serving the
//! example functions on real models, misbehaving guests, pools that scale.

use cascade_host::bindings::{Tensor, TensorType};
use cascade_host::model::ort::{OrtModel, OrtSettings, RunCounts};
use cascade_host::model::shared_initializers::SharedInitializers;
use cascade_host::model::stop::Stop;
use cascade_tests::fixture;
use cascade_tests::host::{Host, client, error_of};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn embed(host: &Host, texts: &[&str]) -> Vec<Vec<f64>> {
    let body = serde_json::json!({ "inputs": texts }).to_string();
    let response = host.invoke("embed", "application/json", body);
    assert_eq!(response.status(), 200, "{:?}", response.text());
    let value: Value = response.json().expect("JSON");
    value["embeddings"]
        .as_array()
        .expect("embeddings")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("number"))
                .collect()
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn embed_matches_the_onnxruntime_reference_and_means_something() {
    let host = Host::start();
    host.publish_examples();
    for (text, want) in embed_reference() {
        let got = embed(&host, &[&text]);
        assert_eq!(got[0].len(), 384);
        let similarity = cosine(&got[0], &want);
        assert!(
            similarity >= 0.9999,
            "{text:?}: cosine {similarity} to the onnxruntime reference"
        );
    }
    let rows = embed(
        &host,
        &[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby.",
        ],
    );
    let (close, far) = (cosine(&rows[0], &rows[1]), cosine(&rows[0], &rows[2]));
    assert!(close > far + 0.3, "related {close} vs unrelated {far}");
    // Plain text works too and equals the batched row.
    let response = host.invoke("embed", "text/plain", "A man is eating food.");
    let timing = response.headers()["server-timing"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        timing.contains("desc=\"bert-tokenizer@0.1.0\"")
            && timing.contains("desc=\"minilm-l3@1.0.0\""),
        "{timing}"
    );
    let single: Value = response.json().expect("JSON");
    let single: Vec<f64> = single["embeddings"][0]
        .as_array()
        .expect("row")
        .iter()
        .map(|v| v.as_f64().expect("f"))
        .collect();
    assert!(cosine(&single, &rows[0]) > 0.99999);
    postprocessors_receive_only_the_tensors_they_name(&host);
}

#[test]
fn a_model_run_whose_caller_left_is_stopped_and_its_sessions_serve_on() {
    let host = Host::start();
    host.publish_examples();
    assert_eq!(
        host.metric("cascade_model_backend{backend=\"onnxruntime\"}"),
        1.0,
        "this test needs the ONNX Runtime backend (cargo xtask models caches its library)"
    );
    let manifest = cascade_tests::embed_manifest("embed-hurried", "[limits]\ntimeout_ms = 150\n");
    assert_eq!(
        host.put("/v1/functions/embed-hurried", "application/toml", manifest)
            .status(),
        201
    );
    // Instances and sessions warm first, so the tokenizer is quick (on a
    // slow machine a cold call may itself run past 150 ms: counted before).
    embed(&host, &["warm up"]);
    for _ in 0..3 {
        host.invoke("embed-hurried", "text/plain", "warm up");
    }
    let before = host.metric("cascade_onnxruntime_runs_stopped_total");
    // 64 texts of 128 tokens: a model run of a second or so, and the
    // caller gives up after 150 ms.
    let long = "word ".repeat(200);
    let body = serde_json::json!({ "inputs": vec![long; 64] }).to_string();
    let response = host.invoke("embed-hurried", "application/json", body);
    assert_eq!(response.status(), 504, "{:?}", response.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.metric("cascade_onnxruntime_runs_stopped_total") < before + 1.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned run was never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stopped session's flag is cleared: every session answers right.
    for _ in 0..4 {
        for (text, want) in embed_reference() {
            let got = embed(&host, &[&text]);
            let similarity = cosine(&got[0], &want);
            assert!(similarity >= 0.9999, "{text:?}: cosine {similarity}");
        }
    }
    assert_eq!(
        host.metric("cascade_onnxruntime_runs_stopped_total"),
        before + 1.0,
        "answered runs are not counted as stopped"
    );
}

/// MiniLM's inputs for `rows` texts of 128 tokens, on `model`.
fn long_batch(model: &OrtModel, rows: u32) -> Vec<Tensor> {
    model
        .input_names()
        .into_iter()
        .map(|name| {
            // Token 2000 everywhere, attended to, one segment.
            let value: i64 = match name.as_str() {
                "input_ids" => 2000,
                "attention_mask" => 1,
                _ => 0,
            };
            Tensor {
                name,
                dimensions: vec![rows, 128],
                ty: TensorType::I64,
                data: (0..rows * 128).flat_map(|_| value.to_le_bytes()).collect(),
            }
        })
        .collect()
}

#[test]
fn a_stopped_onnxruntime_run_ends_early_and_its_session_runs_again() {
    let counter = |name: &str| prometheus::IntCounter::new(name, "test").expect("counter");
    let settings = OrtSettings {
        library: cascade_tests::onnxruntime_library(),
        threads: 1,
        alone_threads: 1,
        or_tract: false,
    };
    // One thread per run and runs one after another: one session serves
    // them all, the stopped run's too.
    let model = OrtModel::load(
        &cascade_tests::models_dir().join("paraphrase-MiniLM-L3-v2.onnx"),
        None,
        &["onnx::Shape_422".to_string()],
        &settings,
        RunCounts {
            narrow: counter("narrow"),
            wide: counter("wide"),
            stopped: counter("stopped"),
        },
    )
    .expect("MiniLM loads on ONNX Runtime");
    let inputs = long_batch(&model, 32);
    let started = Instant::now();
    let want = model.run(&inputs).expect("a whole run");
    let whole = started.elapsed();
    let stop = Arc::new(Stop::default());
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(whole / 10);
            stop.stop();
        })
    };
    let started = Instant::now();
    let stopped = model.run_stoppable(&inputs, &stop);
    let took = started.elapsed();
    stopper.join().expect("stopper");
    let error = stopped.expect_err("the stopped run gives no outputs");
    assert!(error.to_string().contains("stopped"), "{error}");
    assert!(
        took < whole / 2,
        "stopped after {took:?}, a whole run takes {whole:?}"
    );
    let again = model
        .run(&inputs)
        .expect("the session runs again after a stop");
    assert_eq!(again[0].data, want[0].data, "the same outputs as before");
}

/// The reference texts and their embeddings, from `embed_reference.json`.
fn embed_reference() -> Vec<(String, Vec<f64>)> {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("embed_reference.json")).expect("fixture"),
    )
    .expect("JSON");
    let rows = reference["embeddings"].as_array().expect("embeddings");
    reference["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .zip(rows)
        .map(|(text, row)| {
            let row = row.as_array().expect("row");
            (
                text.as_str().expect("text").to_string(),
                row.iter().map(|v| v.as_f64().expect("f")).collect(),
            )
        })
        .collect()
}

#[test]
fn onnxruntime_sessions_of_a_model_share_its_large_initializers() {
    cascade_host::model::ort::init(&cascade_tests::onnxruntime_library()).expect("loads");
    let read = |file: &str| SharedInitializers::read(&cascade_tests::model_file(file));
    let minilm = read("paraphrase-MiniLM-L3-v2.onnx").expect("reads MiniLM");
    let names: Vec<&str> = minilm.names().collect();
    // The 30522 x 384 word-embedding table (47 MB), which every session
    // held a copy of, and the feed-forward weights; nothing small.
    assert!(
        names.contains(&"model.0.auto_model.embeddings.word_embeddings.weight"),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| !n.contains("LayerNorm") && !n.contains("bias")),
        "{names:?}"
    );
    let classifier = read("ch_ppocr_mobile_v2.0_cls_infer.onnx").expect("reads the classifier");
    assert_eq!(classifier.names().count(), 0, "its weights are all small");
    let error = read("tokenizer.json").err().expect("not a model");
    assert!(
        error
            .to_string()
            .contains("reading the model's initializers"),
        "{error}"
    );
}

#[test]
fn the_onnxruntime_backend_serves_the_examples_with_the_same_answers() {
    let library = cascade_tests::onnxruntime_library();
    let host = Host::start_with(&[
        "--onnxruntime",
        library.to_str().expect("utf-8 path"),
        "--onnxruntime-alone-threads",
        "2",
    ]);
    host.publish_examples();
    assert_eq!(
        host.metric("cascade_model_backend{backend=\"onnxruntime\"}"),
        1.0
    );
    assert_eq!(host.metric("cascade_model_backend{backend=\"tract\"}"), 0.0);
    // One request at a time: lone runs, the first ones alternating between
    // one thread and two, all giving the reference answers.
    embeddings_match_the_reference(&host, "lone runs");
    // The two-thread session is built in the background after the model
    // serves: lone runs reach it within a few seconds, with the same answers.
    let runs = |threads: &str| {
        host.metric(&format!(
            "cascade_onnxruntime_runs_total{{model=\"minilm-l3@1.0.0\",threads=\"{threads}\"}}"
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, want) = &embed_reference()[0];
    while runs("2") == 0.0 && Instant::now() < deadline {
        let got = embed(&host, &[text]);
        assert!(cosine(&got[0], want) > 0.9999, "{text:?} on a lone run");
        std::thread::sleep(Duration::from_millis(20));
    }
    for threads in ["1", "2"] {
        assert!(runs(threads) > 0.0, "no lone run used {threads} thread(s)");
    }
    // More runs at once than the model has sessions: each gets its own answer.
    let texts = ["A man is eating food.", "The girl is carrying a baby."];
    let alone: Vec<Vec<f64>> = texts.iter().map(|t| embed(&host, &[t]).remove(0)).collect();
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..8)
            .map(|i| {
                let (host, text) = (&host, texts[i % 2]);
                scope.spawn(move || (i % 2, embed(host, &[text]).remove(0)))
            })
            .collect();
        for run in runs {
            let (which, got) = run.join().expect("no panic");
            assert!(
                cosine(&got, &alone[which]) > 0.99999,
                "concurrent run {which}"
            );
        }
    });
    batched_requests_get_their_own_answers(&host);
    for text in ["Cascade serves models", "The quick brown fox 42"] {
        let (label, _) = top_label(&host, cascade_tests::render_line(text, false));
        assert_eq!(label, "0", "upright {text:?}");
        let (label, _) = top_label(&host, cascade_tests::render_line(text, true));
        assert_eq!(label, "180", "rotated {text:?}");
    }
}

#[test]
fn an_onnxruntime_restart_loads_the_optimised_copies_with_the_same_answers() {
    let library = cascade_tests::onnxruntime_library();
    let mut host = Host::start_with(&["--onnxruntime", library.to_str().expect("utf-8 path")]);
    host.publish_examples();
    let answers_match = |host: &Host, when: &str| {
        embeddings_match_the_reference(host, when);
        let (label, _) = top_label(host, cascade_tests::render_line("Cascade serves", true));
        assert_eq!(label, "180", "{when}: the rotated line");
    };
    answers_match(&host, "first load");
    let copies_dir = host.data.join("compiled").join("onnxruntime");
    let copies = || -> Vec<std::path::PathBuf> {
        let Ok(entries) = std::fs::read_dir(&copies_dir) else {
            return Vec::new();
        };
        // Copies still being written are hidden (`.partial-…`).
        let mut files: Vec<_> = entries
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        files
    };
    // Saved in the background while the models serve; a graceful stop
    // lets them finish.
    assert!(host.terminate(), "the host stops cleanly");
    let saved = copies();
    assert_eq!(
        saved.len(),
        2,
        "one copy per model, nothing half written: {saved:?}"
    );
    for copy in &saved {
        // The large weights sit in a file of their own, which sessions map.
        let weights = std::fs::metadata(copy.join("weights.bin")).expect("weights beside");
        let graph = std::fs::metadata(copy.join("model.onnx")).expect("the graph");
        assert!(weights.len() > graph.len(), "{}", copy.display());
    }

    host.restart();
    answers_match(&host, "loaded from the optimised copies");
    assert_eq!(copies(), saved, "the copies are reused, not written again");

    // A copy that does not load is replaced, and the model still serves.
    for copy in &saved {
        std::fs::write(copy.join("model.onnx"), b"not a model").expect("spoil the copy");
    }
    host.restart();
    answers_match(&host, "after spoiled copies");
    let deadline = Instant::now() + Duration::from_secs(30);
    for copy in &saved {
        let graph = copy.join("model.onnx");
        while !std::fs::metadata(&graph).is_ok_and(|m| m.len() > 1000) {
            assert!(
                Instant::now() < deadline,
                "{} was not optimised and saved again",
                copy.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the first stage of `function` starts its instances from a snapshot.
fn first_stage_snapshotted(host: &Host, function: &str) -> bool {
    let status: Value = host
        .get(&format!("/v1/functions/{function}/status"))
        .json()
        .expect("status JSON");
    status["stages"][0]["snapshot"] == Value::Bool(true)
}

/// Waits until `check` holds, at most `within`; panics naming `what`.
fn wait_for(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn instances_start_from_a_snapshot_after_initialize_with_the_same_answers() {
    let mut host = Host::start();
    host.publish_examples();
    // bert-tokenizer exports `initialize`: the host runs it once, in the
    // background, and switches the stage over.
    wait_for(
        Duration::from_secs(120),
        "embed never started from a snapshot",
        || first_stage_snapshotted(&host, "embed"),
    );
    assert_eq!(
        host.metric("cascade_snapshots_total{outcome=\"made\"}"),
        1.0
    );
    assert!(
        !first_stage_snapshotted(&host, "orientation"),
        "image-preprocess exports no initialize"
    );

    // A revision that scales to zero: every instance after the first is
    // new, and made from the snapshot already on disk (same grant).
    let manifest = host
        .get("/v1/functions/embed")
        .json::<Value>()
        .expect("function JSON")["manifest"]
        .as_str()
        .expect("manifest")
        .replace("min_instances = 1", "min_instances = 0")
        .replace("idle_timeout_ms = 30000", "idle_timeout_ms = 100");
    host.publish_function("embed", &manifest);
    wait_for(
        Duration::from_secs(10),
        "the snapshot on disk was not used",
        || host.metric("cascade_snapshots_total{outcome=\"cached\"}") == 1.0,
    );
    assert!(first_stage_snapshotted(&host, "embed"));
    assert_eq!(
        host.metric("cascade_snapshots_total{outcome=\"made\"}"),
        1.0
    );
    let cold = "cascade_cold_starts_total{function=\"embed\",stage=\"bert-tokenizer@0.1.0\"}";
    for round in 0..3 {
        wait_for(
            Duration::from_secs(10),
            "embed never scaled to zero",
            || stage_instances(&host, "embed")[0] == 0,
        );
        let before = host.metric(cold);
        embeddings_match_the_reference(&host, &format!("from the snapshot, round {round}"));
        assert!(host.metric(cold) > before, "a new instance served");
    }

    // A restart loads the compiled snapshot instead of making it again.
    host.restart();
    assert!(first_stage_snapshotted(&host, "embed"));
    assert_eq!(
        host.metric("cascade_snapshots_total{outcome=\"made\"}"),
        0.0
    );
    assert_eq!(
        host.metric("cascade_snapshots_total{outcome=\"cached\"}"),
        1.0
    );
    embeddings_match_the_reference(&host, "after a restart");
}

#[test]
fn a_component_whose_initialize_fails_holds_a_file_or_loops_is_not_snapshotted_and_serves() {
    let host = Host::start_logged();
    host.publish_examples();
    host.publish_component("misbehave");
    let cases = [
        (
            "fail",
            "its `initialize` failed: asked to fail in initialize",
        ),
        ("hold", "it still holds a handle"),
        ("loop", "its `initialize` ran past its 10 s deadline"),
    ];
    for (behaviour, _) in cases {
        let manifest = format!(
            "name = \"init-{behaviour}\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n\
             files = \"minilm-l3@1.0.0\"\nconfig = {{ on_initialize = \"{behaviour}\" }}\n"
        );
        host.publish_function(&format!("init-{behaviour}"), &manifest);
    }
    // `loop` is stopped at the 10 s start-up deadline; one at a time.
    wait_for(Duration::from_secs(90), "three refusals", || {
        host.metric("cascade_snapshots_total{outcome=\"refused\"}") == 3.0
    });
    let log = host.log();
    for (behaviour, why) in cases {
        let function = format!("init-{behaviour}");
        assert!(
            log.lines()
                .any(|l| l.contains("no snapshot") && l.contains(&function) && l.contains(why)),
            "{function}: {why}\n{log}"
        );
        assert!(!first_stage_snapshotted(&host, &function));
        let response = host.invoke(&function, "text/plain", "echo:still here".to_string());
        assert_eq!(response.status(), 200, "{function}");
        let value: Value = response.json().expect("JSON");
        assert_eq!(cascade_tests::first_tensor_text(&value), "still here");
    }
    assert_eq!(
        host.metric("cascade_snapshots_total{outcome=\"made\"}"),
        1.0,
        "embed's"
    );
}

/// Every reference text's embedding from `host` is within 1e-4 of the
/// onnxruntime reference, element by element.
fn embeddings_match_the_reference(host: &Host, when: &str) {
    for (text, want) in embed_reference() {
        let got = embed(host, &[&text]);
        let worst = got[0]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "{when}: {text:?} is {worst} from the onnxruntime reference"
        );
    }
}

/// Concurrent requests to `embed-batched` share model runs and each gets
/// the answer it gets alone.
fn batched_requests_get_their_own_answers(host: &Host) {
    let manifest = cascade_tests::batched_embed_manifest("embed-batched", 8, 16);
    let response = host.put("/v1/functions/embed-batched", "application/toml", manifest);
    assert_eq!(response.status(), 201, "{:?}", response.text());
    let texts: Vec<Vec<&str>> = vec![
        // Different texts of 8 tokens each: any two requests can share a
        // batch, so a mix-up of rows would show.
        vec!["A man is eating food."],
        vec!["A girl is eating fruit."],
        vec!["The cat sat on mats.", "Two dogs run in parks."],
        vec!["A boy is reading books."],
    ];
    let alone: Vec<Vec<Vec<f64>>> = texts.iter().map(|t| embed(host, t)).collect();
    let batches = "cascade_model_batches_total{function=\"embed-batched\"";
    for round in 0.. {
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..16)
                .map(|i| {
                    let kind = i % texts.len();
                    let body = serde_json::json!({ "inputs": texts[kind] }).to_string();
                    scope.spawn(move || {
                        let response = host.invoke("embed-batched", "application/json", body);
                        assert_eq!(response.status(), 200, "{:?}", response.text());
                        let value: Value = response.json().expect("JSON");
                        (kind, value)
                    })
                })
                .collect();
            for run in runs {
                let (which, got) = run.join().expect("no panic");
                for (row, want) in alone[which].iter().enumerate() {
                    let got = got["embeddings"][row].as_array().expect("row");
                    assert_eq!(got.len(), want.len());
                    let worst = got
                        .iter()
                        .zip(want)
                        .map(|(g, w)| (g.as_f64().expect("number") - w).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        worst < 1e-4,
                        "request kind {which}, row {row}: off by {worst}"
                    );
                }
            }
        });
        if host.metric(batches) > 0.0 {
            break;
        }
        assert!(
            round < 20,
            "20 rounds of 16 concurrent requests never shared a model run"
        );
    }
    let shared = host.metric("cascade_model_batched_requests_total{function=\"embed-batched\"");
    assert!(
        shared >= 2.0 * host.metric(batches),
        "{shared} requests in batches"
    );
}

#[test]
fn a_host_given_no_onnxruntime_library_says_so_and_exits() {
    let data = tempfile::tempdir().expect("tempdir");
    let missing = data.path().join("libonnxruntime.so.1.32.0");
    let output = std::process::Command::new(cascade_tests::host::cascade_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .arg("--onnxruntime")
        .arg(&missing)
        .output()
        .expect("cascade runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot load ONNX Runtime from")
            && stderr.contains(&*missing.to_string_lossy()),
        "{stderr}"
    );
}

#[test]
fn by_default_a_host_runs_models_with_the_cached_onnxruntime_and_else_with_tract() {
    // The cache `cargo xtask models` filled: ONNX Runtime, no flag needed.
    let host = Host::start_logged();
    host.publish_examples();
    assert_eq!(
        host.metric("cascade_model_backend{backend=\"onnxruntime\"}"),
        1.0
    );
    let library = cascade_tests::onnxruntime_library();
    let log = host.log();
    assert!(
        log.contains(&format!(
            "models run with ONNX Runtime from {} (the cached copy",
            library.display()
        )),
        "{log}"
    );
    let want = &embed_reference()[0];
    let got = embed(&host, &[&want.0]);
    assert!(cosine(&got[0], &want.1) > 0.999);
    drop(host);
    // A cache without the library: tract, saying why at start.
    let cache = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let listen = taken.local_addr().expect("its address").to_string();
    let output = std::process::Command::new(cascade_tests::host::cascade_binary())
        .args(["serve", "--listen", &listen, "--data"])
        .arg(data.path())
        .env("CASCADE_CACHE_DIR", cache.path())
        .env("RUST_LOG", "info")
        .output()
        .expect("cascade runs");
    // The port is taken: the host chooses its backend, then exits.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INFO")
            && stderr.contains(
                "models run with tract (pure Rust): no ONNX Runtime library given (--onnxruntime) or cached in"
            ),
        "{stderr}"
    );
    // One that does not load: it was loading in the background, so the
    // host serves, warns, and runs models with tract.
    let models = cache.path().join("models");
    std::fs::create_dir_all(&models).expect("models dir");
    std::fs::write(models.join("libonnxruntime.so.1.40.0"), b"not a library").expect("junk");
    let host = Host::start_logged_in(&[], &[("CASCADE_CACHE_DIR", cache.path())]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host.log().contains("did not load") {
        assert!(Instant::now() < deadline, "no warning: {}", host.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = host.log();
    let warning = log
        .lines()
        .find(|l| l.contains("did not load"))
        .expect("the line");
    assert!(
        warning.contains("WARN") && warning.contains("models run with tract (pure Rust)"),
        "{warning}"
    );
    assert_eq!(host.metric("cascade_model_backend{backend=\"tract\"}"), 1.0);
    host.publish_examples();
    let got = embed(&host, &[&want.0]);
    assert!(cosine(&got[0], &want.1) > 0.999, "embed on the fallback");
    drop(host);
    // Asking for ONNX Runtime where there is none stops the host.
    let data = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(cascade_tests::host::cascade_binary())
        .args([
            "serve",
            "--model-backend",
            "onnxruntime",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data.path())
        .env("CASCADE_CACHE_DIR", data.path())
        .output()
        .expect("cascade runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--model-backend onnxruntime, but no library"),
        "{stderr}"
    );
}

#[test]
fn a_repeated_input_shape_gets_a_specialised_plan_with_the_same_answers() {
    let host = Host::start_with(&["--model-backend", "tract", "--shape-plans", "1"]);
    host.publish_examples();
    assert_eq!(host.metric("cascade_model_backend{backend=\"tract\"}"), 1.0);
    let gauge = "cascade_shape_plans{model=\"minilm-l3@1.0.0\"}";
    let text = "A man is eating food.";
    let general = embed(&host, &[text]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.metric(gauge) < 1.0 {
        assert!(Instant::now() < deadline, "no plan was specialised");
        embed(&host, &[text]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let specialised = embed(&host, &[text]);
    let worst = general[0]
        .iter()
        .zip(&specialised[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "specialised plan differs by {worst}");
    for _ in 0..10 {
        embed(&host, &[text]);
    }
    // A rarer length stays on the general plan: the one place is taken by
    // a shape used far more.
    let longer = "A man is eating food, and the food is a piece of bread.";
    let first = embed(&host, &[longer]);
    for _ in 0..5 {
        assert_eq!(embed(&host, &[longer]), first);
    }
    assert_eq!(host.metric(gauge), 1.0);
}

#[test]
fn padding_to_a_multiple_leaves_embeddings_unchanged() {
    let host = Host::start();
    host.publish_examples();
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/functions/embed.toml"),
    )
    .expect("embed.toml");
    let plain = r#"config = { max_length = "128" }"#;
    assert!(
        manifest.contains(plain),
        "embed.toml configures the tokenizer"
    );
    let padded = manifest
        .replace("name = \"embed\"", "name = \"embed-padded\"")
        .replace("embed.requests", "embed-padded.requests")
        .replace(
            plain,
            r#"config = { max_length = "128", pad_to_multiple_of = "16" }"#,
        );
    let response = host.put("/v1/functions/embed-padded", "application/toml", padded);
    assert_eq!(response.status(), 201, "{:?}", response.text());
    let texts = [
        "Hi.",
        "A man is eating food.",
        "The girl is carrying a baby on her back today.",
    ];
    let want = embed(&host, &texts);
    let body = serde_json::json!({ "inputs": texts }).to_string();
    let response = host.invoke("embed-padded", "application/json", body);
    assert_eq!(response.status(), 200);
    let got: Value = response.json().expect("JSON");
    for (row, want) in want.iter().enumerate() {
        for (i, w) in want.iter().enumerate() {
            let g = got["embeddings"][row][i].as_f64().expect("number");
            assert!((g - w).abs() < 1e-5, "text {row}, value {i}: {g} vs {w}");
        }
    }
}

/// `embed`'s manifest names mean-pool's tensors (`inputs`); the reference
/// figures above went through that selection. Here: what it leaves out is
/// really gone, a name nothing produced is a clear error, and only
/// postprocessors take the field.
fn postprocessors_receive_only_the_tensors_they_name(host: &Host) {
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/functions/embed.toml"),
    )
    .expect("embed.toml");
    let named = "inputs = [\"onnx::Shape_422\", \"attention_mask\"]";
    assert!(manifest.contains(named), "embed.toml names its tensors");
    let variant = |name: &str, inputs: &str| {
        manifest
            .replace("name = \"embed\"", &format!("name = \"{name}\""))
            .replace(named, inputs)
    };
    let publish = |name: &str, text: String| {
        host.put(&format!("/v1/functions/{name}"), "application/toml", text)
    };

    let no_mask = variant("embed-no-mask", "inputs = [\"onnx::Shape_422\"]");
    assert_eq!(publish("embed-no-mask", no_mask).status(), 201);
    let (status, message) = error_of(host.invoke("embed-no-mask", "text/plain", "a text"));
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("attention_mask"),
        "mean-pool no longer sees the mask: {message}"
    );

    let unknown = variant("embed-unknown", "inputs = [\"onnx::Shape_422\", \"nope\"]");
    assert_eq!(publish("embed-unknown", unknown).status(), 201);
    let (status, message) = error_of(host.invoke("embed-unknown", "text/plain", "a text"));
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("mean-pool@0.1.0")
            && message.contains("names tensor \"nope\"")
            && message.contains("attention_mask, onnx::Shape_422"),
        "{message}"
    );

    let on_tokenizer = variant("embed-misplaced", "").replace(
        "config = { max_length = \"128\" }",
        "config = { max_length = \"128\" }\ninputs = [\"x\"]",
    );
    let (status, message) = error_of(publish("embed-misplaced", on_tokenizer));
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("`stages[0].inputs`: bert-tokenizer@0.1.0 is a preprocessor; only postprocessors take `inputs`"),
        "{message}"
    );
}

fn top_label(host: &Host, png: Vec<u8>) -> (String, f64) {
    let response = host.invoke("orientation", "image/png", png);
    assert_eq!(response.status(), 200);
    let value: Value = response.json().expect("JSON");
    let best = &value["predictions"][0][0];
    (
        best["label"].as_str().expect("label").to_string(),
        best["score"].as_f64().expect("score"),
    )
}

#[test]
fn orientation_tells_upright_text_from_upside_down() {
    let host = Host::start();
    host.publish_examples();
    for text in ["Cascade serves models", "The quick brown fox 42"] {
        let (label, score) = top_label(&host, cascade_tests::render_line(text, false));
        assert_eq!(label, "0", "upright {text:?} (score {score})");
        let (label, score) = top_label(&host, cascade_tests::render_line(text, true));
        assert_eq!(label, "180", "rotated {text:?} (score {score})");
    }
    let (status, message) = error_of(host.invoke("orientation", "image/png", "not an image"));
    assert_eq!(status, 400);
    assert!(
        message.contains("image-preprocess@0.1.0") && message.contains("not a PNG or JPEG"),
        "{message}"
    );
}

const MISBEHAVE: &str = r#"
name = "misbehave"
[[stages]]
component = "misbehave@0.1.0"
[scaling]
max_instances = 2
[limits]
timeout_ms = 1000
memory_mb = 32
"#;

fn misbehave_host() -> Host {
    misbehave_on(Host::start())
}

fn misbehave_on(host: Host) -> Host {
    host.publish_component("misbehave");
    let response = host.put("/v1/functions/misbehave", "application/toml", MISBEHAVE);
    assert_eq!(response.status(), 201);
    host
}

fn echo(host: &Host) -> String {
    misbehave_says(host, "echo:still here")
}

fn misbehave_says(host: &Host, command: &str) -> String {
    let response = host.invoke("misbehave", "text/plain", command.to_string());
    assert_eq!(response.status(), 200, "{command}");
    let value: Value = response.json().expect("JSON");
    cascade_tests::first_tensor_text(&value)
}

#[test]
fn an_instance_starts_clean_in_a_slot_a_trapped_instance_left() {
    let host = Host::start();
    host.publish_component("misbehave");
    let one_instance = MISBEHAVE.replace("max_instances = 2", "max_instances = 1");
    let response = host.put("/v1/functions/misbehave", "application/toml", one_instance);
    assert_eq!(response.status(), 201);
    let secret = "scan:the-previous-tenant-wrote-this";
    assert_eq!(misbehave_says(&host, secret), "clean");
    assert_eq!(
        misbehave_says(&host, &secret.replace("scan", "keep")),
        "kept"
    );
    assert_eq!(
        misbehave_says(&host, secret),
        "found",
        "the scan sees its own instance"
    );
    let (status, _) = error_of(host.invoke("misbehave", "text/plain", "panic"));
    assert_eq!(status, 500);
    assert_eq!(
        misbehave_says(&host, secret),
        "clean",
        "a fresh instance after the trap"
    );
}

#[test]
fn misbehaving_guests_cannot_hurt_the_host() {
    let host = misbehave_host();
    assert_eq!(echo(&host), "still here");

    let started = Instant::now();
    let (status, message) = error_of(host.invoke("misbehave", "text/plain", "loop"));
    assert_eq!(status, 504, "{message}");
    assert!(
        message.contains("deadline of 1000 ms exceeded"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(echo(&host), "still here");

    let (status, message) = error_of(host.invoke("misbehave", "text/plain", "oom"));
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("misbehave@0.1.0"), "{message}");
    assert_eq!(echo(&host), "still here");

    let (status, message) = error_of(host.invoke("misbehave", "text/plain", "panic"));
    assert_eq!(status, 500);
    assert!(message.contains("trapped"), "{message}");
    assert_eq!(echo(&host), "still here");
    assert!(host.metric("cascade_traps_total") >= 2.0);

    let (status, message) = error_of(host.invoke("misbehave", "text/plain", "read:/etc/passwd"));
    assert_eq!(status, 400);
    assert!(
        message.contains("read /etc/passwd:") && !message.contains("root:"),
        "{message}"
    );
    let (status, message) =
        error_of(host.invoke("misbehave", "text/plain", "read:/model/tokenizer.json"));
    assert_eq!(status, 400, "no model files were granted: {message}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = listener.local_addr().expect("addr");
    let (status, message) =
        error_of(host.invoke("misbehave", "text/plain", format!("connect:{target}")));
    assert_eq!(status, 400);
    assert!(message.contains(&format!("connect {target}:")), "{message}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        listener.accept().is_err(),
        "the guest must not have reached the listener"
    );

    let response = host.invoke("misbehave", "text/plain", "env");
    let value: Value = response.json().expect("JSON");
    assert_eq!(
        value["tensors"][0]["dimensions"][0], 0,
        "the guest sees no environment"
    );
    assert_eq!(host.get("/healthz").status(), 200);
}

#[test]
fn a_request_abandoned_mid_call_gives_its_instance_back() {
    let host = misbehave_host();
    assert_eq!(echo(&host), "still here");
    // The client hangs up long before the 1 s deadline while the guest loops.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let gave_up = impatient
        .post(format!("{}/v1/functions/misbehave/invoke", host.url))
        .header("content-type", "text/plain")
        .body("loop")
        .send();
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    // Whether the host noticed the hang-up or the deadline stopped the guest,
    // the instance must leave the busy count, and the pool must add up.
    let settled_by = Instant::now() + Duration::from_secs(5);
    loop {
        let status: Value = host
            .get("/v1/functions/misbehave/status")
            .json()
            .expect("status JSON");
        let stage = &status["stages"][0];
        if stage["busy"] == 0 {
            assert_eq!(stage["instances"], stage["idle"], "{status}");
            break;
        }
        assert!(Instant::now() < settled_by, "still busy: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(echo(&host), "still here");
}

fn pooled() -> String {
    cascade_tests::embed_manifest(
        "pooled",
        r#"[scaling]
min_instances = 0
max_instances = 4
idle_timeout_ms = 600
max_queue = 64
"#,
    )
}

fn stage_instances(host: &Host, function: &str) -> Vec<u64> {
    let status: Value = host
        .get(&format!("/v1/functions/{function}/status"))
        .json()
        .expect("status JSON");
    status["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["instances"].as_u64().expect("n"))
        .collect()
}

#[test]
fn pools_scale_up_under_load_and_back_to_the_minimum() {
    let host = Arc::new(Host::start());
    host.publish_examples();
    assert_eq!(
        host.put("/v1/functions/pooled", "application/toml", pooled())
            .status(),
        201
    );
    assert_eq!(
        stage_instances(&host, "pooled"),
        vec![0, 0],
        "scale to zero at rest"
    );

    let peak = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (host, peak, running) = (host.clone(), peak.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                let most = stage_instances(&host, "pooled")
                    .into_iter()
                    .max()
                    .unwrap_or(0) as usize;
                peak.fetch_max(most, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let workers: Vec<_> = (0..64)
        .map(|i| {
            let host = host.clone();
            std::thread::spawn(move || {
                let text = format!("request number {i} asks for an embedding of a longer sentence");
                host.invoke("pooled", "text/plain", text).status().as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    running.store(false, Ordering::SeqCst);
    sampler.join().expect("sampler");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak > 1 && peak <= 4, "peak instances per stage {peak}");
    assert!(stage_instances(&host, "pooled").iter().all(|n| *n <= 4));
    assert!(host.metric("cascade_cold_starts_total{function=\"pooled\"") >= 2.0);

    let deadline = Instant::now() + Duration::from_secs(10);
    while stage_instances(&host, "pooled") != vec![0, 0] {
        assert!(
            Instant::now() < deadline,
            "instances never returned to min_instances = 0"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_answers_while_embed_is_saturated_and_new_revisions_lose_nothing() {
    let host = Arc::new(Host::start());
    host.publish_examples();
    let running = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (host, running, failures, served) = (host.clone(), running.clone(), failures.clone(), served.clone());
            std::thread::spawn(move || {
                let client = client();
                while running.load(Ordering::SeqCst) {
                    let status = client
                        .post(format!("{}/v1/functions/embed/invoke", host.url))
                        .header("content-type", "text/plain")
                        .body("a sentence long enough to keep the model busy for a little while, again and again")
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    if status == 200 {
                        served.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut took = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(host.get("/healthz").status(), 200);
        took.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(25));
    }
    took.sort();
    // New revisions while the load runs: requests must keep succeeding.
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/functions/embed.toml"),
    )
    .expect("manifest");
    for timeout in [4000, 4500] {
        let revised = manifest.replace("timeout_ms = 5000", &format!("timeout_ms = {timeout}"));
        assert_eq!(
            host.put("/v1/functions/embed", "application/toml", revised)
                .status(),
            201
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    running.store(false, Ordering::SeqCst);
    for worker in load {
        worker.join().expect("worker");
    }
    // Health never waits behind the saturated queue (that would be seconds);
    // one probe in twenty may meet a scheduling hiccup of the 2-core machine
    // running other tests beside this one (seen once: 195 ms).
    assert!(
        took[took.len() / 2] < Duration::from_millis(100)
            && took[took.len() - 1] < Duration::from_secs(1),
        "healthz under load took {took:?}"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed during revisions"
    );
    assert!(served.load(Ordering::SeqCst) > 20);
    let status: Value = host
        .get("/v1/functions/embed/status")
        .json()
        .expect("status");
    assert_eq!(status["revision"], 3);
}

const EMBED_NN: &str = r#"
name = "embed-nn"
[[stages]]
component = "bert-tokenizer@0.1.0"
files = "minilm-l3@1.0.0"
[[stages]]
component = "nn-infer@0.1.0"
models = ["minilm-l3@1.0.0"]
config = { model = "minilm-l3@1.0.0", outputs = "onnx::Shape_422" }
[[stages]]
component = "mean-pool@0.1.0"
config = { normalize = "true" }
"#;

#[test]
fn an_inferencer_runs_a_granted_registry_model_through_wasi_nn() {
    let host = Host::start();
    host.publish_examples();
    host.publish_component("nn-infer");
    let shown: Value = host
        .get("/v1/components/nn-infer/0.1.0")
        .json()
        .expect("JSON");
    assert_eq!(shown["world"], "inferencer");
    assert_eq!(
        host.put("/v1/functions/embed-nn", "application/toml", EMBED_NN)
            .status(),
        201
    );

    let text = "A man is eating a piece of bread.";
    let through_nn: Value = host
        .invoke("embed-nn", "text/plain", text)
        .json()
        .expect("JSON");
    let native = embed(&host, &[text]);
    let row: Vec<f64> = through_nn["embeddings"][0]
        .as_array()
        .expect("row")
        .iter()
        .map(|v| v.as_f64().expect("f"))
        .collect();
    assert!(
        cosine(&row, &native[0]) > 0.99999,
        "wasi:nn and the model stage disagree"
    );

    // Only granted models can be loaded by name.
    let ungranted = EMBED_NN
        .replace("name = \"embed-nn\"", "name = \"sneaky\"")
        .replace(
            "config = { model = \"minilm-l3@1.0.0\"",
            "config = { model = \"ppocr-cls@2.0.0\"",
        );
    assert_eq!(
        host.put("/v1/functions/sneaky", "application/toml", ungranted)
            .status(),
        201
    );
    let (status, message) = error_of(host.invoke("sneaky", "text/plain", text));
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("loading ppocr-cls@2.0.0"), "{message}");

    // `models` is refused on a component that is not an inferencer.
    let wrong = "name = \"w\"\n[[stages]]\ncomponent = \"bert-tokenizer@0.1.0\"\nmodels = [\"minilm-l3@1.0.0\"]";
    let (status, message) = error_of(host.put("/v1/functions/w", "application/toml", wrong));
    assert_eq!(status, 400);
    assert!(
        message.contains("only inferencers load models"),
        "{message}"
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_cleanly() {
    let mut host = misbehave_host();
    let url = host.url.clone();
    let slow = std::thread::spawn(move || {
        let response = client()
            .post(format!("{url}/v1/functions/misbehave/invoke"))
            .header("content-type", "text/plain")
            .body("sleep:700")
            .send()
            .expect("the in-flight request is answered");
        response.status().as_u16()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(host.terminate(), "cascade serve exits 0 after SIGTERM");
    assert_eq!(
        slow.join().expect("request thread"),
        200,
        "the in-flight request finished"
    );
    assert!(
        client()
            .get(format!("{}/healthz", host.url))
            .send()
            .is_err(),
        "no longer accepting"
    );
}

const TIGHT: &str = r#"
name = "tight"
[[stages]]
component = "misbehave@0.1.0"
[scaling]
max_instances = 1
max_queue = 0
[limits]
timeout_ms = 3000
max_body_kb = 1
"#;

#[test]
fn overload_gets_503_with_retry_after_and_big_bodies_413() {
    let host = misbehave_host();
    assert_eq!(
        host.put("/v1/functions/tight", "application/toml", TIGHT)
            .status(),
        201
    );
    let url = host.url.clone();
    let busy = std::thread::spawn(move || {
        client()
            .post(format!("{url}/v1/functions/tight/invoke"))
            .body("sleep:800")
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    std::thread::sleep(Duration::from_millis(200));
    let refused = host.invoke("tight", "text/plain", "echo:second");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let (_, message) = error_of(refused);
    assert!(
        message.contains("function tight is overloaded"),
        "{message}"
    );
    assert_eq!(busy.join().expect("busy request"), 200);
    assert_eq!(
        echo(&host),
        "still here",
        "capacity is back once the slow request ends"
    );

    let (status, message) = error_of(host.invoke("tight", "text/plain", vec![b'x'; 2048]));
    assert_eq!(status, 413);
    assert!(
        message.contains("function tight: body exceeds the limit of 1024 bytes"),
        "{message}"
    );
}

#[test]
fn guest_output_reaches_the_host_log_tagged_with_function_and_stage() {
    let host = misbehave_on(Host::start_logged());
    let response = host.invoke(
        "misbehave",
        "text/plain",
        "print:hello from inside the sandbox",
    );
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = host.log();
        let tagged: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("hello from inside the sandbox"))
            .collect();
        if tagged.len() >= 2 {
            assert!(
                tagged
                    .iter()
                    .all(|l| l.contains("function=misbehave stage=misbehave@0.1.0")),
                "{tagged:?}"
            );
            assert!(
                tagged.iter().any(|l| l.contains("stdout"))
                    && tagged.iter().any(|l| l.contains("stderr")),
                "{tagged:?}"
            );
            assert!(
                log.contains("request_id="),
                "invocations are logged with a request id"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest output never reached the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn batching_a_model_whose_first_dimension_is_fixed_is_refused_at_publish() {
    // The examples publish ppocr-cls with `--input-shape x=1,3,48,192`:
    // stacked requests would make a batch of 2 that no plan of it can run
    // (seen as a 500 for every shared run on tract).
    let host = Host::start();
    host.publish_examples();
    let manifest = "name = \"orientation-batched\"\n\
        [[stages]]\ncomponent = \"image-preprocess@0.1.0\"\n\
        config = { resize = \"pad\", height = \"48\", width = \"192\", tensor = \"x\" }\n\
        [[stages]]\nmodel = \"ppocr-cls@2.0.0\"\nbatch = 4\n";
    let (status, message) = error_of(host.put(
        "/v1/functions/orientation-batched",
        "application/toml",
        manifest,
    ));
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains(
            "`stages[1].batch`: 4 needs a free batch dimension, but ppocr-cls@2.0.0's input \
             \"x\" has shape [1, 3, 48, 192] (dimension 0 fixed at 1)"
        ),
        "{message}"
    );
    let unbatched = manifest.replace("batch = 4\n", "");
    let response = host.put(
        "/v1/functions/orientation-batched",
        "application/toml",
        unbatched,
    );
    assert_eq!(response.status().as_u16(), 201);
}
