//! One namespace's view of the shared PostgreSQL store, for the engine a cluster replica runs
//! for a namespace it holds the lease of: every batch is written under that lease, and
//! recovery reads that namespace alone.

use super::api::{
    Commit, Durability, Fence, OnDurable, Recovered, RunFilter, Store, StoreError, WriteBatch,
};
use super::postgres::PostgresStore;
use crate::state::{RunState, SessionState};
use std::sync::Arc;
use tether_core::types::{Namespace, RunId, SessionId};
use tether_wire::pb::HistoryEvent;

/// A [`Store`] for one namespace's engine, writing under its lease.
pub struct NamespaceStore {
    shared: Arc<PostgresStore>,
    fence: Fence,
}

impl NamespaceStore {
    /// The namespace `fence` names, written under `fence`.
    pub fn new(shared: Arc<PostgresStore>, fence: Fence) -> NamespaceStore {
        NamespaceStore { shared, fence }
    }

    /// The lease it writes under.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }
}

impl Store for NamespaceStore {
    fn submit_then(&self, batch: WriteBatch, on_durable: Option<OnDurable>) -> Commit {
        self.shared
            .submit_fenced_then(batch, self.fence.clone(), on_durable)
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.shared.durability()
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        self.shared.recover_namespaces(Some(&self.fence.namespace))
    }

    fn load_run(&self, run_id: &RunId) -> Result<Option<RunState>, StoreError> {
        // A run id of another namespace is not this engine's to show.
        Ok(self
            .shared
            .load_run(run_id)?
            .filter(|run| run.namespace == *self.fence.namespace))
    }

    fn latest_run(
        &self,
        namespace: &Namespace,
        standalone_activity: bool,
        id: &str,
    ) -> Result<Option<RunState>, StoreError> {
        self.shared.latest_run(namespace, standalone_activity, id)
    }

    fn history(&self, run_id: &RunId) -> Result<Vec<HistoryEvent>, StoreError> {
        self.shared.history(run_id)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunState>, StoreError> {
        self.shared.list_runs(filter)
    }

    fn expired_runs(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<RunId>, StoreError> {
        self.shared.expired_runs(namespace, closed_before_ms, limit)
    }

    fn expired_sessions(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.shared
            .expired_sessions(namespace, closed_before_ms, limit)
    }

    fn list_sessions(
        &self,
        namespace: &Namespace,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<SessionState>, StoreError> {
        self.shared.list_sessions(namespace, after, limit)
    }

    fn load_session(&self, session_id: &SessionId) -> Result<Option<SessionState>, StoreError> {
        Ok(self.shared.load_session(session_id)?.filter(|s| {
            s.info
                .as_ref()
                .is_some_and(|i| i.namespace == *self.fence.namespace)
        }))
    }

    // The shared store is closed by the replica, once every namespace's engine has stopped.
}
