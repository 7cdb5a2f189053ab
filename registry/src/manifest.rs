//! The function manifest: a TOML file that chains stages, parsed into typed
//! structs once and checked with messages that name the field.
//!
//! ```toml
//! name = "embed"
//! [[stages]]
//! component = "bert-tokenizer@0.1.0"
//! files = "minilm-l3@1.0.0"          # this model package's files appear under /model
//! config = { max_length = "128" }
//! [[stages]]
//! model = "minilm-l3@1.0.0"          # run natively by the host
//! outputs = ["onnx::Shape_422"]
//! batch = 8                          # run up to 8 rows of concurrent requests together
//! [[stages]]
//! component = "mean-pool@0.1.0"
//! config = { normalize = "true" }
//! inputs = ["onnx::Shape_422", "attention_mask"]  # what it receives (default: all)
//! [scaling]
//! min_instances = 0
//! max_instances = 4
//! idle_timeout_ms = 30000
//! max_queue = 64
//! [limits]
//! timeout_ms = 5000
//! memory_mb = 128
//! max_body_kb = 10240
//! [triggers]
//! http = true
//! nats = { subject = "embed.requests", result_subject = "embed.results" }
//! [monitoring]
//! feedback = 1000                    # answers remembered for `POST .../feedback`
//! [monitoring.drift]
//! sample = 0.1                       # share of requests summarised (0: off)
//! reference = 500                    # a revision's first summaries: its reference
//! window = 500                       # the latest summaries, compared with it
//! threshold = 0.25                   # PSI above which an event fires
//! ```
//!
//! The `[triggers]` table, JetStream's included, is [`crate::triggers`].

use crate::RegistryError;
use crate::names::{Name, Reference};
pub use crate::triggers::{JetStreamTrigger, MAX_SUBJECT_BYTES, NatsTrigger, Triggers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The manifest as written: what serde reads, checked field by field into
/// a [`Function`] and never handed out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    /// The function's name.
    pub name: Name,
    /// The stages, first to last.
    stages: Vec<StageSpec>,
    /// How many instances serve the function.
    #[serde(default)]
    pub scaling: Scaling,
    /// What one invocation may use.
    #[serde(default)]
    pub limits: Limits,
    /// How the function is invoked.
    #[serde(default)]
    pub triggers: Triggers,
    /// What the host watches of its answers.
    #[serde(default)]
    pub monitoring: Monitoring,
}

/// One stage as written: exactly one of `component` or `model`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageSpec {
    /// A component `name@version`.
    pub component: Option<Reference>,
    /// A model `name@version`, run by the host.
    pub model: Option<Reference>,
    /// For a component: the model package whose files it sees under `/model`.
    pub files: Option<Reference>,
    /// For a component: `wasi:config/store` values.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// For an inferencer component: models it may `load-by-name` through `wasi:nn`.
    #[serde(default)]
    pub models: Vec<Reference>,
    /// For an inferencer component: whether `wasi:nn` `load` may build a
    /// model from bytes the guest supplies (default false: only granted
    /// `models`, which the registry has checked, can run).
    pub nn_load_bytes: Option<bool>,
    /// For a model: which outputs to compute (default: all).
    pub outputs: Option<Vec<String>>,
    /// For a model whose inputs and outputs all have the batch as
    /// dimension 0: requests that wait for the model at the same time, with
    /// the same shapes otherwise, run as one batch of up to this many rows
    /// (default 1: each request runs alone).
    pub batch: Option<u32>,
    /// For a postprocessor: the tensors it receives, by name and in this
    /// order (default: every input of the stage before, then its outputs).
    /// Naming only what it reads spares copying the rest into the sandbox.
    pub inputs: Option<Vec<String>>,
}

/// Scaling of a function's instance pools.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scaling {
    /// Warm instances kept per stage even when idle (0 = scale to zero).
    pub min_instances: u32,
    /// Instances per stage at most; also the function's concurrency.
    pub max_instances: u32,
    /// An instance idle this long is dropped, down to `min_instances`.
    pub idle_timeout_ms: u64,
    /// Requests that may wait for an instance; more get 503 at once.
    pub max_queue: u32,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            min_instances: 0,
            max_instances: 4,
            idle_timeout_ms: 30_000,
            max_queue: 64,
        }
    }
}

/// What the host watches of a function's answers in production.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Monitoring {
    /// How the host watches the inputs and answers for drift.
    pub drift: Drift,
    /// Answers remembered per function for `POST /v1/functions/{name}/feedback`
    /// (their request id, revision and prediction), and the window of
    /// feedback that accuracy is computed over. 0: no feedback.
    pub feedback: u32,
}

