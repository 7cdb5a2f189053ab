//! The registry on redb: records in `registry.redb`, bytes in [`BlobStore`].
//!
//! Every publish and delete is one redb write transaction; blobs are renamed
//! into place inside it, before the commit, so after a crash the database
//! lists only artifacts whose bytes are whole.

use crate::RegistryError;
use crate::blobs::{BlobStore, StagedBlob};
use crate::checks::{Lookup, check_stages};
use crate::manifest::{self, Function, Manifest};
use crate::names::{Name, Reference};
use crate::records::{
    ComponentRecord, FileRecord, FunctionRecord, ModelRecord, ModelSignature, Revision, Use, World,
};
use crate::tables::{COMPONENTS, FUNCTION_HEADS, FUNCTION_REVISIONS, FUNCTION_TRAFFIC, MODELS};
use crate::traffic::Traffic;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The outcome of a publish: the stored record and whether it is new (201)
/// or an identical re-publish (200).
#[derive(Debug, Clone)]
pub struct Published<R> {
    /// The stored record.
    pub record: R,
    /// False when an identical artifact was already stored.
    pub created: bool,
}

/// Whether a publish may replace a stored version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Versions {
    /// Published versions never change (every publish here).
    Immutable,
    /// A mirror follows its source, which may have deleted and re-published.
    FollowSource,
}

/// What a model version is made of, staged and checked by the caller.
pub struct ModelPackage {
    /// The ONNX file.
    pub model: StagedBlob,
    /// Extra files by name (`tokenizer.json`, `labels.txt`).
    pub files: Vec<(String, StagedBlob)>,
    /// Input dimensions fixed at publish.
    pub input_shapes: std::collections::BTreeMap<String, Vec<String>>,
    /// Inputs and outputs, as the publish-time checker found them.
    pub signature: ModelSignature,
}

/// The registry of one data directory.
pub struct Registry {
    db: Database,
    blobs: BlobStore,
    packages: PathBuf,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn decode<R: DeserializeOwned>(bytes: &[u8]) -> Result<R, RegistryError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// A function revision as stored: its record and the typed function.
#[derive(Serialize)]
struct StoredRevision<'a> {
    #[serde(flatten)]
    record: &'a FunctionRecord,
    function: &'a Function,
}

/// A stored revision read back. Revisions stored before the typed form was
/// kept have none: their manifest is parsed once more, on read.
#[derive(serde::Deserialize)]
struct StoredRevisionOwned {
    #[serde(flatten)]
    record: FunctionRecord,
    function: Option<Function>,
}

fn decode_revision(bytes: &[u8]) -> Result<Revision, RegistryError> {
    let stored: StoredRevisionOwned = decode(bytes)?;
    let function = match stored.function {
        Some(function) => function,
        None => manifest::parse(&stored.record.manifest)?.function,
    };
    Ok(Revision {
        record: stored.record,
        function,
    })
}

fn encode_revision(revision: &Revision) -> Result<Vec<u8>, RegistryError> {
    Ok(serde_json::to_vec(&StoredRevision {
        record: &revision.record,
        function: &revision.function,
    })?)
}

/// The component and model tables, of a write transaction or a read one,
/// for the publish-time checks.
struct Tables<T> {
    components: T,
    models: T,
}

impl<'txn> Tables<redb::Table<'txn, &'static str, &'static [u8]>> {
    fn of(txn: &'txn WriteTransaction) -> Result<Self, RegistryError> {
        Ok(Tables {
            components: txn.open_table(COMPONENTS)?,
            models: txn.open_table(MODELS)?,
        })
    }
}

impl<T: ReadableTable<&'static str, &'static [u8]>> Lookup for Tables<T> {
    fn component(&self, reference: &Reference) -> Result<Option<ComponentRecord>, RegistryError> {
        let found = self.components.get(reference.to_string().as_str())?;
        found.map(|v| decode(v.value())).transpose()
    }

    fn model(&self, reference: &Reference) -> Result<Option<ModelRecord>, RegistryError> {
        let found = self.models.get(reference.to_string().as_str())?;
        found.map(|v| decode(v.value())).transpose()
    }
}

