//! How far a shadow's answer agrees with the served one, from 0 to 1:
//! classifications by their top-1 labels, numbers by cosine similarity,
//! anything else by byte equality.

use crate::bindings::Message;
use serde_json::Value;

/// The agreement of `shadow`'s answer with `served`'s.
pub fn agreement(served: &Message, shadow: &Message) -> f64 {
    if served.body == shadow.body {
        return 1.0;
    }
    let (Ok(left), Ok(right)) = (
        serde_json::from_slice::<Value>(&served.body),
        serde_json::from_slice::<Value>(&shadow.body),
    ) else {
        return equal(served, shadow);
    };
    if let (Some(left), Some(right)) = (top_labels(&left), top_labels(&right)) {
        if left.len() != right.len() || left.is_empty() {
            return 0.0;
        }
        let same = left.iter().zip(&right).filter(|(a, b)| a == b).count();
        return same as f64 / left.len() as f64;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    numbers(&left, &mut a);
    numbers(&right, &mut b);
    if !a.is_empty() && a.len() == b.len() {
        return cosine(&a, &b);
    }
    equal(served, shadow)
}

fn equal(served: &Message, shadow: &Message) -> f64 {
    if served.body == shadow.body { 1.0 } else { 0.0 }
}

/// The top-1 label of each row of a classification answer,
/// `{"predictions": [[{"label": …}, …], …]}` (what `classify` answers).
pub fn top_labels(answer: &Value) -> Option<Vec<String>> {
    answer
        .get("predictions")?
        .as_array()?
        .iter()
        .map(|row| {
            let first = row.as_array()?.first()?.get("label")?;
            Some(match first {
                Value::String(label) => label.clone(),
                other => other.to_string(),
            })
        })
        .collect()
}

/// Every number in `value`, in document order.
pub(super) fn numbers(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(n) => out.extend(n.as_f64()),
        Value::Array(items) => items.iter().for_each(|v| numbers(v, out)),
        Value::Object(fields) => fields.values().for_each(|v| numbers(v, out)),
        _ => {}
    }
}

/// Cosine similarity, negative values counted as no agreement; two zero
/// vectors agree.
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (
        a.iter().map(|x| x * x).sum::<f64>().sqrt(),
        b.iter().map(|x| x * x).sum::<f64>().sqrt(),
    );
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na * nb)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Message {
        Message {
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn classifications_agree_on_the_top_label() {
        let upright =
            json(r#"{"predictions":[[{"label":"0","score":0.9},{"label":"180","score":0.1}]]}"#);
        let same =
            json(r#"{"predictions":[[{"label":"0","score":0.7},{"label":"180","score":0.3}]]}"#);
        let swapped =
            json(r#"{"predictions":[[{"label":"180","score":0.9},{"label":"0","score":0.1}]]}"#);
        assert_eq!(agreement(&upright, &same), 1.0);
        assert_eq!(agreement(&upright, &swapped), 0.0);
        let two = json(r#"{"predictions":[[{"label":"a"}],[{"label":"b"}]]}"#);
        let half = json(r#"{"predictions":[[{"label":"a"}],[{"label":"c"}]]}"#);
        assert_eq!(agreement(&two, &half), 0.5);
    }

    #[test]
    fn embeddings_agree_by_cosine() {
        let a = json(r#"{"embedding":[[1.0,0.0,0.0]]}"#);
        let b = json(r#"{"embedding":[[2.0,0.0,0.0]]}"#);
        let c = json(r#"{"embedding":[[0.0,1.0,0.0]]}"#);
        let d = json(r#"{"embedding":[[-1.0,0.0,0.0]]}"#);
        assert!((agreement(&a, &b) - 1.0).abs() < 1e-12);
        assert_eq!(agreement(&a, &c), 0.0);
        assert_eq!(agreement(&a, &d), 0.0);
        let e = json(r#"{"embedding":[[1.0,1.0,0.0]]}"#);
        assert!((agreement(&a, &e) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
    }

    #[test]
    fn anything_else_by_bytes() {
        let text = |s: &str| Message {
            content_type: "text/plain".into(),
            body: s.as_bytes().to_vec(),
        };
        assert_eq!(agreement(&text("hello"), &text("hello")), 1.0);
        assert_eq!(agreement(&text("hello"), &text("hullo")), 0.0);
        // Different lengths of numbers are not comparable by cosine.
        assert_eq!(agreement(&json("[1,2]"), &json("[1,2,3]")), 0.0);
    }
}