/// Drift monitoring: summaries of a sampled share of requests (sizes,
/// tensor statistics, answer classes), each revision's first ones kept as
/// its reference, the latest compared with it by the population
/// stability index.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drift {
    /// Share of requests summarised, 0 to 1 (0: drift is not watched).
    pub sample: f64,
    /// Summaries that form a revision's reference (its first ones).
    pub reference: u32,
    /// Latest summaries compared with the reference.
    pub window: u32,
    /// The score above which a signal has drifted (an event fires).
    pub threshold: f64,
}

impl Default for Drift {
    fn default() -> Self {
        Drift {
            sample: 0.1,
            reference: 500,
            window: 500,
            threshold: 0.25,
        }
    }
}

/// Fewest and most summaries a drift reference or window may hold.
pub const DRIFT_SUMMARIES: std::ops::RangeInclusive<u32> = 20..=10_000;

/// Most answers a function may remember for feedback.
pub const MAX_FEEDBACK: u32 = 100_000;

/// Limits of one invocation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deadline of a whole invocation, queueing included.
    pub timeout_ms: u64,
    /// Linear memory of each component instance.
    pub memory_mb: u64,
    /// Largest request body.
    pub max_body_kb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 5_000,
            memory_mb: 128,
            max_body_kb: 10 * 1024,
        }
    }
}

/// A stage after static validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Stage {
    /// A WebAssembly component.
    Component(ComponentStep),
    /// A model run natively.
    Model(ModelStep),
}

/// A component stage and what its manifest grants it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentStep {
    /// Which component.
    pub component: Reference,
    /// Model package shown under `/model`.
    pub files: Option<Reference>,
    /// Configuration values.
    pub config: BTreeMap<String, String>,
    /// Models granted to `wasi:nn` `load-by-name`.
    pub models: Vec<Reference>,
    /// Whether `wasi:nn` `load` from guest bytes is granted.
    pub load_bytes: bool,
    /// For a postprocessor: the tensors it receives; `None` means all.
    pub inputs: Option<Vec<String>>,
}

/// A model stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStep {
    /// Which model.
    pub model: Reference,
    /// Outputs to compute; empty means all.
    pub outputs: Vec<String>,
    /// Most rows of concurrent requests run together (1: no batching).
    pub batch: u32,
}

/// A function as its manifest declares it, every field valid on its own:
/// the typed form the registry stores beside the text and hosts serve
/// from. The registry then checks that what it names exists and fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    /// The function's name.
    pub name: Name,
    /// The stages, first to last.
    pub stages: Vec<Stage>,
    /// How many instances serve the function.
    pub scaling: Scaling,
    /// What one invocation may use.
    pub limits: Limits,
    /// How the function is invoked.
    pub triggers: Triggers,
    /// What the host watches of its answers (absent from records stored
    /// before monitoring existed: the defaults).
    #[serde(default)]
    pub monitoring: Monitoring,
}

/// A manifest as published: its text (what `cascade show` prints and the
/// digest covers) and the [`Function`] it declares.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The text as published.
    pub text: String,
    /// What it declares.
    pub function: Function,
}

/// Upper bounds that keep one function from starving a host.
pub const MAX_STAGES: usize = 8;
/// Longest deadline a manifest may ask for.
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Most memory a manifest may ask for per instance.
pub const MAX_MEMORY_MB: u64 = 1024;
/// Most instances per stage.
pub const MAX_INSTANCES: u32 = 64;
/// Largest `batch` a model stage may ask for.
pub const MAX_BATCH: u32 = 256;

