//! Namespaces: register, update, list, and the purge of closed runs past their retention.

use super::*;

impl Engine {
    pub(super) fn check_namespace(st: &EngineState, namespace: &str) -> Result<(), EngineError> {
        if st.namespaces.contains_key(namespace) {
            Ok(())
        } else {
            Err(EngineError::NamespaceNotFound(namespace.to_string()))
        }
    }

    /// Creates a namespace.
    pub async fn register_namespace(
        &self,
        name: &str,
        description: &str,
        retention_ms: u64,
    ) -> Result<(), EngineError> {
        self.check_healthy()?;
        check_retention(retention_ms)?;
        self.transact(|st, txn| {
            if st.namespaces.contains_key(name) {
                return Err(EngineError::AlreadyExists(format!(
                    "namespace {name:?} already exists"
                )));
            }
            let info = NamespaceInfo {
                name: name.to_string(),
                description: description.to_string(),
                created_ms: self.now_ms(),
                retention_ms,
            };
            st.namespaces.insert(name.to_string(), info.clone());
            txn.extra.push(Write::Namespace(info));
            Ok(())
        })
        .await
    }

    /// Changes a namespace's description and/or retention; returns it as it now is.
    pub async fn update_namespace(
        &self,
        req: pb::UpdateNamespaceRequest,
    ) -> Result<NamespaceInfo, EngineError> {
        self.check_healthy()?;
        if let Some(retention_ms) = req.retention_ms {
            check_retention(retention_ms)?;
        }
        let info = self
            .transact(|st, txn| {
                let Some(info) = st.namespaces.get_mut(&req.namespace) else {
                    return Err(EngineError::NamespaceNotFound(req.namespace));
                };
                if let Some(description) = req.description {
                    info.description = description;
                }
                if let Some(retention_ms) = req.retention_ms {
                    info.retention_ms = retention_ms;
                }
                let info = info.clone();
                txn.extra.push(Write::Namespace(info.clone()));
                Ok(info)
            })
            .await?;
        Ok(info)
    }

    /// Deletes closed runs (with their history) and closed sessions older than their
    /// namespace's retention, in bounded batches so that other commits are not held up behind
    /// one huge delete. Returns how many runs and sessions were deleted.
    pub async fn purge_expired(&self, now: i64) -> Result<(usize, usize), EngineError> {
        let namespaces: Vec<(String, u64)> = self
            .state
            .lock()
            .namespaces
            .values()
            .filter(|n| n.retention_ms > 0)
            .map(|n| (n.name.clone(), n.retention_ms))
            .collect();
        let (mut runs, mut sessions) = (0, 0);
        for (namespace, retention_ms) in namespaces {
            let before = now.saturating_sub(retention_ms as i64);
            runs += self
                .purge(&namespace, before, Store::expired_runs, |run_ids| {
                    Write::DeleteRuns { run_ids }
                })
                .await?;
            sessions += self
                .purge(&namespace, before, Store::expired_sessions, |session_ids| {
                    Write::DeleteSessions { session_ids }
                })
                .await?;
        }
        Ok((runs, sessions))
    }

    /// Finds (`expired`) and deletes (`delete`) closed rows of one kind, batch by batch.
    pub(super) async fn purge<Id: Send + 'static>(
        &self,
        namespace: &str,
        closed_before_ms: i64,
        expired: ExpiredLookup<Id>,
        delete: fn(Vec<Id>) -> Write,
    ) -> Result<usize, EngineError> {
        let mut deleted = 0;
        for _ in 0..PURGE_BATCHES_PER_SWEEP {
            self.check_healthy()?;
            let store = self.store.clone();
            let ns = Namespace::from(namespace);
            let ids = tokio::task::spawn_blocking(move || {
                expired(store.as_ref(), &ns, closed_before_ms, PURGE_BATCH)
            })
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(format!("reading expired rows: {e}")))?;
            if ids.is_empty() {
                break;
            }
            let count = ids.len();
            // Closed runs are not in memory: the transaction is the delete alone.
            self.transact(|_, txn| {
                txn.extra.push(delete(ids));
                Ok(())
            })
            .await?;
            deleted += count;
            if count < PURGE_BATCH {
                break;
            }
        }
        Ok(deleted)
    }

    /// All namespaces.
    pub fn list_namespaces(&self) -> Vec<NamespaceInfo> {
        self.state.lock().namespaces.values().cloned().collect()
    }

    // ------------------------------------------------------------------------------------------
    // Client operations
    // ------------------------------------------------------------------------------------------
}
