//! Who may do what, over every route of the real binary: no token, a wrong
//! token, and a token of each scope, including a function named `invoke`
//! (whose registry routes end in `/invoke` too).

use cascade_tests::host::{Host, client};
use reqwest::Method;
use sha2::{Digest, Sha256};

const SCOPES: [&str; 4] = ["publish", "read", "invoke", "metrics"];

fn secret(scope: &str) -> String {
    format!("{scope}-secret-of-some-length")
}

/// A tokens file with one token per scope; the invoke token may invoke only
/// the function named `invoke`.
fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = String::new();
    for scope in SCOPES {
        let hash = hex::encode(Sha256::digest(secret(scope).as_bytes()));
        text.push_str(&format!(
            "[[token]]\nname = \"{scope}-token\"\nsha256 = \"{hash}\"\nscopes = [\"{scope}\"]\n"
        ));
        if scope == "invoke" {
            text.push_str("functions = [\"invoke\"]\n");
        }
    }
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text).expect("tokens file");
    path
}

fn send(host: &Host, method: &Method, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client()
        .request(method.clone(), format!("{}{path}", host.url))
        .body("not what the route wants");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().expect("answers");
    let status = response.status().as_u16();
    (status, response.text().unwrap_or_default())
}

/// Every route, with the scope it needs (`None`: open to all).
fn routes() -> Vec<(Method, &'static str, Option<&'static str>)> {
    vec![
        (Method::GET, "/healthz", None),
        (Method::GET, "/readyz", None),
        (Method::GET, "/metrics", Some("metrics")),
        (Method::POST, "/v1/functions/invoke/invoke", Some("invoke")),
        (Method::GET, "/v1/functions/invoke/status", Some("read")),
        (
            Method::POST,
            "/v1/functions/invoke/feedback",
            Some("invoke"),
        ),
        (Method::GET, "/v1/components", Some("read")),
        (Method::GET, "/v1/components/misbehave", Some("read")),
        (Method::GET, "/v1/components/misbehave/0.1.0", Some("read")),
        (
            Method::GET,
            "/v1/components/misbehave/0.1.0/content",
            Some("read"),
        ),
        (Method::PUT, "/v1/components/other/0.1.0", Some("publish")),
        (
            Method::DELETE,
            "/v1/components/absent/0.1.0",
            Some("publish"),
        ),
        (Method::GET, "/v1/models", Some("read")),
        (Method::GET, "/v1/models/absent", Some("read")),
        (Method::GET, "/v1/models/absent/1.0.0", Some("read")),
        (Method::GET, "/v1/models/absent/1.0.0/content", Some("read")),
        (Method::GET, "/v1/models/absent/1.0.0/files/x", Some("read")),
        (Method::PUT, "/v1/models/other/1.0.0", Some("publish")),
        (Method::DELETE, "/v1/models/absent/1.0.0", Some("publish")),
        (Method::GET, "/v1/functions", Some("read")),
        (Method::GET, "/v1/functions/invoke", Some("read")),
        (Method::GET, "/v1/functions/invoke/revisions", Some("read")),
        (Method::GET, "/v1/functions/invoke/1", Some("read")),
        (Method::GET, "/v1/functions/invoke/1/content", Some("read")),
        (Method::PUT, "/v1/functions/invoke", Some("publish")),
        (Method::DELETE, "/v1/functions/absent", Some("publish")),
        (
            Method::POST,
            "/v1/functions/invoke/rollback",
            Some("publish"),
        ),
        (Method::GET, "/v2", None),
        (Method::GET, "/v2/health/live", None),
        (Method::GET, "/v2/health/ready", None),
        (Method::GET, "/v2/models/invoke", Some("read")),
        (Method::GET, "/v2/models/invoke/versions/1", Some("read")),
        (Method::GET, "/v2/models/invoke/ready", Some("read")),
        (
            Method::GET,
            "/v2/models/invoke/versions/1/ready",
            Some("read"),
        ),
        (Method::POST, "/v2/models/invoke/infer", Some("invoke")),
        (
            Method::POST,
            "/v2/models/invoke/versions/1/infer",
            Some("invoke"),
        ),
    ]
}