/// Largest request body a manifest may allow (256 MiB).
pub const MAX_BODY_KB: u64 = 256 * 1024;
/// Parses and statically validates a manifest: the one place manifest text
/// becomes types.
pub fn parse(text: &str) -> Result<Manifest, RegistryError> {
    let manifest: ManifestFile = toml::from_str(text)
        .map_err(|e| RegistryError::Invalid(format!("invalid manifest: {e}")))?;
    let invalid = |m: String| Err(RegistryError::Invalid(format!("invalid manifest: {m}")));
    if manifest.stages.is_empty() || manifest.stages.len() > MAX_STAGES {
        return invalid(format!("`stages` must hold 1 to {MAX_STAGES} stages"));
    }
    let s = &manifest.scaling;
    if s.max_instances == 0 || s.max_instances > MAX_INSTANCES {
        return invalid(format!(
            "`scaling.max_instances` must be 1 to {MAX_INSTANCES}"
        ));
    }
    if s.min_instances > s.max_instances {
        return invalid("`scaling.min_instances` exceeds `scaling.max_instances`".into());
    }
    let l = &manifest.limits;
    if l.timeout_ms == 0 || l.timeout_ms > MAX_TIMEOUT_MS {
        return invalid(format!("`limits.timeout_ms` must be 1 to {MAX_TIMEOUT_MS}"));
    }
    if l.memory_mb == 0 || l.memory_mb > MAX_MEMORY_MB {
        return invalid(format!("`limits.memory_mb` must be 1 to {MAX_MEMORY_MB}"));
    }
    if l.max_body_kb == 0 || l.max_body_kb > MAX_BODY_KB {
        return invalid(format!("`limits.max_body_kb` must be 1 to {MAX_BODY_KB}"));
    }
    let drift = &manifest.monitoring.drift;
    if !(0.0..=1.0).contains(&drift.sample) {
        return invalid("`monitoring.drift.sample` must be a share from 0 to 1".into());
    }
    for (field, value) in [("reference", drift.reference), ("window", drift.window)] {
        if !DRIFT_SUMMARIES.contains(&value) {
            return invalid(format!(
                "`monitoring.drift.{field}` must be {} to {}",
                DRIFT_SUMMARIES.start(),
                DRIFT_SUMMARIES.end()
            ));
        }
    }
    if !(drift.threshold.is_finite() && drift.threshold > 0.0) {
        return invalid("`monitoring.drift.threshold` must be above 0".into());
    }
    if manifest.monitoring.feedback > MAX_FEEDBACK {
        return invalid(format!("`monitoring.feedback` must be 0 to {MAX_FEEDBACK}"));
    }
    crate::triggers::check(&manifest.triggers)?;
    let stages = manifest
        .stages
        .iter()
        .enumerate()
        .map(|(i, spec)| stage(i, spec))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Manifest {
        text: text.to_string(),
        function: Function {
            name: manifest.name,
            stages,
            scaling: manifest.scaling,
            limits: manifest.limits,
            triggers: manifest.triggers,
            monitoring: manifest.monitoring,
        },
    })
}

