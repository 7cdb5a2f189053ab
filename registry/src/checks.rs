//! Publish-time checks of a function's stages against what the registry
//! holds: every component and model it names exists, each component's
//! world fits its position and grants, and each model gets the inputs it
//! needs. Pure: the records come through [`Lookup`], so the rules are
//! tested beside this file with a small table of fakes.

use crate::RegistryError;
use crate::manifest::{ComponentStep, ModelStep, Stage};
use crate::names::Reference;
use crate::records::{ComponentRecord, ModelRecord, Use, World};
use std::collections::BTreeSet;

/// Where the checks find the records a function names.
pub trait Lookup {
    /// The component `reference`, if published.
    fn component(&self, reference: &Reference) -> Result<Option<ComponentRecord>, RegistryError>;
    /// The model `reference`, if published.
    fn model(&self, reference: &Reference) -> Result<Option<ModelRecord>, RegistryError>;
}

/// Checks references and positions; returns what the function uses, each
/// once, in stage order.
pub fn check_stages(stages: &[Stage], lookup: &impl Lookup) -> Result<Vec<Use>, RegistryError> {
    let last = stages.len().saturating_sub(1);
    let mut uses = Vec::new();
    // Tensor names the stage before hands on (None after a component: its
    // outputs are known only at run time).
    let mut previous_outputs: Option<Vec<String>> = None;
    for (at, stage) in stages.iter().enumerate() {
        let place = Place { at, last };
        previous_outputs = match stage {
            Stage::Component(step) => {
                check_component(step, place, lookup, &mut uses)?;
                None
            }
            Stage::Model(step) => Some(check_model(
                step,
                at,
                previous_outputs.as_deref(),
                lookup,
                &mut uses,
            )?),
        };
    }
    let mut seen = BTreeSet::new();
    uses.retain(|u| seen.insert(u.clone()));
    Ok(uses)
}

/// A stage's index and the index of the function's last stage.
#[derive(Clone, Copy)]
struct Place {
    at: usize,
    last: usize,
}

fn invalid(message: String) -> RegistryError {
    RegistryError::Invalid(message)
}

fn published_model(
    reference: &Reference,
    at: usize,
    lookup: &impl Lookup,
) -> Result<ModelRecord, RegistryError> {
    lookup.model(reference)?.ok_or_else(|| {
        invalid(format!(
            "`stages[{at}]`: model {reference} is not published"
        ))
    })
}

fn check_component(
    step: &ComponentStep,
    Place { at, last }: Place,
    lookup: &impl Lookup,
    uses: &mut Vec<Use>,
) -> Result<(), RegistryError> {
    let ComponentStep {
        component,
        files,
        models,
        inputs,
        load_bytes,
        ..
    } = step;
    let record = lookup.component(component)?.ok_or_else(|| {
        invalid(format!(
            "`stages[{at}]`: component {component} is not published"
        ))
    })?;
    let world = record.world;
    let misplaced = match world {
        World::Preprocessor if at != 0 => Some("the first"),
        World::Postprocessor if at != last => Some("the last"),
        _ => None,
    };
    if let Some(place) = misplaced {
        return Err(invalid(format!(
            "`stages[{at}]`: {component} is a {world}, which can only be {place} stage"
        )));
    }
    if let Some(files) = files {
        published_model(files, at, lookup)?;
        uses.push(Use::Model(files.clone()));
    }
    let refuse = |field: &str, why: &str| {
        Err(invalid(format!(
            "`stages[{at}].{field}`: {component} is a {world}; {why}"
        )))
    };
    if !models.is_empty() && world != World::Inferencer {
        return refuse("models", "only inferencers load models");
    }
    if *load_bytes && world != World::Inferencer {
        return refuse("nn_load_bytes", "only inferencers load models");
    }
    if inputs.is_some() && world != World::Postprocessor {
        return refuse("inputs", "only postprocessors take `inputs`");
    }
    for granted in models {
        published_model(granted, at, lookup)?;
        uses.push(Use::Model(granted.clone()));
    }
    uses.push(Use::Component(component.clone()));
    Ok(())
}

