//! Which engine runs models. The default is the fastest one the machine
//! has: ONNX Runtime when its shared library is found (`--onnxruntime`, or
//! the copy `cargo xtask models` caches), tract otherwise, saying which
//! and why in one log line and in `cascade_model_backend`.

use super::ModelError;
use super::ort::{self, OrtSettings};
use super::plan::Backend;
use prometheus::IntGaugeVec;
use std::path::{Path, PathBuf};

/// `--model-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModelBackend {
    /// ONNX Runtime when its library is found, else tract.
    #[default]
    Auto,
    /// ONNX Runtime, or refuse to start without its library.
    Onnxruntime,
    /// tract (pure Rust) whatever is installed.
    Tract,
}

/// What the host was asked for.
pub struct BackendRequest {
    /// `--model-backend`.
    pub choice: ModelBackend,
    /// `--onnxruntime`: the library, when named.
    pub library: Option<PathBuf>,
    /// `--onnxruntime-threads`.
    pub threads: usize,
    /// `--onnxruntime-alone-threads`.
    pub alone_threads: usize,
}

/// Why a backend could not be chosen: the host refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// `--model-backend tract` with `--onnxruntime`.
    #[error("--onnxruntime names a library but --model-backend is tract: drop one of the two")]
    Contradiction,
    /// `--model-backend onnxruntime` and no library anywhere.
    #[error(
        "--model-backend onnxruntime, but no library: pass --onnxruntime LIBRARY (or CASCADE_ONNXRUNTIME), or run `cargo xtask models` to cache one in {0}"
    )]
    NoLibrary(String),
    /// The library named or found does not load.
    #[error(transparent)]
    Load(#[from] ModelError),
}

/// The backend chosen, with the log line that says why.
pub struct Chosen {
    /// The engine.
    pub backend: Backend,
    /// One line for the start-up log.
    pub reason: String,
}

/// Chooses the engine and sets `cascade_model_backend` (`gauge`) to it.
/// A library named (`--onnxruntime`) or required (`--model-backend
/// onnxruntime`) loads now, so a wrong one stops the host at start. One the
/// host only found loads in the background, so functions without models
/// answer without waiting for it (~20 ms); if it does not load, a WARN line
/// says so, the gauge turns to tract and models load with tract.
pub fn choose(request: &BackendRequest, gauge: &IntGaugeVec) -> Result<Chosen, ChoiceError> {
    let settings = |library: PathBuf, or_tract: bool| OrtSettings {
        library,
        threads: request.threads,
        alone_threads: request.alone_threads,
        or_tract,
    };
    let onnxruntime = |settings: OrtSettings, how: &str| {
        set(gauge, "onnxruntime");
        Chosen {
            reason: format!(
                "models run with ONNX Runtime from {} ({how}; --model-backend tract runs them with tract)",
                settings.library.display()
            ),
            backend: Backend::OnnxRuntime(settings),
        }
    };
    let tract = |why: String| {
        set(gauge, "tract");
        Chosen {
            backend: Backend::Tract,
            reason: format!("models run with tract (pure Rust): {why}"),
        }
    };
    match (request.choice, &request.library) {
        (ModelBackend::Tract, Some(_)) => Err(ChoiceError::Contradiction),
        (ModelBackend::Tract, None) => Ok(tract("--model-backend tract".into())),
        (_, Some(library)) => {
            ort::init(library)?;
            Ok(onnxruntime(
                settings(library.clone(), false),
                "--onnxruntime",
            ))
        }
        (choice, None) => {
            let models = models_dir();
            match newest_library(&models) {
                Some(found) if choice == ModelBackend::Auto => {
                    // The gauge says onnxruntime before the loader may turn it to tract.
                    let chosen = onnxruntime(
                        settings(found.clone(), true),
                        "the cached copy, loading in the background; tract if it does not load",
                    );
                    load_in_background(found, gauge.clone());
                    Ok(chosen)
                }
                Some(found) => {
                    ort::init(&found)?;
                    Ok(onnxruntime(settings(found, false), "the cached copy"))
                }
                None if choice == ModelBackend::Auto => Ok(tract(format!(
                    "no ONNX Runtime library given (--onnxruntime) or cached in {} by `cargo xtask models`; with one, models usually run faster",
                    models.display()
                ))),
                None => Err(ChoiceError::NoLibrary(models.display().to_string())),
            }
        }
    }
}

