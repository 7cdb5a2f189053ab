//! Models as ONNX Runtime left them after its graph optimisations, kept in
//! the compiled-artifact cache so a restart loads them with optimisation
//! off: the PP-OCR classifier's first session took 16.5 ms from the model
//! and 4.7 ms from its copy, MiniLM-L3's 118 and 113 ms
//! (benches/optimisations.md, entry 34). The price is a second copy of
//! each model on disk, removed with the model.
//!
//! ONNX Runtime's optimised graphs may use kernels chosen for this CPU and
//! this library version, so the file name carries both.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The directory of optimised models, under the compiled cache.
#[derive(Debug, Clone)]
pub struct OptimizedModels {
    dir: PathBuf,
}

/// Where one model's optimised copy lives, and whether it is there.
#[derive(Debug, Clone)]
pub struct OptimizedCopy {
    /// `<dir>/<model digest>-<library and CPU tag>.onnx`.
    pub path: PathBuf,
    dir: PathBuf,
}

impl OptimizedModels {
    /// Optimised models kept in `dir` (created when the first is saved).
    pub fn new(dir: PathBuf) -> Self {
        OptimizedModels { dir }
    }

    /// The copy of the model `digest` for the ONNX Runtime `library`.
    pub fn copy_of(&self, digest: &str, library: &Path) -> OptimizedCopy {
        OptimizedCopy {
            path: self.dir.join(format!("{digest}-{}.onnx", tag(library))),
            dir: self.dir.clone(),
        }
    }

    /// Removes the copies of models `live` no longer wants.
    pub fn collect(&self, live: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name.split('-').next().unwrap_or_default();
            if !live(digest)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!("removing optimised model {name}: {e}");
            }
        }
    }
}

impl OptimizedCopy {
    /// Whether an earlier load saved it.
    pub fn exists(&self) -> bool {
        self.path.is_file()
    }

    /// A fresh file in the same directory for ONNX Runtime to write the
    /// copy into; [`OptimizedCopy::keep`] moves it in place in one step, so
    /// a crash never leaves half a model under the final name.
    pub fn staging(&self) -> std::io::Result<tempfile::TempPath> {
        std::fs::create_dir_all(&self.dir)?;
        Ok(tempfile::Builder::new()
            .suffix(".onnx.partial")
            .tempfile_in(&self.dir)?
            .into_temp_path())
    }

    /// Moves a written `staged` file in place.
    pub fn keep(&self, staged: tempfile::TempPath) {
        if let Err(e) = staged.persist(&self.path) {
            tracing::warn!(
                "cannot keep the optimised model {}: {e}",
                self.path.display()
            );
        }
    }

    /// Removes a copy that would not load.
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Names the library and the CPU features its kernels may rely on.
fn tag(library: &Path) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    library.file_name().hash(&mut hasher);
    cpu_features().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut features = Vec::new();
        for (name, present) in [
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
        ] {
            if present {
                features.push(name);
            }
        }
        features
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![std::env::consts::ARCH]
    }
}

#[cfg(test)]
mod tests {
    use super::OptimizedModels;
    use std::path::Path;

    #[test]
    fn copies_are_named_by_model_and_library_and_collected_when_unused() {
        let dir = tempfile::tempdir().expect("dir");
        let models = OptimizedModels::new(dir.path().join("onnxruntime"));
        let a = models.copy_of("aaaa", Path::new("/lib/libonnxruntime.so.1.22.0"));
        let other_library = models.copy_of("aaaa", Path::new("/lib/libonnxruntime.so.1.23.0"));
        assert_ne!(a.path, other_library.path);
        let b = models.copy_of("bbbb", Path::new("/lib/libonnxruntime.so.1.22.0"));
        for copy in [&a, &b] {
            let staged = copy.staging().expect("staging");
            std::fs::write(&staged, b"model").expect("write");
            copy.keep(staged);
            assert!(copy.exists());
        }
        models.collect(|digest| digest == "bbbb");
        assert!(!a.exists(), "a model no longer published loses its copy");
        assert!(b.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("onnxruntime"))
                .expect("dir")
                .count(),
            1,
            "no staging file is left behind"
        );
    }
}