fn stage(index: usize, spec: &StageSpec) -> Result<Stage, RegistryError> {
    let invalid = |m: &str| {
        Err(RegistryError::Invalid(format!(
            "invalid manifest: `stages[{index}]` {m}"
        )))
    };
    match (&spec.component, &spec.model) {
        (Some(component), None) => {
            if spec.outputs.is_some() || spec.batch.is_some() {
                return invalid("sets `outputs` or `batch`, which only model stages take");
            }
            if let Some(inputs) = &spec.inputs {
                if inputs.is_empty() || inputs.iter().any(String::is_empty) {
                    return invalid("sets `inputs` to an empty list or an empty name");
                }
                let mut seen = std::collections::BTreeSet::new();
                if let Some(twice) = inputs.iter().find(|name| !seen.insert(*name)) {
                    return invalid(&format!("names tensor {twice:?} twice in `inputs`"));
                }
            }
            Ok(Stage::Component(ComponentStep {
                component: component.clone(),
                files: spec.files.clone(),
                config: spec.config.clone(),
                models: spec.models.clone(),
                inputs: spec.inputs.clone(),
                load_bytes: spec.nn_load_bytes.unwrap_or(false),
            }))
        }
        (None, Some(model)) => {
            if spec.files.is_some()
                || !spec.config.is_empty()
                || !spec.models.is_empty()
                || spec.inputs.is_some()
                || spec.nn_load_bytes.is_some()
            {
                return invalid(
                    "sets `files`, `config`, `models`, `inputs` or `nn_load_bytes`, which only \
                     component stages take",
                );
            }
            let batch = spec.batch.unwrap_or(1);
            if batch == 0 || batch > MAX_BATCH {
                return invalid(&format!(
                    "sets `batch` to {batch}; it must be 1 to {MAX_BATCH}"
                ));
            }
            Ok(Stage::Model(ModelStep {
                model: model.clone(),
                outputs: spec.outputs.clone().unwrap_or_default(),
                batch,
            }))
        }
        (Some(_), Some(_)) => {
            invalid("names both `component` and `model`; a stage is one or the other")
        }
        (None, None) => invalid("names neither `component` nor `model`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_stored_before_monitoring_existed_still_load() {
        let stored = parse("name = \"f\"\n[[stages]]\ncomponent = \"c@1.0.0\"\n").expect("valid");
        let mut record = serde_json::to_value(&stored.function).expect("JSON");
        record
            .as_object_mut()
            .expect("an object")
            .remove("monitoring");
        let loaded: Function = serde_json::from_value(record).expect("an older record loads");
        assert_eq!(loaded.monitoring, Monitoring::default());
    }

    #[test]
    fn monitoring_settings_are_checked_and_name_their_field() {
        let base = "name = \"f\"\n[[stages]]\ncomponent = \"c@1.0.0\"\n";
        let valid = parse(&format!(
            "{base}[monitoring]\nfeedback = 10\n[monitoring.drift]\nsample = 1.0\nreference = 50\nwindow = 40\n"
        ))
        .expect("valid");
        let monitoring = &valid.function.monitoring;
        assert_eq!((monitoring.feedback, monitoring.drift.window), (10, 40));
        assert_eq!(monitoring.drift.threshold, 0.25);
        let plain = parse(base).expect("valid");
        assert_eq!(plain.function.monitoring.drift, Drift::default());
        for (extra, want) in [
            (
                "[monitoring.drift]\nsample = 2.0\n",
                "`monitoring.drift.sample`",
            ),
            (
                "[monitoring.drift]\nwindow = 5\n",
                "`monitoring.drift.window` must be 20",
            ),
            (
                "[monitoring.drift]\nreference = 50000\n",
                "`monitoring.drift.reference`",
            ),
            (
                "[monitoring.drift]\nthreshold = 0.0\n",
                "`monitoring.drift.threshold`",
            ),
            (
                "[monitoring]\nfeedback = 1000000\n",
                "`monitoring.feedback`",
            ),
            ("[monitoring]\nfedback = 1\n", "unknown field `fedback`"),
        ] {
            let why = parse(&format!("{base}{extra}"))
                .expect_err(extra)
                .to_string();
            assert!(why.contains(want), "{extra}: {why}");
        }
    }

    const EMBED: &str = r#"
name = "embed"
[[stages]]
component = "bert-tokenizer@0.1.0"
files = "minilm-l3@1.0.0"
config = { max_length = "128" }
[[stages]]
model = "minilm-l3@1.0.0"
outputs = ["onnx::Shape_422"]
[[stages]]
component = "mean-pool@0.1.0"
[scaling]
max_instances = 2
[triggers]
nats = { subject = "embed.requests" }
"#;

    #[test]
    fn a_full_manifest_parses_with_defaults() {
        let v = parse(EMBED).expect("valid").function;
        assert_eq!(v.stages.len(), 3);
        assert_eq!(v.scaling.max_instances, 2);
        assert_eq!(v.scaling.idle_timeout_ms, 30_000);
        assert_eq!(v.limits, Limits::default());
        assert!(v.triggers.http);
        assert!(matches!(&v.stages[1], Stage::Model(m) if m.outputs == ["onnx::Shape_422"]));
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("invalid").to_string()
    }

    #[test]
    fn mistakes_name_the_field() {
        assert!(error_of("name = \"e\"\nstages = []").contains("`stages` must hold 1 to 8"));
        assert!(
            error_of("name = \"E\"\n[[stages]]\nmodel = \"m@1.0.0\"")
                .contains("invalid name \"E\"")
        );
        assert!(
            error_of("name = \"e\"\nnmae = 1\n[[stages]]\nmodel = \"m@1.0.0\"")
                .contains("unknown field `nmae`")
        );
        let both = "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\ncomponent = \"c@1.0.0\"";
        assert!(error_of(both).contains("`stages[0]` names both"));
        let config_int = "name = \"e\"\n[[stages]]\ncomponent = \"c@1.0.0\"\nconfig = { k = 1 }";
        assert!(
            error_of(config_int).contains("invalid type: integer"),
            "{}",
            error_of(config_int)
        );
        let scaling = "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\n[scaling]\nmin_instances = 5\nmax_instances = 2";
        assert!(error_of(scaling).contains("`scaling.min_instances` exceeds"));
        let version = "name = \"e\"\n[[stages]]\nmodel = \"m@one\"";
        assert!(error_of(version).contains("invalid version \"one\""));
        let model_inputs = "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\ninputs = [\"x\"]";
        assert!(
            error_of(model_inputs).contains(
                "`stages[0]` sets `files`, `config`, `models`, `inputs` or `nn_load_bytes`"
            )
        );
        let twice = "name = \"e\"\n[[stages]]\ncomponent = \"c@1.0.0\"\ninputs = [\"a\", \"a\"]";
        assert!(error_of(twice).contains("`stages[0]` names tensor \"a\" twice in `inputs`"));
        let empty = "name = \"e\"\n[[stages]]\ncomponent = \"c@1.0.0\"\ninputs = []";
        assert!(error_of(empty).contains("`stages[0]` sets `inputs` to an empty list"));
        let batch_zero = "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\nbatch = 0";
        assert!(
            error_of(batch_zero).contains("`stages[0]` sets `batch` to 0; it must be 1 to 256")
        );
        let batch_on_component = "name = \"e\"\n[[stages]]\ncomponent = \"c@1.0.0\"\nbatch = 4";
        assert!(
            error_of(batch_on_component)
                .contains("`stages[0]` sets `outputs` or `batch`, which only model stages take")
        );
        let huge_body = "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\n[limits]\nmax_body_kb = 18014398509481984";
        assert!(error_of(huge_body).contains("`limits.max_body_kb` must be 1 to 262144"));
        let batched =
            parse("name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\nbatch = 8").expect("valid");
        assert!(matches!(&batched.function.stages[0], Stage::Model(m) if m.batch == 8));
    }

    fn with_nats(subject: &str, result: &str) -> String {
        format!(
            "name = \"e\"\n[[stages]]\nmodel = \"m@1.0.0\"\n[triggers]\nnats = {{ subject = {subject:?}, result_subject = {result:?} }}"
        )
    }

    #[test]
    fn nats_subjects_are_plain_and_not_reserved() {
        assert!(parse(&with_nats("images.in", "images.out")).is_ok());
        let cases = [
            (
                with_nats("cascade.events.registry.function", "x"),
                "reserved prefix",
            ),
            (
                with_nats("a", "cascade.events.registry.function"),
                "reserved prefix",
            ),
            (with_nats("$JS.API.STREAM.DELETE.X", "x"), "reserved prefix"),
            (with_nats("a", "_INBOX.abc"), "reserved prefix"),
            (with_nats("a", "results.>"), "wildcard"),
            (with_nats("a.*", "x"), "wildcard"),
            (with_nats("a", "x\r\nPUB evil 1"), "control character"),
            (with_nats("a..b", "x"), "empty token"),
            (with_nats("a.", "x"), "empty token"),
            (with_nats("", "x"), "must be 1 to 256 bytes"),
        ];
        for (manifest, expected) in cases {
            let message = error_of(&manifest);
            assert!(message.contains(expected), "{manifest}: {message}");
            assert!(message.contains("`triggers.nats."), "{message}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A 400 that says it is about the manifest, or a valid manifest.
        fn precise(result: Result<Manifest, RegistryError>) -> Result<(), TestCaseError> {
            match result {
                Ok(_) => Ok(()),
                Err(e) => {
                    prop_assert_eq!(e.status(), 400);
                    prop_assert!(e.to_string().starts_with("invalid manifest: "), "{}", e);
                    Ok(())
                }
            }
        }

        fn any_text() -> impl Strategy<Value = String> {
            prop_oneof![".{0,40}", "[a-z.*>$_ \r\n-]{0,20}", Just(String::new()),]
        }

        proptest! {
            #[test]
            fn any_text_is_a_manifest_or_a_400(text in ".{0,400}") {
                precise(parse(&text))?;
            }

            #[test]
            fn any_field_values_are_a_manifest_or_a_400(
                name in any_text(),
                reference in any_text(),
                min in any::<u32>(),
                max in any::<u32>(),
                queue in any::<u32>(),
                timeout in any::<u64>(),
                memory in any::<u64>(),
                body in any::<u64>(),
                batch in any::<u32>(),
                subject in any_text(),
                result in any_text(),
            ) {
                let text = format!(
                    "name = {name:?}\n[[stages]]\nmodel = {reference:?}\nbatch = {batch}\n\
                     [scaling]\nmin_instances = {min}\nmax_instances = {max}\nmax_queue = {queue}\n\
                     [limits]\ntimeout_ms = {timeout}\nmemory_mb = {memory}\nmax_body_kb = {body}\n\
                     [triggers]\nnats = {{ subject = {subject:?}, result_subject = {result:?} }}\n"
                );
                precise(parse(&text))?;
            }
        }
    }
}
