//! The dashboard at `/ui`, opened in a real headless Chromium after real
//! load, and its data behind the read scope.

use cascade_tests::host::{Host, client};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs headless Chromium on `url` with `args`, as root can (no sandbox)
/// and with no network but loopback.
fn chromium(url: &str, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().expect("a profile directory");
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Lets the page's fetch of /ui/data finish before the dump.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("chromium (Debian's `chromium`; `cargo xtask test` installs it): {e}")
        });
    assert!(output.status.success(), "chromium failed: {output:?}");
    output
}

/// The HTML of the first element starting with `open` (up to `close`).
fn element<'a>(dom: &'a str, open: &str, close: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in the page:\n{dom}"));
    let end = dom[start..].find(close).map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// The text of the `<td>` with class `class` in `row`.
fn cell<'a>(row: &'a str, class: &str) -> &'a str {
    let open = format!("class=\"{class}\">");
    let start = row
        .find(&open)
        .unwrap_or_else(|| panic!("no {class} cell in {row}"))
        + open.len();
    let end = row[start..].find('<').map_or(row.len(), |e| start + e);
    &row[start..end]
}

fn milliseconds(text: &str) -> f64 {
    text.parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a latency figure"))
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png")
}

#[test]
fn the_dashboard_shows_functions_and_latency_after_load() {
    let host = Host::start();
    host.publish_examples();
    for i in 0..40 {
        let response = host.invoke("embed", "text/plain", format!("sentence number {i}"));
        assert_eq!(response.status(), 200);
    }
    let refused = host.invoke("orientation", "image/png", "not an image");
    assert_eq!(refused.status(), 400);

    let data: serde_json::Value = client()
        .get(format!("{}/ui/data", host.url))
        .send()
        .and_then(|r| r.json())
        .expect("the dashboard's data");
    let functions = data["functions"].as_array().expect("functions");
    let embed = functions
        .iter()
        .find(|f| f["name"] == "embed")
        .unwrap_or_else(|| panic!("embed missing: {data}"));
    assert_eq!(embed["statuses"]["200"], 40, "{embed}");
    assert_eq!(embed["stages"].as_array().map(Vec::len), Some(3), "{embed}");
    let orientation = functions.iter().find(|f| f["name"] == "orientation");
    assert_eq!(
        orientation.map(|f| f["statuses"]["400"].clone()),
        Some(serde_json::json!(1)),
        "errors by code: {data}"
    );

    let dom =
        String::from_utf8_lossy(&chromium(&format!("{}/ui", host.url), &["--dump-dom"]).stdout)
            .into_owned();
    for function in ["embed", "orientation"] {
        element(&dom, &format!("<tr data-function=\"{function}\">"), "</tr>");
    }
    let row = element(&dom, "<tr data-function=\"embed\">", "</tr>");
    let (p50, p99) = (
        milliseconds(cell(row, "num p50")),
        milliseconds(cell(row, "num p99")),
    );
    assert!(p50 > 0.0 && p99 >= p50, "embed p50 {p50} ms, p99 {p99} ms");
    assert!(cell(row, "statuses").contains("200: 40"), "{row}");
    // A latency figure for every stage of embed.
    let details = element(&dom, "<section data-function=\"embed\">", "</section>");
    for stage in ["bert-tokenizer@0.1.0", "minilm-l3@1.0.0", "mean-pool@0.1.0"] {
        let row = element(details, &format!("<tr data-stage=\"{stage}\">"), "</tr>");
        assert!(milliseconds(cell(row, "num p99")) > 0.0, "{stage}: {row}");
    }
    let failed = element(&dom, "<tr data-function=\"orientation\">", "</tr>");
    assert!(cell(failed, "bad statuses").contains("400: 1"), "{failed}");
    assert!(dom.contains("minilm-l3@1.0.0"), "the registry's models");

    let shot = screenshot_path();
    chromium(
        &format!("{}/ui", host.url),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000",
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
}

#[test]
fn the_page_is_open_and_its_data_needs_the_read_scope() {
    let host = Host::start_with(&["--token", "secret", "--token-read"]);
    let page = client()
        .get(format!("{}/ui", host.url))
        .send()
        .expect("page");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let denied = client()
        .get(format!("{}/ui/data", host.url))
        .send()
        .expect("data");
    assert_eq!(denied.status(), 401);
    let allowed = client()
        .get(format!("{}/ui/data", host.url))
        .bearer_auth("secret")
        .send()
        .expect("data");
    assert_eq!(allowed.status(), 200);
    let view: serde_json::Value = allowed.json().expect("JSON");
    assert_eq!(view["functions"], serde_json::json!([]));
}
