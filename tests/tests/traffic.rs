//! Traffic splits through the real binary: shares, sticky keys, tags at
//! 0 %, the revision named in every answer, a split that survives a
//! restart, and splits refused with the field at fault.

use cascade_tests::host::{Host, client, error_of};
use serde_json::json;
use std::collections::BTreeMap;

/// `echo` as function `split`; each publish with a different `max_instances`
/// is a new revision.
fn manifest(max_instances: u32) -> String {
    format!(
        "name = \"split\"\n[[stages]]\ncomponent = \"echo@0.1.0\"\n\
         [scaling]\nmax_instances = {max_instances}\n"
    )
}

/// A host serving revisions 1 and 2 of `split`.
fn two_revisions() -> Host {
    let host = Host::start();
    host.publish_component("echo");
    host.publish_function("split", &manifest(2));
    host.publish_function("split", &manifest(3));
    host
}

fn set_traffic(host: &Host, split: serde_json::Value) -> reqwest::blocking::Response {
    host.put(
        "/v1/functions/split/traffic",
        "application/json",
        split.to_string(),
    )
}

/// The revision that answered one invocation of `target` (`split` or
/// `split@tag`), with `headers`.
fn served_by(host: &Host, target: &str, headers: &[(&str, &str)]) -> u64 {
    let mut request = client()
        .post(format!("{}/v1/functions/{target}/invoke", host.url))
        .header("content-type", "text/plain")
        .body("hello");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().expect("answered");
    assert_eq!(response.status(), 200, "{target}");
    response.headers()["x-cascade-revision"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("a revision number")
}

#[test]
fn a_ninety_ten_split_serves_each_revision_its_share() {
    let host = two_revisions();
    // Before any split, the head answers and says so.
    assert_eq!(served_by(&host, "split", &[]), 2);
    let response = set_traffic(
        &host,
        json!({"targets": [{"revision": 1, "percent": 90}, {"revision": "latest", "percent": 10, "tag": "candidate"}]}),
    );
    assert_eq!(response.status(), 200);
    let view: serde_json::Value = response.json().expect("JSON");
    assert_eq!(view["head"], 2);
    assert_eq!(view["targets"][1]["serves"], 2);
    let mut counts = BTreeMap::new();
    for _ in 0..2000 {
        *counts.entry(served_by(&host, "split", &[])).or_insert(0u32) += 1;
    }
    let second = counts.get(&2).copied().unwrap_or(0);
    assert!(
        (140..=260).contains(&second),
        "revision 2 served {second} of 2000 (10 % ± 3): {counts:?}"
    );
    assert_eq!(counts.get(&1).copied().unwrap_or(0) + second, 2000);
    assert_eq!(served_by(&host, "split@candidate", &[]), 2);
    // The dashboard shows the split.
    let view: serde_json::Value = host.get("/ui/data").json().expect("JSON");
    assert_eq!(
        view["functions"][0]["traffic"],
        json!([
            {"revision": 1, "percent": 90, "tag": null, "shadow": false},
            {"revision": 2, "percent": 10, "tag": "candidate", "shadow": false}
        ]),
        "{view}"
    );
}

#[test]
fn a_sticky_key_stays_on_one_arm_and_a_tag_at_zero_is_invocable_after_a_restart() {
    let mut host = two_revisions();
    let response = set_traffic(
        &host,
        json!({
            "targets": [{"revision": 1, "percent": 50}, {"revision": 2, "percent": 50}],
            "sticky_header": "x-user"
        }),
    );
    assert_eq!(response.status(), 200);
    for user in ["alice", "bob", "carol"] {
        let first = served_by(&host, "split", &[("x-user", user)]);
        for _ in 0..20 {
            assert_eq!(
                served_by(&host, "split", &[("x-user", user)]),
                first,
                "{user}"
            );
        }
    }
    let arms: std::collections::BTreeSet<u64> = (0..32)
        .map(|i| served_by(&host, "split", &[("x-user", &format!("user-{i}"))]))
        .collect();
    assert_eq!(arms.len(), 2, "users spread over both arms");

    let response = set_traffic(
        &host,
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 0, "tag": "canary"}]}),
    );
    assert_eq!(response.status(), 200);
    for _ in 0..20 {
        assert_eq!(served_by(&host, "split", &[]), 1);
    }
    assert_eq!(served_by(&host, "split@canary", &[]), 2);
    host.restart();
    assert_eq!(
        served_by(&host, "split", &[]),
        1,
        "the split survives a restart"
    );
    assert_eq!(served_by(&host, "split@canary", &[]), 2);
    let unknown = client()
        .post(format!("{}/v1/functions/split@nothing/invoke", host.url))
        .body("x")
        .send()
        .expect("answered");
    let (status, message) = error_of(unknown);
    assert_eq!(status, 404);
    assert!(
        message.contains("no traffic target tagged \"nothing\""),
        "{message}"
    );
}

#[test]
fn a_bad_split_is_refused_naming_its_field() {
    let host = two_revisions();
    for (split, want) in [
        (
            json!({"targets": [{"revision": 1, "percent": 90}]}),
            "the percents sum to 90, not 100",
        ),
        (
            json!({"targets": [{"revision": 7, "percent": 100}]}),
            "targets[0].revision: the function has no revision 7",
        ),
        (
            json!({"targets": [{"revision": 1}]}),
            "missing field `percent`",
        ),
    ] {
        let (status, message) = error_of(set_traffic(&host, split.clone()));
        assert_eq!(status, 400, "{split}");
        assert!(message.contains(want), "{split}: {message}");
    }
    // Nothing changed: the head still answers everything.
    assert_eq!(served_by(&host, "split", &[]), 2);
}

