//! One OIP inference, whichever transport brought it (REST or gRPC): the
//! function served as the model, its input as a message or tensors checked
//! against the metadata, the run, and the outputs asked for.

use super::codec::{BadRequest, InferRequest, Input, Output, bytes_elements, push_bytes_element};
use super::datatypes::{of_tensor_type, tensor_type};
use super::metadata::{self, Entry, MESSAGE};
use crate::bindings::{Message, Tensor};
use crate::http::{ApiError, HttpState};
use crate::pipeline::{Admission, Payload, PreparedFunction};
use crate::traffic::Choice;
use cascade_registry::records::TensorSpec;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// What an inference gave: the outputs asked for, and each stage's time.
pub struct Answer {
    /// The outputs, in the order asked (all, by default).
    pub outputs: Vec<Output>,
    /// (stage label, duration) in order.
    pub timings: Vec<(String, Duration)>,
}

/// Runs `inputs` through an admitted `function` as `request` asks.
pub async fn run(
    function: &Arc<PreparedFunction>,
    mut admission: Admission,
    request: &InferRequest,
    inputs: Vec<Input>,
) -> Result<Answer, ApiError> {
    // The protocol's `timeout` parameter, in microseconds: a tighter deadline.
    if let Some(timeout) = request.parameters.get("timeout").and_then(Value::as_u64) {
        admission.tighten(Duration::from_micros(timeout));
    }
    let payload = payload(function, inputs).map_err(invalid)?;
    let outcome = function.run_payload(admission, payload).await?;
    let outputs = outputs(function, request, outcome.output).map_err(invalid)?;
    Ok(Answer {
        outputs,
        timings: outcome.timings,
    })
}

