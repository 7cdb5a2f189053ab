//! Inference requests and responses of the OIP REST protocol: a JSON
//! document, optionally followed by raw tensors (the binary tensor data
//! extension: `Inference-Header-Content-Length` says where the JSON ends,
//! `binary_data_size` how many bytes each binary tensor takes, in order).
//! Tensors are decoded into their binary form (little-endian, row major;
//! `BYTES` elements as a 4-byte length and the bytes) whichever way they came.

use super::datatypes::{KNOWN, element_size};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Why a request cannot be read: the caller's fault (400), said precisely.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(message: String) -> BadRequest {
    BadRequest(message)
}

/// An inference request's JSON.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (`binary_data_output`, `timeout`, …).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The input tensors.
    pub inputs: Vec<RequestInput>,
    /// The outputs wanted (default: all).
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One input as the JSON describes it.
#[derive(Debug, Deserialize)]
pub struct RequestInput {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its datatype (`FP32`, `BYTES`, …).
    pub datatype: String,
    /// Its parameters (`binary_data_size`, `content_type`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Its elements, when sent as JSON (flat or nested, row major).
    #[serde(default)]
    pub data: Option<Value>,
}

/// One output a request asks for.
#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    /// Its name.
    pub name: String,
    /// Its parameters (`binary_data`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An input tensor in binary form, its size checked against its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its elements, little-endian (`BYTES`: length-prefixed).
    pub data: Vec<u8>,
    /// Its parameters.
    pub parameters: Map<String, Value>,
}

/// Reads a request body: JSON alone, or JSON of `header_length` bytes
/// followed by binary tensors.
pub fn decode(
    body: &[u8],
    header_length: Option<usize>,
) -> Result<(InferRequest, Vec<Input>), BadRequest> {
    let (json, mut binary) = match header_length {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            )));
        }
        None => (body, &[][..]),
    };
    let request: InferRequest = serde_json::from_slice(json)
        .map_err(|e| bad(format!("the inference request is not valid JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        inputs.push(decode_input(input, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs, but no input claims them \
             (`binary_data_size`)",
            binary.len()
        )));
    }
    Ok((request, inputs))
}

fn decode_input(input: &RequestInput, binary: &mut &[u8]) -> Result<Input, BadRequest> {
    let name = &input.name;
    let data = match input.parameters.get("binary_data_size") {
        Some(size) => {
            let size = size
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .ok_or_else(|| bad(format!("input {name:?}: `binary_data_size` is not a size")))?;
            if size > binary.len() {
                return Err(bad(format!(
                    "input {name:?}: `binary_data_size` is {size}, but only {} bytes of binary data are left",
                    binary.len()
                )));
            }
            let (head, rest) = binary.split_at(size);
            *binary = rest;
            head.to_vec()
        }
        None => match &input.data {
            Some(data) => {
                check_datatype(name, &input.datatype)?;
                json_to_binary(name, &input.datatype, data)?
            }
            None => {
                return Err(bad(format!(
                    "input {name:?} has neither `data` nor a `binary_data_size` parameter"
                )));
            }
        },
    };
    input_from_binary(
        name,
        &input.datatype,
        &input.shape,
        input.parameters.clone(),
        data,
    )
}

fn check_datatype(name: &str, datatype: &str) -> Result<(), BadRequest> {
    if KNOWN.contains(&datatype) {
        return Ok(());
    }
    Err(bad(format!(
        "input {name:?}: unknown datatype {datatype:?} (expected one of {})",
        KNOWN.join(", ")
    )))
}

/// An input whose elements came in binary form (`data`), its datatype,
/// shape and size checked.
pub fn input_from_binary(
    name: &str,
    datatype: &str,
    shape: &[i64],
    parameters: Map<String, Value>,
    data: Vec<u8>,
) -> Result<Input, BadRequest> {
    check_datatype(name, datatype)?;
    let shape = shape
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| {
            bad(format!(
                "input {name:?}: shape {shape:?} has a negative dimension"
            ))
        })?;
    let elements = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("input {name:?}: shape {shape:?} is too large")))?;
    check_size(name, datatype, &shape, elements, &data)?;
    Ok(Input {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
        data,
        parameters,
    })
}

