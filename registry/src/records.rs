//! What the registry stores about each artifact (JSON in redb, and the API's
//! response bodies).

use serde::{Deserialize, Serialize};

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
    /// Which Cascade world it implements: preprocessor, postprocessor, inferencer.
    pub world: String,
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
    /// Components and models it uses, as `component:name@version` / `model:name@version`.
    pub uses: Vec<String>,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
}
