//! Model operations through the real binary: shadow copies compared with
//! the served answers (identical, swapped labels, trapping), a canary
//! rolled back by its rule with an event and a log line, and feedback
//! scored per revision.

use cascade_tests::host::{Host, client, error_of};
use cascade_tests::nats::NatsServer;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A single-stage function `name` over `component`; `max_instances` makes
/// otherwise identical manifests distinct revisions.
fn single_stage(name: &str, component: &str, max_instances: u32) -> String {
    format!(
        "name = \"{name}\"\n[[stages]]\ncomponent = \"{component}@0.1.0\"\n\
         [scaling]\nmax_instances = {max_instances}\n"
    )
}

fn set_traffic(host: &Host, name: &str, split: Value) {
    let response = host.put(
        &format!("/v1/functions/{name}/traffic"),
        "application/json",
        split.to_string(),
    );
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().unwrap_or_default()
    );
}

/// Invokes `name` with a text body: status and the revision that answered.
fn call(host: &Host, name: &str, body: &str) -> (u16, u64) {
    let response = host.invoke(name, "text/plain", body.to_string());
    let revision = response.headers()["x-cascade-revision"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("a revision");
    (response.status().as_u16(), revision)
}

/// Waits until the metric line `prefix` sums to at least `want`.
fn wait_for_metric(host: &Host, prefix: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = host.metric(prefix);
        if value >= want || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn shadows_are_compared_and_never_touch_the_caller() {
    let host = Host::start();
    host.publish_component("echo");
    host.publish_component("misbehave");
    host.publish_function("ops", &single_stage("ops", "echo", 2));
    host.publish_function("ops", &single_stage("ops", "echo", 3));
    host.publish_function("ops", &single_stage("ops", "misbehave", 2));

    // Revision 2 does what revision 1 does: every copy agrees.
    set_traffic(
        &host,
        "ops",
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 100, "shadow": true}]}),
    );
    for i in 0..40 {
        assert_eq!(call(&host, "ops", &format!("hello {i}")), (200, 1));
    }
    let copies = r#"cascade_shadow_requests_total{function="ops",revision="2",status="200"}"#;
    assert_eq!(wait_for_metric(&host, copies, 40.0), 40.0);
    let agreement = host.metric(r#"cascade_shadow_agreement{function="ops",revision="2"}"#);
    assert_eq!(agreement, 1.0);
    let status: Value = host.get("/v1/functions/ops/status").json().expect("JSON");
    assert_eq!(status["traffic"]["targets"][1]["shadow"], true);
    let quality = status["quality"].as_array().expect("quality");
    let second = quality
        .iter()
        .find(|q| q["revision"] == 2)
        .expect("revision 2");
    assert_eq!(
        (second["agreement"].as_f64(), second["compared"].as_u64()),
        (Some(1.0), Some(40))
    );

    // Revision 3 traps on `panic`: its copies fail, the callers do not.
    set_traffic(
        &host,
        "ops",
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 3, "percent": 50, "shadow": true}]}),
    );
    for _ in 0..20 {
        assert_eq!(call(&host, "ops", "panic"), (200, 1));
    }
    // Half of every 100 is copied; of 20, between 8 and 12.
    let trapped = r#"cascade_shadow_requests_total{function="ops",revision="3",status="500"}"#;
    let copied = wait_for_metric(&host, trapped, 8.0);
    assert!((8.0..=12.0).contains(&copied), "{copied} copies trapped");
    std::thread::sleep(Duration::from_millis(200));
    let all = host.metric(r#"cascade_shadow_requests_total{function="ops",revision="3""#);
    assert_eq!(all, host.metric(trapped), "every copy trapped");
    let served = host.metric(r#"cascade_requests_total{function="ops",revision="1",status="200"}"#);
    assert_eq!(served, 60.0, "shadow copies are not counted as requests");
    assert_eq!(
        host.metric(r#"cascade_requests_total{function="ops",revision="3""#),
        0.0
    );

    // A caller's request id is kept when short, replaced when long (it is
    // logged, traced and remembered for feedback).
    let with_id = |id: &str| {
        let response = client()
            .post(format!("{}/v1/functions/ops/invoke", host.url))
            .header("x-request-id", id)
            .body("hi")
            .send()
            .expect("answers");
        assert_eq!(response.status(), 200);
        response.headers()["x-request-id"]
            .to_str()
            .expect("an id")
            .to_string()
    };
    assert_eq!(with_id("order-17"), "order-17");
    let replaced = with_id(&"r".repeat(200));
    assert_eq!(replaced.len(), 16, "{replaced}");

    // A shadow of the served revision would take the callers' instances.
    let refused = host.put(
        "/v1/functions/ops/traffic",
        "application/json",
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 1, "percent": 10, "shadow": true}]})
            .to_string(),
    );
    let (status, message) = error_of(refused);
    assert_eq!(status, 400);
    assert!(message.contains("targets[1].revision"), "{message}");
}

