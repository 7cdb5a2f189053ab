//! Faults a host must survive, on the real binary: killed with SIGKILL
//! under load, and a data directory whose disk fills up. (NATS stopped
//! under load: `hosts_ride_out_a_nats_restart` in nats.rs.)

use cascade_registry::blobs::sha256_file;
use cascade_tests::host::{Host, client, error_of};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `wasm` with a custom section appended: its own digest.
fn distinct_copy(wasm: &[u8], copy: u64) -> Vec<u8> {
    let mut out = wasm.to_vec();
    out.extend_from_slice(&[0, 14, 5]);
    out.extend_from_slice(b"fault");
    out.extend_from_slice(&copy.to_le_bytes());
    out
}

/// Every blob a record of `url`'s registry names, with its digest.
fn listed_blobs(url: &str) -> Vec<(String, String)> {
    let get = |path: &str| -> Vec<Value> {
        client()
            .get(format!("{url}{path}"))
            .send()
            .expect("answers")
            .json()
            .expect("JSON list")
    };
    let mut blobs = Vec::new();
    for component in get("/v1/components") {
        let digest = component["digest"].as_str().expect("digest").to_string();
        blobs.push((format!("component {}", component["name"]), digest));
    }
    for model in get("/v1/models") {
        let name = model["name"].to_string();
        blobs.push((
            format!("model {name}"),
            model["digest"].as_str().expect("digest").into(),
        ));
        for file in model["files"].as_array().expect("files") {
            let digest = file["digest"].as_str().expect("digest").to_string();
            blobs.push((format!("model {name} file {}", file["name"]), digest));
        }
    }
    blobs
}

#[test]
fn sigkill_under_load_loses_nothing_published_and_every_file_verifies() {
    let mut host = Host::start();
    host.publish_examples();
    let wasm = std::fs::read(cascade_tests::component_path("echo")).expect("built");
    let running = Arc::new(AtomicBool::new(true));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (url, running) = (host.url.clone(), running.clone());
            std::thread::spawn(move || {
                let client = client();
                while running.load(Ordering::SeqCst) {
                    let _ = client
                        .post(format!("{url}/v1/functions/embed/invoke"))
                        .body("load before the crash")
                        .send();
                }
            })
        })
        .collect();
    let publisher = {
        let (url, running) = (host.url.clone(), running.clone());
        std::thread::spawn(move || {
            let mut published = Vec::new();
            let client = client();
            for copy in 0.. {
                if !running.load(Ordering::SeqCst) {
                    break;
                }
                let answer = client
                    .put(format!("{url}/v1/components/crash/1.0.{copy}"))
                    .body(distinct_copy(&wasm, copy))
                    .send();
                match answer {
                    Ok(r) if r.status() == 201 => published.push(copy),
                    _ => break,
                }
            }
            published
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    host.kill9();
    running.store(false, Ordering::SeqCst);
    let published = publisher.join().expect("publisher");
    for thread in load {
        thread.join().expect("load");
    }
    assert!(
        !published.is_empty(),
        "nothing was published before the kill"
    );

    host.restart();
    for copy in &published {
        let response = host.get(&format!("/v1/components/crash/1.0.{copy}"));
        assert_eq!(
            response.status(),
            200,
            "crash@1.0.{copy} was published, then lost"
        );
    }
    let blobs = listed_blobs(&host.url);
    assert!(blobs.len() > published.len() + 4, "{blobs:?}");
    for (what, digest) in blobs {
        let path = host.data.join("blobs").join(&digest);
        assert_eq!(
            sha256_file(&path).unwrap_or_else(|e| panic!("{what}: {e}")),
            digest,
            "{what}: the bytes do not match the digest"
        );
    }
    let answer = host.invoke("embed", "text/plain", "after the crash");
    assert_eq!(answer.status(), 200);
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount runs");
        assert!(
            mounted.success(),
            "mounting a {megabytes} MB tmpfs failed: this test needs root (as `cargo xtask test` has in CI)"
        );
        SmallDisk { path, _dir: dir }
    }

    /// Fills the disk up to `leave` free bytes with a file of its own.
    fn fill(&self, leave: u64) -> PathBuf {
        let output = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .expect("df runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let available: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("available bytes");
        let filler = self.path.join("filler");
        let file = std::fs::File::create(&filler).expect("filler");
        let size = available.saturating_sub(leave);
        std::io::Write::write_all(&mut &file, &vec![0u8; size as usize]).expect("filling");
        file.sync_all().expect("sync");
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn publish(host: &Host, wasm: Vec<u8>, version: &str) -> reqwest::blocking::Response {
    host.put(
        &format!("/v1/components/filler/{version}"),
        "application/wasm",
        wasm,
    )
}

#[test]
fn a_full_disk_refuses_publishes_clearly_and_keeps_serving() {
    let disk = SmallDisk::mount(24);
    let data = disk.path.join("data");
    let host = Host::start_in(&data, &[]);
    host.publish_component("misbehave");
    let manifest = "name = \"steady\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n";
    assert_eq!(
        host.put("/v1/functions/steady", "application/toml", manifest)
            .status(),
        201
    );

    let wasm = std::fs::read(cascade_tests::component_path("image-preprocess")).expect("built");
    let filler = disk.fill(64 << 10);
    let (status, message) = error_of(publish(&host, distinct_copy(&wasm, 1), "1.0.0"));
    assert_eq!(status, 507, "{message}");
    assert!(
        message.contains("disk is full") && message.contains("No space left on device"),
        "{message}"
    );

    // Still readable, still serving.
    let listed: Vec<Value> = host.get("/v1/components").json().expect("JSON");
    assert_eq!(listed.len(), 1);
    let answer = host.invoke("steady", "text/plain", "echo:still here");
    assert_eq!(answer.status(), 200);
    assert_eq!(host.get("/v1/functions/steady").status(), 200);

    // Space freed: publishing works again, and nothing half-written stayed.
    std::fs::remove_file(&filler).expect("free the disk");
    let staged = std::fs::read_dir(data.join("tmp")).map_or(0, |d| d.count());
    assert_eq!(staged, 0, "a failed upload left its staging file");
    assert_eq!(
        publish(&host, distinct_copy(&wasm, 1), "1.0.0").status(),
        201
    );
    drop(host);
    assert!(Path::new(&data).join("registry.redb").is_file());
}
