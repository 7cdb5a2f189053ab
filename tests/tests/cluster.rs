//! The registry on JetStream (`--registry-store jetstream`): a real
//! three-node NATS cluster on loopback (routes, JetStream R3) and three
//! real hosts. Any host publishes, every host serves; a version has one
//! winner; killed nodes and hosts rejoin and catch up; a fresh host syncs
//! everything with digests verified; blobs stream.

use cascade_tests::host::{Host, client, error_of};
use cascade_tests::nats::{NatsCluster, NatsServer};
use cascade_tests::{component_path, embed_manifest, first_tensor_text, model_file};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};

/// The flags of a host whose registry of record is the cluster's.
fn cluster_flags(urls: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--nats",
        urls,
        "--registry-store",
        "jetstream",
        "--registry-replicas",
        "3",
        "--model-backend",
        "tract",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

fn start_host(data: &Path, flags: &[String]) -> Host {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let host = Host::start_in(data, &flags);
    wait_synced(&host);
    host
}

/// Waits (≤ 60 s) until the host has opened the buckets and synced.
fn wait_synced(host: &Host) {
    wait_for(
        Duration::from_secs(60),
        "the host to sync the cluster registry",
        || {
            host.get("/readyz")
                .json::<serde_json::Value>()
                .ok()
                .is_some_and(|b| b["checks"]["cluster_registry"] == true)
        },
    );
}

/// Polls `done` every 50 ms; panics naming `what` after `within`. Returns
/// how long it took.
fn wait_for(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn publish_component_as(host: &Host, file: &Path, reference: &str) -> reqwest::blocking::Response {
    let (name, version) = reference.split_once('@').expect("name@version");
    host.put(
        &format!("/v1/components/{name}/{version}"),
        "application/wasm",
        std::fs::read(file).expect("component file"),
    )
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("file")))
}

/// `VmRSS` or `VmHWM` of a process, in MiB.
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("the field");
    kib / 1024.0
}

/// A file of `mib` MiB of bytes that do not repeat in any short period.
fn big_file(path: &Path, mib: usize) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for byte in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        out.write_all(&chunk).expect("write");
    }
    out.flush().expect("flush");
}

