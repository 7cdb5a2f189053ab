//! The Open Inference Protocol over REST, against the real binary: the
//! examples and a model-only MiniLM function answer OIP requests in JSON
//! and binary form with what `/v1` answers, and mistakes get the precise
//! `{"error": "..."}` an OIP client shows.

use cascade_tests::host::{Host, client};
use serde_json::{Value, json};

/// A host with the examples and `minilm`, a function of the MiniLM model alone.
fn host() -> Host {
    let host = Host::start();
    host.publish_examples();
    host.serve_minilm("minilm", &[]);
    host
}

fn post(
    host: &Host,
    path: &str,
    body: Vec<u8>,
    header_length: Option<usize>,
) -> reqwest::blocking::Response {
    // Like tritonclient: no Content-Type.
    let mut request = client().post(format!("{}{path}", host.url)).body(body);
    if let Some(length) = header_length {
        request = request.header("Inference-Header-Content-Length", length);
    }
    request.send().expect("answers")
}

/// A response split into its JSON and the binary data after it.
fn split(response: reqwest::blocking::Response) -> (u16, Value, Vec<u8>) {
    let status = response.status().as_u16();
    let length: Option<usize> = response
        .headers()
        .get("inference-header-content-length")
        .map(|v| v.to_str().expect("ascii").parse().expect("a length"));
    let body = response.bytes().expect("body").to_vec();
    let at = length.unwrap_or(body.len());
    let header = serde_json::from_slice(&body[..at]).expect("JSON header");
    (status, header, body[at..].to_vec())
}

fn oip_error(response: reqwest::blocking::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().expect("JSON error");
    (
        status,
        body["error"].as_str().expect("a string error").to_string(),
    )
}

#[test]
fn server_and_model_metadata_follow_the_protocol() {
    let host = host();
    let server: Value = host.get("/v2").json().expect("json");
    assert_eq!(server["name"], "cascade");
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));
    assert_eq!(
        host.get("/v2/health/live").json::<Value>().expect("json"),
        json!({"live": true})
    );
    let ready = host.get("/v2/health/ready");
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().expect("json"), json!({"ready": true}));
    let embed: Value = host.get("/v2/models/embed").json().expect("json");
    assert_eq!(embed["versions"], json!(["1"]));
    assert_eq!(embed["platform"], "cascade");
    assert_eq!(
        embed["inputs"],
        json!([{"name": "message", "datatype": "BYTES", "shape": [1]}])
    );
    assert_eq!(
        embed["outputs"],
        json!([{"name": "message", "datatype": "BYTES", "shape": [1]}])
    );
    let minilm: Value = host
        .get("/v2/models/minilm/versions/1")
        .json()
        .expect("json");
    let inputs = minilm["inputs"].as_array().expect("inputs");
    assert!(inputs.iter().any(|i| i["name"] == "input_ids"), "{minilm}");
    assert!(
        inputs
            .iter()
            .all(|i| i["datatype"] == "INT64" && i["shape"] == json!([-1, -1])),
        "{minilm}"
    );
    assert_eq!(minilm["outputs"][0]["name"], "onnx::Shape_422");
    assert_eq!(minilm["outputs"][0]["datatype"], "FP32");
    let model_ready = host.get("/v2/models/minilm/ready");
    assert_eq!(model_ready.status(), 200);
    assert_eq!(
        model_ready.json::<Value>().expect("json"),
        json!({"name": "minilm", "ready": true})
    );
    assert_eq!(oip_error(host.get("/v2/models/nope")).0, 404);
    let (status, message) = oip_error(host.get("/v2/models/minilm/versions/9/ready"));
    assert_eq!(
        (status, message.as_str()),
        (404, "model minilm has no version 9")
    );
}

