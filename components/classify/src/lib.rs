//! `classify`: class scores in, top-k labels out.
//!
//! Takes a batch × classes tensor of logits or probabilities, optionally
//! applies softmax, and answers `application/json`
//! `{"predictions": [[{"label": "…", "index": i, "score": s}, …], …]}`,
//! one list per batch row, best first.
//!
//! Config: `scores` (tensor name; default: the last rank-2 fp32 tensor, i.e.
//! the model's output), `softmax` (default false), `top_k` (default 1),
//! `labels` (comma-separated labels) or `labels_file` (one label per line,
//! default `/model/labels.txt` when present); without labels the index is
//! the label.

use cascade::inference::types::{Error, Message, Tensor, TensorType};
use cascade_guest::{Config, Failure, PerInstance, le};
use serde::Serialize;

wit_bindgen::generate!({ world: "postprocessor", path: "../../wit", generate_all });
cascade_guest::component_glue!();

const KEYS: &[&str] = &["scores", "softmax", "top_k", "labels", "labels_file"];
const DEFAULT_LABELS_FILE: &str = "/model/labels.txt";

#[derive(Serialize)]
struct Prediction {
    label: String,
    index: usize,
    score: f32,
}

fn labels(config: &Config) -> Result<Option<Vec<String>>, Failure> {
    if let Some(inline) = config.get("labels") {
        return Ok(Some(
            inline.split(',').map(|l| l.trim().to_string()).collect(),
        ));
    }
    let path = config.get("labels_file");
    let text = match (
        std::fs::read_to_string(path.unwrap_or(DEFAULT_LABELS_FILE)),
        path,
    ) {
        (Ok(text), _) => text,
        (Err(_), None) => return Ok(None),
        (Err(e), Some(path)) => {
            return Err(Failure::internal(format!(
                "reading labels file {path}: {e}"
            )));
        }
    };
    Ok(Some(
        text.lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect(),
    ))
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = (*v - max).exp());
    let sum: f32 = row.iter().sum();
    row.iter_mut().for_each(|v| *v /= sum);
}

fn top_k(row: &[f32], k: usize, labels: Option<&[String]>) -> Vec<Prediction> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|index| Prediction {
            label: labels
                .and_then(|l| l.get(index).cloned())
                .unwrap_or_else(|| index.to_string()),
            index,
            score: row[index],
        })
        .collect()
}

/// What the configuration and the labels file say; read once per instance
/// (they cannot change while it lives), not on every call.
struct Settings {
    scores: Option<String>,
    labels: Option<Vec<String>>,
    softmax: bool,
    top_k: usize,
}

static SETTINGS: PerInstance<Settings> = PerInstance::new();

fn prepare() -> Result<Settings, Failure> {
    let config = load_config(KEYS)?;
    Ok(Settings {
        scores: config.get("scores").map(str::to_string),
        labels: labels(&config)?,
        softmax: config.flag("softmax", false)?,
        top_k: config.parse("top_k", 1)?,
    })
}

fn classify(tensors: Vec<Tensor>) -> Result<Message, Failure> {
    let settings = SETTINGS.get(prepare)?;
    let scores = match &settings.scores {
        Some(name) => tensors
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| Failure::input(format!("no tensor named `{name}`")))?,
        None => tensors
            .iter()
            .rev()
            .find(|t| t.dimensions.len() == 2 && t.ty == TensorType::Fp32)
            .ok_or_else(|| Failure::input("no rank-2 fp32 tensor (batch × classes) to classify"))?,
    };
    if scores.ty != TensorType::Fp32 || scores.dimensions.len() != 2 || scores.dimensions[1] == 0 {
        return Err(Failure::input(format!(
            "tensor `{}` must be fp32 batch × classes, got {:?} {:?}",
            scores.name, scores.ty, scores.dimensions
        )));
    }
    let classes = scores.dimensions[1] as usize;
    let mut values = le::f32s(&scores.name, &scores.data)?;
    if values.len() != scores.dimensions[0] as usize * classes {
        return Err(Failure::input(format!(
            "tensor `{}` holds {} values but its shape {:?} needs {}",
            scores.name,
            values.len(),
            scores.dimensions,
            scores.dimensions[0] as usize * classes
        )));
    }
    let labels = settings.labels.as_deref();
    if let Some(labels) = labels
        && labels.len() != classes
    {
        return Err(Failure::internal(format!(
            "{} labels for {classes} classes in tensor `{}`",
            labels.len(),
            scores.name
        )));
    }
    let predictions: Vec<Vec<Prediction>> = values
        .chunks_exact_mut(classes)
        .map(|row| {
            if settings.softmax {
                softmax(row);
            }
            top_k(row, settings.top_k, labels)
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "predictions": predictions }))
        .map_err(|e| Failure::internal(format!("encoding JSON: {e}")))?;
    Ok(Message {
        content_type: "application/json".into(),
        body,
    })
}

struct Classify;

impl exports::cascade::inference::postprocess::Guest for Classify {
    fn postprocess(tensors: Vec<Tensor>) -> Result<Message, Error> {
        classify(tensors).map_err(Error::from)
    }
}

export!(Classify);
