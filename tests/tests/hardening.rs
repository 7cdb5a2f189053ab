//! The holes an outside review found, each proven closed against the real
//! binary: abandoned queue places, guests that wait out their deadline.

use cascade_tests::host::{Host, client, error_of};
use serde_json::Value;
use std::time::{Duration, Instant};

/// One slot, a short queue, a short deadline: easy to fill.
const NARROW: &str = r#"
name = "narrow"
[[stages]]
component = "misbehave@0.1.0"
[scaling]
max_instances = 1
max_queue = 2
[limits]
timeout_ms = 4000
"#;

fn narrow_host() -> Host {
    let host = Host::start();
    host.publish_component("misbehave");
    let response = host.put("/v1/functions/narrow", "application/toml", NARROW);
    assert_eq!(response.status(), 201);
    host
}

fn queued(host: &Host) -> u64 {
    let status: Value = host
        .get("/v1/functions/narrow/status")
        .json()
        .expect("status JSON");
    status["queued"].as_u64().expect("queued")
}

/// Sends `body` to `narrow` and hangs up after `patience`.
fn impatient_invoke(url: &str, body: &'static str, patience: Duration) {
    let impatient = reqwest::blocking::Client::builder()
        .timeout(patience)
        .build()
        .expect("client");
    let gave_up = impatient
        .post(format!("{url}/v1/functions/narrow/invoke"))
        .body(body)
        .send();
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
}

