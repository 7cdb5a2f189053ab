//! The buckets as a mirror's [`Source`]: records from this host's
//! [`super::view::View`], bytes streamed from the object store.

use super::{ClusterError, ClusterStore, Head, keys};
use crate::mirror::{Blob, MirrorError, Source};
use cascade_registry::RegistryError;
use cascade_registry::blobs::BlobWriter;
use cascade_registry::names::Reference;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use cascade_registry::traffic::Traffic;
use std::sync::Arc;

impl From<ClusterError> for MirrorError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Registry(e) => MirrorError::Local(e),
            other => MirrorError::Bucket(other.to_string()),
        }
    }
}

fn missing(what: String) -> MirrorError {
    MirrorError::Bucket(format!("{what} is not in the cluster registry"))
}

impl Source for Arc<ClusterStore> {
    fn describe(&self) -> String {
        ClusterStore::describe(self)
    }

    async fn functions(&self) -> Result<Vec<FunctionRecord>, MirrorError> {
        let heads: Vec<Head> = self.view.with_prefix(keys::FUNCTIONS)?;
        Ok(heads.into_iter().map(|h| h.head).collect())
    }

    async fn components(&self) -> Result<Vec<ComponentRecord>, MirrorError> {
        Ok(self.view.with_prefix(keys::COMPONENTS)?)
    }

    async fn models(&self) -> Result<Vec<ModelRecord>, MirrorError> {
        Ok(self.view.with_prefix(keys::MODELS)?)
    }

    async fn component(&self, reference: &Reference) -> Result<ComponentRecord, MirrorError> {
        self.view
            .get(&keys::component(reference))?
            .ok_or_else(|| missing(format!("component {reference}")))
    }

    async fn model(&self, reference: &Reference) -> Result<ModelRecord, MirrorError> {
        self.view
            .get(&keys::model(reference))?
            .ok_or_else(|| missing(format!("model {reference}")))
    }

    async fn traffic(&self, name: &str) -> Result<Traffic, MirrorError> {
        Ok(self.view.get(&keys::traffic(name))?.unwrap_or_default())
    }

    async fn revision(&self, name: &str, revision: u64) -> Result<FunctionRecord, MirrorError> {
        if let Some(record) = self.view.get(&keys::revision(name, revision))? {
            return Ok(record);
        }
        // The head is written before its revision key (see `writes`).
        match self.view.get::<Head>(&keys::function(name))? {
            Some(head) if head.head.revision == revision => Ok(head.head),
            _ => Err(MirrorError::Local(RegistryError::NotFound(format!(
                "function {name} has no revision {revision} in the cluster registry"
            )))),
        }
    }

    async fn download(
        &self,
        _blob: Blob<'_>,
        digest: &str,
        writer: &mut BlobWriter,
    ) -> Result<(), MirrorError> {
        Ok(ClusterStore::download(self, digest, writer).await?)
    }
}
