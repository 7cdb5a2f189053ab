//! Content-addressed files beside the database: `blobs/<sha256>`.
//!
//! Bodies stream into a temporary file under `tmp/` while being hashed, are
//! fsynced, and are renamed into `blobs/` only by a publish that then commits
//! its metadata. A crash leaves at worst an unreferenced blob or a temporary
//! file, both removed at the next open; a listed digest always names a whole,
//! verified file.

use crate::RegistryError;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// The blob directory and its staging area.
#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store under `root`, clearing abandoned uploads.
    pub fn open(root: &Path) -> Result<Self, RegistryError> {
        let store = BlobStore {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
        };
        fs::create_dir_all(&store.blobs)?;
        if store.tmp.exists() {
            fs::remove_dir_all(&store.tmp)?;
        }
        fs::create_dir_all(&store.tmp)?;
        Ok(store)
    }

    /// Where the blob with `digest` lives (it may not exist).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.blobs.join(digest)
    }

    /// Starts staging a blob of at most `limit` bytes.
    pub fn stage(&self, limit: u64) -> Result<BlobWriter, RegistryError> {
        Ok(BlobWriter {
            file: NamedTempFile::new_in(&self.tmp)?,
            hasher: Sha256::new(),
            size: 0,
            limit,
        })
    }

    /// Moves a staged blob into place (a no-op when the digest is already stored).
    pub(crate) fn commit(&self, staged: StagedBlob) -> Result<PathBuf, RegistryError> {
        let target = self.path(&staged.digest);
        if !target.exists() {
            staged
                .file
                .persist(&target)
                .map_err(|e| RegistryError::from(e.error))?;
            File::open(&self.blobs)?.sync_all()?;
        }
        Ok(target)
    }

    /// Digests of every stored blob.
    pub(crate) fn digests(&self) -> Result<Vec<String>, RegistryError> {
        let mut digests = Vec::new();
        for entry in fs::read_dir(&self.blobs)? {
            digests.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(digests)
    }

    /// Removes a blob no record refers to any more.
    pub(crate) fn remove(&self, digest: &str) -> Result<(), RegistryError> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// A blob being written; hashes as it goes and refuses to exceed its limit.
pub struct BlobWriter {
    file: NamedTempFile,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl BlobWriter {
    /// Appends a chunk.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), RegistryError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(RegistryError::TooLarge(format!(
                "body exceeds the limit of {} bytes",
                self.limit
            )));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk)?;
        Ok(())
    }

    /// Flushes to disk and returns the staged blob.
    pub fn finish(mut self) -> Result<StagedBlob, RegistryError> {
        self.file.flush()?;
        self.file.as_file().sync_all()?;
        Ok(StagedBlob {
            file: self.file,
            digest: hex::encode(self.hasher.finalize()),
            size: self.size,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A complete, hashed upload waiting to be published (deleted if dropped).
pub struct StagedBlob {
    file: NamedTempFile,
    /// sha256, lower-case hex.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl StagedBlob {
    /// Where the staged bytes are, for validation before publishing.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// sha256 of a file, for verification.
pub fn sha256_file(path: &Path) -> Result<String, RegistryError> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
