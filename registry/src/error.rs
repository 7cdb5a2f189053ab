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
    /// The disk is full (507): the registry stays readable, publishing
    /// fails until space is freed.
    #[error("the registry's disk is full: {0}")]
    StorageFull(#[source] Cause),
    /// The disk or the database failed (500).
    #[error("storage error: {0}")]
    Storage(#[source] Cause),
}

/// The underlying failure of a storage error, kept for its chain of causes.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

impl RegistryError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::Invalid(_) => 400,
            RegistryError::NotFound(_) => 404,
            RegistryError::Conflict(_) => 409,
            RegistryError::TooLarge(_) => 413,
            RegistryError::StorageFull(_) => 507,
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
            RegistryError::StorageFull(_) => "insufficient_storage",
            RegistryError::Storage(_) => "storage",
        }
    }
}

/// A storage failure, told apart when it is a full disk: the error or one
/// of its sources is an I/O error of that kind (redb wraps them).
fn storage(e: impl std::error::Error + Send + Sync + 'static) -> RegistryError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut full = false;
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            full = true;
            break;
        }
        cause = error.source();
    }
    if full {
        RegistryError::StorageFull(Box::new(e))
    } else {
        RegistryError::Storage(Box::new(e))
    }
}

macro_rules! storage_from {
    ($($source:ty),*) => {$(
        impl From<$source> for RegistryError {
            fn from(e: $source) -> Self {
                storage(e)
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
