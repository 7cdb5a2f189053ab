//! The registry's errors, each with the HTTP status a caller should see.

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or the artifact is unacceptable (400).
    #[error("{0}")]
    Invalid(String),
    /// No such artifact (404).
    #[error("{0}")]
    NotFound(String),
    /// The artifact exists with other content, or is still in use (409).
    #[error("{0}")]
    Conflict(String),
    /// The body exceeds a configured limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The disk or the database failed (500).
    #[error("storage error: {0}")]
    Storage(String),
}

impl RegistryError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::Invalid(_) => 400,
            RegistryError::NotFound(_) => 404,
            RegistryError::Conflict(_) => 409,
            RegistryError::TooLarge(_) => 413,
            RegistryError::Storage(_) => 500,
        }
    }

    /// A stable machine-readable code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Invalid(_) => "invalid",
            RegistryError::NotFound(_) => "not_found",
            RegistryError::Conflict(_) => "conflict",
            RegistryError::TooLarge(_) => "too_large",
            RegistryError::Storage(_) => "storage",
        }
    }
}

macro_rules! storage_from {
    ($($source:ty),*) => {$(
        impl From<$source> for RegistryError {
            fn from(e: $source) -> Self {
                RegistryError::Storage(e.to_string())
            }
        }
    )*};
}

storage_from!(
    std::io::Error,
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