#[test]
fn a_message_function_answers_oip_exactly_as_v1() {
    let host = host();
    let text = "Cascade serves functions over the Open Inference Protocol";
    let v1 = host
        .invoke("embed", "text/plain", text)
        .bytes()
        .expect("v1 body")
        .to_vec();
    let request = json!({
        "id": "42",
        "inputs": [{"name": "message", "shape": [1], "datatype": "BYTES",
                    "parameters": {"content_type": "text/plain"}, "data": [text]}],
    });
    let (status, header, tail) = split(post(
        &host,
        "/v2/models/embed/infer",
        request.to_string().into_bytes(),
        None,
    ));
    assert_eq!(status, 200, "{header}");
    assert_eq!(header["id"], "42");
    assert_eq!(header["model_name"], "embed");
    assert_eq!(header["model_version"], "1");
    assert!(tail.is_empty());
    let output = &header["outputs"][0];
    assert_eq!(output["parameters"]["content_type"], "application/json");
    assert_eq!(
        output["data"][0].as_str().expect("text").as_bytes(),
        v1.as_slice()
    );

    // Binary both ways, as tritonclient sends by default.
    let json_header = json!({
        "inputs": [{"name": "message", "shape": [1], "datatype": "BYTES",
                    "parameters": {"content_type": "text/plain", "binary_data_size": text.len() + 4}}],
        "outputs": [{"name": "message", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = json_header.clone().into_bytes();
    body.extend_from_slice(&(text.len() as u32).to_le_bytes());
    body.extend_from_slice(text.as_bytes());
    let (status, header, tail) = split(post(
        &host,
        "/v2/models/embed/versions/1/infer",
        body,
        Some(json_header.len()),
    ));
    assert_eq!(status, 200, "{header}");
    assert_eq!(
        header["outputs"][0]["parameters"]["binary_data_size"],
        v1.len() + 4
    );
    assert_eq!(&tail[4..], v1.as_slice());
    assert_eq!(
        u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as usize,
        v1.len()
    );
}

/// `hello world` as MiniLM's tokenizer gives it: [CLS] hello world [SEP].
const TOKENS: [i64; 4] = [101, 7592, 2088, 102];

/// What MiniLM's input `name` holds for `tokens`: the ids, a mask of ones,
/// or token types of zeros.
fn input_values(name: &str, tokens: [i64; 4]) -> Vec<i64> {
    tokens
        .iter()
        .map(|&t| match name {
            n if n.contains("mask") => 1,
            n if n.contains("type") => 0,
            _ => t,
        })
        .collect()
}

/// An infer request for `minilm` with every input the metadata lists.
fn minilm_request(host: &Host, binary: bool) -> (Vec<u8>, Option<usize>) {
    let metadata: Value = host.get("/v2/models/minilm").json().expect("json");
    let mut inputs = Vec::new();
    let mut tail = Vec::new();
    for input in metadata["inputs"].as_array().expect("inputs") {
        let name = input["name"].as_str().expect("name");
        let values = input_values(name, TOKENS);
        let mut entry = json!({"name": name, "shape": [1, 4], "datatype": "INT64"});
        if binary {
            entry["parameters"] = json!({"binary_data_size": 32});
            tail.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        } else {
            entry["data"] = json!(values);
        }
        inputs.push(entry);
    }
    let mut request = json!({"inputs": inputs});
    if binary {
        request["parameters"] = json!({"binary_data_output": true});
    }
    let mut body = request.to_string().into_bytes();
    let length = binary.then_some(body.len());
    body.extend_from_slice(&tail);
    (body, length)
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect()
}

#[test]
fn a_model_only_function_takes_tensors_in_json_and_binary_alike() {
    let host = host();
    let (body, _) = minilm_request(&host, false);
    let (status, json_answer, _) = split(post(&host, "/v2/models/minilm/infer", body, None));
    assert_eq!(status, 200, "{json_answer}");
    let output = &json_answer["outputs"][0];
    assert_eq!(output["shape"], json!([1, 4, 384]));
    assert_eq!(output["datatype"], "FP32");
    let from_json: Vec<f32> = output["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect();
    let (body, length) = minilm_request(&host, true);
    let (status, binary_answer, tail) = split(post(&host, "/v2/models/minilm/infer", body, length));
    assert_eq!(status, 200, "{binary_answer}");
    let from_binary = floats(&tail);
    assert_eq!(from_binary.len(), 4 * 384);
    assert_eq!(
        from_json, from_binary,
        "JSON and binary carry the same bits"
    );

    // Mean-pooled and normalised, the token embeddings are `embed`'s answer.
    let mut pooled = vec![0f32; 384];
    for token in from_binary.chunks_exact(384) {
        pooled
            .iter_mut()
            .zip(token)
            .for_each(|(p, t)| *p += t / 4.0);
    }
    let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt();
    let v1: Value = host
        .invoke("embed", "text/plain", "hello world")
        .json()
        .expect("v1");
    let embedding = v1["embeddings"][0].as_array().expect("embedding");
    for (got, want) in pooled.iter().zip(embedding) {
        let want = want.as_f64().expect("number") as f32;
        assert!((got / norm - want).abs() < 1e-4, "{} vs {want}", got / norm);
    }
    assert!(
        host.metric("cascade_requests_total{function=\"minilm\",revision=\"1\",status=\"200\"}")
            >= 2.0
    );
}

#[test]
fn mistakes_get_the_precise_oip_error() {
    let host = host();
    let ids = |datatype: &str, shape: Value, data: Value| {
        json!({"inputs": [
            {"name": "input_ids", "shape": shape, "datatype": datatype, "data": data},
            {"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]},
            {"name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0]},
        ]})
    };
    let metadata: Value = host.get("/v2/models/minilm").json().expect("json");
    let has_types = metadata["inputs"].as_array().expect("inputs").len() == 3;
    let strip = |mut request: Value| {
        if !has_types {
            request["inputs"].as_array_mut().expect("inputs").pop();
        }
        request.to_string().into_bytes()
    };
    let cases = [
        (
            strip(ids("INT32", json!([1, 4]), json!(TOKENS))),
            400,
            "input \"input_ids\" is INT32; model minilm takes INT64",
        ),
        (
            strip(ids("INT64", json!([4]), json!(TOKENS))),
            400,
            "input \"input_ids\" has shape [4]; model minilm takes [-1, -1]",
        ),
        (
            strip(ids("INT64", json!([1, 5]), json!(TOKENS))),
            400,
            "shape [1, 5] holds 5 INT64 elements (40 bytes), but 32 bytes came",
        ),
        (
            json!({"inputs": []}).to_string().into_bytes(),
            400,
            "model minilm needs input",
        ),
        (b"{\"inputs\": [".to_vec(), 400, "not valid JSON"),
    ];
    for (body, status, expected) in cases {
        let (got, message) = oip_error(post(&host, "/v2/models/minilm/infer", body, None));
        assert_eq!(got, status, "{message}");
        assert!(message.contains(expected), "{message}");
    }
    let (status, message) = oip_error(post(&host, "/v2/models/nope/infer", b"{}".to_vec(), None));
    assert_eq!(
        (status, message.as_str()),
        (404, "function nope is not published")
    );
    let (status, message) = oip_error(post(
        &host,
        "/v2/models/minilm/versions/7/infer",
        b"{}".to_vec(),
        None,
    ));
    assert_eq!(
        (status, message.as_str()),
        (404, "model minilm has no version 7")
    );
    let (body, _) = minilm_request(&host, false);
    let mut request: Value = serde_json::from_slice(&body).expect("json");
    request["parameters"] = json!({"timeout": 1});
    let (status, message) = oip_error(post(
        &host,
        "/v2/models/minilm/infer",
        request.to_string().into_bytes(),
        None,
    ));
    assert_eq!(status, 504, "a 1 µs timeout cannot be met: {message}");
    assert!(message.contains("deadline"), "{message}");
    request["parameters"] = json!({});
    request["outputs"] = json!([{"name": "logits"}]);
    let (status, message) = oip_error(post(
        &host,
        "/v2/models/minilm/infer",
        request.to_string().into_bytes(),
        None,
    ));
    assert_eq!(status, 400);
    assert_eq!(
        message,
        "model minilm has no output \"logits\" (outputs: onnx::Shape_422)"
    );
}

/// An OIP request for MiniLM on `tokens` (every input the metadata lists).
fn tokens_request(inputs: &[String], tokens: [i64; 4]) -> Vec<u8> {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|name| {
            let values = input_values(name, tokens);
            json!({"name": name, "shape": [1, 4], "datatype": "INT64", "data": values})
        })
        .collect();
    json!({ "inputs": inputs }).to_string().into_bytes()
}

#[test]
fn oip_requests_share_batched_model_runs_and_keep_their_own_answers() {
    let host = Host::start();
    host.publish_examples();
    host.serve_minilm("minilm-batched", &["--batch", "8"]);
    let metadata: Value = host.get("/v2/models/minilm-batched").json().expect("json");
    let names: Vec<String> = metadata["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_string())
        .collect();
    // Four different sentences of four tokens: rows of any two can share a run.
    let kinds: [[i64; 4]; 4] = [
        [101, 7592, 2088, 102],
        [101, 2204, 2851, 102],
        [101, 4937, 2015, 102],
        [101, 3899, 2003, 102],
    ];
    let path = "/v2/models/minilm-batched/infer";
    let answer = |tokens| {
        let (status, header, _) = split(post(&host, path, tokens_request(&names, tokens), None));
        assert_eq!(status, 200, "{header}");
        header["outputs"][0]["data"].clone()
    };
    let alone: Vec<Value> = kinds.iter().map(|&k| answer(k)).collect();
    let batches = "cascade_model_batches_total{function=\"minilm-batched\"";
    for round in 0.. {
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..16)
                .map(|i| scope.spawn(move || (i % 4, answer(kinds[i % 4]))))
                .collect();
            for run in runs {
                let (kind, got) = run.join().expect("no panic");
                let (got, want) = (
                    got.as_array().expect("data"),
                    alone[kind].as_array().expect("data"),
                );
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(want)
                    .map(|(g, w)| (g.as_f64().expect("number") - w.as_f64().expect("number")).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 1e-4, "kind {kind}: off by {worst}");
            }
        });
        if host.metric(batches) > 0.0 {
            break;
        }
        assert!(
            round < 20,
            "20 rounds of 16 concurrent OIP requests never shared a model run"
        );
    }
}
