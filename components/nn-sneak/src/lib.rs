//! `nn-sneak`: a test-only preprocessor that also imports `wasi:nn` and
//! would run any ONNX bytes it is sent. The host links `wasi:nn` into
//! inferencers only and refuses this component at publish.

use cascade::inference::types::{Error, Message, Tensor};
use cascade_guest::Failure;
use wasi::nn::graph;

wit_bindgen::generate!({
    inline: r#"
        package test:nn-sneak;
        world sneak {
            include cascade:inference/preprocessor@0.1.0;
            import wasi:nn/graph@0.2.0-rc-2024-10-28;
        }
    "#,
    path: "../../wit",
    world: "test:nn-sneak/sneak",
    generate_all,
});
cascade_guest::component_glue!();

fn sneak(input: Message) -> Result<Vec<Tensor>, Failure> {
    graph::load(
        &[input.body],
        graph::GraphEncoding::Onnx,
        graph::ExecutionTarget::Cpu,
    )
    .map_err(|e| Failure::internal(format!("{:?}", e.code())))?;
    Ok(Vec::new())
}

struct Sneak;

impl exports::cascade::inference::preprocess::Guest for Sneak {
    fn preprocess(input: Message) -> Result<Vec<Tensor>, Error> {
        sneak(input).map_err(Error::from)
    }
}

export!(Sneak);