/// `gauge{backend}` 1 for `backend`, 0 for the other.
fn set(gauge: &IntGaugeVec, backend: &str) {
    for name in ["tract", "onnxruntime"] {
        gauge
            .with_label_values(&[name])
            .set(i64::from(name == backend));
    }
}

/// Loads ONNX Runtime from `library` on a thread of its own; model loads
/// wait for it ([`ort::init`] runs once at a time).
fn load_in_background(library: PathBuf, gauge: IntGaugeVec) {
    let spawned = std::thread::Builder::new()
        .name("ort-init".into())
        .spawn(move || {
            if let Err(error) = ort::init(&library) {
                set(&gauge, "tract");
                tracing::warn!(
                    "models run with tract (pure Rust): the ONNX Runtime library {} did not load ({error})",
                    library.display()
                );
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(
            "no thread to load ONNX Runtime on ({error}); models load it when first used"
        );
    }
}

/// Where `cargo xtask models` unpacks model files and the library, as
/// xtask's `catalog::models_dir`: `$CASCADE_CACHE_DIR/models`, else
/// `$XDG_CACHE_HOME/cascade/models`, else `~/.cache/cascade/models`.
pub fn models_dir() -> PathBuf {
    let cache = std::env::var_os("CASCADE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("cascade")
        });
    cache.join("models")
}

/// The `libonnxruntime.so.X.Y.Z` with the highest version in `dir`.
fn newest_library(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = library_version(&name)?;
            entry
                .file_type()
                .ok()
                .filter(|t| !t.is_dir())
                .map(|_| (version, entry.path()))
        })
        .max()
        .map(|(_, path)| path)
}

/// `libonnxruntime.so.1.32.0` → `[1, 32, 0]`; anything else → `None`.
fn library_version(name: &str) -> Option<Vec<u32>> {
    name.strip_prefix("libonnxruntime.so.")?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically_and_other_names_are_ignored() {
        assert_eq!(
            library_version("libonnxruntime.so.1.32.0"),
            Some(vec![1, 32, 0])
        );
        assert_eq!(library_version("libonnxruntime.so"), None);
        assert_eq!(library_version("libonnxruntime.so.1.x"), None);
        assert_eq!(library_version("minilm.onnx"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.32.0",
            "x.onnx",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("file");
        }
        std::fs::create_dir(dir.path().join("libonnxruntime.so.9.0.0")).expect("dir");
        assert_eq!(
            newest_library(dir.path()),
            Some(dir.path().join("libonnxruntime.so.1.32.0"))
        );
    }

    #[test]
    fn tract_with_a_library_is_refused_and_tract_alone_needs_nothing() {
        let mut request = BackendRequest {
            choice: ModelBackend::Tract,
            library: Some("/nowhere/libonnxruntime.so.1.32.0".into()),
            threads: 1,
            alone_threads: 1,
        };
        let gauge = IntGaugeVec::new(
            prometheus::Opts::new("backend", "the engine in use"),
            &["backend"],
        )
        .expect("gauge");
        assert!(matches!(
            choose(&request, &gauge),
            Err(ChoiceError::Contradiction)
        ));
        request.library = None;
        let chosen = choose(&request, &gauge).expect("tract needs nothing");
        assert!(matches!(chosen.backend, Backend::Tract));
        assert!(
            chosen.reason.contains("--model-backend tract"),
            "{}",
            chosen.reason
        );
        assert_eq!(gauge.with_label_values(&["tract"]).get(), 1);
        assert_eq!(gauge.with_label_values(&["onnxruntime"]).get(), 0);
    }
}
