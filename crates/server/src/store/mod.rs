//! Persistence. The engine talks to a [`Store`]: ordered, group-committed write batches and a few
//! reads. SQLite (embedded, WAL) is the default, [`MemoryStore`] a fake for
//! the engine's unit tests; PostgreSQL the store several server replicas share, each namespace
//! written through a [`NamespaceStore`] under its lease ([`Fence`]).

mod api;
#[cfg(test)]
mod contract;
mod group_commit;
mod memory;
mod namespace_store;
mod postgres;
mod sqlite;

pub use api::{
    ClusterView, Commit, CommitReceiver, Durability, Fence, LeaseRow, OnDurable, Recovered,
    ReplicaRow, RunFilter, RunMatch, Store, StoreError, Write, WriteBatch,
};
pub use memory::MemoryStore;
pub use namespace_store::NamespaceStore;
pub use postgres::{redact as redact_database_url, PostgresStore, TestCluster};
pub use sqlite::{SqliteStore, SyncMode, DEFAULT_BUSY_TIMEOUT};
