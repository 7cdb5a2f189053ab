//! `echo`: the request body back as one u8 tensor named `body`.
//!
//! Does no work on purpose: a function made of this stage alone measures
//! what the platform costs per call (trigger, admission, instance checkout,
//! sandbox entry and exit), which is what the benchmarks compare with
//! `wasmtime serve` and a raw NATS responder.

use cascade::inference::types::{Error, Message, Tensor, TensorType};

wit_bindgen::generate!({ world: "preprocessor", path: "../../wit", generate_all });

struct Echo;

impl exports::cascade::inference::preprocess::Guest for Echo {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        Ok(vec![Tensor {
            name: "body".into(),
            dimensions: vec![input.body.len() as u32],
            ty: TensorType::U8,
            data: input.body,
        }])
    }
}

export!(Echo);