/// Checks a model stage; returns the tensor names it hands on.
fn check_model(
    step: &ModelStep,
    at: usize,
    available: Option<&[String]>,
    lookup: &impl Lookup,
    uses: &mut Vec<Use>,
) -> Result<Vec<String>, RegistryError> {
    let ModelStep {
        model: reference,
        outputs,
        batch,
    } = step;
    let record = published_model(reference, at, lookup)?;
    if *batch > 1 {
        check_batchable(&record, outputs, at, *batch)?;
    }
    let known: Vec<&str> = record
        .signature
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    if let Some(unknown) = outputs.iter().find(|o| !known.contains(&o.as_str())) {
        return Err(invalid(format!(
            "`stages[{at}].outputs`: {reference} has no output {unknown:?} (outputs: {})",
            known.join(", ")
        )));
    }
    if let Some(available) = available
        && let Some(missing) = record
            .signature
            .inputs
            .iter()
            .find(|i| !available.contains(&i.name))
    {
        return Err(invalid(format!(
            "`stages[{at}]`: {reference} needs input {:?}, which the stage before does not produce",
            missing.name
        )));
    }
    uses.push(Use::Model(reference.clone()));
    Ok(if outputs.is_empty() {
        known.iter().map(|s| s.to_string()).collect()
    } else {
        outputs.clone()
    })
}

