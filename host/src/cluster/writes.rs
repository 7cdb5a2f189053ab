//! Changes to the registry of record, decided in the record bucket: a
//! version is created only if its key is free (a second publish of other
//! bytes is a conflict, whichever host it reaches), and a function's head
//! and traffic split change only from the revision of the key that was
//! read (compare-and-set). The caller then applies the outcome to its
//! local registry; other hosts apply it when their watch sees it.

use super::store::Created;
use super::{ClusterError, ClusterStore, Head, keys};
use cascade_registry::blobs::StagedBlob;
use cascade_registry::names::Reference;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord, Use, World};
use cascade_registry::store::{component_record, same_or_conflict};
use cascade_registry::traffic::{RevisionRef, Traffic};
use cascade_registry::{ModelPackage, Published, RegistryError};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Compare-and-set attempts before a publish gives up on a busy head.
const CAS_ATTEMPTS: usize = 16;

fn not_found(what: String) -> ClusterError {
    ClusterError::Registry(RegistryError::NotFound(what))
}

fn conflict(what: String) -> ClusterError {
    ClusterError::Registry(RegistryError::Conflict(what))
}

impl ClusterStore {
    /// A stored blob older than this is written again by a publish that
    /// reuses it, so garbage collection cannot take it meanwhile.
    fn fresh(&self) -> Duration {
        self.gc_grace / 2
    }

    /// Uploads `blobs` (skipping fresh copies).
    async fn upload_all(&self, blobs: &[&StagedBlob]) -> Result<(), ClusterError> {
        for blob in blobs {
            self.upload(blob.path(), &blob.digest, self.fresh()).await?;
        }
        Ok(())
    }

    /// After a record naming `blobs` is created: uploads any that a
    /// collection removed between the upload and the record.
    async fn ensure_uploaded(&self, blobs: &[&StagedBlob]) -> Result<(), ClusterError> {
        for blob in blobs {
            if self.blob_written(&blob.digest).await?.is_none() {
                self.upload(blob.path(), &blob.digest, Duration::ZERO)
                    .await?;
            }
        }
        Ok(())
    }

    /// Publishes a component version whose world the caller established.
    pub async fn publish_component(
        &self,
        reference: &Reference,
        blob: &StagedBlob,
        world: World,
    ) -> Result<Published<ComponentRecord>, ClusterError> {
        let record = component_record(reference, blob, world);
        self.upload_all(&[blob]).await?;
        match self.create(&keys::component(reference), &record).await? {
            Created::Now => {
                self.ensure_uploaded(&[blob]).await?;
                Ok(Published {
                    record,
                    created: true,
                })
            }
            Created::Already(stored) => Ok(same_or_conflict(
                stored.clone(),
                &stored.digest,
                &record.digest,
                "component",
                &reference.to_string(),
            )?),
        }
    }

    /// Publishes a model package the caller checked.
    pub async fn publish_model(
        &self,
        reference: &Reference,
        package: &ModelPackage,
    ) -> Result<Published<ModelRecord>, ClusterError> {
        let record = package.record(reference)?;
        let mut blobs = vec![&package.model];
        blobs.extend(package.files.iter().map(|(_, blob)| blob));
        self.upload_all(&blobs).await?;
        match self.create(&keys::model(reference), &record).await? {
            Created::Now => {
                self.ensure_uploaded(&blobs).await?;
                Ok(Published {
                    record,
                    created: true,
                })
            }
            Created::Already(stored) => Ok(same_or_conflict(
                stored.clone(),
                &stored.package_digest,
                &record.package_digest,
                "model",
                &reference.to_string(),
            )?),
        }
    }

    /// Makes `prepared` (checked against this host's registry) the
    /// function's next revision, unless the head already has its manifest.
    pub async fn publish_function(
        &self,
        prepared: cascade_registry::records::Revision,
    ) -> Result<Published<cascade_registry::records::Revision>, ClusterError> {
        let name = prepared.record.name.clone();
        let key = keys::function(&name);
        for _ in 0..CAS_ATTEMPTS {
            let current: Option<(Head, u64)> = self.entry(&key).await?;
            if let Some((head, _)) = &current
                && head.head.digest == prepared.record.digest
            {
                let mut same = prepared;
                same.record = head.head.clone();
                return Ok(Published {
                    record: same,
                    created: false,
                });
            }
            let number = current.as_ref().map_or(0, |(head, _)| head.last) + 1;
            let mut record = prepared.record.clone();
            record.revision = number;
            let head = Head {
                head: record.clone(),
                last: number,
            };
            if self.swap(&key, &head, current.map(|(_, at)| at)).await? {
                self.put(&keys::revision(&name, number), &record).await?;
                let mut published = prepared;
                published.record = record;
                return Ok(Published {
                    record: published,
                    created: true,
                });
            }
        }
        Err(conflict(format!(
            "function {name} changed {CAS_ATTEMPTS} times while this revision was being published; publish again"
        )))
    }