#[test]
fn every_route_asks_for_its_own_scope_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = tokens_file(dir.path());
    let host = Host::start_with(&["--tokens", tokens.to_str().expect("utf-8")]);
    let publisher = secret("publish");
    let wasm = std::fs::read(cascade_tests::component_path("misbehave")).expect("built");
    let published = client()
        .put(format!("{}/v1/components/misbehave/0.1.0", host.url))
        .bearer_auth(&publisher)
        .body(wasm)
        .send()
        .expect("answers");
    assert_eq!(published.status(), 201);
    let manifest = "name = \"invoke\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n";
    let published = client()
        .put(format!("{}/v1/functions/invoke", host.url))
        .bearer_auth(&publisher)
        .body(manifest)
        .send()
        .expect("answers");
    assert_eq!(published.status(), 201);

    for (method, path, needs) in routes() {
        let (status, body) = send(&host, &method, path, None);
        match needs {
            None => assert_eq!(status, 200, "{method} {path} without a token: {body}"),
            Some(scope) => {
                assert_eq!(status, 401, "{method} {path} without a token: {body}");
                assert!(body.contains(&format!("with the {scope} scope")), "{body}");
            }
        }
        let (status, body) = send(&host, &method, path, Some("not-a-token"));
        if needs.is_some() {
            assert_eq!(status, 401, "{method} {path} with a wrong token: {body}");
            assert!(body.contains("wrong token"), "{body}");
        }
        for scope in SCOPES {
            let (status, body) = send(&host, &method, path, Some(&secret(scope)));
            let allowed = needs.is_none_or(|needed| needed == scope);
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} with the {scope} token: {status} {body}"
                );
            } else {
                assert_eq!(
                    status, 403,
                    "{method} {path} with the {scope} token: {body}"
                );
                assert!(
                    body.contains(&format!("lacks the {}", needs.unwrap_or(""))),
                    "{body}"
                );
            }
        }
    }

    // The invoke token is limited to the function named `invoke`.
    let other = "name = \"other\"\n[[stages]]\ncomponent = \"misbehave@0.1.0\"\n";
    let published = client()
        .put(format!("{}/v1/functions/other", host.url))
        .bearer_auth(&publisher)
        .body(other)
        .send()
        .expect("answers");
    assert_eq!(published.status(), 201);
    let (status, body) = send(
        &host,
        &Method::POST,
        "/v1/functions/other/invoke",
        Some(&secret("invoke")),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("may not invoke function \\\"other\\\""),
        "{body}"
    );
    let invoked = client()
        .post(format!("{}/v1/functions/invoke/invoke", host.url))
        .bearer_auth(secret("invoke"))
        .body("echo:allowed")
        .send()
        .expect("answers");
    assert_eq!(invoked.status(), 200);
}

#[test]
fn with_one_token_a_function_named_invoke_still_needs_it_to_change() {
    let host = Host::start_with(&["--token", "the-only-token"]);
    for method in [Method::PUT, Method::DELETE] {
        let (status, body) = send(&host, &method, "/v1/functions/invoke", None);
        assert_eq!(status, 401, "{method} /v1/functions/invoke: {body}");
    }
    // Reads, invocations and metrics stay open without --token-read.
    assert_eq!(send(&host, &Method::GET, "/v1/functions", None).0, 200);
    assert_eq!(send(&host, &Method::GET, "/metrics", None).0, 200);

    let closed = Host::start_with(&["--token", "the-only-token", "--token-read"]);
    assert_eq!(send(&closed, &Method::GET, "/metrics", None).0, 401);
    assert_eq!(send(&closed, &Method::GET, "/v1/functions", None).0, 401);
    assert_eq!(
        send(&closed, &Method::GET, "/metrics", Some("the-only-token")).0,
        200
    );
}
