//! Every redb table of the registry, named in one place.

use redb::TableDefinition;

/// `name@version` → JSON [`crate::records::ComponentRecord`].
pub const COMPONENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("components");
/// `name@version` → JSON [`crate::records::ModelRecord`].
pub const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
/// (name, revision) → JSON [`crate::records::FunctionRecord`].
pub const FUNCTION_REVISIONS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("function_revisions");
/// name → the revision currently served.
pub const FUNCTION_HEADS: TableDefinition<&str, u64> = TableDefinition::new("function_heads");
/// name → JSON [`crate::traffic::Traffic`]; absent: every request to the head.
pub const FUNCTION_TRAFFIC: TableDefinition<&str, &[u8]> = TableDefinition::new("function_traffic");