/// Checks that `data` holds exactly `elements` elements of `datatype`.
fn check_size(
    name: &str,
    datatype: &str,
    shape: &[u64],
    elements: u64,
    data: &[u8],
) -> Result<(), BadRequest> {
    match element_size(datatype) {
        Some(size) => {
            let expected = elements.checked_mul(size as u64);
            if expected != Some(data.len() as u64) {
                return Err(bad(format!(
                    "input {name:?}: shape {shape:?} holds {elements} {datatype} elements \
                     ({} bytes), but {} bytes came",
                    expected.map_or("too many".to_string(), |e| e.to_string()),
                    data.len()
                )));
            }
        }
        None => {
            let counted = bytes_elements(data).map(|items| items.len() as u64);
            if counted != Some(elements) {
                return Err(bad(format!(
                    "input {name:?}: shape {shape:?} holds {elements} BYTES elements, but the \
                     data holds {}",
                    counted.map_or("a malformed length".to_string(), |c| c.to_string())
                )));
            }
        }
    }
    Ok(())
}

/// The elements of `BYTES` data (each a 4-byte little-endian length and
/// the bytes); `None` when a length runs past the end.
pub fn bytes_elements(mut data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    while !data.is_empty() {
        let length: [u8; 4] = data.get(..4)?.try_into().ok()?;
        let length = u32::from_le_bytes(length) as usize;
        let item = data.get(4..4 + length)?;
        items.push(item);
        data = &data[4 + length..];
    }
    Some(items)
}

/// Appends one `BYTES` element.
pub fn push_bytes_element(data: &mut Vec<u8>, item: &[u8]) {
    data.extend_from_slice(&(item.len() as u32).to_le_bytes());
    data.extend_from_slice(item);
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

/// JSON elements (flat or nested) in binary form.
pub fn json_to_binary(name: &str, datatype: &str, data: &Value) -> Result<Vec<u8>, BadRequest> {
    let mut values = Vec::new();
    flatten(data, &mut values);
    let mut out = Vec::with_capacity(values.len() * element_size(datatype).unwrap_or(8));
    for value in values {
        push_json_element(&mut out, datatype, value).ok_or_else(|| {
            bad(format!(
                "input {name:?}: {value} is not a {datatype} element{}",
                if matches!(datatype, "FP16" | "BF16") {
                    " (JSON has no 16-bit floats: send them as binary data)"
                } else {
                    ""
                }
            ))
        })?;
    }
    Ok(out)
}

fn push_json_element(out: &mut Vec<u8>, datatype: &str, value: &Value) -> Option<()> {
    macro_rules! int {
        ($ty:ty) => {{
            let v: $ty = match value {
                Value::Number(n) => n
                    .as_i64()
                    .and_then(|i| <$ty>::try_from(i).ok())
                    .or_else(|| n.as_u64().and_then(|u| <$ty>::try_from(u).ok()))?,
                _ => return None,
            };
            out.extend_from_slice(&v.to_le_bytes());
        }};
    }
    match datatype {
        "BOOL" => out.push(u8::from(value.as_bool()?)),
        "UINT8" => int!(u8),
        "UINT16" => int!(u16),
        "UINT32" => int!(u32),
        "UINT64" => int!(u64),
        "INT8" => int!(i8),
        "INT16" => int!(i16),
        "INT32" => int!(i32),
        "INT64" => int!(i64),
        "FP32" => out.extend_from_slice(&(value.as_f64()? as f32).to_le_bytes()),
        "FP64" => out.extend_from_slice(&value.as_f64()?.to_le_bytes()),
        "BYTES" => push_bytes_element(out, value.as_str()?.as_bytes()),
        _ => return None,
    }
    Some(())
}

/// An output's elements written straight into the response's JSON, with no
/// `Value` per element (MiniLM's token embeddings are 12,288 of them); FP32
/// in the shortest form that reads back as the same `f32`.
struct JsonElements<'a> {
    datatype: &'a str,
    data: &'a [u8],
}

