//! The keys of the cluster's record bucket, formatted in this one place.
//!
//! - `components.<name>.<version>` and `models.<name>.<version>`: the
//!   record of an artifact version, created once and never changed;
//! - `functions.<name>`: the [`super::records::Head`] of a function (its
//!   served revision and the last number given), changed by compare-and-set;
//! - `revisions.<name>.<n>`: revision `n` of a function, written once;
//! - `traffic.<name>`: a function's traffic split, changed by compare-and-set.
//!
//! Names are `[a-z0-9-]`; a version's `+` (build metadata) becomes `_`,
//! which semantic versions never hold, since keys admit neither.

use cascade_registry::names::Reference;

/// Prefix of component records.
pub const COMPONENTS: &str = "components.";
/// Prefix of model records.
pub const MODELS: &str = "models.";
/// Prefix of function heads.
pub const FUNCTIONS: &str = "functions.";
/// Prefix of function revisions.
pub const REVISIONS: &str = "revisions.";
/// Prefix of traffic splits.
pub const TRAFFIC: &str = "traffic.";

fn version(reference: &Reference) -> String {
    reference.version.to_string().replace('+', "_")
}

/// The key of a component version.
pub fn component(reference: &Reference) -> String {
    format!("{COMPONENTS}{}.{}", reference.name, version(reference))
}

/// The key of a model version.
pub fn model(reference: &Reference) -> String {
    format!("{MODELS}{}.{}", reference.name, version(reference))
}

/// The key of a function's head.
pub fn function(name: &str) -> String {
    format!("{FUNCTIONS}{name}")
}

/// The prefix of a function's revisions.
pub fn revisions_of(name: &str) -> String {
    format!("{REVISIONS}{name}.")
}

/// The key of one revision.
pub fn revision(name: &str, revision: u64) -> String {
    format!("{}{revision}", revisions_of(name))
}

/// The key of a function's traffic split.
pub fn traffic(name: &str) -> String {
    format!("{TRAFFIC}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_with_build_metadata_make_valid_distinct_keys() {
        let plain: Reference = "tok@1.0.0".parse().expect("reference");
        let built: Reference = "tok@1.0.0+abc.1".parse().expect("reference");
        assert_eq!(component(&plain), "components.tok.1.0.0");
        assert_eq!(model(&built), "models.tok.1.0.0_abc.1");
        assert_ne!(component(&plain), component(&built));
        assert_eq!(revision("embed", 12), "revisions.embed.12");
        assert!(revision("embed", 12).starts_with(&revisions_of("embed")));
        assert!(!revision("embed-2", 1).starts_with(&revisions_of("embed")));
    }
}