/// The record of a component version stored from `blob`.
pub fn component_record(reference: &Reference, blob: &StagedBlob, world: World) -> ComponentRecord {
    ComponentRecord {
        name: reference.name.to_string(),
        version: reference.version.to_string(),
        digest: blob.digest.clone(),
        size: blob.size,
        world,
        published_at: now(),
    }
}

impl ModelPackage {
    /// The record this package is published as under `reference` (file
    /// names checked, package digest computed).
    pub fn record(&self, reference: &Reference) -> Result<ModelRecord, RegistryError> {
        let files = file_records(&self.files)?;
        Ok(ModelRecord {
            name: reference.name.to_string(),
            version: reference.version.to_string(),
            digest: self.model.digest.clone(),
            size: self.model.size,
            package_digest: package_digest(&self.model.digest, &files, &self.input_shapes),
            files,
            input_shapes: self.input_shapes.clone(),
            signature: self.signature.clone(),
            published_at: now(),
        })
    }
}

fn get<R: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<R>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    table.get(key)?.map(|v| decode(v.value())).transpose()
}

fn all<R: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<R>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    table
        .iter()?
        .map(|entry| decode(entry?.1.value()))
        .collect()
}

/// Versions of `name` in `records`, newest first.
fn versions_of<R>(records: Vec<R>, name: &str, parts: impl Fn(&R) -> (&str, &str)) -> Vec<R> {
    let mut found: Vec<(semver::Version, R)> = records
        .into_iter()
        .filter(|r| parts(r).0 == name)
        .filter_map(|r| semver::Version::parse(parts(&r).1).ok().map(|v| (v, r)))
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, r)| r).collect()
}

