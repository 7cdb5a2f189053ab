//! Section 8, the Open Inference Protocol: the model-only MiniLM function
//! (`cascade serve-model`) against MLServer serving the same ONNX file on
//! onnxruntime, over the same protocol (REST JSON, gRPC), at equal threads;
//! gRPC against REST on Cascade; and what the OIP REST binary encoding costs
//! against `/v1` on `embed`.

use crate::context::{Bench, invoke_url, median_p99, median_rps};
use crate::oip_load::{self, Call, proto};
use crate::process::Spawned;
use crate::report::{Bar, Record, Section, num};
use crate::wrk::WrkRun;
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use cascade_tests::host::{Host, free_port};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Concurrencies compared.
const CONCURRENCY: [u32; 3] = [1, 4, 16];
/// The model-only function's name on both servers.
const MODEL: &str = "minilm";
/// Tokens per request.
const TOKENS: usize = 32;

/// Runs the section.
pub fn run(bench: &Bench) -> Result<Section> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mlserver_python =
        bench.args.mlserver_python.as_deref().context(
            "the OIP section needs --mlserver-python (cargo xtask bench installs MLServer)",
        )?;
    let mut section = Section::new(
        "8. Open Inference Protocol",
        &format!(
            "The model-only MiniLM function (`cascade serve-model minilm-l3@1.0.0 --name {MODEL} \
             --output {output}`, {TOKENS} tokens, the token embeddings out) against MLServer 1.7.1 \
             serving the same ONNX file with an onnxruntime runtime (`benches/python/mlserver_onnx.py`, \
             the custom runtime MLServer's docs describe; versions in \
             `benches/python/mlserver-requirements.txt`), at equal threads: MLServer with \
             `parallel_workers = {cores}` (one worker process per core), each with one onnxruntime \
             session of one intra-op thread; Cascade with its ONNX Runtime backend on the same \
             library, one thread per run (`--onnxruntime-alone-threads 1`), at most one run per \
             core. Both over the same protocol: REST with JSON tensors (MLServer has no binary \
             tensor extension on REST) and gRPC with `raw_input_contents`. Beside them, not against \
             MLServer: Cascade's REST with the binary tensor extension, gRPC against it, and \
             `embed` through OIP REST binary (its text as one BYTES input, its JSON as one binary \
             output) against `/v1` with the same text. One load generator drives every contender \
             (`benches/src/oip_load.rs`: one tokio thread, one socket per connection, every answer \
             checked; wrk speaks no gRPC, and PyPI's `perf-analyzer` 2.60 has no wheel for this \
             machine's glibc and Python, so only its 0.1.0 placeholder installs). Every measured run \
             must be all successes, or the section fails.",
            output = crate::native::TOKEN_EMBEDDINGS,
        ),
    );
    let library = cascade_tests::onnxruntime_library();
    let library = library
        .to_str()
        .context("the library's path is not UTF-8")?;
    let grpc_port = free_port();
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let host = bench.host_with_examples(&[
        "--onnxruntime",
        library,
        "--onnxruntime-alone-threads",
        "1",
        "--grpc-listen",
        &grpc_listen,
    ])?;
    host.serve_minilm(MODEL, &[]);
    let (http_port, mlserver_grpc) = (free_port(), free_port());
    let mlserver = start_mlserver(bench, mlserver_python, cores, http_port, mlserver_grpc)?;
    section.commands.extend([
        format!(
            "cascade serve --onnxruntime {library} --onnxruntime-alone-threads 1 --grpc-listen \
             {grpc_listen}; cascade serve-model minilm-l3@1.0.0 --name {MODEL} --output {}",
            crate::native::TOKEN_EMBEDDINGS
        ),
        format!(
            "ORT_THREADS=1 PYTHONPATH=benches/python {} start DIR   # settings.json: \
             parallel_workers {cores}; model-settings.json: implementation mlserver_onnx.OnnxModel",
            mlserver_python.with_file_name("mlserver").display()
        ),
    ]);

    let (ids, mask) = bench.native.encode(&bench.bodies.text_32)?;
    ensure!(ids.len() == TOKENS, "the text has {} tokens", ids.len());
    let ours = Requests::new(&host.url, &format!("http://{grpc_listen}"), &ids, &mask)?;
    let theirs = Requests::new(
        &format!("http://127.0.0.1:{http_port}"),
        &format!("http://127.0.0.1:{mlserver_grpc}"),
        &ids,
        &mask,
    )?;
    check_same_answers(&ours.rest_json, &theirs.rest_json)?;
    for call in [&ours.rest_binary, &ours.grpc, &theirs.grpc] {
        oip_load::once(call)?;
    }
    section.table.push(
        [
            "concurrency",
            "REST JSON req/s: Cascade",
            "MLServer",
            "×",
            "p99 ms: Cascade",
            "MLServer",
            "gRPC req/s: Cascade",
            "MLServer",
            "×",
            "p99 ms: Cascade",
            "MLServer",
            "Cascade REST binary req/s",
            "Cascade gRPC ÷ REST binary",
        ]
        .map(String::from)
        .to_vec(),
    );
    for c in CONCURRENCY {
        against_mlserver(bench, &mut section, c, &ours, &theirs)?;
    }
    drop(mlserver);
    encoding_overhead(bench, &mut section, &host)?;
    Ok(section)
}