/// Refuses `batch` on a model whose inputs or computed outputs fix
/// dimension 0: requests are stacked and cut apart along it, so a model
/// published with `--input-shape x=1,...` would fail every shared run.
fn check_batchable(
    record: &ModelRecord,
    outputs: &[String],
    at: usize,
    batch: u32,
) -> Result<(), RegistryError> {
    let computed = record
        .signature
        .outputs
        .iter()
        .filter(|o| outputs.is_empty() || outputs.contains(&o.name));
    let tensors = record
        .signature
        .inputs
        .iter()
        .map(|t| ("input", t))
        .chain(computed.map(|t| ("output", t)));
    for (kind, tensor) in tensors {
        let first = tensor.shape.first();
        if first.is_none_or(|d| d.parse::<u64>().is_ok()) {
            let reference = format!("{}@{}", record.name, record.version);
            let fixed = first.map_or("no dimension 0".to_string(), |d| {
                format!("dimension 0 fixed at {d}")
            });
            return Err(invalid(format!(
                "`stages[{at}].batch`: {batch} needs a free batch dimension, but {reference}'s \
                 {kind} {:?} has shape [{}] ({fixed}); publish the model with a named first \
                 dimension (e.g. `--input-shape {}=batch,...`) or leave `batch` out",
                tensor.name,
                tensor.shape.join(", "),
                record
                    .signature
                    .inputs
                    .first()
                    .map_or("x", |i| i.name.as_str()),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;
    use crate::records::{ModelSignature, TensorSpec};
    use std::collections::BTreeMap;

    /// Published records by reference.
    #[derive(Default)]
    struct Fakes {
        components: BTreeMap<String, ComponentRecord>,
        models: BTreeMap<String, ModelRecord>,
    }

    impl Lookup for Fakes {
        fn component(&self, r: &Reference) -> Result<Option<ComponentRecord>, RegistryError> {
            Ok(self.components.get(&r.to_string()).cloned())
        }
        fn model(&self, r: &Reference) -> Result<Option<ModelRecord>, RegistryError> {
            Ok(self.models.get(&r.to_string()).cloned())
        }
    }

    fn spec(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            ty: "f32".into(),
            shape: vec!["N".into()],
        }
    }

    fn fakes() -> Fakes {
        let mut fakes = Fakes::default();
        for (name, world) in [
            ("pre", World::Preprocessor),
            ("post", World::Postprocessor),
            ("infer", World::Inferencer),
        ] {
            fakes.components.insert(
                format!("{name}@1.0.0"),
                ComponentRecord {
                    name: name.into(),
                    version: "1.0.0".into(),
                    digest: format!("{name}-digest"),
                    size: 1,
                    world,
                    published_at: 0,
                },
            );
        }
        fakes.models.insert(
            "m@1.0.0".into(),
            ModelRecord {
                name: "m".into(),
                version: "1.0.0".into(),
                digest: "m-digest".into(),
                size: 1,
                package_digest: "m-package".into(),
                files: Vec::new(),
                input_shapes: BTreeMap::new(),
                signature: ModelSignature {
                    inputs: vec![spec("input_ids")],
                    outputs: vec![spec("hidden"), spec("pooled")],
                },
                published_at: 0,
            },
        );
        let mut fixed = fakes.models["m@1.0.0"].clone();
        fixed.name = "fixed".into();
        fixed.signature.inputs[0].shape = vec!["1".into(), "3".into()];
        fakes.models.insert("fixed@1.0.0".into(), fixed);
        fakes
    }

    /// The checks' verdict on a manifest whose stages are `stages` (TOML).
    fn check(stages: &str) -> Result<Vec<String>, String> {
        let text = format!("name = \"f\"\n{stages}");
        let parsed = manifest::parse(&text).map_err(|e| e.to_string())?;
        check_stages(&parsed.function.stages, &fakes())
            .map(|uses| uses.iter().map(Use::to_string).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn uses_are_listed_once_in_stage_order() {
        let uses = check(
            "[[stages]]\ncomponent = \"pre@1.0.0\"\nfiles = \"m@1.0.0\"\n\
             [[stages]]\nmodel = \"m@1.0.0\"\n[[stages]]\ncomponent = \"post@1.0.0\"",
        );
        assert_eq!(
            uses.expect("valid"),
            [
                "model:m@1.0.0",
                "component:pre@1.0.0",
                "component:post@1.0.0"
            ]
        );
    }

    #[test]
    fn worlds_must_fit_their_positions() {
        let late_pre =
            check("[[stages]]\ncomponent = \"infer@1.0.0\"\n[[stages]]\ncomponent = \"pre@1.0.0\"");
        assert_eq!(
            late_pre.expect_err("misplaced"),
            "`stages[1]`: pre@1.0.0 is a preprocessor, which can only be the first stage"
        );
        let early_post = check(
            "[[stages]]\ncomponent = \"post@1.0.0\"\n[[stages]]\ncomponent = \"infer@1.0.0\"",
        );
        assert_eq!(
            early_post.expect_err("misplaced"),
            "`stages[0]`: post@1.0.0 is a postprocessor, which can only be the last stage"
        );
        assert!(check("[[stages]]\ncomponent = \"infer@1.0.0\"").is_ok());
    }

    #[test]
    fn grants_belong_to_their_worlds() {
        let models = check("[[stages]]\ncomponent = \"pre@1.0.0\"\nmodels = [\"m@1.0.0\"]");
        assert_eq!(
            models.expect_err("not an inferencer"),
            "`stages[0].models`: pre@1.0.0 is a preprocessor; only inferencers load models"
        );
        let bytes = check("[[stages]]\ncomponent = \"post@1.0.0\"\nnn_load_bytes = true");
        assert!(
            bytes
                .expect_err("not an inferencer")
                .starts_with("`stages[0].nn_load_bytes`")
        );
        let inputs = check("[[stages]]\ncomponent = \"infer@1.0.0\"\ninputs = [\"x\"]");
        assert_eq!(
            inputs.expect_err("not a postprocessor"),
            "`stages[0].inputs`: infer@1.0.0 is a inferencer; only postprocessors take `inputs`"
        );
        let granted = check("[[stages]]\ncomponent = \"infer@1.0.0\"\nmodels = [\"m@1.0.0\"]");
        assert_eq!(
            granted.expect("granted"),
            ["model:m@1.0.0", "component:infer@1.0.0"]
        );
    }

    #[test]
    fn models_must_exist_and_get_their_inputs() {
        let missing = check("[[stages]]\nmodel = \"nope@1.0.0\"");
        assert_eq!(
            missing.expect_err("missing"),
            "`stages[0]`: model nope@1.0.0 is not published"
        );
        let output = check("[[stages]]\nmodel = \"m@1.0.0\"\noutputs = [\"logits\"]");
        assert_eq!(
            output.expect_err("no such output"),
            "`stages[0].outputs`: m@1.0.0 has no output \"logits\" (outputs: hidden, pooled)"
        );
        let chained = check("[[stages]]\nmodel = \"m@1.0.0\"\n[[stages]]\nmodel = \"m@1.0.0\"");
        assert_eq!(
            chained.expect_err("input not produced"),
            "`stages[1]`: m@1.0.0 needs input \"input_ids\", which the stage before does not produce"
        );
        let files = check("[[stages]]\ncomponent = \"pre@1.0.0\"\nfiles = \"gone@1.0.0\"");
        assert_eq!(
            files.expect_err("missing files"),
            "`stages[0]`: model gone@1.0.0 is not published"
        );
    }

    #[test]
    fn batching_needs_a_free_first_dimension() {
        let free = check("[[stages]]\nmodel = \"m@1.0.0\"\nbatch = 4");
        assert_eq!(free.expect("batchable"), ["model:m@1.0.0"]);
        let fixed = check("[[stages]]\nmodel = \"fixed@1.0.0\"\nbatch = 4");
        assert_eq!(
            fixed.expect_err("fixed batch"),
            "`stages[0].batch`: 4 needs a free batch dimension, but fixed@1.0.0's input \
             \"input_ids\" has shape [1, 3] (dimension 0 fixed at 1); publish the model with a \
             named first dimension (e.g. `--input-shape input_ids=batch,...`) or leave `batch` out"
        );
        let alone = check("[[stages]]\nmodel = \"fixed@1.0.0\"\nbatch = 1");
        assert!(alone.is_ok(), "batch = 1 runs each request alone");
    }
}