impl Registry {
    /// Opens (creating) the registry in `dir`, clearing abandoned uploads and
    /// unreferenced blobs.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, RegistryError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("registry.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(COMPONENTS)?;
        txn.open_table(MODELS)?;
        txn.open_table(FUNCTION_REVISIONS)?;
        txn.open_table(FUNCTION_HEADS)?;
        txn.open_table(FUNCTION_TRAFFIC)?;
        txn.commit()?;
        let registry = Registry {
            db,
            blobs: BlobStore::open(dir)?,
            packages: dir.join("packages"),
        };
        registry.collect_garbage(true)?;
        Ok(registry)
    }

    /// Starts staging an upload of at most `limit` bytes.
    pub fn stage(&self, limit: u64) -> Result<crate::blobs::BlobWriter, RegistryError> {
        self.blobs.stage(limit)
    }

    /// Where the bytes of `digest` are.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.blobs.path(digest)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Publishes a component whose world the caller has established.
    pub fn publish_component(
        &self,
        reference: &Reference,
        blob: StagedBlob,
        world: World,
    ) -> Result<Published<ComponentRecord>, RegistryError> {
        self.store_component(reference, blob, world, Versions::Immutable)
    }

    /// A mirror's copy of its source's component: replaces a local record
    /// whose bytes differ (the source deleted and re-published the version).
    pub fn mirror_component(
        &self,
        reference: &Reference,
        blob: StagedBlob,
        world: World,
    ) -> Result<Published<ComponentRecord>, RegistryError> {
        let published = self.store_component(reference, blob, world, Versions::FollowSource)?;
        self.collect_garbage(false)?;
        Ok(published)
    }

    fn store_component(
        &self,
        reference: &Reference,
        blob: StagedBlob,
        world: World,
        versions: Versions,
    ) -> Result<Published<ComponentRecord>, RegistryError> {
        let key = reference.to_string();
        self.write(|txn| {
            let mut table = txn.open_table(COMPONENTS)?;
            let existing: Option<ComponentRecord> = table
                .get(key.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(existing) = existing
                && (versions == Versions::Immutable || existing.digest == blob.digest)
            {
                return same_or_conflict(
                    existing.clone(),
                    &existing.digest,
                    &blob.digest,
                    "component",
                    &key,
                );
            }
            let record = component_record(reference, &blob, world);
            self.blobs.commit(blob)?;
            table.insert(key.as_str(), serde_json::to_vec(&record)?.as_slice())?;
            Ok(Published {
                record,
                created: true,
            })
        })
    }

    /// Publishes a model package: the ONNX file plus named extra files.
    pub fn publish_model(
        &self,
        reference: &Reference,
        package: ModelPackage,
    ) -> Result<Published<ModelRecord>, RegistryError> {
        self.store_model(reference, package, Versions::Immutable)
    }

    /// A mirror's copy of its source's model: replaces a local record whose
    /// package differs (the source deleted and re-published the version).
    pub fn mirror_model(
        &self,
        reference: &Reference,
        package: ModelPackage,
    ) -> Result<Published<ModelRecord>, RegistryError> {
        let published = self.store_model(reference, package, Versions::FollowSource)?;
        self.collect_garbage(false)?;
        Ok(published)
    }

    fn store_model(
        &self,
        reference: &Reference,
        package: ModelPackage,
        versions: Versions,
    ) -> Result<Published<ModelRecord>, RegistryError> {
        let record = package.record(reference)?;
        let ModelPackage { model, files, .. } = package;
        let key = reference.to_string();
        self.write(|txn| {
            let mut table = txn.open_table(MODELS)?;
            let existing: Option<ModelRecord> = table
                .get(key.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(existing) = existing
                && (versions == Versions::Immutable
                    || existing.package_digest == record.package_digest)
            {
                return same_or_conflict(
                    existing.clone(),
                    &existing.package_digest,
                    &record.package_digest,
                    "model",
                    &key,
                );
            }
            self.blobs.commit(model)?;
            for (_, blob) in files {
                self.blobs.commit(blob)?;
            }
            table.insert(key.as_str(), serde_json::to_vec(&record)?.as_slice())?;
            Ok(Published {
                record,
                created: true,
            })
        })
    }

    /// Publishes a function manifest as its next revision, after checking
    /// that every stage exists and fits its position. An identical manifest
    /// to the current revision is not stored again.
    pub fn publish_function(
        &self,
        manifest: &Manifest,
    ) -> Result<Published<Revision>, RegistryError> {
        let name = manifest.function.name.as_str();
        let digest = manifest_digest(manifest);
        self.write(|txn| {
            let uses = check_stages(&manifest.function.stages, &Tables::of(txn)?)?;
            let mut heads = txn.open_table(FUNCTION_HEADS)?;
            let mut revisions = txn.open_table(FUNCTION_REVISIONS)?;
            let head = heads.get(name)?.map(|v| v.value());
            if let Some(head) = head {
                let stored = revisions.get((name, head))?.ok_or_else(|| corrupt(name))?;
                let current = decode_revision(stored.value())?;
                if current.record.digest == digest {
                    return Ok(Published {
                        record: current,
                        created: false,
                    });
                }
            }
            let last = revisions
                .range((name, 0)..=(name, u64::MAX))?
                .next_back()
                .transpose()?
                .map_or(0, |(k, _)| k.value().1);
            let revision = Revision {
                record: FunctionRecord {
                    name: name.to_string(),
                    revision: last + 1,
                    digest,
                    manifest: manifest.text.clone(),
                    uses,
                    published_at: now(),
                },
                function: manifest.function.clone(),
            };
            revisions.insert(
                (name, revision.record.revision),
                encode_revision(&revision)?.as_slice(),
            )?;
            heads.insert(name, revision.record.revision)?;
            Ok(Published {
                record: revision,
                created: true,
            })
        })
    }

    /// The record `manifest` would be published as, checked against the
    /// components and models stored here, numbered `revision` (for a
    /// registry of record elsewhere, which numbers revisions itself).
    pub fn prepare_function(
        &self,
        manifest: &Manifest,
        revision: u64,
    ) -> Result<Revision, RegistryError> {
        let txn = self.db.begin_read()?;
        let tables = Tables {
            components: txn.open_table(COMPONENTS)?,
            models: txn.open_table(MODELS)?,
        };
        let uses = check_stages(&manifest.function.stages, &tables)?;
        Ok(Revision {
            record: FunctionRecord {
                name: manifest.function.name.to_string(),
                revision,
                digest: manifest_digest(manifest),
                manifest: manifest.text.clone(),
                uses,
                published_at: now(),
            },
            function: manifest.function.clone(),
        })
    }

    /// One component.
    pub fn component(&self, reference: &Reference) -> Result<ComponentRecord, RegistryError> {
        get(&self.db, COMPONENTS, &reference.to_string())?.ok_or_else(|| {
            RegistryError::NotFound(format!("component {reference} is not published"))
        })
    }

    /// Every component version.
    pub fn components(&self) -> Result<Vec<ComponentRecord>, RegistryError> {
        all(&self.db, COMPONENTS)
    }

    /// Versions of one component, newest first (404 when none).
    pub fn component_versions(&self, name: &Name) -> Result<Vec<ComponentRecord>, RegistryError> {
        let found = versions_of(self.components()?, name.as_str(), |r| (&r.name, &r.version));
        non_empty(found, "component", name)
    }

    /// One model.
    pub fn model(&self, reference: &Reference) -> Result<ModelRecord, RegistryError> {
        get(&self.db, MODELS, &reference.to_string())?
            .ok_or_else(|| RegistryError::NotFound(format!("model {reference} is not published")))
    }

    /// Every model version.
    pub fn models(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        all(&self.db, MODELS)
    }

    /// Versions of one model, newest first (404 when none).
    pub fn model_versions(&self, name: &Name) -> Result<Vec<ModelRecord>, RegistryError> {
        let found = versions_of(self.models()?, name.as_str(), |r| (&r.name, &r.version));
        non_empty(found, "model", name)
    }

    /// The current revision of every function.
    pub fn functions(&self) -> Result<Vec<Revision>, RegistryError> {
        let txn = self.db.begin_read()?;
        let heads = txn.open_table(FUNCTION_HEADS)?;
        let revisions = txn.open_table(FUNCTION_REVISIONS)?;
        let mut out = Vec::new();
        for entry in heads.iter()? {
            let (name, revision) = entry?;
            let record = revisions
                .get((name.value(), revision.value()))?
                .ok_or_else(|| corrupt(name.value()))?;
            out.push(decode_revision(record.value())?);
        }
        Ok(out)
    }

    /// The current revision of a function.
    pub fn function(&self, name: &str) -> Result<Revision, RegistryError> {
        let txn = self.db.begin_read()?;
        let head = txn
            .open_table(FUNCTION_HEADS)?
            .get(name)?
            .map(|v| v.value());
        let head = head
            .ok_or_else(|| RegistryError::NotFound(format!("function {name} is not published")))?;
        let revisions = txn.open_table(FUNCTION_REVISIONS)?;
        let record = revisions.get((name, head))?.ok_or_else(|| corrupt(name))?;
        decode_revision(record.value())
    }

    /// Every revision of a function, oldest first.
    pub fn function_revisions(&self, name: &str) -> Result<Vec<Revision>, RegistryError> {
        let txn = self.db.begin_read()?;
        let revisions = txn.open_table(FUNCTION_REVISIONS)?;
        let found: Vec<Revision> = revisions
            .range((name, 0)..=(name, u64::MAX))?
            .map(|e| {
                e.map_err(RegistryError::from)
                    .and_then(|(_, v)| decode_revision(v.value()))
            })
            .collect::<Result<_, _>>()?;
        if found.is_empty() {
            return Err(RegistryError::NotFound(format!(
                "function {name} is not published"
            )));
        }
        Ok(found)
    }

    /// One revision of a function.
    pub fn function_revision(&self, name: &str, revision: u64) -> Result<Revision, RegistryError> {
        let txn = self.db.begin_read()?;
        let revisions = txn.open_table(FUNCTION_REVISIONS)?;
        let record = revisions.get((name, revision))?.ok_or_else(|| {
            RegistryError::NotFound(format!("function {name} has no revision {revision}"))
        })?;
        decode_revision(record.value())
    }

    /// Stores a revision exactly as another registry holds it and makes it
    /// the current one (for hosts that mirror a registry). The components
    /// and models it uses must already be here.
    pub fn mirror_function(&self, record: &FunctionRecord) -> Result<(), RegistryError> {
        self.mirror_revision(record, true)
    }

    /// Stores a revision exactly as another registry holds it, making it
    /// the current one when `head` (a mirror copies the revisions a
    /// traffic split serves beside the head).
    pub fn mirror_revision(
        &self,
        record: &FunctionRecord,
        head: bool,
    ) -> Result<(), RegistryError> {
        let parsed = manifest::parse(&record.manifest)?;
        if parsed.function.name.as_str() != record.name {
            return Err(RegistryError::Invalid(format!(
                "revision {} of function {} holds a manifest of function {}",
                record.revision, record.name, parsed.function.name
            )));
        }
        let revision = Revision {
            record: record.clone(),
            function: parsed.function,
        };
        self.write(|txn| {
            check_stages(&revision.function.stages, &Tables::of(txn)?)?;
            let mut revisions = txn.open_table(FUNCTION_REVISIONS)?;
            let key = (record.name.as_str(), record.revision);
            // A number the source gave anew (after a delete) replaces ours.
            let stored: Option<FunctionRecord> =
                revisions.get(key)?.map(|v| decode(v.value())).transpose()?;
            if stored.is_none_or(|s| s.digest != record.digest) {
                revisions.insert(key, encode_revision(&revision)?.as_slice())?;
            }
            if head {
                txn.open_table(FUNCTION_HEADS)?
                    .insert(record.name.as_str(), record.revision)?;
            }
            Ok(())
        })
    }

    /// How a function's requests split across its revisions (every
    /// request to the head when none was set).
    pub fn traffic(&self, name: &str) -> Result<Traffic, RegistryError> {
        self.function(name)?;
        Ok(get(&self.db, FUNCTION_TRAFFIC, name)?.unwrap_or_default())
    }

    /// Sets a function's traffic split, checked against its revisions in
    /// the same transaction that stores it.
    pub fn set_traffic(&self, name: &str, traffic: &Traffic) -> Result<(), RegistryError> {
        self.write(|txn| {
            let revisions = txn.open_table(FUNCTION_REVISIONS)?;
            let numbers: Vec<u64> = revisions
                .range((name, 0)..=(name, u64::MAX))?
                .map(|e| e.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            if numbers.is_empty() {
                return Err(RegistryError::NotFound(format!(
                    "function {name} is not published"
                )));
            }
            traffic
                .check(&numbers)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            let mut table = txn.open_table(FUNCTION_TRAFFIC)?;
            if *traffic == Traffic::default() {
                table.remove(name)?;
            } else {
                table.insert(name, serde_json::to_vec(traffic)?.as_slice())?;
            }
            Ok(())
        })
    }

    /// Serves an earlier revision again.
    pub fn rollback(&self, name: &str, revision: u64) -> Result<Revision, RegistryError> {
        self.write(|txn| {
            let revisions = txn.open_table(FUNCTION_REVISIONS)?;
            let record = decode_revision(
                revisions
                    .get((name, revision))?
                    .ok_or_else(|| {
                        RegistryError::NotFound(format!(
                            "function {name} has no revision {revision}"
                        ))
                    })?
                    .value(),
            )?;
            txn.open_table(FUNCTION_HEADS)?.insert(name, revision)?;
            Ok(record)
        })
    }

    /// Deletes a component version no function revision uses.
    pub fn delete_component(
        &self,
        reference: &Reference,
    ) -> Result<ComponentRecord, RegistryError> {
        let record: ComponentRecord =
            self.delete_artifact(COMPONENTS, Use::Component(reference.clone()))?;
        self.collect_garbage(false)?;
        Ok(record)
    }

    /// Deletes a model version no function revision uses.
    pub fn delete_model(&self, reference: &Reference) -> Result<ModelRecord, RegistryError> {
        let record: ModelRecord = self.delete_artifact(MODELS, Use::Model(reference.clone()))?;
        self.collect_garbage(false)?;
        Ok(record)
    }

    fn delete_artifact<R: DeserializeOwned + Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        used_as: Use,
    ) -> Result<R, RegistryError> {
        let (kind, reference) = match &used_as {
            Use::Component(r) => ("component", r),
            Use::Model(r) => ("model", r),
        };
        let key = reference.to_string();
        self.write(|txn| {
            let revisions = txn.open_table(FUNCTION_REVISIONS)?;
            for entry in revisions.iter()? {
                let (_, value) = entry?;
                // The record alone: deleting never needs the typed stages.
                let function: FunctionRecord = decode(value.value())?;
                if function.uses.contains(&used_as) {
                    return Err(RegistryError::Conflict(format!(
                        "{kind} {key} is used by function {} revision {}; delete or republish that function first",
                        function.name, function.revision
                    )));
                }
            }
            let mut table = txn.open_table(table)?;
            let removed = table
                .remove(key.as_str())?
                .ok_or_else(|| RegistryError::NotFound(format!("{kind} {key} is not published")))?;
            decode(removed.value())
        })
    }

    /// Deletes a function and all its revisions.
    pub fn delete_function(&self, name: &str) -> Result<Vec<Revision>, RegistryError> {
        let removed = self.function_revisions(name)?;
        self.write(|txn| {
            let mut revisions = txn.open_table(FUNCTION_REVISIONS)?;
            for revision in &removed {
                revisions.remove((name, revision.record.revision))?;
            }
            txn.open_table(FUNCTION_HEADS)?.remove(name)?;
            txn.open_table(FUNCTION_TRAFFIC)?.remove(name)?;
            Ok(())
        })?;
        Ok(removed)
    }

    /// A directory holding the model package's extra files by name, made of
    /// hard links to the blobs (created on first use, atomically).
    pub fn model_dir(&self, model: &ModelRecord) -> Result<PathBuf, RegistryError> {
        let dir = self.packages.join(&model.package_digest);
        if dir.is_dir() {
            return Ok(dir);
        }
        fs::create_dir_all(&self.packages)?;
        let staging = tempfile::Builder::new()
            .prefix(".pkg")
            .tempdir_in(&self.packages)?;
        for file in &model.files {
            let target = staging.path().join(&file.name);
            if fs::hard_link(self.blob_path(&file.digest), &target).is_err() {
                fs::copy(self.blob_path(&file.digest), &target)?;
            }
        }
        let staged = staging.keep();
        if let Err(e) = fs::rename(&staged, &dir) {
            let _ = fs::remove_dir_all(&staged);
            if !dir.is_dir() {
                return Err(e.into());
            }
        }
        Ok(dir)
    }

    /// Removes blobs and package directories no record refers to (left by
    /// crashes or deletes).
    ///
    /// It runs inside a write transaction it never commits: redb admits one
    /// writer at a time, and a publish renames its blobs into place inside
    /// its own write transaction, so no blob a publish is about to commit
    /// can be seen here as unreferenced.
    fn collect_garbage(&self, at_open: bool) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        let mut live = BTreeSet::new();
        let mut packages = BTreeSet::new();
        for entry in txn.open_table(COMPONENTS)?.iter()? {
            let record: ComponentRecord = decode(entry?.1.value())?;
            live.insert(record.digest);
        }
        for entry in txn.open_table(MODELS)?.iter()? {
            let record: ModelRecord = decode(entry?.1.value())?;
            live.insert(record.digest);
            live.extend(record.files.into_iter().map(|f| f.digest));
            packages.insert(record.package_digest);
        }
        for digest in self.blobs.digests()? {
            if !live.contains(&digest) {
                self.blobs.remove(&digest)?;
            }
        }
        self.collect_packages(&packages, at_open)?;
        txn.abort()?;
        Ok(())
    }

    /// Removes package directories of models no longer published: their
    /// hard links would keep deleted blobs' bytes on disk. Staging
    /// directories (`.pkg…`) are [`Registry::model_dir`]'s work in progress,
    /// removed only `at_open`, where they can only be a crash's leftovers.
    fn collect_packages(
        &self,
        live: &BTreeSet<String>,
        at_open: bool,
    ) -> Result<(), RegistryError> {
        let entries = match fs::read_dir(&self.packages) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let staging = name.starts_with(".pkg");
            if !live.contains(&name) && (at_open || !staging) {
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

/// What tells one manifest text from another.
fn manifest_digest(manifest: &Manifest) -> String {
    hex::encode(Sha256::digest(manifest.text.as_bytes()))
}

/// The answer to a publish of a version stored before: the stored record
/// when the bytes are the same, else a conflict naming the stored digest.
pub fn same_or_conflict<R>(
    existing: R,
    stored: &str,
    offered: &str,
    kind: &str,
    key: &str,
) -> Result<Published<R>, RegistryError> {
    if stored == offered {
        Ok(Published {
            record: existing,
            created: false,
        })
    } else {
        Err(RegistryError::Conflict(format!(
            "{kind} {key} is already published with digest {stored}; versions are immutable, publish a new version"
        )))
    }
}

fn non_empty<R>(found: Vec<R>, kind: &str, name: &Name) -> Result<Vec<R>, RegistryError> {
    if found.is_empty() {
        Err(RegistryError::NotFound(format!(
            "{kind} {name} is not published"
        )))
    } else {
        Ok(found)
    }
}

fn corrupt(name: &str) -> RegistryError {
    RegistryError::Storage(format!("function {name} points at a missing revision").into())
}

/// The records of a package's extra files, each name valid and once.
fn file_records(files: &[(String, StagedBlob)]) -> Result<Vec<FileRecord>, RegistryError> {
    let mut names = BTreeSet::new();
    for (name, _) in files {
        check_file_name(name)?;
        if !names.insert(name.clone()) {
            return Err(RegistryError::Invalid(format!(
                "file {name:?} appears twice in the package"
            )));
        }
    }
    Ok(files
        .iter()
        .map(|(name, blob)| FileRecord {
            name: name.clone(),
            digest: blob.digest.clone(),
            size: blob.size,
        })
        .collect())
}

fn check_file_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "invalid file name {name:?}: use letters, digits, '.', '_' and '-' only"
        )))
    }
}

