//! A real Prometheus (Debian's) scrapes a live host under load: per-stage
//! p99 comes back for every stage, and every query of the Grafana
//! dashboard in `deploy/grafana/cascade.json` is valid PromQL against it.

use cascade_tests::host::{Host, client, free_port};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus server on loopback, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second.
    fn scraping(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cascade\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus (Debian's; `cargo xtask test` installs it): {e}")
            });
        let server = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client()
            .get(format!("{}/-/ready", server.url))
            .send()
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The instant query's answer (`data.result`), asserting it succeeded.
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", promql)],
        )
        .expect("a query URL");
        let answer: serde_json::Value = client()
            .get(url)
            .send()
            .and_then(|r| r.json())
            .expect("a query answer");
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one instant-vector sample.
fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

const STAGE_P99: &str = "histogram_quantile(0.99, sum by (le, stage) \
    (rate(cascade_stage_duration_seconds_bucket{function=\"embed\"}[30s])))";

#[test]
fn prometheus_scrapes_a_host_and_gets_a_p99_for_every_stage() {
    let host = Host::start();
    host.publish_examples();
    let prometheus = Prometheus::scraping(host.url.trim_start_matches("http://"));
    // Load across several scrapes, until every stage has a finite p99.
    let deadline = Instant::now() + Duration::from_secs(60);
    let samples = loop {
        for i in 0..20 {
            let response = host.invoke("embed", "text/plain", format!("load sentence {i}"));
            assert_eq!(response.status(), 200);
        }
        let samples = prometheus.query(STAGE_P99);
        if samples.len() == 3 && samples.iter().all(|s| value(s).is_finite()) {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "no p99 for every stage: {samples:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stages: Vec<&str> = samples
        .iter()
        .map(|s| s["metric"]["stage"].as_str().unwrap_or_default())
        .collect();
    stages.sort_unstable();
    assert_eq!(
        stages,
        ["bert-tokenizer@0.1.0", "mean-pool@0.1.0", "minilm-l3@1.0.0"]
    );
    for sample in &samples {
        let p99 = value(sample);
        assert!(p99 > 0.0 && p99 <= 10.0, "p99 {p99} s: {sample}");
    }

    // Every panel query of the Grafana dashboard runs, and the stage
    // latency panels show embed's three stages.
    let grafana = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/cascade.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&grafana).expect("the Grafana dashboard"))
            .expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let promql = expr
                .replace("$function", "embed")
                .replace("$__rate_interval", "1m");
            let result = prometheus.query(&promql);
            if panel["title"] == "Stage latency p99" {
                assert_eq!(result.len(), 3, "{promql}: {result:?}");
            }
        }
    }
}