/// The same inference in each encoding, to one server.
struct Requests {
    rest_json: Call,
    rest_binary: Call,
    grpc: Call,
}

impl Requests {
    fn new(base: &str, grpc: &str, ids: &[i64], mask: &[i64]) -> Result<Requests> {
        let url = format!("{base}/v2/models/{MODEL}/infer");
        let output = crate::native::TOKEN_EMBEDDINGS;
        let shape = [1, ids.len()];
        let json_body = json!({
            "inputs": [
                {"name": "input_ids", "shape": shape, "datatype": "INT64", "data": ids},
                {"name": "attention_mask", "shape": shape, "datatype": "INT64", "data": mask},
            ],
            "outputs": [{"name": output}],
        });
        let raw = |values: &[i64]| {
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let binary_input = |name: &str| {
            json!({"name": name, "shape": shape, "datatype": "INT64",
                   "parameters": {"binary_data_size": ids.len() * 8}})
        };
        let header = serde_json::to_vec(&json!({
            "inputs": [binary_input("input_ids"), binary_input("attention_mask")],
            "outputs": [{"name": output, "parameters": {"binary_data": true}}],
        }))?;
        let mut binary_body = header.clone();
        binary_body.extend(raw(ids));
        binary_body.extend(raw(mask));
        let tensor = |name: &str| proto::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: "INT64".into(),
            shape: vec![1, ids.len() as i64],
            ..Default::default()
        };
        Ok(Requests {
            rest_json: Call::Http {
                url: url.clone(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from(serde_json::to_vec(&json_body)?),
            },
            rest_binary: Call::Http {
                url,
                headers: vec![(
                    "inference-header-content-length".into(),
                    header.len().to_string(),
                )],
                body: Bytes::from(binary_body),
            },
            grpc: Call::Grpc {
                endpoint: grpc.into(),
                request: proto::ModelInferRequest {
                    model_name: MODEL.into(),
                    inputs: vec![tensor("input_ids"), tensor("attention_mask")],
                    outputs: vec![proto::model_infer_request::InferRequestedOutputTensor {
                        name: output.into(),
                        ..Default::default()
                    }],
                    raw_input_contents: vec![raw(ids), raw(mask)],
                    ..Default::default()
                },
            },
        })
    }
}

/// Loads both servers in turn at `c` connections over REST JSON and gRPC
/// (and Cascade's REST binary), and records the ratios.
fn against_mlserver(
    bench: &Bench,
    section: &mut Section,
    c: u32,
    ours: &Requests,
    theirs: &Requests,
) -> Result<()> {
    let calls = [
        &ours.rest_json,
        &theirs.rest_json,
        &ours.grpc,
        &theirs.grpc,
        &ours.rest_binary,
    ];
    let runs = bench.in_rounds(&calls, |call, length, clean| {
        oip_load::measure(call, c, length, clean)
    })?;
    let [rest, mls_rest, grpc, mls_grpc, binary] = [0, 1, 2, 3, 4].map(|i| &runs[i][..]);
    let p99_ms = |runs: &[WrkRun]| median_p99(runs) / 1000.0;
    let ratio = |a: &[WrkRun], b: &[WrkRun]| median_rps(a) / median_rps(b);
    let p99_ratio = |a: &[WrkRun], b: &[WrkRun]| median_p99(a) / median_p99(b);
    section.table.push(vec![
        c.to_string(),
        num(median_rps(rest)),
        num(median_rps(mls_rest)),
        num(ratio(rest, mls_rest)),
        num(p99_ms(rest)),
        num(p99_ms(mls_rest)),
        num(median_rps(grpc)),
        num(median_rps(mls_grpc)),
        num(ratio(grpc, mls_grpc)),
        num(p99_ms(grpc)),
        num(p99_ms(mls_grpc)),
        num(median_rps(binary)),
        num(ratio(grpc, binary)),
    ]);
    for (protocol, ours, theirs) in [("rest", rest, mls_rest), ("grpc", grpc, mls_grpc)] {
        section.records.extend([
            Record::against(
                &format!("oip_{protocol}_vs_mlserver_rps_ratio_c{c}"),
                ratio(ours, theirs),
                "ratio",
                Bar::AtLeast(1.5),
            ),
            Record::against(
                &format!("oip_{protocol}_vs_mlserver_p99_ratio_c{c}"),
                p99_ratio(ours, theirs),
                "ratio",
                Bar::AtMost(1.0),
            ),
        ]);
    }
    section.records.push(Record::against(
        &format!("oip_grpc_over_rest_binary_rps_ratio_c{c}"),
        ratio(grpc, binary),
        "ratio",
        Bar::AtLeast(1.0),
    ));
    Ok(())
}

/// `embed` through OIP REST binary against `/v1`, same text, same host:
/// what the OIP envelope costs.
fn encoding_overhead(bench: &Bench, section: &mut Section, host: &Host) -> Result<()> {
    let text = bench.bodies.text_32.as_bytes();
    let v1 = Call::Http {
        url: invoke_url(host, "embed"),
        headers: vec![("content-type".into(), "text/plain".into())],
        body: Bytes::copy_from_slice(text),
    };
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "message", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + text.len(),
                                   "content_type": "text/plain"}}],
        "parameters": {"binary_data_output": true},
    }))?;
    let mut body = header.clone();
    body.extend(u32::try_from(text.len())?.to_le_bytes());
    body.extend_from_slice(text);
    let oip = Call::Http {
        url: format!("{}/v2/models/embed/infer", host.url),
        headers: vec![(
            "inference-header-content-length".into(),
            header.len().to_string(),
        )],
        body: Bytes::from(body),
    };
    oip_load::once(&oip)?;
    let mut cells = vec!["embed: OIP REST binary ÷ /v1 req/s".to_string()];
    for c in CONCURRENCY {
        let runs = bench.in_rounds(&[&v1, &oip], |call, length, clean| {
            oip_load::measure(call, c, length, clean)
        })?;
        let kept = median_rps(&runs[1]) / median_rps(&runs[0]);
        cells.push(format!("c{c}: {}", num(kept)));
        section.records.push(Record::against(
            &format!("oip_rest_binary_overhead_embed_c{c}"),
            1.0 - kept,
            "ratio",
            Bar::AtMost(0.05),
        ));
    }
    section.notes.push(format!(
        "{} (the overhead records are 1 − that ratio; negative means OIP was faster).",
        cells.join(", ")
    ));
    Ok(())
}

