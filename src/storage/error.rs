//! Database errors, sorted once where they enter the crate.

/// What went wrong talking to Postgres, sorted by what a caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The connection URL does not parse (its text is not repeated: it may hold a password).
    #[error("the database URL is not a valid postgres:// URL")]
    InvalidUrl,
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// A unique or exclusion constraint refused the write.
    #[error("conflict on constraint {constraint}")]
    Conflict {
        /// The constraint's name.
        constraint: String,
    },
    /// Serialization failure or deadlock: the transaction may be retried as a whole.
    #[error("transaction conflict, retry")]
    Retry,
    /// Postgres cannot be reached or the pool is exhausted.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Postgres refused the values themselves (a data exception, a limit such as an index
    /// row too large, a NOT NULL or CHECK constraint): the same statement with the same
    /// values fails the same way, so retrying it is pointless.
    #[error("database refused the data: {0}")]
    Refused(String),
    /// Anything else (a bug, or a schema not migrated).
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => StorageError::NotFound,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StorageError::Unavailable(error.to_string()),
            sqlx::Error::Database(ref db) => match db.code().as_deref() {
                Some("23505") | Some("23P01") => {
                    StorageError::Conflict { constraint: db.constraint().unwrap_or("unknown").to_owned() }
                }
                Some("40001") | Some("40P01") => StorageError::Retry,
                // 25006: a write reached a server that only reads (a failover in progress).
                Some(code) if code.starts_with("08") || code.starts_with("57P") || code == "25006" => {
                    StorageError::Unavailable(error.to_string())
                }
                Some(code)
                    if code.starts_with("22")
                        || code.starts_with("54")
                        || matches!(code, "23502" | "23514") =>
                {
                    StorageError::Refused(error.to_string())
                }
                _ => StorageError::Other(error.to_string()),
            },
            other => StorageError::Other(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StorageError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StorageError::Migration(error.to_string())
    }
}