fn package_digest(
    model: &str,
    files: &[FileRecord],
    input_shapes: &std::collections::BTreeMap<String, Vec<String>>,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("model {model}\n"));
    for (input, dims) in input_shapes {
        hasher.update(format!("shape {input} {}\n", dims.join(",")));
    }
    let mut sorted: Vec<&FileRecord> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for f in sorted {
        hasher.update(format!("file {} {}\n", f.name, f.digest));
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(registry: &Registry, bytes: &[u8]) -> StagedBlob {
        let mut writer = registry.stage(1 << 20).expect("stage");
        writer.write_chunk(bytes).expect("write");
        writer.finish().expect("finish")
    }

    fn publish(registry: &Registry, text: &str) -> Result<Published<Revision>, RegistryError> {
        registry.publish_function(&manifest::parse(text)?)
    }

    fn reference(s: &str) -> Reference {
        s.parse().expect("valid reference")
    }

    #[test]
    fn versions_are_immutable_and_republish_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        let r = reference("pre@1.0.0");
        let first = registry
            .publish_component(&r, staged(&registry, b"one"), World::Preprocessor)
            .expect("publish");
        assert!(first.created);
        assert_eq!(first.record.digest, hex::encode(Sha256::digest(b"one")));
        let again = registry
            .publish_component(&r, staged(&registry, b"one"), World::Preprocessor)
            .expect("same");
        assert!(!again.created);
        let err = registry
            .publish_component(&r, staged(&registry, b"two"), World::Preprocessor)
            .expect_err("conflict");
        assert_eq!(err.status(), 409);
        assert_eq!(
            std::fs::read(registry.blob_path(&first.record.digest)).expect("blob"),
            b"one"
        );
    }

    /// A fresh registry holding the preprocessor `pre@1.0.0` (keep the
    /// directory alive as long as the registry).
    fn with_preprocessor() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::open(dir.path()).expect("open");
        registry
            .publish_component(
                &reference("pre@1.0.0"),
                staged(&registry, b"p"),
                World::Preprocessor,
            )
            .expect("pre");
        (dir, registry)
    }

    #[test]
    fn functions_check_stages_and_protect_what_they_use() {
        let (_dir, registry) = with_preprocessor();
        registry
            .publish_component(
                &reference("post@1.0.0"),
                staged(&registry, b"q"),
                World::Postprocessor,
            )
            .expect("post");
        let missing = "name = \"f\"\n[[stages]]\ncomponent = \"nope@1.0.0\"";
        let err = publish(&registry, missing).expect_err("missing");
        assert!(
            err.to_string()
                .contains("component nope@1.0.0 is not published"),
            "{err}"
        );
        let swapped = "name = \"f\"\n[[stages]]\ncomponent = \"post@1.0.0\"\n[[stages]]\ncomponent = \"pre@1.0.0\"";
        let err = publish(&registry, swapped).expect_err("misplaced");
        assert!(
            err.to_string()
                .contains("post@1.0.0 is a postprocessor, which can only be the last stage"),
            "{err}"
        );
        let good = "name = \"f\"\n[[stages]]\ncomponent = \"pre@1.0.0\"\n[[stages]]\ncomponent = \"post@1.0.0\"";
        assert_eq!(
            publish(&registry, good)
                .expect("good")
                .record
                .record
                .revision,
            1
        );
        assert!(!publish(&registry, good).expect("same").created);
        let second = format!("{good}\n[limits]\ntimeout_ms = 100");
        assert_eq!(
            publish(&registry, &second)
                .expect("second")
                .record
                .record
                .revision,
            2
        );
        assert_eq!(
            registry.rollback("f", 1).expect("rollback").record.revision,
            1
        );
        assert_eq!(registry.function("f").expect("head").record.revision, 1);
        let err = registry
            .delete_component(&reference("pre@1.0.0"))
            .expect_err("in use");
        assert_eq!(err.status(), 409);
        registry.delete_function("f").expect("delete function");
        registry
            .delete_component(&reference("pre@1.0.0"))
            .expect("now free");
        assert_eq!(registry.components().expect("list").len(), 1);
    }

    /// A source that deleted a function and published it again numbers
    /// from 1 anew: the copy replaces a stored revision of that number.
    #[test]
    fn a_mirrored_revision_replaces_a_stored_one_with_other_content() {
        let (_dir, registry) = with_preprocessor();
        let old = publish(
            &registry,
            "name = \"f\"\n[[stages]]\ncomponent = \"pre@1.0.0\"",
        )
        .expect("old")
        .record;
        let text = "name = \"f\"\n[[stages]]\ncomponent = \"pre@1.0.0\"\n[limits]\ntimeout_ms = 99";
        let mut anew = registry
            .prepare_function(&manifest::parse(text).expect("manifest"), 1)
            .expect("prepared")
            .record;
        anew.revision = old.record.revision;
        registry.mirror_revision(&anew, true).expect("mirrored");
        let head = registry.function("f").expect("head");
        assert_eq!(head.record.digest, anew.digest);
        assert_eq!(head.function.limits.timeout_ms, 99);
    }

    /// A data directory written before revisions kept their typed form
    /// still serves: the record's manifest is parsed when read.
    #[test]
    fn revisions_stored_without_the_typed_form_are_read_from_their_manifest() {
        let (_dir, registry) = with_preprocessor();
        let text =
            "name = \"old\"\n[[stages]]\ncomponent = \"pre@1.0.0\"\n[limits]\ntimeout_ms = 250";
        let legacy = serde_json::json!({
            "name": "old",
            "revision": 1,
            "digest": hex::encode(Sha256::digest(text.as_bytes())),
            "manifest": text,
            "uses": ["component:pre@1.0.0"],
            "published_at": 0,
        });
        registry
            .write(|txn| {
                let bytes = serde_json::to_vec(&legacy)?;
                txn.open_table(FUNCTION_REVISIONS)?
                    .insert(("old", 1), bytes.as_slice())?;
                txn.open_table(FUNCTION_HEADS)?.insert("old", 1)?;
                Ok(())
            })
            .expect("a legacy row");
        let revision = registry.function("old").expect("readable");
        assert_eq!(revision.function.limits.timeout_ms, 250);
        assert_eq!(
            revision.record.uses,
            [Use::Component(reference("pre@1.0.0"))]
        );
        assert_eq!(
            serde_json::to_value(&revision).expect("json"),
            legacy,
            "the API shows the record as it was stored"
        );
        // Re-publishing the same text is recognised as identical.
        assert!(!publish(&registry, text).expect("same").created);
    }
}