fn embed(host: &Host, function: &str) -> Vec<f64> {
    let response = host.invoke(function, "text/plain", "a cluster of hosts");
    assert_eq!(response.status(), 200, "{}", host.url);
    let reply: serde_json::Value = response.json().expect("json");
    reply["embeddings"][0]
        .as_array()
        .expect("an embedding")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

#[test]
fn a_publish_on_any_host_serves_on_all_and_a_version_has_exactly_one_winner() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let hosts: Vec<Host> = (0..3)
        .map(|i| start_host(dirs[i].path(), &cluster_flags(&nats.urls_from(i), &[])))
        .collect();
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);

    // A 100 MB model package streams: squeezenet plus a 100 MiB file.
    let scratch = tempfile::tempdir().expect("dir");
    let weights = scratch.path().join("weights.bin");
    big_file(&weights, 100);
    // The model alone first, so the checker's own start-up is not counted.
    let squeezenet = model_file("light_squeezenet.onnx");
    a.cli_ok(&[
        "publish",
        "model",
        squeezenet.to_str().expect("path"),
        "--name",
        "small",
        "--version",
        "1.0.0",
    ]);
    for host in [b, c] {
        wait_for(
            Duration::from_secs(10),
            "the small model on every host",
            || host.get("/v1/models/small/1.0.0").status() == 200,
        );
    }
    let idle: Vec<f64> = hosts
        .iter()
        .map(|h| memory_mib(h.pid().expect("pid"), "VmRSS:"))
        .collect();
    a.cli_ok(&[
        "publish",
        "model",
        squeezenet.to_str().expect("path"),
        "--file",
        weights.to_str().expect("path"),
        "--name",
        "big",
        "--version",
        "1.0.0",
    ]);
    let weights_digest = sha256_of(&weights);
    for host in [b, c] {
        wait_for(
            Duration::from_secs(60),
            "the 100 MB model on every host",
            || host.get("/v1/models/big/1.0.0").status() == 200,
        );
        let copied = client()
            .get(format!(
                "{}/v1/models/big/1.0.0/files/weights.bin",
                host.url
            ))
            .send()
            .expect("file")
            .bytes()
            .expect("bytes");
        assert_eq!(hex::encode(Sha256::digest(&copied)), weights_digest);
    }
    let peaks: Vec<f64> = hosts
        .iter()
        .map(|h| memory_mib(h.pid().expect("pid"), "VmHWM:"))
        .collect();
    eprintln!("idle RSS {idle:?} MiB, peak {peaks:?} MiB (publisher first)");
    for ((host, idle), peak) in hosts.iter().zip(&idle).zip(peaks) {
        assert!(
            peak - idle < 100.0,
            "{}: peak RSS {peak:.1} MiB is {:.1} MiB above idle ({idle:.1}) while a 100 MB model moved",
            host.url,
            peak - idle
        );
    }

    // A component, a model and a function published on A serve on B and C.
    a.publish_component("bert-tokenizer");
    a.publish_component("mean-pool");
    a.publish_model(
        "paraphrase-MiniLM-L3-v2.onnx",
        "tokenizer.json",
        &[],
        "minilm-l3@1.0.0",
    );
    a.publish_function("embed", &embed_manifest("embed", ""));
    let expected = embed(a, "embed");
    assert_eq!(expected.len(), 384);
    let published = Instant::now();
    for host in [b, c] {
        wait_for(Duration::from_secs(10), "embed in every registry", || {
            host.get("/v1/functions/embed").status() == 200
        });
        let stored = published.elapsed();
        wait_for(Duration::from_secs(30), "embed on every host", || {
            host.invoke("embed", "text/plain", "x").status() == 200
        });
        eprintln!(
            "{}: embed stored {stored:?} and served {:?} after A's publish answered",
            host.url,
            published.elapsed()
        );
        assert_eq!(embed(host, "embed"), expected, "{}", host.url);
    }

    // The same version with other bytes on B and C at once: one winner.
    let tokenizer = component_path("bert-tokenizer");
    let pool = component_path("mean-pool");
    let (on_b, on_c) = std::thread::scope(|scope| {
        let on_b = scope.spawn(|| publish_component_as(b, &tokenizer, "dup@1.0.0"));
        let on_c = scope.spawn(|| publish_component_as(c, &pool, "dup@1.0.0"));
        (on_b.join().expect("b"), on_c.join().expect("c"))
    });
    let statuses = [on_b.status().as_u16(), on_c.status().as_u16()];
    let (winner, loser) = match statuses {
        [201, 409] => (sha256_of(&tokenizer), on_c),
        [409, 201] => (sha256_of(&pool), on_b),
        other => panic!("expected one 201 and one 409, got {other:?}"),
    };
    let (_, message) = error_of(loser);
    assert!(
        message.contains("already published with digest"),
        "{message}"
    );
    for host in &hosts {
        wait_for(
            Duration::from_secs(10),
            "every host to hold the winner",
            || {
                let record = host.get("/v1/components/dup/1.0.0");
                record.status() == 200
                    && record.json::<serde_json::Value>().expect("json")["digest"]
                        == winner.as_str()
            },
        );
        let bytes = client()
            .get(format!("{}/v1/components/dup/1.0.0/content", host.url))
            .send()
            .expect("content")
            .bytes()
            .expect("bytes");
        assert_eq!(hex::encode(Sha256::digest(&bytes)), winner, "{}", host.url);
    }

    // A version deleted on one host is gone from all.
    let deleted = client()
        .delete(format!("{}/v1/components/dup/1.0.0", c.url))
        .send()
        .expect("delete");
    assert_eq!(deleted.status(), 200);
    for host in &hosts {
        wait_for(
            Duration::from_secs(10),
            "the deleted version gone from every host",
            || host.get("/v1/components/dup/1.0.0").status() == 404,
        );
    }
    let in_use = client()
        .delete(format!("{}/v1/components/mean-pool/0.1.0", b.url))
        .send()
        .expect("delete");
    let (status, message) = error_of(in_use);
    assert_eq!(status, 409);
    assert!(message.contains("is used by function embed"), "{message}");

    // Rollback and traffic set on one host are what the others serve.
    c.publish_function(
        "embed",
        &embed_manifest("embed", "[limits]\ntimeout_ms = 4000"),
    );
    let rolled = client()
        .post(format!("{}/v1/functions/embed/rollback", b.url))
        .json(&serde_json::json!({"revision": 1}))
        .send()
        .expect("rollback");
    assert_eq!(rolled.status(), 200);
    for host in &hosts {
        wait_for(
            Duration::from_secs(10),
            "every host to serve revision 1",
            || {
                host.get("/v1/functions/embed")
                    .json::<serde_json::Value>()
                    .expect("json")["revision"]
                    == 1
            },
        );
    }
}