#[test]
fn a_shadow_copy_that_cannot_meet_its_deadline_never_runs_its_model() {
    let host = Host::start();
    host.publish_examples();
    assert_eq!(
        host.metric("cascade_model_backend{backend=\"onnxruntime\"}"),
        1.0,
        "this test counts ONNX Runtime's runs (cargo xtask models caches its library)"
    );
    // ~100 tokens: MiniLM takes several ms on them (8 would fit in 1 ms).
    let text = &"word ".repeat(100);
    let publish = |extra: &str| {
        let manifest = cascade_tests::embed_manifest("hasty", extra);
        let response = host.put("/v1/functions/hasty", "application/toml", manifest);
        assert_eq!(response.status(), 201);
    };
    publish("");
    // Revision 2's 1 ms cannot hold MiniLM's run, which the live revision
    // shows on the plan they share. It keeps a tokenizer instance ready,
    // so its copies get as far as the model.
    publish("[limits]\ntimeout_ms = 1\n[scaling]\nmin_instances = 1\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = host.get("/v1/functions/hasty/status").json().expect("JSON");
        let tokenizer = &status["stages"][0];
        if tokenizer["idle"].as_u64() >= Some(1) && tokenizer["snapshot"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revision 2 never got ready: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    set_traffic(
        &host,
        "hasty",
        json!({"targets": [{"revision": 1, "percent": 100}]}),
    );
    for _ in 0..5 {
        assert_eq!(call(&host, "hasty", text), (200, 1));
    }
    set_traffic(
        &host,
        "hasty",
        json!({"targets": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 100, "shadow": true}]}),
    );
    let runs = || host.metric(r#"cascade_onnxruntime_runs_total{model="minilm-l3@1.0.0""#);
    let stopped = || host.metric("cascade_onnxruntime_runs_stopped_total");
    let (runs_before, stopped_before) = (runs(), stopped());
    for _ in 0..20 {
        assert_eq!(call(&host, "hasty", text), (200, 1));
    }
    let copies = r#"cascade_shadow_requests_total{function="hasty",revision="2""#;
    assert_eq!(wait_for_metric(&host, copies, 20.0), 20.0);
    let timed_out =
        host.metric(r#"cascade_shadow_requests_total{function="hasty",revision="2",status="504"}"#);
    assert!(timed_out > 0.0, "no copy ran at all");
    assert_eq!(runs(), runs_before + 20.0, "only the callers' runs ran");
    assert_eq!(
        stopped(),
        stopped_before,
        "no copy's run was started to be stopped"
    );
}

/// `orientation` as the examples publish it, with the classifier's labels
/// swapped (`swap`) and feedback kept for 100 answers.
fn orientation(swap: bool) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join("xtask/functions/orientation.toml");
    let text = std::fs::read_to_string(root).expect("the example manifest");
    let labels = if swap { ", labels = \"180,0\"" } else { "" };
    let text = text.replace(
        "config = { top_k = \"2\" }",
        &format!("config = {{ top_k = \"2\"{labels} }}"),
    );
    assert!(
        !swap || text.contains("labels = \"180,0\""),
        "the manifest changed"
    );
    format!("{text}\n[monitoring]\nfeedback = 100\n")
}

/// Posts an image to `orientation`: the top label, the revision that
/// answered and the request id.
fn classify(host: &Host, image: &[u8]) -> (String, u64, String) {
    let response = host.invoke("orientation", "image/png", image.to_vec());
    assert_eq!(response.status(), 200);
    let revision = response.headers()["x-cascade-revision"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("a revision");
    let id = response.headers()["x-request-id"]
        .to_str()
        .expect("an id")
        .to_string();
    let answer: Value = response.json().expect("JSON");
    let label = answer["predictions"][0][0]["label"]
        .as_str()
        .expect("a label")
        .to_string();
    (label, revision, id)
}

#[test]
fn swapped_labels_disagree_and_feedback_scores_each_revision() {
    let host = Host::start();
    host.publish_examples();
    host.publish_function("orientation", &orientation(true));
    host.publish_function("orientation", &orientation(false));
    let images: Vec<(Vec<u8>, &str)> = ["Cascade serves models", "The quick brown fox 42"]
        .iter()
        .flat_map(|text| {
            [
                (cascade_tests::render_line(text, false), "0"),
                (cascade_tests::render_line(text, true), "180"),
            ]
        })
        .collect();

    // The served revision 3 labels right; its shadow 2 swaps every label.
    set_traffic(
        &host,
        "orientation",
        json!({"targets": [{"revision": 3, "percent": 100}, {"revision": 2, "percent": 100, "shadow": true}]}),
    );
    for (image, truth) in images.iter().cycle().take(8) {
        let (label, revision, _) = classify(&host, image);
        assert_eq!((label.as_str(), revision), (*truth, 3));
    }
    let copies =
        r#"cascade_shadow_requests_total{function="orientation",revision="2",status="200"}"#;
    assert_eq!(wait_for_metric(&host, copies, 8.0), 8.0);
    let agreement = host.metric(r#"cascade_shadow_agreement{function="orientation",revision="2"}"#);
    assert_eq!(agreement, 0.0);

    // A 50/50 split of both; the truth goes back as feedback, one label
    // in four deliberately wrong, and each revision's accuracy is the
    // share of sent labels that match its own answers.
    set_traffic(
        &host,
        "orientation",
        json!({"targets": [{"revision": 2, "percent": 50}, {"revision": 3, "percent": 50}]}),
    );
    // (answers matching the label sent, deliberately wrong labels sent, all).
    let mut matches: std::collections::BTreeMap<u64, (u32, u32, u32)> = Default::default();
    for (i, (image, truth)) in images.iter().cycle().take(16).enumerate() {
        let (label, revision, id) = classify(&host, image);
        let sent = if i % 4 == 3 {
            if *truth == "0" { "180" } else { "0" }
        } else {
            truth
        };
        let response = client()
            .post(format!("{}/v1/functions/orientation/feedback", host.url))
            .json(&json!({"request_id": id, "label": sent}))
            .send()
            .expect("answers");
        assert_eq!(response.status(), 200);
        let scored: Value = response.json().expect("JSON");
        assert_eq!(scored["revision"], revision);
        assert_eq!(scored["correct"], label == sent);
        let entry = matches.entry(revision).or_default();
        entry.0 += u32::from(label == sent);
        entry.1 += u32::from(sent != *truth);
        entry.2 += 1;
    }
    assert_eq!(
        matches.keys().copied().collect::<Vec<_>>(),
        [2, 3],
        "{matches:?}"
    );
    for (revision, (right, _, all)) in &matches {
        let accuracy = host.metric(&format!(
            "cascade_prediction_accuracy{{function=\"orientation\",revision=\"{revision}\"}}"
        ));
        assert_eq!(
            accuracy,
            f64::from(*right) / f64::from(*all),
            "revision {revision}"
        );
    }
    // The dashboard's data shows the same accuracy per revision.
    let view: Value = host.get("/ui/data").json().expect("JSON");
    let shown = view["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .find(|f| f["name"] == "orientation")
        .expect("orientation shown");
    for (revision, (right, _, all)) in &matches {
        let quality = shown["quality"]
            .as_array()
            .expect("quality")
            .iter()
            .find(|q| q["revision"] == *revision)
            .expect("the revision's quality");
        assert_eq!(
            quality["accuracy"].as_f64(),
            Some(f64::from(*right) / f64::from(*all))
        );
    }
    // Revision 3 matches all but the wrong labels sent; 2 only those.
    let (right, wrong, all) = matches[&3];
    assert_eq!((right, wrong > 0), (all - wrong, true));
    let (right, wrong, _) = matches[&2];
    assert_eq!((right, wrong > 0), (wrong, true));

    // Feedback is taken once, for remembered answers, and must fit them.
    let feedback = |body: Value| {
        error_of(
            client()
                .post(format!("{}/v1/functions/orientation/feedback", host.url))
                .json(&body)
                .send()
                .expect("answers"),
        )
    };
    let (status, message) = feedback(json!({"request_id": "never-seen", "label": "0"}));
    assert_eq!(status, 404);
    assert!(message.contains("request id \"never-seen\""), "{message}");
    let (_, _, id) = classify(&host, &images[0].0);
    let (status, message) = feedback(json!({"request_id": id, "value": 1.0}));
    assert_eq!(status, 400);
    assert!(message.contains("the answer was a label"), "{message}");
    let (status, message) = feedback(json!({"request_id": id, "labels": "0"}));
    assert_eq!(status, 400);
    assert!(message.contains("unknown field `labels`"), "{message}");
}

#[test]
fn a_trapping_canary_is_rolled_back_with_an_event_and_a_log_line() {
    let nats = NatsServer::start();
    let host = Host::start_logged_with(&["--nats", &nats.url()]);
    host.publish_component("echo");
    host.publish_component("misbehave");
    host.publish_function("canary", &single_stage("canary", "echo", 2));
    host.publish_function("canary", &single_stage("canary", "misbehave", 2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let (nats_client, mut events) = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let events = client
            .subscribe("cascade.events.traffic.canary")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        (client, events)
    });
    set_traffic(
        &host,
        "canary",
        json!({
            "targets": [{"revision": 1, "percent": 70}, {"revision": 2, "percent": 30, "tag": "candidate"}],
            "rollback": {"min_requests": 10, "window": 20, "max_error_rate": 0.1}
        }),
    );
    // Three inputs in ten make revision 2 trap; revision 1 echoes them.
    let mut failed = 0;
    for i in 0..100 {
        let body = if i % 10 < 3 { "panic" } else { "echo:hi" };
        let (status, revision) = call(&host, "canary", body);
        if status != 200 {
            assert_eq!((status, revision), (500, 2));
            failed += 1;
        }
    }
    let event = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), events.next()).await })
        .expect("a traffic event within 10 s")
        .expect("a message");
    let event: Value = serde_json::from_slice(&event.payload).expect("JSON");
    assert_eq!(event["action"], "rolled-back");
    assert_eq!(event["revision"], 2);
    let reason = event["reason"].as_str().expect("a reason");
    assert!(reason.contains("exceeds max_error_rate 0.1"), "{reason}");
    assert_eq!(event["traffic"]["targets"][1]["percent"], 0);
    drop(nats_client);

    // Judged within its window: it served at most `window` requests.
    let canary_served = host.metric(r#"cascade_requests_total{function="canary",revision="2""#);
    assert!(
        (10.0..=20.0).contains(&canary_served),
        "the canary served {canary_served} requests before it was rolled back"
    );
    assert!(failed >= 2, "{failed} requests failed");
    let split: Value = host
        .get("/v1/functions/canary/traffic")
        .json()
        .expect("JSON");
    let shares: Vec<u64> = split["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["percent"].as_u64().expect("percent"))
        .collect();
    assert_eq!(shares, [100, 0]);
    assert_eq!(
        host.metric(r#"cascade_rollbacks_total{function="canary",revision="2"}"#),
        1.0
    );
    let log = host.log();
    let line = log
        .lines()
        .find(|l| l.contains("rolled back to 0 %"))
        .unwrap_or_else(|| panic!("no rollback line in:\n{log}"));
    assert!(line.contains("exceeds max_error_rate"), "{line}");
    // Every request now reaches revision 1; the tag still reaches 2.
    for i in 0..20 {
        let body = if i % 2 == 0 { "panic" } else { "echo:hi" };
        assert_eq!(call(&host, "canary", body), (200, 1));
    }
    assert_eq!(call(&host, "canary@candidate", "echo:hi"), (200, 2));
}
