//! Another host's registry over its HTTP API, as a mirror's [`Source`].

use super::{Blob, MirrorError, Source};
use crate::client::{Kind, RegistryClient, paths};
use cascade_registry::blobs::BlobWriter;
use cascade_registry::names::Reference;
use cascade_registry::records::{ComponentRecord, FunctionRecord, ModelRecord};
use cascade_registry::traffic::Traffic;
use futures_util::StreamExt;

impl Source for RegistryClient {
    fn describe(&self) -> String {
        self.base().to_string()
    }

    async fn functions(&self) -> Result<Vec<FunctionRecord>, MirrorError> {
        Ok(RegistryClient::functions(self).await?)
    }

    async fn components(&self) -> Result<Vec<ComponentRecord>, MirrorError> {
        Ok(RegistryClient::components(self).await?)
    }

    async fn models(&self) -> Result<Vec<ModelRecord>, MirrorError> {
        Ok(RegistryClient::models(self).await?)
    }

    async fn component(&self, reference: &Reference) -> Result<ComponentRecord, MirrorError> {
        Ok(RegistryClient::component(self, reference).await?)
    }

    async fn model(&self, reference: &Reference) -> Result<ModelRecord, MirrorError> {
        Ok(RegistryClient::model(self, reference).await?)
    }

    async fn traffic(&self, name: &str) -> Result<Traffic, MirrorError> {
        let shown: serde_json::Value = self.get(&paths::traffic(name)).await?;
        serde_json::from_value(shown["split"].clone()).map_err(|e| MirrorError::Unreadable {
            what: format!("traffic split of {name}"),
            why: e.to_string(),
        })
    }

    async fn revision(&self, name: &str, revision: u64) -> Result<FunctionRecord, MirrorError> {
        let path = format!("{}/{revision}", paths::function(name));
        Ok(self.get(&path).await?)
    }

    async fn download(
        &self,
        blob: Blob<'_>,
        _digest: &str,
        writer: &mut BlobWriter,
    ) -> Result<(), MirrorError> {
        let path = match blob {
            Blob::Component(reference) => paths::content(Kind::Components, reference),
            Blob::Model(reference) => paths::content(Kind::Models, reference),
            Blob::ModelFile(reference, name) => paths::model_file(reference, name),
        };
        let response = RegistryClient::download(self, &path).await?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| MirrorError::Download {
                path: path.clone(),
                source: Box::new(source),
            })?;
            tokio::task::block_in_place(|| writer.write_chunk(&chunk))?;
        }
        Ok(())
    }
}