#[test]
fn killed_nodes_and_hosts_rejoin_and_catch_up_and_a_fresh_host_syncs_everything() {
    let mut nats = NatsCluster::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let flags: Vec<Vec<String>> = (0..3)
        .map(|i| cluster_flags(&nats.urls_from(i), &[]))
        .collect();
    let mut hosts: Vec<Host> = (0..3)
        .map(|i| start_host(dirs[i].path(), &flags[i]))
        .collect();
    hosts[0].publish_component("echo");
    let echo = |name: &str| format!("name = \"{name}\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n");
    hosts[0].publish_function("first", &echo("first"));
    for host in &hosts {
        wait_for(Duration::from_secs(10), "first on every host", || {
            host.invoke("first", "text/plain", "x").status() == 200
        });
    }

    // Load on B throughout; node 0 and host C die with SIGKILL.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (served, failed) = std::thread::scope(|scope| {
        let b = &hosts[1];
        let load = scope.spawn(|| {
            let (mut served, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let response = b.invoke("first", "text/plain", "under load");
                match response.status().as_u16() {
                    200 => served += 1,
                    other => failed.push(other),
                }
            }
            (served, failed)
        });
        std::thread::sleep(Duration::from_millis(300));
        nats.nodes[0].stop();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.join().expect("load")
    });
    assert!(
        served > 0 && failed.is_empty(),
        "served {served}, failed {failed:?}"
    );
    hosts[2].kill9();

    // Publishing and invoking through the survivors keep working.
    let second = echo("second");
    let published = wait_for(
        Duration::from_secs(30),
        "a publish through a survivor",
        || {
            hosts[1]
                .put("/v1/functions/second", "application/toml", second.clone())
                .status()
                == 201
        },
    );
    eprintln!("publishing through a survivor after the kills took {published:?}");
    // Bounded generously: under CI's load a re-elected stream leader can
    // keep the watch from being set up again for several seconds.
    let served = wait_for(Duration::from_secs(30), "second on host A", || {
        hosts[0].invoke("second", "text/plain", "x").status() == 200
    });
    eprintln!("host A served it {served:?} after the publish answered");

    // The killed node and host come back and catch up with no manual step.
    nats.nodes[0].resume();
    hosts[2].restart();
    wait_synced(&hosts[2]);
    wait_for(
        Duration::from_secs(30),
        "second on the restarted host",
        || hosts[2].invoke("second", "text/plain", "x").status() == 200,
    );
    let reply: serde_json::Value = hosts[2]
        .invoke("second", "text/plain", "back")
        .json()
        .expect("json");
    assert_eq!(first_tensor_text(&reply), "back");

    // A fresh host with an empty data directory serves every function.
    let fresh_dir = tempfile::tempdir().expect("dir");
    let fresh = start_host(fresh_dir.path(), &cluster_flags(&nats.urls_from(1), &[]));
    for name in ["first", "second"] {
        wait_for(
            Duration::from_secs(30),
            "every function on the fresh host",
            || fresh.invoke(name, "text/plain", "x").status() == 200,
        );
    }
    let components: serde_json::Value = fresh.get("/v1/components").json().expect("json");
    let listed = components.as_array().expect("list");
    assert_eq!(listed.len(), 1, "{components}");
    assert_eq!(listed[0]["digest"], sha256_of(&component_path("echo")));
    let stored = fresh_dir
        .path()
        .join("blobs")
        .join(sha256_of(&component_path("echo")));
    assert_eq!(sha256_of(&stored), sha256_of(&component_path("echo")));
}

