//! The registry end to end: the real binary, a real redb file, real uploads.

use cascade_tests::host::{Host, cascade_binary, client, error_of};
use cascade_tests::{component_path, model_file};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sha256(path: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("readable")))
}

fn cli_ok(host: &Host, args: &[&str]) -> Value {
    let out = host.cli(args);
    assert!(
        out.status.success(),
        "cascade {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn publish_list_show_and_content_round_trip_with_verified_digests() {
    let host = Host::start();
    host.publish_examples();
    let tokenizer = component_path("bert-tokenizer");
    let shown = cli_ok(&host, &["show", "components", "bert-tokenizer@0.1.0"]);
    assert_eq!(shown["digest"], sha256(&tokenizer));
    assert_eq!(shown["world"], "preprocessor");
    let content = host
        .get("/v1/components/bert-tokenizer/0.1.0/content")
        .bytes()
        .expect("bytes");
    assert_eq!(hex::encode(Sha256::digest(&content)), sha256(&tokenizer));

    let model: Value = host.get("/v1/models/minilm-l3/1.0.0").json().expect("JSON");
    assert_eq!(
        model["digest"],
        sha256(&model_file("paraphrase-MiniLM-L3-v2.onnx"))
    );
    assert_eq!(model["files"][0]["name"], "tokenizer.json");
    assert_eq!(
        model["files"][0]["digest"],
        sha256(&model_file("tokenizer.json"))
    );
    assert_eq!(model["inputs"][0]["name"], "input_ids");
    assert!(
        model["outputs"]
            .as_array()
            .expect("outputs")
            .iter()
            .any(|o| o["name"] == "onnx::Shape_422")
    );
    let file = host
        .get("/v1/models/minilm-l3/1.0.0/files/tokenizer.json")
        .bytes()
        .expect("bytes");
    assert_eq!(
        hex::encode(Sha256::digest(&file)),
        sha256(&model_file("tokenizer.json"))
    );

    let listed = host.cli(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    for needle in [
        "bert-tokenizer@0.1.0",
        "minilm-l3@1.0.0",
        "ppocr-cls@2.0.0",
        "embed@1",
        "orientation@1",
    ] {
        assert!(listed.contains(needle), "{needle} missing from:\n{listed}");
    }
    let functions: Value = host.get("/v1/functions").json().expect("JSON");
    assert_eq!(functions.as_array().expect("list").len(), 2);

    // `cascade list | head -0`: the reader is gone before the first line is written.
    let mut piped = std::process::Command::new(cascade_binary())
        .args(["--registry", &host.url, "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cascade runs");
    drop(piped.stdout.take());
    let out = piped.wait_with_output().expect("cascade exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

#[test]
fn versions_are_immutable_and_concurrent_publishes_agree() {
    let host = Arc::new(Host::start());
    let wasm = std::fs::read(component_path("mean-pool")).expect("wasm");
    assert_eq!(
        host.put(
            "/v1/components/pool/1.0.0",
            "application/wasm",
            wasm.clone()
        )
        .status(),
        201
    );
    assert_eq!(
        host.put(
            "/v1/components/pool/1.0.0",
            "application/wasm",
            wasm.clone()
        )
        .status(),
        200
    );
    let other = std::fs::read(component_path("classify")).expect("wasm");
    let (status, message) =
        error_of(host.put("/v1/components/pool/1.0.0", "application/wasm", other));
    assert_eq!(status, 409);
    assert!(message.contains("already published"), "{message}");

    // Eight clients race to publish one name@version with four different bodies.
    let bodies: Vec<Vec<u8>> = ["mean-pool", "classify", "image-preprocess", "misbehave"]
        .iter()
        .map(|c| std::fs::read(component_path(c)).expect("wasm"))
        .collect();
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let (host, body) = (host.clone(), bodies[i % 4].clone());
            std::thread::spawn(move || {
                let response = host.put(
                    "/v1/components/race/1.0.0",
                    "application/wasm",
                    body.clone(),
                );
                (
                    response.status().as_u16(),
                    hex::encode(Sha256::digest(&body)),
                )
            })
        })
        .collect();
    let results: Vec<(u16, String)> = racers
        .into_iter()
        .map(|r| r.join().expect("racer"))
        .collect();
    let stored: Value = host.get("/v1/components/race/1.0.0").json().expect("JSON");
    let winner = stored["digest"].as_str().expect("digest").to_string();
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{results:?}"
    );
    for (status, digest) in &results {
        let expected = if *digest == winner {
            [200, 201].contains(status)
        } else {
            *status == 409
        };
        assert!(expected, "{status} for {digest} (winner {winner})");
    }
    let content = host
        .get("/v1/components/race/1.0.0/content")
        .bytes()
        .expect("bytes");
    assert_eq!(hex::encode(Sha256::digest(&content)), winner);
}

#[test]
fn bad_inputs_get_precise_client_errors() {
    let host = Host::start_with(&["--max-upload-mb", "3"]);
    host.publish_examples_small();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/components/x/1.0.0",
            b"hello".to_vec(),
            400,
            "not WebAssembly",
        ),
        (
            "/v1/components/x/1.0.0",
            wat::parse_str("(module)").expect("wat"),
            400,
            "core WebAssembly module, not a component",
        ),
        (
            "/v1/components/x/1.0.0",
            wat::parse_str("(component)").expect("wat"),
            400,
            "exports exactly one of",
        ),
        (
            "/v1/components/Bad_Name/1.0.0",
            b"x".to_vec(),
            400,
            "invalid name \"Bad_Name\"",
        ),
        (
            "/v1/components/x/1",
            b"x".to_vec(),
            400,
            "invalid version \"1\"",
        ),
        (
            "/v1/models/m/1.0.0",
            b"not onnx at all".to_vec(),
            400,
            "invalid ONNX model",
        ),
        (
            "/v1/components/x/1.0.0",
            vec![0u8; 4 << 20],
            413,
            "exceeds the limit",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (got, message) = error_of(host.put(path, "application/octet-stream", body));
        assert_eq!(got, status, "{path}: {message}");
        assert!(
            message.contains(needle),
            "{path}: {message:?} lacks {needle:?}"
        );
    }
    let manifests = [
        (
            "name = \"f\"\n[[stages]]\ncomponent = \"nope@1.0.0\"",
            "component nope@1.0.0 is not published",
        ),
        (
            "name = \"f\"\n[[stages]]\ncomponent = \"mean-pool@0.1.0\"\n[[stages]]\ncomponent = \"bert-tokenizer@0.1.0\"",
            "mean-pool@0.1.0 is a postprocessor, which can only be the last stage",
        ),
        (
            "name = \"f\"\n[[stages]]\nmodell = \"m@1.0.0\"",
            "unknown field `modell`",
        ),
        (
            "name = \"g\"\n[[stages]]\ncomponent = \"mean-pool@0.1.0\"",
            "names function \"g\"",
        ),
    ];
    for (manifest, needle) in manifests {
        let (status, message) = error_of(host.put("/v1/functions/f", "application/toml", manifest));
        assert_eq!(status, 400, "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    let (status, message) = error_of(host.get("/v1/components/nope/1.0.0"));
    assert_eq!(
        (status, message.as_str()),
        (404, "component nope@1.0.0 is not published")
    );
    let (status, message) = error_of(host.invoke("nope", "text/plain", "x"));
    assert_eq!(
        (status, message.as_str()),
        (404, "function nope is not published")
    );

    let out = host.cli(&[
        "publish",
        "component",
        "/nonexistent.wasm",
        "--name",
        "a",
        "--version",
        "1.0.0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.wasm"));
}

#[test]
fn tokens_guard_writes_and_optionally_reads() {
    let host = Host::start_with(&["--token", "s3cret"]);
    let wasm = std::fs::read(component_path("mean-pool")).expect("wasm");
    let (status, message) =
        error_of(host.put("/v1/components/p/1.0.0", "application/wasm", wasm.clone()));
    assert_eq!(status, 401);
    assert!(message.contains("Authorization: Bearer"), "{message}");
    let wrong = client()
        .put(format!("{}/v1/components/p/1.0.0", host.url))
        .bearer_auth("nope")
        .body(wasm.clone())
        .send()
        .expect("answers");
    assert_eq!(wrong.status(), 401);
    let right = client()
        .put(format!("{}/v1/components/p/1.0.0", host.url))
        .bearer_auth("s3cret")
        .body(wasm)
        .send()
        .expect("answers");
    assert_eq!(right.status(), 201);
    assert_eq!(host.get("/v1/components").status(), 200, "reads stay open");
    let out = host.cli(&["--token", "s3cret", "delete", "components", "p@1.0.0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let closed = Host::start_with(&["--token", "s3cret", "--token-read"]);
    assert_eq!(closed.get("/v1/components").status(), 401);
    assert_eq!(closed.get("/healthz").status(), 200);
}

#[test]
fn functions_have_revisions_rollback_and_protect_their_stages() {
    let host = Host::start();
    host.publish_examples();
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/functions/embed.toml"),
    )
    .expect("manifest");
    let revised = manifest.replace("normalize = \"true\"", "normalize = \"false\"");
    let second: Value = host
        .put("/v1/functions/embed", "application/toml", revised)
        .json()
        .expect("JSON");
    assert_eq!(second["revision"], 2);
    let norm = |host: &Host| -> f64 {
        let v: Value = host
            .invoke("embed", "text/plain", "hello there")
            .json()
            .expect("JSON");
        v["embeddings"][0]
            .as_array()
            .expect("row")
            .iter()
            .map(|x| x.as_f64().expect("f").powi(2))
            .sum::<f64>()
            .sqrt()
    };
    assert!(
        (norm(&host) - 1.0).abs() > 0.01,
        "revision 2 does not normalise"
    );
    cli_ok(&host, &["rollback", "embed", "--revision", "1"]);
    assert!(
        (norm(&host) - 1.0).abs() < 1e-4,
        "revision 1 normalises again"
    );
    let revisions: Value = host
        .get("/v1/functions/embed/revisions")
        .json()
        .expect("JSON");
    assert_eq!(revisions.as_array().expect("list").len(), 2);
    let (status, message) = error_of(
        client()
            .delete(format!("{}/v1/components/mean-pool/0.1.0", host.url))
            .send()
            .expect("answers"),
    );
    assert_eq!(status, 409);
    assert!(message.contains("used by function embed"), "{message}");
}

#[test]
fn a_restart_reuses_compiled_components() {
    let mut host = Host::start();
    host.publish_examples();
    assert!(host.metric("cascade_compiled_artifacts_total{source=\"compiled\"}") >= 4.0);
    let started = Instant::now();
    host.restart();
    let response = host.invoke("embed", "text/plain", "warm again");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(
        host.metric("cascade_compiled_artifacts_total{source=\"compiled\"}"),
        0.0
    );
    assert!(host.metric("cascade_compiled_artifacts_total{source=\"cache\"}") >= 4.0);
    eprintln!("restart to first embed response: {elapsed:?}");
}

#[test]
fn kill_9_during_uploads_never_corrupts_the_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut host = Host::start_in(dir.path(), &[]);
    let model = std::fs::read(model_file("paraphrase-MiniLM-L3-v2.onnx")).expect("model");
    let large = std::fs::read(component_path("bert-tokenizer")).expect("wasm");
    let small = std::fs::read(component_path("mean-pool")).expect("wasm");
    let mut verified = 0;
    for round in 0..20u32 {
        // A large model, a large and a small component: killed at times from
        // 50 ms to 1.5 s, some uploads die midway and some complete.
        let bodies = [
            ("models", model.clone()),
            ("components", large.clone()),
            ("components", small.clone()),
        ];
        let uploads: Vec<_> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, (kind, body))| {
                let url = format!("{}/v1/{kind}/a{round}-{i}/1.0.0", host.url);
                std::thread::spawn(move || {
                    let _ = client()
                        .put(url)
                        .body(body)
                        .timeout(Duration::from_secs(20))
                        .send();
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + u64::from(round * 173 % 1450)));
        host.kill9();
        for upload in uploads {
            let _ = upload.join();
        }
        host.restart();
        let components: Value = host.get("/v1/components").json().expect("components");
        let models: Value = host.get("/v1/models").json().expect("models");
        for record in components
            .as_array()
            .into_iter()
            .flatten()
            .chain(models.as_array().into_iter().flatten())
        {
            let digest = record["digest"].as_str().expect("digest");
            let blob = dir.path().join("blobs").join(digest);
            assert_eq!(
                sha256(&blob),
                digest,
                "round {round}: {} is corrupt",
                record["name"]
            );
            verified += 1;
        }
    }
    // Some uploads finished before their kill, so whole artifacts were really checked.
    assert!(
        verified > 0,
        "no upload ever completed: the rounds checked nothing"
    );
    eprintln!("kill -9 rounds: {verified} listed artifacts verified");
    let tmp_left = std::fs::read_dir(dir.path().join("tmp"))
        .expect("tmp")
        .count();
    assert_eq!(tmp_left, 0, "abandoned uploads are cleared at open");
}

#[test]
fn publishing_a_function_the_host_cannot_serve_warns_on_stderr() {
    // Valid, but it asks for more warm instances than this host has slots.
    let host = Host::start_with(&["--max-instances", "2"]);
    host.publish_component("mean-pool");
    let manifest = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        manifest.path(),
        "name = \"greedy\"\n[[stages]]\ncomponent = \"mean-pool@0.1.0\"\n\
         [scaling]\nmin_instances = 3\nmax_instances = 3\n",
    )
    .expect("written");
    let out = host.cli(&[
        "publish",
        "function",
        manifest.path().to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stored, so not an error: {stderr}");
    assert!(
        stderr.starts_with("warning: published, but the host cannot serve it: "),
        "{stderr}"
    );
    let record: Value = serde_json::from_slice(&out.stdout).expect("the record on stdout");
    assert_eq!(record["revision"], 1);
}