#[test]
fn callers_that_hang_up_while_queued_give_their_place_back() {
    let host = narrow_host();
    for round in 0..3 {
        // One request holds the only slot; two more wait behind it and
        // their callers give up.
        let url = host.url.clone();
        let holder = std::thread::spawn(move || {
            client()
                .post(format!("{url}/v1/functions/narrow/invoke"))
                .body("sleep:1500")
                .send()
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        });
        std::thread::sleep(Duration::from_millis(200));
        let leavers: Vec<_> = (0..2)
            .map(|_| {
                let url = host.url.clone();
                // Slow too, so a leaver that happens to get the slot first
                // still hangs up before it is answered.
                std::thread::spawn(move || {
                    impatient_invoke(&url, "sleep:2000", Duration::from_millis(300))
                })
            })
            .collect();
        for leaver in leavers {
            leaver.join().expect("leaver");
        }
        assert_eq!(holder.join().expect("holder"), 200, "round {round}");
        let settled_by = Instant::now() + Duration::from_secs(5);
        while queued(&host) != 0 {
            assert!(
                Instant::now() < settled_by,
                "round {round}: {} still counted as queued with nobody waiting",
                queued(&host)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The queue has room again: a request that must wait is admitted, not refused.
    let url = host.url.clone();
    let holder = std::thread::spawn(move || {
        client()
            .post(format!("{url}/v1/functions/narrow/invoke"))
            .body("sleep:500")
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    std::thread::sleep(Duration::from_millis(150));
    let waited = host.invoke("narrow", "text/plain", "echo:waited");
    assert_eq!(waited.status(), 200);
    assert_eq!(holder.join().expect("holder"), 200);
    assert_eq!(
        host.metric("cascade_queued_requests{function=\"narrow\"}"),
        0.0
    );
}

#[test]
fn a_guest_that_waits_in_a_host_call_is_held_to_its_deadline() {
    let host = narrow_host();
    let started = Instant::now();
    let (status, message) = error_of(host.invoke("narrow", "text/plain", "sleep:60000"));
    assert_eq!(status, 504, "{message}");
    assert!(
        message.contains("deadline of 4000 ms exceeded"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered after {:?}",
        started.elapsed()
    );
    let response = host.invoke("narrow", "text/plain", "echo:next");
    assert_eq!(response.status(), 200, "the slot came back");
}

/// `embed` with its model run by `nn-infer` from a file's bytes instead of
/// a granted registry model; `GRANT` is replaced by the stage's grant.
const EMBED_FROM_BYTES: &str = r#"
name = "embed-bytes"
[[stages]]
component = "bert-tokenizer@0.1.0"
files = "minilm-l3@1.0.0"
[[stages]]
component = "nn-infer@0.1.0"
files = "carrier@1.0.0"
config = { model_file = "/model/paraphrase-MiniLM-L3-v2.onnx", outputs = "onnx::Shape_422" }
GRANT
[[stages]]
component = "mean-pool@0.1.0"
config = { normalize = "true" }
"#;

fn first_row(value: &Value) -> Vec<f64> {
    value["embeddings"][0]
        .as_array()
        .expect("row")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

#[test]
fn wasi_nn_reaches_only_inferencers_and_bytes_only_when_granted() {
    let host = Host::start_logged();
    host.publish_examples();

    // A preprocessor that imports wasi:nn is refused at publish.
    let sneak = cascade_tests::component_path("nn-sneak");
    let response = host.put(
        "/v1/components/nn-sneak/0.1.0",
        "application/wasm",
        std::fs::read(&sneak).expect("nn-sneak built"),
    );
    let (status, message) = error_of(response);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("this preprocessor imports wasi:nn/")
            && message.contains("only inferencer components may use wasi:nn"),
        "{message}"
    );

    // A model package that carries an ONNX file among its files.
    host.publish_component("nn-infer");
    host.publish_model(
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "paraphrase-MiniLM-L3-v2.onnx",
        &["--input-shape", "x=1,3,48,192"],
        "carrier@1.0.0",
    );

    // Loading from bytes is off unless the manifest grants it.
    let ungranted = EMBED_FROM_BYTES.replace("GRANT", "");
    let response = host.put("/v1/functions/embed-bytes", "application/toml", ungranted);
    assert_eq!(response.status(), 201);
    let text = "A man is eating a piece of bread.";
    let (status, message) = error_of(host.invoke("embed-bytes", "text/plain", text));
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("loading /model/paraphrase-MiniLM-L3-v2.onnx"),
        "{message}"
    );
    let log = host.log();
    assert!(
        log.contains("embed-bytes/nn-infer@0.1.0")
            && log.contains("wasi:nn load from bytes refused: not granted to this stage"),
        "{log}"
    );

    let granted = EMBED_FROM_BYTES.replace("GRANT", "nn_load_bytes = true");
    let response = host.put("/v1/functions/embed-bytes", "application/toml", granted);
    assert_eq!(response.status(), 201);
    let response = host.invoke("embed-bytes", "text/plain", text);
    assert_eq!(response.status(), 200);
    let through_bytes = first_row(&response.json().expect("JSON"));
    let native = first_row(
        &host
            .invoke("embed", "text/plain", text)
            .json()
            .expect("JSON"),
    );
    assert_eq!(through_bytes.len(), 384);
    let dot: f64 = through_bytes.iter().zip(&native).map(|(a, b)| a * b).sum();
    assert!(
        dot > 0.99999,
        "cosine {dot}: the same model gave another answer"
    );

    // The grant is refused on a stage that is not an inferencer.
    let wrong =
        "name = \"w\"\n[[stages]]\ncomponent = \"bert-tokenizer@0.1.0\"\nnn_load_bytes = true";
    let (status, message) = error_of(host.put("/v1/functions/w", "application/toml", wrong));
    assert_eq!(status, 400);
    assert!(
        message.contains("`stages[0].nn_load_bytes`: bert-tokenizer@0.1.0 is a preprocessor"),
        "{message}"
    );
}

#[test]
fn a_slow_preparation_never_replaces_a_newer_revision() {
    let host = Host::start();
    host.publish_examples_small();
    host.publish_component("misbehave");
    host.publish_model(
        "paraphrase-MiniLM-L3-v2.onnx",
        "tokenizer.json",
        &[],
        "minilm-l3@1.0.0",
    );
    // Revision 1 optimises a model nobody has loaded yet (slow); revision 2,
    // published while that runs, is one component (quick).
    let slow = cascade_tests::embed_manifest("racy", "");
    let quick = "name = \"racy\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n";
    let url = host.url.clone();
    let first = std::thread::spawn(move || {
        client()
            .put(format!("{url}/v1/functions/racy"))
            .body(slow)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        host.put("/v1/functions/racy", "application/toml", quick)
            .status(),
        201
    );
    assert_eq!(first.join().expect("first publish"), 201);
    let status: Value = host
        .get("/v1/functions/racy/status")
        .json()
        .expect("status JSON");
    assert_eq!(status["revision"], 2, "{status}");
    let response = host.invoke("racy", "text/plain", "echo:newest");
    assert_eq!(response.status(), 200);
}

/// Reads what the host sends until it closes the connection (or 20 s pass).
fn read_until_closed(stream: &mut std::net::TcpStream) -> (String, Duration) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
        }
    }
    (
        String::from_utf8_lossy(&seen).into_owned(),
        started.elapsed(),
    )
}

fn connect(host: &Host) -> std::net::TcpStream {
    let address = host.url.trim_start_matches("http://");
    std::net::TcpStream::connect(address).expect("connects")
}

#[test]
fn slow_headers_are_cut_off_and_idle_connections_do_not_lock_others_out() {
    use std::io::Write;
    let host = Host::start_with(&["--header-timeout-secs", "1", "--max-connections", "2"]);
    // A slowloris: headers begun, never finished.
    let mut slow = connect(&host);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("write");
    // A client that connects and sends nothing at all.
    let mut silent = connect(&host);
    let (_, slow_after) = read_until_closed(&mut slow);
    let (_, silent_after) = read_until_closed(&mut silent);
    assert!(
        slow_after < Duration::from_secs(15),
        "slow headers held {slow_after:?}"
    );
    assert!(
        silent_after < Duration::from_secs(15),
        "a silent client held {silent_after:?}"
    );
    // Both slots are free again: ordinary requests are served.
    for _ in 0..3 {
        assert_eq!(host.get("/healthz").status(), 200);
    }
}

#[test]
fn an_oversized_declared_body_is_refused_before_it_is_read() {
    use std::io::Write;
    let host = narrow_host();
    let mut stream = connect(&host);
    // Declares 10 GiB, sends a few bytes, and waits for the answer.
    stream
        .write_all(
            b"POST /v1/functions/narrow/invoke HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 10737418240\r\n\r\necho:",
        )
        .expect("write");
    let (answer, _) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        answer.contains("body exceeds the limit of 10485760 bytes"),
        "{answer}"
    );

    // A registry upload the same way, and an unauthenticated one.
    let mut stream = connect(&host);
    stream
        .write_all(
            b"PUT /v1/components/big/1.0.0 HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 109951162777600\r\n\r\n\0asm",
        )
        .expect("write");
    let (answer, _) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(host.get("/healthz").status(), 200);
}

#[test]
fn a_refused_upload_is_not_read_before_the_answer() {
    use std::io::Write;
    let host = Host::start_with(&["--token", "secret"]);
    let mut stream = connect(&host);
    // 64 MiB declared, none sent: the refusal must not wait for it.
    stream
        .write_all(
            b"PUT /v1/components/x/1.0.0 HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 67108864\r\n\r\n",
        )
        .expect("write");
    let (answer, took) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
}

/// `wasm` with a custom section appended: the same component with its own
/// digest, as a new version of a real component would have.
fn distinct_copy(wasm: &[u8], copy: usize) -> Vec<u8> {
    let name = b"churn";
    let data = (copy as u64).to_le_bytes();
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + data.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&data);
    out
}

fn resident_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => disk_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Publishes a new version of a component and a function using it,
/// invokes it, and deletes both.
fn churn_once(host: &Host, wasm: &[u8], copy: usize) {
    let path = format!("/v1/components/churn/1.0.{copy}");
    let response = host.put(&path, "application/wasm", distinct_copy(wasm, copy));
    assert_eq!(response.status(), 201, "{copy}");
    let manifest = format!("name = \"churn\"\n[[stages]]\ncomponent = \"churn@1.0.{copy}\"\n");
    assert_eq!(
        host.put("/v1/functions/churn", "application/toml", manifest)
            .status(),
        201
    );
    assert_eq!(host.invoke("churn", "text/plain", "hello").status(), 200);
    for path in ["/v1/functions/churn".to_string(), path] {
        let deleted = client()
            .delete(format!("{}{path}", host.url))
            .send()
            .expect("delete");
        assert!(
            deleted.status().is_success(),
            "{path}: {:?}",
            deleted.text()
        );
    }
}

#[test]
fn publishing_and_deleting_two_hundred_versions_leaves_memory_and_disk_where_they_were() {
    let host = Host::start();
    let pid = host.pid().expect("running");
    let wasm = std::fs::read(cascade_tests::component_path("echo")).expect("built");
    // Warm up: allocator arenas, redb's pages, and the pooling allocator's
    // slots, each of which keeps up to 128 KiB resident once a new
    // component has run in it (bounded by the pool; RSS levels off after
    // ~100 versions here: 35 MB at 20, 45 MB from 100 on).
    let mut memory_before = 0;
    for copy in 0..100 {
        churn_once(&host, &wasm, copy);
        if copy >= 80 {
            memory_before = memory_before.max(resident_kb(pid));
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    let disk_before = disk_bytes(&host.data);
    let compiled_before = std::fs::read_dir(host.data.join("compiled")).map_or(0, |d| d.count());
    for copy in 100..300 {
        churn_once(&host, &wasm, copy);
        if std::env::var("CHURN_TRACE").is_ok() && copy % 20 == 0 {
            eprintln!("{copy}: RSS {} kB", resident_kb(pid));
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    let (memory_after, disk_after) = (resident_kb(pid), disk_bytes(&host.data));
    let compiled_after = std::fs::read_dir(host.data.join("compiled")).map_or(0, |d| d.count());
    eprintln!(
        "after 200 more versions: RSS {memory_before} -> {memory_after} kB, \
         data {disk_before} -> {disk_after} bytes, compiled {compiled_before} -> {compiled_after}"
    );
    assert!(
        memory_after * 10 <= memory_before * 11,
        "RSS grew from {memory_before} to {memory_after} kB"
    );
    assert!(
        disk_after * 10 <= disk_before * 11,
        "the data directory grew from {disk_before} to {disk_after} bytes"
    );
    assert_eq!(
        compiled_after, compiled_before,
        "compiled artifacts of deleted components stay"
    );
    let metrics = host.get("/metrics").text().expect("metrics");
    assert!(
        !metrics.contains("function=\"churn\""),
        "a deleted function keeps its metric label sets"
    );
}

fn publish_python_guest(host: &Host) -> Value {
    let wasm = std::fs::read(cascade_tests::component_path("text-bytes"))
        .expect("text_bytes.wasm: built by `cargo xtask test` with componentize-py");
    let response = host.put("/v1/components/text-bytes/0.1.0", "application/wasm", wasm);
    assert_eq!(response.status(), 201);
    response.json().expect("JSON record")
}

#[test]
fn a_stage_written_in_python_runs_and_its_footprint_is_counted() {
    let host = Host::start();
    let record = publish_python_guest(&host);
    assert_eq!(record["world"], "preprocessor");
    assert_eq!(record["footprint"]["core_instances"], 14, "{record}");
    let manifest = "name = \"lower\"\n[[stages]]\ncomponent = \"text-bytes@0.1.0\"\n";
    assert_eq!(
        host.put("/v1/functions/lower", "application/toml", manifest)
            .status(),
        201
    );
    let answer: Value = host
        .invoke("lower", "text/plain", "Hello, Wörld")
        .json()
        .expect("JSON");
    let tensor = &answer["tensors"][0];
    assert_eq!(tensor["name"], "text");
    assert_eq!(tensor["type"], "u8");
    assert_eq!(cascade_tests::first_tensor_text(&answer), "hello, wörld");
    let (status, message) = error_of(host.invoke("lower", "text/plain", vec![0xff, 0xfe]));
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("the body is not UTF-8"), "{message}");
}

#[test]
fn full_pools_answer_503_and_a_function_that_cannot_fit_says_why() {
    let host = Host::start_with(&["--max-instances", "2"]);
    host.publish_component("misbehave");
    let wide = "name = \"wide\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n\
                [scaling]\nmax_instances = 4\n[limits]\ntimeout_ms = 5000\n";
    assert_eq!(
        host.put("/v1/functions/wide", "application/toml", wide)
            .status(),
        201
    );
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = host.url.clone();
            std::thread::spawn(move || {
                client()
                    .post(format!("{url}/v1/functions/wide/invoke"))
                    .body("sleep:1500")
                    .send()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let refused = host.invoke("wide", "text/plain", "echo:third");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let (_, message) = error_of(refused);
    assert!(message.contains("instance pools are full"), "{message}");
    for request in busy {
        assert_eq!(request.join().expect("busy"), 200);
    }
    let response = host.invoke("wide", "text/plain", "echo:room again");
    assert_eq!(response.status(), 200);

    // Three warm Python instances can never fit in pools for two.
    publish_python_guest(&host);
    let many = "name = \"many\"\n[[stages]]\ncomponent = \"text-bytes@0.1.0\"\n\
                [scaling]\nmin_instances = 3\nmax_instances = 3\n";
    let published: Value = host
        .put("/v1/functions/many", "application/toml", many)
        .json()
        .expect("JSON");
    let warning = published["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("more than this host's pools hold"),
        "{published}"
    );
    for response in [
        host.invoke("many", "text/plain", "x"),
        host.get("/v1/functions/many/status"),
    ] {
        let (status, message) = error_of(response);
        assert_eq!(status, 503, "{message}");
        assert!(
            message
                .contains("function many revision 1 is published, but this host cannot serve it"),
            "{message}"
        );
    }
    let ready = host.get("/readyz");
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().expect("JSON");
    assert_eq!(ready["checks"]["servable"], false);
    assert_eq!(ready["unservable"][0]["function"], "many", "{ready}");
    // A revision that fits clears it.
    let fits = many.replace("min_instances = 3\nmax_instances = 3", "min_instances = 0");
    assert_eq!(
        host.put("/v1/functions/many", "application/toml", fits)
            .status(),
        201
    );
    assert_eq!(host.invoke("many", "text/plain", "x").status(), 200);
    assert_eq!(host.get("/readyz").status(), 200);
}