/// Starts MLServer on the MiniLM file and waits until the model is ready.
fn start_mlserver(
    bench: &Bench,
    python: &Path,
    workers: usize,
    http_port: u16,
    grpc_port: u16,
) -> Result<Spawned> {
    // Absolute: MLServer runs in it and is given it as an argument.
    let dir = std::path::absolute(bench.work.join("mlserver"))?;
    let model_dir = dir.join(MODEL);
    std::fs::create_dir_all(&model_dir)?;
    std::fs::write(
        dir.join("settings.json"),
        serde_json::to_vec_pretty(&json!({
            "debug": false,
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": free_port(),
            "parallel_workers": workers,
            "grpc_max_message_length": 64 << 20,
        }))?,
    )?;
    std::fs::write(
        model_dir.join("model-settings.json"),
        serde_json::to_vec_pretty(&json!({
            "name": MODEL,
            "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": bench.models.join(crate::native::MODEL_FILE)},
        }))?,
    )?;
    let runtime_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    // The venv's `mlserver` script (the package has no `__main__`).
    let mlserver = python.with_file_name("mlserver");
    let log = dir.join("mlserver.log");
    let mut server = Spawned::start(
        "MLServer",
        Command::new(&mlserver)
            .arg("start")
            .arg(&dir)
            .current_dir(&dir)
            .env("PYTHONPATH", &runtime_dir)
            .env("ORT_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?),
    )?;
    let ready = format!("http://127.0.0.1:{http_port}/v2/models/{MODEL}/ready");
    let client = reqwest::blocking::Client::new();
    server
        .wait_until(Duration::from_secs(120), || {
            client
                .get(&ready)
                .timeout(Duration::from_secs(5))
                .send()
                .is_ok_and(|r| r.status().is_success())
        })
        .with_context(|| format!("MLServer's log: {}", log.display()))?;
    Ok(server)
}

/// Both servers must compute the same tensor, or the comparison means nothing.
fn check_same_answers(ours: &Call, theirs: &Call) -> Result<()> {
    let answer = |call: &Call| -> Result<Vec<f64>> {
        let Call::Http { url, headers, body } = call else {
            anyhow::bail!("a REST call expected");
        };
        let mut request = reqwest::blocking::Client::new()
            .post(url)
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send()?;
        ensure!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        let value: serde_json::Value = response.json()?;
        Ok(value["outputs"][0]["data"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default())
    };
    let (a, b) = (answer(ours)?, answer(theirs)?);
    ensure!(
        a.len() == TOKENS * 384 && a.len() == b.len(),
        "token embeddings of {} numbers expected, got {} and {}",
        TOKENS * 384,
        a.len(),
        b.len()
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    ensure!(
        worst < 1e-4,
        "Cascade and MLServer disagree (largest difference {worst})"
    );
    Ok(())
}
