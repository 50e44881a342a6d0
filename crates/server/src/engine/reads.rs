//! Reads: describe, history, list, and results (with their long-poll wait).

use super::*;

impl Engine {
    /// Finds a run for reading: memory first, then the store.
    pub(super) async fn snapshot(&self, run: &RunSelector) -> Result<RunSnapshot, EngineError> {
        let (namespace, _, _, _) = run.parts();
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            live_entry(&st, run).map(|entry| {
                (
                    RunSnapshot {
                        state: entry.state.clone(),
                        pending: entry.pending_activities(),
                    },
                    st.last_submitted_seq,
                )
            })
        };
        if let Some((snapshot, seq)) = live {
            self.durable(seq).await?;
            return Ok(snapshot);
        }
        let state = self.load_stored(run).await?;
        let pending = state
            .activities
            .values()
            .map(|a| pb::PendingActivityInfo {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                activity_id: a.activity_id.clone(),
                activity_type: a.activity_type.clone(),
                state: if a.started_ms > 0 {
                    "started"
                } else if a.backoff_until_ms > 0 {
                    "backoff"
                } else {
                    "scheduled"
                }
                .into(),
                attempt: a.attempt,
                last_failure: a.last_failure.clone(),
                last_worker: a.last_worker.clone(),
                last_heartbeat_ms: 0,
                next_attempt_ms: a.backoff_until_ms,
                task_queue: a.task_queue.clone(),
            })
            .collect();
        Ok(RunSnapshot { state, pending })
    }

    pub(super) async fn load_stored(&self, run: &RunSelector) -> Result<RunState, EngineError> {
        let (namespace, standalone, id, run_id) = run.parts();
        let store = self.store.clone();
        let (ns, idc, rid) = (Namespace::from(namespace), id.to_string(), run_id.clone());
        let found = tokio::task::spawn_blocking(move || {
            if rid.is_empty() {
                store.latest_run(&ns, standalone, &idc)
            } else {
                store.load_run(&rid)
            }
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        match found {
            Some(s)
                if s.namespace == namespace
                    && s.workflow_id == id
                    && s.standalone_activity == standalone =>
            {
                Ok(s)
            }
            _ => Err(not_found(run)),
        }
    }

    /// Describes a run.
    pub async fn describe(
        &self,
        run: &RunSelector,
    ) -> Result<pb::DescribeWorkflowResponse, EngineError> {
        let snap = self.snapshot(run).await?;
        let s = snap.state;
        Ok(pb::DescribeWorkflowResponse {
            info: Some(execution_info(&s)),
            pending_activities: snap.pending,
            pending_timers: s.timers.len() as u32,
            last_workflow_task_failure: s.last_workflow_task_failure.clone(),
            result: s.result.clone(),
            failure: s.failure.clone(),
            workflow_task_failures: s.workflow_task_failures,
        })
    }

    /// A run's history.
    pub async fn history(&self, run: &RunSelector) -> Result<Vec<pb::HistoryEvent>, EngineError> {
        let (namespace, _, _, _) = run.parts();
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            live_entry(&st, run).map(|entry| (entry.history.clone(), st.last_submitted_seq))
        };
        if let Some((history, seq)) = live {
            self.durable(seq).await?;
            return Ok(history);
        }
        let state = self.load_stored(run).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.history(&RunId::from(state.run_id)))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))
    }

    /// Lists runs, newest first, a page at a time: returns the page and the token of the next
    /// one ("" after the last).
    pub async fn list(
        &self,
        namespace: &Namespace,
        standalone: bool,
        status: Option<i32>,
        limit: usize,
        page_token: &str,
        matching: &RunMatch,
    ) -> Result<(Vec<pb::ExecutionInfo>, String), EngineError> {
        // How many runs one filtered page may look through before it answers with what it has
        // and a token to go on from: a rare type must not make one call read a whole namespace.
        const MOST_SCANNED: usize = 10_000;
        self.check_healthy()?;
        {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
        }
        let mut after = parse_page_token(page_token)?.map(|(ms, id)| (ms, RunId::from(id)));
        let mut found = Vec::new();
        let mut scanned = 0;
        // The last run looked at: a next page starts after it.
        let mut last: Option<(i64, String)> = None;
        let chunk = if matching.is_empty() {
            limit
        } else {
            limit.max(500)
        };
        let more = 'pages: loop {
            let store = self.store.clone();
            let filter = RunFilter {
                namespace: namespace.clone(),
                standalone_activity: standalone,
                status,
                limit: chunk,
                after: after.clone(),
            };
            let runs = tokio::task::spawn_blocking(move || store.list_runs(&filter))
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))?
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
            let full = runs.len() >= chunk;
            for run in &runs {
                scanned += 1;
                last = Some((run.start_ms, run.run_id.to_string()));
                if matching.matches(run) {
                    found.push(execution_info(run));
                    if found.len() >= limit {
                        break 'pages true;
                    }
                }
            }
            match &last {
                Some((ms, id)) if full && scanned < MOST_SCANNED => {
                    after = Some((*ms, RunId::from(id.clone())));
                }
                _ => break full,
            }
        };
        let next = match (&last, more) {
            (Some((ms, id)), true) => page_token_of(*ms, id),
            _ => String::new(),
        };
        Ok((found, next))
    }

    /// The outcome of a run, waiting up to `wait` for it to close (and for the close to be
    /// durable): RUNNING only once the wait is over.
    pub async fn result(
        &self,
        run: &RunSelector,
        wait: Duration,
    ) -> Result<pb::GetWorkflowResultResponse, EngineError> {
        let (namespace, _, _, _) = run.parts();
        self.check_healthy()?;
        let wait = wait.min(self.config.long_poll_timeout);
        let receiver = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            match live_entry(&st, run) {
                // A closing run's close is not durable yet: wait for it like for an open one.
                Some(entry) => {
                    let r = entry.state.run_id.clone();
                    if entry.is_open() && wait.is_zero() {
                        return Ok(pb::GetWorkflowResultResponse {
                            run_id: r,
                            status: ExecutionStatus::Running as i32,
                            ..Default::default()
                        });
                    }
                    let (tx, rx) = oneshot::channel();
                    st.waiters.entry(r.clone().into()).or_default().push(tx);
                    Some((r, rx))
                }
                None => None,
            }
        };
        if let Some((run_id, rx)) = receiver {
            if let Some(outcome) = self.wait_for_answer(rx, wait).await? {
                return Ok(outcome);
            }
            forget_gone_waiters(&mut self.state.lock().waiters, &run_id);
            return Ok(pb::GetWorkflowResultResponse {
                run_id,
                status: ExecutionStatus::Running as i32,
                ..Default::default()
            });
        }
        let state = self.load_stored(run).await?;
        Ok(pb::GetWorkflowResultResponse {
            run_id: state.run_id,
            status: state.status,
            result: state.result,
            failure: state.failure,
        })
    }

    /// Waits up to `wait` for what a waiter list answers (None when the wait ended first, or
    /// the server is shutting down); UNAVAILABLE if storage failed meanwhile.
    pub(super) async fn wait_for_answer<T>(
        &self,
        rx: oneshot::Receiver<T>,
        wait: Duration,
    ) -> Result<Option<T>, EngineError> {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            answer = rx => {
                if let Ok(answer) = answer {
                    return Ok(Some(answer));
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        self.check_healthy()?;
        Ok(None)
    }

    // ------------------------------------------------------------------------------------------
    // Worker operations
    // ------------------------------------------------------------------------------------------
}
