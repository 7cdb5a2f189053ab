//! Shared helpers for the end-to-end tests: where the built components and
//! the real models are, and a shared serving engine to run components in.

use cascade_host::bindings::{Message, Tensor};
use cascade_host::engine::{EngineSettings, ServingEngine};
use cascade_host::stage::{ComponentStage, Grant, StageError, StageInstance};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../xtask/src/catalog.rs"]
mod catalog;

pub mod host;
pub mod nats;
pub mod otlp;

/// Path of a built guest component, by crate name (`bert-tokenizer`).
pub fn component_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CASCADE_COMPONENTS_DIR")).join(format!("{}.wasm", name.replace('-', "_")))
}

/// The models cache; fails loudly when the models were never fetched.
pub fn models_dir() -> PathBuf {
    let dir = catalog::models_dir();
    for wheel in catalog::WHEELS {
        for file in wheel.files {
            assert!(
                dir.join(file.file_name()).is_file(),
                "model file {} is missing from {}: run `cargo xtask models` (or `cargo xtask test`)",
                file.file_name(),
                dir.display()
            );
        }
    }
    dir
}

/// Path of one file of the models cache, e.g. `tokenizer.json`.
pub fn model_file(name: &str) -> PathBuf {
    models_dir().join(name)
}

/// ONNX Runtime's shared library in the models cache (`cascade serve
/// --onnxruntime`).
pub fn onnxruntime_library() -> PathBuf {
    model_file(catalog::ONNXRUNTIME_LIBRARY)
}

/// The `embed` example's manifest (`xtask/functions/embed.toml`) renamed
/// to `name`, its model stage merging up to `rows` rows of concurrent
/// requests (`batch`; 1 turns batching off) and its component stages at
/// most `max_instances`.
pub fn batched_embed_manifest(name: &str, rows: u32, max_instances: u32) -> String {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/functions/embed.toml"),
    )
    .expect("xtask/functions/embed.toml");
    let mut manifest = String::new();
    for line in example.lines() {
        let line = line
            .replace("name = \"embed\"", &format!("name = \"{name}\""))
            .replace("embed.requests", &format!("{name}.requests"));
        if line.starts_with("max_instances =") {
            manifest.push_str(&format!("max_instances = {max_instances}\n"));
            continue;
        }
        if line.starts_with("batch =") {
            manifest.push_str(&format!("batch = {rows}\n"));
            continue;
        }
        manifest.push_str(&line);
        manifest.push('\n');
    }
    assert!(
        manifest.contains("batch =") && manifest.contains("max_instances ="),
        "embed.toml has a model stage and a [scaling] table"
    );
    manifest
}

/// A manifest named `name` running the `embed` pipeline (tokenizer,
/// MiniLM token embeddings, mean pooling) followed by `extra` TOML tables.
pub fn embed_manifest(name: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[[stages]]
component = "bert-tokenizer@0.1.0"
files = "minilm-l3@1.0.0"
[[stages]]
model = "minilm-l3@1.0.0"
outputs = ["onnx::Shape_422"]
[[stages]]
component = "mean-pool@0.1.0"
{extra}"#
    )
}

/// The first tensor of a `{"tensors": [...]}` reply, its u8 data read as
/// UTF-8 text (what `misbehave`, `echo` and `text-bytes` answer).
pub fn first_tensor_text(reply: &serde_json::Value) -> String {
    let bytes: Vec<u8> = reply["tensors"][0]["data"]
        .as_array()
        .expect("a tensor with data")
        .iter()
        .map(|v| v.as_u64().expect("u8") as u8)
        .collect();
    String::from_utf8(bytes).expect("utf-8")
}

/// Path of a committed fixture under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// One engine for the whole test binary, as a host has one.
pub fn engine() -> &'static ServingEngine {
    static ENGINE: OnceLock<ServingEngine> = OnceLock::new();
    ENGINE.get_or_init(|| ServingEngine::new(&EngineSettings::default()).expect("engine builds"))
}

/// Compiles a built component (cached per test binary).
pub fn stage(name: &str) -> &'static ComponentStage {
    static STAGES: OnceLock<std::sync::Mutex<BTreeMap<String, &'static ComponentStage>>> =
        OnceLock::new();
    let mut stages = STAGES
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    stages.entry(name.to_string()).or_insert_with(|| {
        let stage = ComponentStage::from_file(engine(), component_path(name))
            .unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
        Box::leak(Box::new(stage))
    })
}

/// A tokio runtime for driving guests from plain `#[test]`s: guest calls
/// are asynchronous (they yield at every epoch tick) and WASI needs a reactor.
pub fn reactor() -> &'static tokio::runtime::Runtime {
    static REACTOR: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    REACTOR.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime starts")
    })
}

/// A stage instance whose calls block the test's thread until they return.
pub struct BlockingInstance(StageInstance);

impl BlockingInstance {
    /// Runs `preprocess`.
    pub fn preprocess(&mut self, input: Message) -> Result<Vec<Tensor>, StageError> {
        reactor().block_on(self.0.preprocess(input))
    }

    /// Runs `postprocess`.
    pub fn postprocess(&mut self, tensors: Vec<Tensor>) -> Result<Message, StageError> {
        reactor().block_on(self.0.postprocess(tensors))
    }
}

/// A fresh instance of `name` configured with `config`, seeing the models
/// cache as its `/model` directory.
pub fn instance(name: &str, config: &[(&str, &str)]) -> BlockingInstance {
    let grant = Grant {
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        model_dir: Some(models_dir()),
        ..Grant::default()
    };
    let instance = reactor()
        .block_on(stage(name).instantiate(&grant))
        .unwrap_or_else(|e| panic!("instantiating {name}: {e:#}"));
    BlockingInstance(instance)
}

/// Renders one line of text in DejaVu Sans, black on white, as PNG bytes.
pub fn render_line(text: &str, rotate: bool) -> Vec<u8> {
    use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
    let data = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").expect(
        "DejaVu Sans is installed (apt-get install fonts-dejavu-core; cargo xtask test does)",
    );
    let font = FontRef::try_from_slice(&data).expect("font parses");
    let scale = PxScale::from(36.0);
    let scaled = font.as_scaled(scale);
    let width: f32 = text
        .chars()
        .map(|c| scaled.h_advance(font.glyph_id(c)))
        .sum();
    let (w, h) = (width.ceil() as u32 + 16, 48u32);
    let mut image = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut x = 8.0;
    for c in text.chars() {
        let glyph = font
            .glyph_id(c)
            .with_scale_and_position(scale, ab_glyph::point(x, 8.0 + scaled.ascent()));
        x += scaled.h_advance(font.glyph_id(c));
        if let Some(outlined) = font.outline_glyph(glyph) {
            let bounds = outlined.px_bounds();
            outlined.draw(|gx, gy, coverage| {
                let (px, py) = (
                    bounds.min.x as i32 + gx as i32,
                    bounds.min.y as i32 + gy as i32,
                );
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    let v = (255.0 * (1.0 - coverage)).round() as u8;
                    let pixel = image.get_pixel_mut(px as u32, py as u32);
                    *pixel = image::Rgb([v.min(pixel[0]); 3]);
                }
            });
        }
    }
    if rotate {
        image = image::imageops::rotate180(&image);
    }
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("PNG encodes");
    png
}