#[test]
fn the_cli_publishes_a_canary_and_sets_a_split() {
    let host = Host::start();
    host.publish_component("echo");
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (dir.path().join("1.toml"), dir.path().join("2.toml"));
    std::fs::write(&first, manifest(2)).expect("write");
    std::fs::write(&second, manifest(3)).expect("write");
    let refused = host.cli(&[
        "publish",
        "function",
        &first.display().to_string(),
        "--canary",
        "10",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--canary: function split has no earlier revision"),
        "{refused:?}"
    );
    host.cli_ok(&["publish", "function", &first.display().to_string()]);
    host.cli_ok(&[
        "publish",
        "function",
        &second.display().to_string(),
        "--canary",
        "10",
    ]);
    let split: serde_json::Value = host
        .get("/v1/functions/split/traffic")
        .json()
        .expect("JSON");
    assert_eq!(
        split["targets"][0],
        json!({"revision": 1, "serves": 1, "percent": 90, "tag": "stable", "shadow": false})
    );
    assert_eq!(
        split["targets"][1],
        json!({"revision": 2, "serves": 2, "percent": 10, "tag": "canary", "shadow": false})
    );
    assert_eq!(served_by(&host, "split@canary", &[]), 2);
    host.cli_ok(&["traffic", "split", "1=100", "--tag", "next=2"]);
    for _ in 0..10 {
        assert_eq!(served_by(&host, "split", &[]), 1);
    }
    assert_eq!(served_by(&host, "split@next", &[]), 2);
}

/// The `model_version` of an OIP inference at `path`.
fn oip_version(host: &Host, path: &str) -> String {
    let request = json!({
        "inputs": [{"name": "message", "shape": [1], "datatype": "BYTES",
                    "parameters": {"content_type": "text/plain"}, "data": ["hello"]}],
    });
    let response = client()
        .post(format!("{}{path}", host.url))
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .expect("answered");
    assert_eq!(response.status(), 200, "{path}");
    let answer: serde_json::Value = response.json().expect("JSON");
    answer["model_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn oip_and_nats_follow_the_split_and_name_the_revision() {
    let nats = cascade_tests::nats::NatsServer::start();
    let host = Host::start_with(&["--nats", &nats.url()]);
    host.publish_component("echo");
    let with_nats = |n: u32| {
        format!(
            "{}[triggers]\nnats = {{ subject = \"split.in\" }}\n",
            manifest(n)
        )
    };
    host.publish_function("split", &with_nats(2));
    host.publish_function("split", &with_nats(3));
    let response = set_traffic(
        &host,
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 0, "tag": "canary"}]}),
    );
    assert_eq!(response.status(), 200);
    assert_eq!(oip_version(&host, "/v2/models/split/infer"), "1");
    assert_eq!(
        oip_version(&host, "/v2/models/split/versions/canary/infer"),
        "2"
    );
    assert_eq!(oip_version(&host, "/v2/models/split/versions/2/infer"), "2");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let revisions = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut revisions = Vec::new();
        for tag in [None, Some("canary")] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "text/plain");
            if let Some(tag) = tag {
                headers.insert("Cascade-Tag", tag);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let reply = loop {
                let request =
                    client.request_with_headers("split.in", headers.clone(), "hello".into());
                match tokio::time::timeout(std::time::Duration::from_secs(5), request).await {
                    Ok(Ok(reply)) => break reply,
                    _ => assert!(
                        std::time::Instant::now() < deadline,
                        "split.in never answered"
                    ),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let revision = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Cascade-Revision"))
                .map(|v| v.as_str().to_string());
            revisions.push(revision);
        }
        revisions
    });
    assert_eq!(revisions, [Some("1".to_string()), Some("2".to_string())]);
}

#[test]
fn a_split_reaches_a_mirror_within_two_seconds() {
    let nats = cascade_tests::nats::NatsServer::start();
    let source = Host::start_with(&["--nats", &nats.url()]);
    source.publish_component("echo");
    source.publish_function("split", &manifest(2));
    source.publish_function("split", &manifest(3));
    let mirror = Host::start_with(&["--nats", &nats.url(), "--registry-url", &source.url]);
    let ready = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mirror.get("/readyz").status() != 200 {
        assert!(
            std::time::Instant::now() < ready,
            "the mirror never became ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(served_by(&mirror, "split", &[]), 2);
    let set = std::time::Instant::now();
    let response = set_traffic(
        &source,
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 0, "tag": "canary"}]}),
    );
    assert_eq!(response.status(), 200);
    while served_by(&mirror, "split", &[]) != 1 {
        assert!(
            set.elapsed() < std::time::Duration::from_secs(2),
            "the mirror did not follow the split within 2 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!(
        "split set on the source, served by the mirror after {:?}",
        set.elapsed()
    );
    assert_eq!(served_by(&mirror, "split@canary", &[]), 2);
    let copied: serde_json::Value = mirror
        .get("/v1/functions/split/traffic")
        .json()
        .expect("JSON");
    assert_eq!(copied["targets"][1]["tag"], "canary");
    // The mirror refuses to set a split itself: the source is the registry of record.
    assert_eq!(
        set_traffic(
            &mirror,
            json!({"targets": [{"revision": 2, "percent": 100}]})
        )
        .status(),
        409
    );
}
