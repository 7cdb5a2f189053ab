//! Golden tests of the guest components: the real `.wasm` files run in the
//! host's wasmtime sandbox and are compared with reference values (the
//! Python `tokenizers` library, hand-computed numbers, a committed PNG).

use cascade_host::bindings::{Message, Tensor, TensorType};
use cascade_host::stage::StageError;
use cascade_tests::{fixture, instance};
use serde_json::Value;

fn text(content_type: &str, body: &[u8]) -> Message {
    Message {
        content_type: content_type.into(),
        body: body.to_vec(),
    }
}

fn i64s(tensor: &Tensor) -> Vec<i64> {
    assert_eq!(tensor.ty, TensorType::I64, "tensor {}", tensor.name);
    tensor
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn f32s(tensor: &Tensor) -> Vec<f32> {
    assert_eq!(tensor.ty, TensorType::Fp32, "tensor {}", tensor.name);
    tensor
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

fn tensor_f32(name: &str, dimensions: &[u32], values: &[f32]) -> Tensor {
    Tensor {
        name: name.into(),
        dimensions: dimensions.to_vec(),
        ty: TensorType::Fp32,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn tensor_i64(name: &str, dimensions: &[u32], values: &[i64]) -> Tensor {
    Tensor {
        name: name.into(),
        dimensions: dimensions.to_vec(),
        ty: TensorType::I64,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn json(message: &Message) -> Value {
    assert_eq!(message.content_type, "application/json");
    serde_json::from_slice(&message.body).expect("the component answers JSON")
}

fn invalid_input(result: Result<impl std::fmt::Debug, StageError>) -> String {
    match result {
        Err(StageError::InvalidInput(message)) => message,
        other => panic!("expected an invalid-input error, got {other:?}"),
    }
}

fn column(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_i64().expect("integer"))
        .collect()
}

fn reference_cases() -> Vec<Value> {
    let text =
        std::fs::read_to_string(fixture("tokenizer_reference.json")).expect("fixture exists");
    let reference: Value = serde_json::from_str(&text).expect("fixture is JSON");
    reference["cases"].as_array().expect("cases").clone()
}

#[test]
fn bert_tokenizer_matches_python_tokenizers_one_text_at_a_time() {
    for case in reference_cases() {
        let max_length = case["max_length"].to_string();
        let mut tokenizer = instance("bert-tokenizer", &[("max_length", &max_length)]);
        let singles = case["single"].as_array().expect("single");
        assert!(singles.len() >= 10);
        for single in singles {
            let sentence = single["text"].as_str().expect("text");
            // An empty body is refused, so the empty sentence goes as JSON.
            let input = if sentence.is_empty() {
                text("application/json", br#"{"inputs": [""]}"#)
            } else {
                text("text/plain", sentence.as_bytes())
            };
            let tensors = tokenizer.preprocess(input).expect("tokenizes");
            let expected_ids = column(&single["input_ids"]);
            assert_eq!(tensors[0].name, "input_ids");
            assert_eq!(
                tensors[0].dimensions,
                vec![1, expected_ids.len() as u32],
                "{sentence:?}"
            );
            assert_eq!(
                i64s(&tensors[0]),
                expected_ids,
                "ids of {sentence:?} at max_length {max_length}"
            );
            assert_eq!(tensors[1].name, "attention_mask");
            assert_eq!(
                i64s(&tensors[1]),
                column(&single["attention_mask"]),
                "mask of {sentence:?}"
            );
        }
    }
}

#[test]
fn bert_tokenizer_pads_to_a_multiple_when_asked() {
    let case = &reference_cases()[0];
    let max_length = case["max_length"].as_u64().expect("max_length");
    let mut tokenizer = instance(
        "bert-tokenizer",
        &[
            ("max_length", &max_length.to_string()),
            ("pad_to_multiple_of", "8"),
        ],
    );
    for single in case["single"].as_array().expect("single") {
        let sentence = single["text"].as_str().expect("text");
        if sentence.is_empty() {
            continue;
        }
        let tensors = tokenizer
            .preprocess(text("text/plain", sentence.as_bytes()))
            .expect("tokenizes");
        let expected = column(&single["input_ids"]);
        let padded = expected.len().div_ceil(8) * 8;
        assert_eq!(
            tensors[0].dimensions,
            vec![1, padded as u32],
            "{sentence:?}"
        );
        let (ids, mask) = (i64s(&tensors[0]), i64s(&tensors[1]));
        assert_eq!(&ids[..expected.len()], &expected[..], "{sentence:?}");
        assert!(ids[expected.len()..].iter().all(|&id| id == 0), "{ids:?}");
        assert_eq!(mask.iter().sum::<i64>(), expected.len() as i64, "{mask:?}");
    }
    let mut bad = instance(
        "bert-tokenizer",
        &[("max_length", "128"), ("pad_to_multiple_of", "48")],
    );
    match bad.preprocess(text("text/plain", b"a text")) {
        Err(StageError::Internal(message)) => {
            assert!(
                message.contains("`pad_to_multiple_of` (48) must divide"),
                "{message}"
            )
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn bert_tokenizer_pads_a_json_batch_to_the_longest_input() {
    for case in reference_cases() {
        let max_length = case["max_length"].to_string();
        let mut tokenizer = instance("bert-tokenizer", &[("max_length", &max_length)]);
        let batch = &case["batch"];
        let body = serde_json::json!({ "inputs": batch["texts"] }).to_string();
        let tensors = tokenizer
            .preprocess(text("application/json", body.as_bytes()))
            .expect("tokenizes");
        let rows = batch["input_ids"].as_array().expect("rows");
        let seq = rows[0].as_array().expect("row").len() as u32;
        assert_eq!(tensors[0].dimensions, vec![rows.len() as u32, seq]);
        let flat = |key: &str| -> Vec<i64> {
            batch[key]
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(column)
                .collect()
        };
        assert_eq!(
            i64s(&tensors[0]),
            flat("input_ids"),
            "batch ids at max_length {max_length}"
        );
        assert_eq!(
            i64s(&tensors[1]),
            flat("attention_mask"),
            "batch mask at max_length {max_length}"
        );
    }
}

#[test]
fn bert_tokenizer_emits_token_type_ids_only_when_asked() {
    let mut plain = instance("bert-tokenizer", &[]);
    let tensors = plain
        .preprocess(text("text/plain", b"hello"))
        .expect("tokenizes");
    assert_eq!(
        tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["input_ids", "attention_mask"]
    );
    let mut typed = instance("bert-tokenizer", &[("token_type_ids", "true")]);
    let tensors = typed
        .preprocess(text("text/plain", b"hello"))
        .expect("tokenizes");
    assert_eq!(tensors[2].name, "token_type_ids");
    assert_eq!(i64s(&tensors[2]), vec![0, 0, 0]);
}

#[test]
fn bert_tokenizer_rejects_bad_input_precisely() {
    let mut tokenizer = instance("bert-tokenizer", &[("max_batch", "2")]);
    let cases: &[(&str, &[u8], &str)] = &[
        ("text/plain", b"", "empty body"),
        ("text/plain", b"caf\xc3", "not valid UTF-8"),
        ("application/json", b"{\"inputs\": [1, 2]", "invalid JSON"),
        ("application/json", b"{\"text\": \"hi\"}", "invalid JSON"),
        (
            "application/json",
            b"{\"inputs\": []}",
            "`inputs` is an empty list",
        ),
        (
            "application/json",
            b"{\"inputs\": [\"a\", \"b\", \"c\"]}",
            "3 inputs exceed the batch limit of 2",
        ),
    ];
    for (content_type, body, expected) in cases {
        let message = invalid_input(tokenizer.preprocess(text(content_type, body)));
        assert!(
            message.contains(expected),
            "{body:?}: {message:?} lacks {expected:?}"
        );
    }
    // The instance survives every rejection.
    assert!(
        tokenizer
            .preprocess(text("text/plain", b"still fine"))
            .is_ok()
    );
}

#[test]
fn bert_tokenizer_reports_configuration_mistakes_as_internal() {
    let mut typo = instance("bert-tokenizer", &[("max_lenght", "12")]);
    match typo.preprocess(text("text/plain", b"hi")) {
        Err(StageError::Internal(message)) => assert!(
            message.contains("unknown config key `max_lenght`"),
            "{message}"
        ),
        other => panic!("expected an internal error, got {other:?}"),
    }
    let mut missing = instance("bert-tokenizer", &[("tokenizer", "/model/nope.json")]);
    match missing.preprocess(text("text/plain", b"hi")) {
        Err(StageError::Internal(message)) => {
            assert!(message.contains("/model/nope.json"), "{message}")
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
}

#[test]
fn mean_pool_averages_masked_tokens_by_hand() {
    // Row 0: tokens (1,2) (3,4) masked-out (100,100) → (2,3).
    // Row 1: token (5,6), then two masked-out tokens → (5,6).
    let embeddings = tensor_f32(
        "tokens",
        &[2, 3, 2],
        &[1., 2., 3., 4., 100., 100., 5., 6., 7., 7., 9., 9.],
    );
    let mask = tensor_i64("attention_mask", &[2, 3], &[1, 1, 0, 1, 0, 0]);
    let mut raw = instance("mean-pool", &[]);
    let out = json(
        &raw.postprocess(vec![mask.clone(), embeddings.clone()])
            .expect("pools"),
    );
    assert_eq!(
        out,
        serde_json::json!({ "embeddings": [[2.0, 3.0], [5.0, 6.0]] })
    );

    let mut normalized = instance("mean-pool", &[("normalize", "true")]);
    let out = json(
        &normalized
            .postprocess(vec![mask, embeddings])
            .expect("pools"),
    );
    let rows = out["embeddings"].as_array().expect("rows");
    let expect = [
        [2.0 / 13f64.sqrt(), 3.0 / 13f64.sqrt()],
        [5.0 / 61f64.sqrt(), 6.0 / 61f64.sqrt()],
    ];
    for (row, want) in rows.iter().zip(expect) {
        for (got, want) in row.as_array().expect("row").iter().zip(want) {
            assert!(
                (got.as_f64().expect("number") - want).abs() < 1e-6,
                "{got} vs {want}"
            );
        }
    }
}

#[test]
fn mean_pool_rejects_wrong_shapes_and_types() {
    let mut pool = instance("mean-pool", &[]);
    let embeddings = tensor_f32("tokens", &[1, 2, 2], &[1., 2., 3., 4.]);
    let cases = [
        (
            vec![tensor_i64("attention_mask", &[1, 2], &[1, 1])],
            "no rank-3 fp32 tensor",
        ),
        (vec![embeddings.clone()], "no tensor named `attention_mask`"),
        (
            vec![
                tensor_i64("attention_mask", &[1, 3], &[1, 1, 1]),
                embeddings.clone(),
            ],
            "mask `attention_mask` has shape [1, 3]",
        ),
        (
            vec![
                tensor_i64("attention_mask", &[1, 2], &[1, 1]),
                tensor_f32("tokens", &[1, 2, 2], &[1., 2., 3.]),
            ],
            "holds 3 values but its shape needs 4",
        ),
        (
            vec![
                Tensor {
                    ty: TensorType::U8,
                    data: vec![1, 1],
                    ..tensor_i64("attention_mask", &[1, 2], &[])
                },
                embeddings.clone(),
            ],
            "the mask must be i64, i32 or fp32",
        ),
    ];
    for (tensors, expected) in cases {
        let message = invalid_input(pool.postprocess(tensors));
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
}

#[test]
fn classify_softmax_top_k_with_labels_by_hand() {
    let logits = tensor_f32("logits", &[2, 3], &[1.0, 2.0, 3.0, 0.5, 0.5, -1.0]);
    let mut classify = instance(
        "classify",
        &[
            ("softmax", "true"),
            ("top_k", "2"),
            ("labels", "cat, dog, bird"),
        ],
    );
    let out = json(&classify.postprocess(vec![logits]).expect("classifies"));
    let rows = out["predictions"].as_array().expect("rows");
    // softmax(1,2,3) = (0.0900306, 0.2447285, 0.6652410)
    assert_eq!(rows[0][0]["label"], "bird");
    assert_eq!(rows[0][1]["label"], "dog");
    assert!((rows[0][0]["score"].as_f64().expect("score") - 0.665_241).abs() < 1e-5);
    assert!((rows[0][1]["score"].as_f64().expect("score") - 0.244_728_5).abs() < 1e-5);
    // softmax(0.5,0.5,-1): ties keep the lower index first.
    assert_eq!(rows[1][0]["index"], 0);
    assert_eq!(rows[1][1]["index"], 1);
    assert!((rows[1][0]["score"].as_f64().expect("score") - 0.449_816_4).abs() < 1e-5);
    assert_eq!(rows[1].as_array().expect("row").len(), 2);
}

#[test]
fn classify_passes_probabilities_through_and_reads_labels_from_model_files() {
    // Without `labels`, `labels_file` names a file under /model; a missing file is an internal error.
    let probabilities = tensor_f32("probs", &[1, 2], &[0.25, 0.75]);
    let mut classify = instance("classify", &[("labels", "0,180")]);
    let out = json(
        &classify
            .postprocess(vec![probabilities.clone()])
            .expect("classifies"),
    );
    assert_eq!(
        out,
        serde_json::json!({ "predictions": [[{ "label": "180", "index": 1, "score": 0.75 }]] })
    );
    let mut missing = instance("classify", &[("labels_file", "/model/labels-missing.txt")]);
    match missing.postprocess(vec![probabilities]) {
        Err(StageError::Internal(message)) => {
            assert!(message.contains("labels-missing.txt"), "{message}")
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
}

#[test]
fn classify_rejects_wrong_shapes_and_label_counts() {
    let mut classify = instance("classify", &[]);
    let message = invalid_input(classify.postprocess(vec![tensor_f32("x", &[2], &[1.0, 2.0])]));
    assert!(message.contains("no rank-2 fp32 tensor"), "{message}");
    let message =
        invalid_input(classify.postprocess(vec![tensor_f32("x", &[2, 2], &[1.0, 2.0, 3.0])]));
    assert!(message.contains("holds 3 values"), "{message}");
    let mut labelled = instance("classify", &[("labels", "a,b,c")]);
    match labelled.postprocess(vec![tensor_f32("x", &[1, 2], &[1.0, 2.0])]) {
        Err(StageError::Internal(message)) => {
            assert!(message.contains("3 labels for 2 classes"), "{message}")
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
}

fn png() -> Message {
    let body = std::fs::read(fixture("two_colours.png")).expect("fixture exists");
    Message {
        content_type: "image/png".into(),
        body,
    }
}

#[test]
fn image_preprocess_pads_like_pp_ocr() {
    // 8×4 image, left half red, right half blue; PP-OCR recipe at height 4:
    // no resize, BGR order, (v/255 - 0.5)/0.5, zero padding from column 8.
    let config = [
        ("resize", "pad"),
        ("height", "4"),
        ("width", "16"),
        ("mean", "0.5,0.5,0.5"),
        ("std", "0.5,0.5,0.5"),
        ("channel_order", "bgr"),
        ("tensor", "x"),
    ];
    let mut pre = instance("image-preprocess", &config);
    let tensors = pre.preprocess(png()).expect("preprocesses");
    assert_eq!(tensors[0].name, "x");
    assert_eq!(tensors[0].dimensions, vec![1, 3, 4, 16]);
    let values = f32s(&tensors[0]);
    let at = |c: usize, y: usize, x: usize| values[c * 64 + y * 16 + x];
    for y in 0..4 {
        for x in 0..16 {
            let (blue, green, red) = match x {
                0..4 => (-1.0, -1.0, 1.0),
                4..8 => (1.0, -1.0, -1.0),
                _ => (0.0, 0.0, 0.0),
            };
            assert_eq!(
                (at(0, y, x), at(1, y, x), at(2, y, x)),
                (blue, green, red),
                "pixel {x},{y}"
            );
        }
    }
}

#[test]
fn image_preprocess_center_crops_like_imagenet() {
    // Shorter side 4 already: crop the centre 4×4 (columns 2..6): two red, two blue columns.
    let mut pre = instance("image-preprocess", &[("width", "4"), ("height", "4")]);
    let values = f32s(&pre.preprocess(png()).expect("preprocesses")[0]);
    assert_eq!(values.len(), 3 * 16);
    let red_plane = &values[0..16];
    let blue_plane = &values[32..48];
    for y in 0..4 {
        assert_eq!(&red_plane[y * 4..y * 4 + 4], &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&blue_plane[y * 4..y * 4 + 4], &[0.0, 0.0, 1.0, 1.0]);
    }
}

#[test]
fn image_preprocess_resizes_with_the_chosen_filter() {
    // 8×4 (left half red, right half blue) stretched to 4×2.
    let stretch = |filter| {
        let config = [
            ("resize", "stretch"),
            ("width", "4"),
            ("height", "2"),
            ("filter", filter),
        ];
        let mut pre = instance("image-preprocess", &config);
        f32s(&pre.preprocess(png()).expect("preprocesses")[0])
    };
    let nearest = stretch("nearest");
    let (red, blue) = (&nearest[0..8], &nearest[16..24]);
    for y in 0..2 {
        assert_eq!(
            &red[y * 4..y * 4 + 4],
            &[1.0, 1.0, 0.0, 0.0],
            "nearest, row {y}"
        );
        assert_eq!(
            &blue[y * 4..y * 4 + 4],
            &[0.0, 0.0, 1.0, 1.0],
            "nearest, row {y}"
        );
    }
    // Triangle blends across the edge: pure at the borders, red + blue = 1 throughout.
    let triangle = stretch("triangle");
    let (red, blue) = (&triangle[0..8], &triangle[16..24]);
    for i in 0..8 {
        assert!(
            (red[i] + blue[i] - 1.0).abs() <= 2.0 / 255.0,
            "pixel {i}: {} + {}",
            red[i],
            blue[i]
        );
    }
    assert_eq!((red[0], blue[3]), (1.0, 1.0));
    assert!(red[1] > red[2] && red[2] > 0.0 && red[2] < 1.0, "{red:?}");
}

#[test]
fn image_preprocess_rejects_undecodable_images() {
    let mut pre = instance("image-preprocess", &[]);
    let cases: &[(&[u8], &str)] = &[
        (b"", "empty body"),
        (b"definitely not an image", "not a PNG or JPEG"),
        (&png().body[..40], "undecodable image"),
    ];
    for (body, expected) in cases {
        let message = invalid_input(pre.preprocess(Message {
            content_type: "image/png".into(),
            body: body.to_vec(),
        }));
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    let mut limited = instance("image-preprocess", &[("max_pixels", "16")]);
    let message = invalid_input(limited.preprocess(png()));
    assert!(
        message.contains("8×4 pixels exceeds the limit of 16"),
        "{message}"
    );
}
