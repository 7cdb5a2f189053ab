//! Models as ONNX Runtime left them after its graph optimisations, kept in
//! the compiled-artifact cache so a restart loads them with optimisation
//! off and their large weights in a file of their own, which ONNX Runtime
//! maps instead of copying: MiniLM-L3's first session took 130 ms from the
//! model and 26 ms from its copy (benches/optimisations.md, entry 34). The
//! price is a second copy of each model on disk, removed with the model,
//! and one more session built in the background after a model's first
//! run, to save it.
//!
//! ONNX Runtime's optimised graphs may use kernels chosen for this CPU and
//! this library version, so the copy's name carries both. A copy is a
//! directory (`model.onnx` names `weights.bin` beside it), written under a
//! temporary name and renamed whole, so a crash never leaves half of one;
//! it is never changed once in place (sessions map `weights.bin`).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// The graph's file in a copy.
const GRAPH: &str = "model.onnx";

/// The file of its large weights, beside the graph; ONNX Runtime writes
/// this name into the graph.
pub const WEIGHTS: &str = "weights.bin";

/// How a copy being written is named.
const PARTIAL: &str = ".partial-";

/// A copy still being written after this long was abandoned by a crash.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// The directory of optimised models, under the compiled cache.
#[derive(Debug, Clone)]
pub struct OptimizedModels {
    dir: PathBuf,
}

/// Where one model's optimised copy lives, and whether it is there.
#[derive(Debug, Clone)]
pub struct OptimizedCopy {
    /// `<dir>/<model digest>-<library and CPU tag>/`.
    dir: PathBuf,
    /// Its graph, `model.onnx`.
    pub path: PathBuf,
}

/// A copy being written: ONNX Runtime saves the graph at `path` and the
/// weights beside it; [`OptimizedCopy::keep`] moves the directory in place.
pub struct Staging {
    dir: tempfile::TempDir,
    /// Where ONNX Runtime writes the graph.
    pub path: PathBuf,
}

impl OptimizedModels {
    /// Optimised models kept in `dir` (created when the first is saved).
    pub fn new(dir: PathBuf) -> Self {
        OptimizedModels { dir }
    }

    /// The copy of the model `digest` for the ONNX Runtime `library`.
    pub fn copy_of(&self, digest: &str, library: &Path) -> OptimizedCopy {
        let dir = self.dir.join(format!("{digest}-{}", tag(library)));
        OptimizedCopy {
            path: dir.join(GRAPH),
            dir,
        }
    }

    /// Removes the copies of models `live` no longer wants, and anything a
    /// crash left half written.
    pub fn collect(&self, live: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let unwanted = if name.starts_with(PARTIAL) {
                // Another load may be writing it now.
                entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > ABANDONED_AFTER))
            } else {
                !live(name.split('-').next().unwrap_or_default())
            };
            if unwanted && let Err(e) = std::fs::remove_dir_all(entry.path()) {
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

    /// A fresh directory beside the final one for ONNX Runtime to write
    /// the copy into.
    pub fn staging(&self) -> std::io::Result<Staging> {
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix(PARTIAL)
            .tempdir_in(parent)?;
        let path = dir.path().join(GRAPH);
        Ok(Staging { dir, path })
    }

    /// Moves a written copy in place (in one rename).
    pub fn keep(&self, staged: Staging) {
        let from = staged.dir.keep();
        // Another load of the same model may have saved it first.
        if let Err(e) = std::fs::rename(&from, &self.dir)
            && !self.exists()
        {
            tracing::warn!(
                "cannot keep the optimised model {}: {e}",
                self.dir.display()
            );
        }
        if from.exists() {
            let _ = std::fs::remove_dir_all(&from);
        }
    }

    /// Removes a copy that would not load (sessions that map its weights
    /// keep them until they end).
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies being written now. A host stopping gracefully lets them finish:
/// one restarted soon after each start would otherwise never keep one.
static SAVING: Mutex<usize> = Mutex::new(0);
static SAVED: Condvar = Condvar::new();

/// Counts one copy as being written until dropped.
pub struct Saving(());

impl Saving {
    /// Starts counting.
    pub fn start() -> Self {
        *SAVING.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Saving(())
    }
}

impl Drop for Saving {
    fn drop(&mut self) {
        *SAVING.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        SAVED.notify_all();
    }
}

/// Waits (at most `within`) for the copies being written; says whether
/// none is left.
pub fn finish_saving(within: Duration) -> bool {
    let saving = SAVING.lock().unwrap_or_else(PoisonError::into_inner);
    let (left, _) = SAVED
        .wait_timeout_while(saving, within, |n| *n > 0)
        .unwrap_or_else(PoisonError::into_inner);
    *left == 0
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
            assert!(!copy.exists());
            let staged = copy.staging().expect("staging");
            std::fs::write(&staged.path, b"graph").expect("write");
            std::fs::write(staged.path.with_file_name(super::WEIGHTS), b"w").expect("write");
            copy.keep(staged);
            assert!(copy.exists());
        }
        // A second load of the same model saves it too: the first stays.
        let again = b.staging().expect("staging");
        std::fs::write(&again.path, b"graph").expect("write");
        std::fs::write(again.path.with_file_name(super::WEIGHTS), b"other").expect("write");
        b.keep(again);
        let being_written = a.staging().expect("staging");
        models.collect(|digest| digest == "bbbb");
        assert!(!a.exists(), "a model no longer published loses its copy");
        assert!(b.exists());
        assert!(
            being_written.path.parent().expect("dir").is_dir(),
            "a copy being written stays"
        );
        drop(being_written);
        assert_eq!(
            std::fs::read_dir(dir.path().join("onnxruntime"))
                .expect("dir")
                .count(),
            1,
            "nothing half written is left behind"
        );
        assert_eq!(
            std::fs::read(b.path.with_file_name(super::WEIGHTS)).expect("weights"),
            b"w"
        );
    }
}