    /// A revision of a function: its key, or the head (written first).
    async fn revision_record(
        &self,
        name: &str,
        number: u64,
    ) -> Result<FunctionRecord, ClusterError> {
        if let Some((record, _)) = self.entry(&keys::revision(name, number)).await? {
            return Ok(record);
        }
        match self.entry::<Head>(&keys::function(name)).await? {
            Some((head, _)) if head.head.revision == number => Ok(head.head),
            _ => Err(not_found(format!(
                "function {name} has no revision {number}"
            ))),
        }
    }

    /// Serves revision `number` of `name` again; returns it.
    pub async fn rollback(&self, name: &str, number: u64) -> Result<FunctionRecord, ClusterError> {
        let key = keys::function(name);
        for _ in 0..CAS_ATTEMPTS {
            let Some((head, at)) = self.entry::<Head>(&key).await? else {
                return Err(not_found(format!("function {name} is not published")));
            };
            let target = self.revision_record(name, number).await?;
            let next = Head {
                head: target.clone(),
                last: head.last,
            };
            if self.swap(&key, &next, Some(at)).await? {
                return Ok(target);
            }
        }
        Err(conflict(format!(
            "function {name} changed {CAS_ATTEMPTS} times during the rollback; roll back again"
        )))
    }

    /// The revision numbers `name` has in the bucket.
    fn revision_numbers(&self, name: &str, head: &Head) -> Result<Vec<u64>, ClusterError> {
        let prefix = keys::revisions_of(name);
        let mut numbers: Vec<u64> = self
            .view
            .keys(&prefix)?
            .iter()
            .filter_map(|key| key[prefix.len()..].parse().ok())
            .collect();
        numbers.push(head.head.revision);
        numbers.sort_unstable();
        numbers.dedup();
        Ok(numbers)
    }

    /// Sets the traffic split of `name`, from the split this call read
    /// (a concurrent change is a conflict); returns the revisions it names,
    /// for the caller to store locally.
    pub async fn set_traffic(
        &self,
        name: &str,
        split: &Traffic,
    ) -> Result<Vec<FunctionRecord>, ClusterError> {
        let Some((head, _)) = self.entry::<Head>(&keys::function(name)).await? else {
            return Err(not_found(format!("function {name} is not published")));
        };
        split
            .check(&self.revision_numbers(name, &head)?)
            .map_err(|e| ClusterError::Registry(RegistryError::Invalid(e.to_string())))?;
        let key = keys::traffic(name);
        let current: Option<(Traffic, u64)> = self.entry(&key).await?;
        if *split == Traffic::default() {
            self.delete(&key).await?;
        } else if !self.swap(&key, split, current.map(|(_, at)| at)).await? {
            return Err(conflict(format!(
                "the traffic split of {name} changed while this one was being set; read it again and retry"
            )));
        }
        let mut records = Vec::new();
        for target in &split.targets {
            if let RevisionRef::Number(number) = target.revision {
                records.push(self.revision_record(name, number).await?);
            }
        }
        Ok(records)
    }

    /// Deletes the artifact `used` (stored under `key`) unless a function
    /// revision in the bucket uses it; returns its record.
    async fn delete_artifact<R: DeserializeOwned>(
        &self,
        key: &str,
        used: &Use,
    ) -> Result<R, ClusterError> {
        let (kind, reference) = match used {
            Use::Component(r) => ("component", r),
            Use::Model(r) => ("model", r),
        };
        let Some((record, _)) = self.entry::<R>(key).await? else {
            return Err(not_found(format!("{kind} {reference} is not published")));
        };
        let heads: Vec<Head> = self.view.with_prefix(keys::FUNCTIONS)?;
        let revisions: Vec<FunctionRecord> = self.view.with_prefix(keys::REVISIONS)?;
        let all = heads.into_iter().map(|h| h.head).chain(revisions);
        for function in all {
            if function.uses.contains(used) {
                return Err(conflict(format!(
                    "{kind} {reference} is used by function {} revision {}; delete or republish that function first",
                    function.name, function.revision
                )));
            }
        }
        self.delete(key).await?;
        Ok(record)
    }

    /// Deletes a component version no function revision uses.
    pub async fn delete_component(
        &self,
        reference: &Reference,
    ) -> Result<ComponentRecord, ClusterError> {
        let used = Use::Component(reference.clone());
        self.delete_artifact(&keys::component(reference), &used)
            .await
    }

    /// Deletes a model version no function revision uses.
    pub async fn delete_model(&self, reference: &Reference) -> Result<ModelRecord, ClusterError> {
        let used = Use::Model(reference.clone());
        self.delete_artifact(&keys::model(reference), &used).await
    }

    /// Deletes a function: its revisions, its split, then its head (so
    /// hosts serve it until the head goes). Returns the revision numbers.
    pub async fn delete_function(&self, name: &str) -> Result<Vec<u64>, ClusterError> {
        let Some((head, _)) = self.entry::<Head>(&keys::function(name)).await? else {
            return Err(not_found(format!("function {name} is not published")));
        };
        let numbers = self.revision_numbers(name, &head)?;
        for number in &numbers {
            self.delete(&keys::revision(name, *number)).await?;
        }
        self.delete(&keys::traffic(name)).await?;
        self.delete(&keys::function(name)).await?;
        Ok(numbers)
    }
}