/// The revision that runs one inference of model `name`: the `version`
/// asked for (a revision number or a traffic target's tag), else the one
/// the function's traffic split chooses.
pub async fn for_inference(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<PreparedFunction>, ApiError> {
    match version {
        Some(_) => served(state, name, version).await,
        None => Ok(state
            .runtime
            .choose_when_loaded(name, &Choice::default())
            .await?),
    }
}

/// The function served as model `name`: its head, or the `version` named
/// (a revision its traffic split serves, or a target's tag).
pub async fn served(
    state: &HttpState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<PreparedFunction>, ApiError> {
    let function = state.runtime.function_when_loaded(name).await?;
    let Some(version) = version else {
        return Ok(function);
    };
    let Ok(wanted) = version.parse::<u64>() else {
        // A traffic target's tag names a version too.
        let tagged = Choice {
            tag: Some(version),
            sticky_key: None,
        };
        return Ok(state.runtime.choose(name, &tagged)?);
    };
    if wanted == function.revision() {
        return Ok(function);
    }
    if let Some(served) = state.runtime.split(name).and_then(|s| s.revision(wanted)) {
        return Ok(served);
    }
    let served = function.revision();
    match state.runtime.registry().function_revision(name, wanted) {
        Ok(_) => Err(ApiError::not_found(format!(
            "model {name} version {wanted} is published but not served; version {served} is"
        ))),
        Err(_) => Err(ApiError::not_found(format!(
            "model {name} has no version {wanted}"
        ))),
    }
}

/// A request the protocol layer refused, as a 400.
pub fn invalid(error: BadRequest) -> ApiError {
    ApiError::invalid(error.0)
}

/// What the function runs on: the message in the one `BYTES` input, or the
/// input tensors, checked against the first model's inputs.
fn payload(function: &PreparedFunction, inputs: Vec<Input>) -> Result<Payload, BadRequest> {
    let name = function.name();
    match metadata::entry(function) {
        Entry::Message => message(name, inputs).map(Payload::Message),
        Entry::Tensors(specs) => {
            if let Some(specs) = &specs {
                check_inputs(name, specs, &inputs)?;
            }
            inputs
                .into_iter()
                .map(|input| tensor(name, input))
                .collect::<Result<Vec<_>, _>>()
                .map(Payload::Tensors)
        }
    }
}

fn message(name: &str, inputs: Vec<Input>) -> Result<Message, BadRequest> {
    let [input] = inputs.as_slice() else {
        return Err(BadRequest(format!(
            "model {name} takes one BYTES input {MESSAGE:?} (the message body); got {} inputs",
            inputs.len()
        )));
    };
    if input.datatype != "BYTES" {
        return Err(BadRequest(format!(
            "input {:?}: model {name} takes the message as BYTES, not {}",
            input.name, input.datatype
        )));
    }
    let items = bytes_elements(&input.data).unwrap_or_default();
    let [body] = items.as_slice() else {
        return Err(BadRequest(format!(
            "input {:?} holds {} elements; model {name} takes one (the message body)",
            input.name,
            items.len()
        )));
    };
    let content_type = input
        .parameters
        .get("content_type")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream");
    Ok(Message {
        content_type: content_type.to_string(),
        body: body.to_vec(),
    })
}

/// Every input the model needs is there, nothing else, each of the
/// model's datatype and of a shape it accepts.
fn check_inputs(name: &str, specs: &[TensorSpec], inputs: &[Input]) -> Result<(), BadRequest> {
    let names = |all: &mut dyn Iterator<Item = &str>| all.collect::<Vec<_>>().join(", ");
    for spec in specs {
        if !inputs.iter().any(|i| i.name == spec.name) {
            return Err(BadRequest(format!(
                "model {name} needs input {:?}; the request has [{}]",
                spec.name,
                names(&mut inputs.iter().map(|i| i.name.as_str()))
            )));
        }
    }
    for input in inputs {
        let Some(spec) = specs.iter().find(|s| s.name == input.name) else {
            return Err(BadRequest(format!(
                "model {name} has no input {:?} (inputs: {})",
                input.name,
                names(&mut specs.iter().map(|s| s.name.as_str()))
            )));
        };
        let wanted = metadata::metadata(spec);
        if input.datatype != wanted.datatype {
            return Err(BadRequest(format!(
                "input {:?} is {}; model {name} takes {}",
                input.name, input.datatype, wanted.datatype
            )));
        }
        let fits = input.shape.len() == wanted.shape.len()
            && input
                .shape
                .iter()
                .zip(&wanted.shape)
                .all(|(&got, &want)| want < 0 || got == want as u64);
        if !fits {
            return Err(BadRequest(format!(
                "input {:?} has shape {:?}; model {name} takes {:?} (-1: any size)",
                input.name, input.shape, wanted.shape
            )));
        }
    }
    Ok(())
}

fn tensor(name: &str, input: Input) -> Result<Tensor, BadRequest> {
    let ty = tensor_type(&input.datatype).ok_or_else(|| {
        BadRequest(format!(
            "input {:?}: model {name} cannot take {} tensors (Cascade passes FP16, FP32, FP64, \
             BF16, UINT8, INT32 and INT64)",
            input.name, input.datatype
        ))
    })?;
    let dimensions = input
        .shape
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| BadRequest(format!("input {:?}: a dimension is over 2^32", input.name)))?;
    Ok(Tensor {
        name: input.name,
        dimensions,
        ty,
        data: input.data,
    })
}

/// The outputs asked for (all by default), each binary or JSON as asked.
fn outputs(
    function: &PreparedFunction,
    request: &InferRequest,
    produced: Payload,
) -> Result<Vec<Output>, BadRequest> {
    let binary = request
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let produced = as_outputs(produced, binary);
    let Some(wanted) = &request.outputs else {
        return Ok(produced);
    };
    wanted
        .iter()
        .map(|want| {
            let mut output = produced
                .iter()
                .find(|o| o.name == want.name)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = produced.iter().map(|o| o.name.as_str()).collect();
                    BadRequest(format!(
                        "model {} has no output {:?} (outputs: {})",
                        function.name(),
                        want.name,
                        names.join(", ")
                    ))
                })?;
            if let Some(binary) = want.parameters.get("binary_data").and_then(Value::as_bool) {
                output.binary = binary;
            }
            Ok(output)
        })
        .collect()
}

/// What the last stage gave, as OIP outputs (`binary`: as binary data).
fn as_outputs(produced: Payload, binary: bool) -> Vec<Output> {
    match produced {
        Payload::Message(message) => {
            let mut data = Vec::with_capacity(message.body.len() + 4);
            push_bytes_element(&mut data, &message.body);
            let mut parameters = Map::new();
            parameters.insert("content_type".into(), message.content_type.into());
            vec![Output {
                name: MESSAGE.into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                data,
                parameters,
                binary,
            }]
        }
        Payload::Tensors(tensors) => tensors
            .into_iter()
            .map(|t| Output {
                name: t.name,
                datatype: of_tensor_type(t.ty).into(),
                shape: t.dimensions.iter().map(|&d| u64::from(d)).collect(),
                data: t.data,
                parameters: Map::new(),
                binary,
            })
            .collect(),
    }
}
