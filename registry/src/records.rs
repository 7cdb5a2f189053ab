//! What the registry stores about each artifact (JSON in redb, and the API's
//! response bodies).

use crate::manifest::Function;
use crate::names::Reference;
use serde::{Deserialize, Serialize};

/// The Cascade world a component implements, told by its exports at
/// publish (spelled as the WIT spells it in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    /// Exports `preprocess`: message → tensors; only a function's first stage.
    Preprocessor,
    /// Exports `postprocess`: tensors → message; only a function's last stage.
    Postprocessor,
    /// Exports `infer`: tensors → tensors; the only world given `wasi:nn`.
    Inferencer,
}

impl World {
    /// The world's name as the WIT spells it.
    pub fn name(self) -> &'static str {
        match self {
            World::Preprocessor => "preprocessor",
            World::Postprocessor => "postprocessor",
            World::Inferencer => "inferencer",
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A published component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// sha256 of the `.wasm` file, lower-case hex.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Which Cascade world it implements.
    pub world: World,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
}

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name in the model.
    pub name: String,
    /// Element type, e.g. `f32`, `i64`.
    pub ty: String,
    /// Dimensions; symbolic ones by name (e.g. `batch`).
    pub shape: Vec<String>,
}

/// What a model takes and gives, as read by the inference engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelSignature {
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
}

/// An extra file of a model package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name as the guest sees it under `/model`.
    pub name: String,
    /// sha256 of the file.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// A published model package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// sha256 of the ONNX file.
    pub digest: String,
    /// Size of the ONNX file.
    pub size: u64,
    /// sha256 over the ONNX digest and every file's name and digest: what
    /// decides whether a re-publish is identical.
    pub package_digest: String,
    /// Extra files (tokenizer.json, labels.txt, …).
    pub files: Vec<FileRecord>,
    /// Input shapes fixed at publish time (numbers fixed, names dynamic).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub input_shapes: std::collections::BTreeMap<String, Vec<String>>,
    /// Inputs and outputs.
    #[serde(flatten)]
    pub signature: ModelSignature,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
}

/// One immutable revision of a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Name.
    pub name: String,
    /// Revision number, from 1.
    pub revision: u64,
    /// sha256 of the manifest text.
    pub digest: String,
    /// The manifest text as published.
    pub manifest: String,
    /// Components and models it uses (in JSON `component:name@version` /
    /// `model:name@version`).
    pub uses: Vec<Use>,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
}

/// An artifact a function revision uses: what keeps it from being deleted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Use {
    /// A component version (a stage).
    Component(Reference),
    /// A model version (a stage, a component's files, or a `wasi:nn` grant).
    Model(Reference),
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Use::Component(r) => write!(f, "component:{r}"),
            Use::Model(r) => write!(f, "model:{r}"),
        }
    }
}

impl TryFrom<String> for Use {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let (kind, reference) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not `component:…` or `model:…`"))?;
        let reference: Reference = reference.parse().map_err(|e| format!("{text:?}: {e}"))?;
        match kind {
            "component" => Ok(Use::Component(reference)),
            "model" => Ok(Use::Model(reference)),
            _ => Err(format!("{text:?} is not `component:…` or `model:…`")),
        }
    }
}

impl From<Use> for String {
    fn from(used: Use) -> String {
        used.to_string()
    }
}

/// A function revision as hosts serve it: the record the API shows and
/// the typed function its manifest declared at publish, so nothing
/// downstream parses the manifest again. Serialises as its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    /// What the registry shows about it.
    pub record: FunctionRecord,
    /// What it declares.
    pub function: Function,
}

impl Serialize for Revision {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.record.serialize(serializer)
    }
}
