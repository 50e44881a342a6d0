//! Persistence. The engine talks to a [`Store`]: ordered, group-committed write batches and a few
//! reads. SQLite (embedded, WAL) is the default, [`MemoryStore`] a fake for
//! the engine's unit tests; a PostgreSQL store will implement the same trait.

mod api;
#[cfg(test)]
mod contract;
mod group_commit;
mod memory;
mod postgres;
mod sqlite;

pub use api::{
    Commit, CommitReceiver, Durability, Recovered, RunFilter, Store, StoreError, Write, WriteBatch,
};
pub use memory::MemoryStore;
pub use postgres::{redact as redact_database_url, PostgresStore, TestCluster};
pub use sqlite::{SqliteStore, SyncMode, DEFAULT_BUSY_TIMEOUT};
