//! The registry under concurrent writers, on a real redb file: garbage
//! collection after deletes must never take a blob that a publish running
//! at the same time is committing.

use cascade_registry::Registry;
use cascade_registry::blobs::{StagedBlob, sha256_file};
use cascade_registry::names::Reference;
use cascade_registry::records::World;
use std::sync::Arc;

fn staged(registry: &Registry, bytes: &[u8]) -> StagedBlob {
    let mut writer = registry.stage(1 << 20).expect("staging");
    writer.write_chunk(bytes).expect("write");
    writer.finish().expect("finish")
}

fn reference(name: &str, patch: usize) -> Reference {
    format!("{name}@1.0.{patch}").parse().expect("reference")
}

#[test]
fn garbage_collection_never_takes_a_blob_a_concurrent_publish_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Arc::new(Registry::open(dir.path()).expect("open"));
    const ROUNDS: usize = 300;
    let publisher = {
        let registry = registry.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                let blob = staged(&registry, format!("kept component {i}").as_bytes());
                registry
                    .publish_component(&reference("kept", i), blob, World::Preprocessor)
                    .expect("publish");
            }
        })
    };
    let churner = {
        let registry = registry.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                let blob = staged(&registry, format!("churned component {i}").as_bytes());
                let r = reference("churned", i);
                registry
                    .publish_component(&r, blob, World::Preprocessor)
                    .expect("publish");
                registry.delete_component(&r).expect("delete");
            }
        })
    };
    publisher.join().expect("publisher");
    churner.join().expect("churner");

    let kept = registry.components().expect("list");
    assert_eq!(kept.len(), ROUNDS, "only the kept versions remain");
    for record in kept {
        let path = registry.blob_path(&record.digest);
        assert!(
            path.is_file(),
            "{}@{}: its blob was collected as garbage",
            record.name,
            record.version
        );
        assert_eq!(sha256_file(&path).expect("hash"), record.digest);
    }
    // Every churned blob is gone: collection still collects.
    let blobs = std::fs::read_dir(dir.path().join("blobs"))
        .expect("blobs dir")
        .count();
    assert_eq!(blobs, ROUNDS);
}