#[test]
fn push_moves_a_local_registry_in_once_and_reports_conflicts() {
    let nats = NatsServer::start_jetstream();
    let local = tempfile::tempdir().expect("dir");
    let mut embedded = Host::start_in(local.path(), &[]);
    embedded.publish_component("echo");
    let manifest = "name = \"hello\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n";
    embedded.publish_function("hello", manifest);
    embedded.publish_function("hello", &format!("{manifest}[limits]\ntimeout_ms = 500\n"));
    assert!(embedded.terminate(), "the host stops cleanly");

    let push = |data: &Path| {
        std::process::Command::new(cascade_tests::host::cascade_binary())
            .args(["registry", "push", "--nats", &nats.url(), "--data"])
            .arg(data)
            .output()
            .expect("cascade runs")
    };
    let first = push(local.path());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).expect("report");
    assert_eq!(
        report["pushed"].as_array().expect("pushed").len(),
        4,
        "{report}"
    );
    let again = push(local.path());
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).expect("report");
    assert_eq!(report["pushed"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["present"].as_array().expect("present").len(),
        4,
        "{report}"
    );

    // Another registry with other bytes under the same version conflicts.
    let other = tempfile::tempdir().expect("dir");
    let mut elsewhere = Host::start_in(other.path(), &[]);
    let response = publish_component_as(&elsewhere, &component_path("mean-pool"), "echo@0.1.0");
    assert_eq!(response.status(), 201);
    assert!(elsewhere.terminate());
    let clash = push(other.path());
    assert!(!clash.status.success());
    let stderr = String::from_utf8_lossy(&clash.stderr);
    assert!(
        stderr.contains("1 item(s) are in the cluster registry with other content"),
        "{stderr}"
    );

    // A host on the buckets serves what was pushed, head and revisions.
    let dir = tempfile::tempdir().expect("dir");
    let host = Host::start_in(
        dir.path(),
        &["--nats", &nats.url(), "--registry-store", "jetstream"],
    );
    wait_synced(&host);
    let head: serde_json::Value = host.get("/v1/functions/hello").json().expect("json");
    assert_eq!(head["revision"], 2, "{head}");
    let reply: serde_json::Value = host
        .invoke("hello", "text/plain", "pushed")
        .json()
        .expect("json");
    assert_eq!(first_tensor_text(&reply), "pushed");
    // The next publish numbers on from the pushed revisions.
    let third = host.put(
        "/v1/functions/hello",
        "application/toml",
        format!("{manifest}[limits]\ntimeout_ms = 700\n"),
    );
    assert_eq!(third.status(), 201);
    assert_eq!(
        third.json::<serde_json::Value>().expect("json")["revision"],
        3
    );
}

#[test]
fn unnamed_blobs_are_collected_after_the_grace_and_named_ones_stay() {
    let nats = NatsServer::start_jetstream();
    let dir = tempfile::tempdir().expect("dir");
    let host = Host::start_in(
        dir.path(),
        &[
            "--nats",
            &nats.url(),
            "--registry-store",
            "jetstream",
            "--registry-gc-grace-secs",
            "1",
        ],
    );
    wait_synced(&host);
    host.publish_component("echo");
    let kept = publish_component_as(&host, &component_path("mean-pool"), "pool@0.1.0");
    assert_eq!(kept.status(), 201);
    let deleted = client()
        .delete(format!("{}/v1/components/echo/0.1.0", host.url))
        .send()
        .expect("delete");
    assert_eq!(deleted.status(), 200);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let objects = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        async_nats::jetstream::new(client)
            .get_object_store("cascade-blobs")
            .await
            .expect("the blob bucket")
    });
    let present = |digest: String| {
        runtime.block_on(async { objects.info(&digest).await.is_ok_and(|info| !info.deleted) })
    };
    wait_for(
        Duration::from_secs(20),
        "the deleted component's blob to go",
        || !present(sha256_of(&component_path("echo"))),
    );
    assert!(
        present(sha256_of(&component_path("mean-pool"))),
        "a named blob stays"
    );
}