impl<'a> JsonElements<'a> {
    /// The elements, when JSON holds them exactly: not 16-bit floats, not
    /// NaN or infinities (JSON has no such numbers), `BYTES` that are UTF-8.
    fn exact(datatype: &'a str, data: &'a [u8]) -> Option<JsonElements<'a>> {
        let finite = |n: usize, read: fn(&[u8]) -> bool| data.chunks_exact(n).all(read);
        let fits = match datatype {
            "BOOL" | "UINT8" | "INT8" | "UINT16" | "INT16" | "UINT32" | "INT32" | "UINT64"
            | "INT64" => true,
            "FP32" => finite(4, |c| f32::from_le_bytes(le(c)).is_finite()),
            "FP64" => finite(8, |c| f64::from_le_bytes(le(c)).is_finite()),
            "BYTES" => bytes_elements(data)
                .is_some_and(|items| items.iter().all(|i| std::str::from_utf8(i).is_ok())),
            _ => false,
        };
        fits.then_some(JsonElements { datatype, data })
    }
}

/// The first `N` bytes of a chunk `chunks_exact(N)` gave.
fn le<const N: usize>(chunk: &[u8]) -> [u8; N] {
    chunk.try_into().unwrap_or([0; N])
}

impl serde::Serialize for JsonElements<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(None)?;
        macro_rules! each {
            ($ty:ty, $n:expr) => {
                for c in self.data.chunks_exact($n) {
                    seq.serialize_element(&<$ty>::from_le_bytes(le(c)))?;
                }
            };
        }
        match self.datatype {
            "BOOL" => {
                for &b in self.data {
                    seq.serialize_element(&(b != 0))?;
                }
            }
            "UINT8" => each!(u8, 1),
            "INT8" => each!(i8, 1),
            "UINT16" => each!(u16, 2),
            "INT16" => each!(i16, 2),
            "UINT32" => each!(u32, 4),
            "INT32" => each!(i32, 4),
            "UINT64" => each!(u64, 8),
            "INT64" => each!(i64, 8),
            "FP32" => each!(f32, 4),
            "FP64" => each!(f64, 8),
            _ => {
                for item in bytes_elements(self.data).unwrap_or_default() {
                    seq.serialize_element(std::str::from_utf8(item).unwrap_or_default())?;
                }
            }
        }
        seq.end()
    }
}

/// One output tensor of a response.
#[derive(Debug, Clone)]
pub struct Output {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its elements in binary form.
    pub data: Vec<u8>,
    /// Its parameters (`content_type` of a message).
    pub parameters: Map<String, Value>,
    /// Whether the caller asked for it as binary data.
    pub binary: bool,
}

/// An encoded response: the body, and where its JSON ends when binary
/// data follows (the `Inference-Header-Content-Length` to send).
pub struct Encoded {
    /// The body.
    pub body: Vec<u8>,
    /// The JSON's length, when binary data follows it.
    pub header_length: Option<usize>,
}

/// A response's JSON (fields in the order `serde_json::json!` would give).
#[derive(serde::Serialize)]
struct ResponseHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: &'a str,
    outputs: Vec<OutputHeader<'a>>,
}

/// One output in a response's JSON: its elements, or where they are.
#[derive(serde::Serialize)]
struct OutputHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonElements<'a>>,
    datatype: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Map::is_empty")]
    parameters: Map<String, Value>,
    shape: &'a [u64],
}

