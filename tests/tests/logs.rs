//! The host's log as operators read it: no colour codes in files, one line
//! per event (a trap too, with the guest's wasm backtrace, under
//! `RUST_BACKTRACE=1`), JSON when asked, and guests that cannot flood it.

use cascade_tests::host::Host;
use std::time::Duration;

/// A host logging to a file, serving `misbehave` as `mb` on one instance.
fn logged(extra: &[&str]) -> Host {
    let host = Host::start_logged_with(extra);
    host.publish_component("misbehave");
    let manifest = "name = \"mb\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n\
                    [scaling]\nmax_instances = 1\n";
    let response = host.put("/v1/functions/mb", "application/toml", manifest);
    assert_eq!(
        response.status(),
        201,
        "{}",
        response.text().unwrap_or_default()
    );
    host
}

fn invoke(host: &Host, body: &str) -> u16 {
    cascade_tests::host::client()
        .post(format!("{}/v1/functions/mb/invoke", host.url))
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .expect("answered")
        .status()
        .as_u16()
}

#[test]
fn a_text_log_in_a_file_has_no_colour_and_one_line_per_event() {
    let host = logged(&[]);
    assert_eq!(invoke(&host, "panic"), 500);
    assert_eq!(invoke(&host, "print:first\nsecond"), 200);
    let log = host.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a file:\n{log}");
    assert!(!log.contains("stack backtrace"), "a host backtrace:\n{log}");
    // Every line is an event of its own: it starts with a timestamp.
    for line in log.lines() {
        assert!(
            line.starts_with("20"),
            "a line that is not an event: {line:?}\n{log}"
        );
    }
    let trap = log
        .lines()
        .find(|l| l.contains("guest trapped"))
        .unwrap_or_else(|| panic!("no trap line:\n{log}"));
    assert!(trap.contains("wasm `unreachable`"), "{trap}");
    assert!(trap.contains("wasm backtrace: 0:"), "{trap}");
    assert!(trap.contains("function=mb"), "{trap}");
    // The guest's two lines, each with its function and stage.
    for word in ["first", "second"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!(" {word} function=mb stage=misbehave@0.1.0"))),
            "{word}:\n{log}"
        );
    }
}

#[test]
fn a_json_log_is_one_object_per_line_with_the_event_fields() {
    let host = logged(&["--log-format", "json"]);
    assert_eq!(invoke(&host, "print:hello"), 200);
    let log = host.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let guest = events
        .iter()
        .find(|e| e["message"] == "hello" && e["stream"] == "stdout")
        .unwrap_or_else(|| panic!("no guest line:\n{log}"));
    assert_eq!(guest["function"], "mb");
    assert_eq!(guest["stage"], "misbehave@0.1.0");
    assert_eq!(guest["level"], "INFO");
    assert!(guest["timestamp"].is_string(), "{guest}");
    let invoked = events
        .iter()
        .find(|e| e["message"] == "invoke")
        .unwrap_or_else(|| panic!("no invoke event:\n{log}"));
    assert_eq!(invoked["function"], "mb");
    assert_eq!(invoked["status"], 200);
    assert!(invoked["request_id"].is_string(), "{invoked}");
    // The guest's line joins its request: the invocation span's fields.
    assert_eq!(guest["request_id"], invoked["request_id"], "{guest}");
    assert_eq!(guest["revision"], 1, "{guest}");
    assert_eq!(guest["trigger"], "http", "{guest}");
}

#[test]
fn a_chatty_guest_is_rate_limited_and_the_drop_is_reported() {
    let host = logged(&[]);
    assert_eq!(invoke(&host, "spam:1000"), 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(invoke(&host, "print:after"), 200);
    let log = host.log();
    let spam = log.lines().filter(|l| l.contains(" spam ")).count();
    assert!((200..=260).contains(&spam), "{spam} spam lines logged");
    let dropped = log
        .lines()
        .find_map(|l| {
            let (before, _) = l.split_once(" guest log lines dropped")?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no drop notice:\n{log}"));
    assert_eq!(
        dropped as usize + spam,
        1000,
        "every line logged or counted"
    );
    assert!(
        log.contains(" after function=mb"),
        "lines pass again:\n{log}"
    );
}