#[test]
fn jetstream_mode_without_nats_or_beside_a_source_url_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let run = |extra: &[&str]| {
        std::process::Command::new(cascade_tests::host::cascade_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .args(extra)
            .output()
            .expect("cascade runs")
    };
    let alone = run(&["--registry-store", "jetstream"]);
    assert!(!alone.status.success());
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("give its URL(s) with --nats"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    let both = run(&[
        "--registry-store",
        "jetstream",
        "--nats",
        "nats://127.0.0.1:1",
        "--registry-url",
        "http://127.0.0.1:1",
    ]);
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("contradict each other"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}

#[test]
fn a_host_restarts_and_serves_its_copy_while_nats_is_down_then_catches_up() {
    let mut nats = NatsServer::start_jetstream();
    let dir = tempfile::tempdir().expect("dir");
    let flags = ["--nats", &nats.url(), "--registry-store", "jetstream"].map(String::from);
    let mut host = start_host(dir.path(), &flags);
    host.publish_component("echo");
    let echo = |name: &str| format!("name = \"{name}\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n");
    host.publish_function("kept", &echo("kept"));

    nats.stop();
    host.restart();
    let reply: serde_json::Value = host
        .invoke("kept", "text/plain", "offline")
        .json()
        .expect("json");
    assert_eq!(first_tensor_text(&reply), "offline");
    let ready: serde_json::Value = host.get("/readyz").json().expect("json");
    assert_eq!(ready["checks"]["cluster_registry"], false, "{ready}");
    let refused = host.put("/v1/functions/later", "application/toml", echo("later"));
    assert_eq!(refused.status(), 503, "a write needs the cluster");

    nats.resume();
    wait_synced(&host);
    host.publish_function("later", &echo("later"));
    let reply: serde_json::Value = host
        .invoke("later", "text/plain", "back")
        .json()
        .expect("json");
    assert_eq!(first_tensor_text(&reply), "back");
}

#[test]
fn a_stalled_watch_is_set_up_again_and_the_copy_is_never_emptied_meanwhile() {
    let nats = NatsServer::start_jetstream();
    let flags = ["--nats", &nats.url(), "--registry-store", "jetstream"];
    let dir = tempfile::tempdir().expect("dir");
    // Both hosts open the bucket while it is empty.
    let watcher = Host::start_logged_with(&flags);
    wait_synced(&watcher);
    let publisher = start_host(dir.path(), &flags.map(String::from));
    publisher.publish_component("echo");
    let echo = |name: &str| format!("name = \"{name}\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n");
    publisher.publish_function("first", &echo("first"));
    wait_for(Duration::from_secs(10), "first on the watcher", || {
        watcher.invoke("first", "text/plain", "x").status() == 200
    });

    // The server forgets every watch's consumer, as when a NATS node dies
    // with it: the clients are told nothing and stop receiving.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let deleted = runtime.block_on(async {
        use futures_util::StreamExt;
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream
            .get_stream("KV_cascade-registry")
            .await
            .expect("the record stream");
        let names: Vec<String> = stream
            .consumer_names()
            .map(|name| name.expect("consumer name"))
            .collect()
            .await;
        for name in &names {
            stream.delete_consumer(name).await.expect("delete consumer");
        }
        names.len()
    });
    assert!(deleted >= 2, "each host watches: {deleted} consumers");

    publisher.publish_function("second", &echo("second"));
    wait_for(Duration::from_secs(30), "second on the watcher", || {
        watcher.invoke("second", "text/plain", "x").status() == 200
    });
    let log = watcher.log();
    assert!(
        log.contains("the watch stopped at sequence"),
        "the stall was noticed by the check, not after missed heartbeats:\n{log}"
    );
    assert!(
        !log.contains("removed here"),
        "watching again must not empty the copy first:\n{log}"
    );
    assert_eq!(watcher.invoke("first", "text/plain", "x").status(), 200);
}