/// Encodes a response; an output asked for as JSON that JSON cannot hold
/// exactly (16-bit floats, NaN or infinities, non-UTF-8 bytes) goes as
/// binary data instead.
pub fn encode(
    id: Option<&str>,
    model_name: &str,
    model_version: &str,
    outputs: Vec<Output>,
) -> Encoded {
    let mut tail = Vec::new();
    let mut described = Vec::with_capacity(outputs.len());
    for output in &outputs {
        let mut parameters = output.parameters.clone();
        let data = (!output.binary)
            .then(|| JsonElements::exact(&output.datatype, &output.data))
            .flatten();
        if data.is_none() {
            parameters.insert("binary_data_size".into(), Value::from(output.data.len()));
            tail.extend_from_slice(&output.data);
        }
        described.push(OutputHeader {
            data,
            datatype: &output.datatype,
            name: &output.name,
            parameters,
            shape: &output.shape,
        });
    }
    let header = ResponseHeader {
        id,
        model_name,
        model_version,
        outputs: described,
    };
    // Serialising borrowed strings, numbers and maps of `Value` cannot fail.
    let mut body = serde_json::to_vec(&header).unwrap_or_default();
    let header_length = (!tail.is_empty()).then_some(body.len());
    body.extend_from_slice(&tail);
    Encoded {
        body,
        header_length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_binary_inputs_decode_to_the_same_bytes() {
        let json = br#"{"id": "7", "inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [[101, 102]]}]}"#;
        let (request, from_json) = decode(json, None).expect("json");
        assert_eq!(request.id.as_deref(), Some("7"));
        let header = br#"{"inputs": [{"name": "ids", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 16}}]}"#;
        let mut body = header.to_vec();
        body.extend([101i64, 102].iter().flat_map(|v| v.to_le_bytes()));
        let (_, from_binary) = decode(&body, Some(header.len())).expect("binary");
        assert_eq!(from_json[0].data, from_binary[0].data);
        assert_eq!(from_json[0].datatype, from_binary[0].datatype);
        assert_eq!(from_json[0].shape, [1, 2]);
        assert_eq!(from_binary[0].shape, [1, 2]);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: &[(&[u8], Option<usize>, &str)] = &[
            (b"{", None, "not valid JSON"),
            (
                br#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}"#,
                None,
                "shape [3] holds 3 FP32 elements (12 bytes), but 8 bytes came",
            ),
            (
                br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}"#,
                None,
                "unknown datatype \"FLOAT\"",
            ),
            (
                br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}"#,
                None,
                "300 is not a INT8 element",
            ),
            (
                br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP16", "data": [1.5]}]}"#,
                None,
                "send them as binary data",
            ),
            (
                br#"{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}"#,
                None,
                "negative dimension",
            ),
            (
                br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}"#,
                None,
                "neither `data` nor a `binary_data_size`",
            ),
            (
                br#"{"inputs": []}xx"#,
                Some(14),
                "2 bytes of binary data follow",
            ),
            (
                br#"{"inputs": []}"#,
                Some(99),
                "Inference-Header-Content-Length is 99",
            ),
        ];
        for (body, header, expected) in cases {
            let error = decode(body, *header).expect_err("refused").to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn bytes_elements_round_trip_and_odd_ones_go_binary() {
        let mut data = Vec::new();
        push_bytes_element(&mut data, b"hello");
        push_bytes_element(&mut data, b"");
        assert_eq!(bytes_elements(&data), Some(vec![&b"hello"[..], &b""[..]]));
        assert_eq!(bytes_elements(&[5, 0, 0, 0, 1]), None);
        let text = Output {
            name: "message".into(),
            datatype: "BYTES".into(),
            shape: vec![2],
            data: data.clone(),
            parameters: Map::new(),
            binary: false,
        };
        let mut raw = Vec::new();
        push_bytes_element(&mut raw, &[0xff, 0xfe]);
        let binary = Output {
            data: raw.clone(),
            shape: vec![1],
            ..text.clone()
        };
        let encoded = encode(Some("1"), "m", "3", vec![text, binary]);
        let at = encoded.header_length.expect("binary follows");
        let header: Value = serde_json::from_slice(&encoded.body[..at]).expect("json");
        assert_eq!(
            header["outputs"][0]["data"],
            serde_json::json!(["hello", ""])
        );
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 6);
        assert_eq!(&encoded.body[at..], raw.as_slice());
        assert_eq!(header["id"], "1");
        assert_eq!(header["model_version"], "3");
    }

    #[test]
    fn fp32_survives_json_exactly() {
        let values = [0.1f32, -3.4e38, 1e-45, 123.456, 0.097_652_51];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let json = serde_json::to_string(&JsonElements::exact("FP32", &data).expect("fp32"))
            .expect("serialises");
        // The shortest form of each f32, not the f64 widening of it.
        assert_eq!(json, "[0.1,-3.4e+38,1e-45,123.456,0.09765251]");
        let back = json_to_binary("x", "FP32", &serde_json::from_str(&json).expect("reparse"))
            .expect("decodes");
        assert_eq!(back, data);
    }

    #[test]
    fn numbers_json_cannot_hold_go_binary() {
        let data: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let output = Output {
            name: "y".into(),
            datatype: "FP32".into(),
            shape: vec![2],
            data: data.clone(),
            parameters: Map::new(),
            binary: false,
        };
        let encoded = encode(None, "m", "1", vec![output]);
        let at = encoded.header_length.expect("NaN goes binary");
        let header: Value = serde_json::from_slice(&encoded.body[..at]).expect("json");
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(header["outputs"][0].get("data").is_none(), "{header}");
        assert_eq!(&encoded.body[at..], data.as_slice());
    }
}
