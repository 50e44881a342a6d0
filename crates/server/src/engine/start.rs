//! Starting runs: workflows and standalone activities, each under an id that must not be running, with resent starts answered from the run they started.

use super::*;

impl Engine {
    /// Starts a workflow run; fails with AlreadyExists if the id is running (unless the running
    /// run was started by this same request: a retried start; a resent one is also answered
    /// with the closed run it started).
    pub async fn start_workflow(
        &self,
        req: pb::StartWorkflowRequest,
    ) -> Result<String, EngineError> {
        tether_core::types::check_duration_ms("run_timeout_ms", req.run_timeout_ms)
            .and_then(|_| {
                tether_core::types::check_duration_ms("task_timeout_ms", req.task_timeout_ms)
            })
            .map_err(EngineError::InvalidArgument)?;
        let (run_id, _) = self
            .start_run(
                &req.namespace,
                false,
                &req.workflow_id,
                &req.request_id,
                req.resent,
                |run_id, now, fx| RunEntry::start_workflow(&req, run_id, now, fx),
            )
            .await?;
        Ok(run_id)
    }

    /// Records which open sessions `entry`'s activities were scheduled in, so a closing
    /// session finds its activities without a look at every run. (An activity scheduled in a
    /// session that is closed already fails at once: nothing to remember.)
    pub(super) fn note_session_runs(st: &mut EngineState, run_id: &RunId, entry: &RunEntry) {
        let EngineState {
            sessions,
            session_runs,
            ..
        } = st;
        for a in entry.state.activities.values() {
            if let Some(o) = a
                .options
                .as_ref()
                .filter(|o| session_is_open(sessions, &SessionId::from(&o.session_id)))
            {
                session_runs
                    .entry(o.session_id.clone().into())
                    .or_default()
                    .insert(run_id.to_string().into());
            }
        }
    }

    /// Creates a run under an id that must not be running already, in one transaction. Returns
    /// the run id and whether its first task went straight to a waiting worker.
    pub(super) async fn start_run(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
        resent: bool,
        make: impl FnOnce(String, i64, &mut Effects) -> RunEntry,
    ) -> Result<(String, bool), EngineError> {
        self.check_healthy()?;
        if resent {
            if let Some(run_id) = self
                .closed_run_started_by(namespace, standalone, id, request_id)
                .await
            {
                return Ok((run_id, true));
            }
        }
        let (commit, txn, started) = self.submit(|st, txn| {
            Self::check_namespace(st, namespace)?;
            let key = (namespace.to_string(), standalone, id.to_string());
            if let Some(existing) = st.open_ids.get(&key) {
                let same_request = !request_id.is_empty()
                    && st
                        .runs
                        .get(existing)
                        .is_some_and(|e| e.state.start_request_id == request_id);
                if !same_request {
                    return Err(EngineError::WorkflowAlreadyStarted {
                        workflow_id: id.to_string(),
                        run_id: existing.clone().into(),
                        standalone,
                    });
                }
                // A retry of a start that got through: the same answer again, once durable.
                Ok(Err((existing.clone(), st.last_submitted_seq)))
            } else {
                let run_id = tether_core::types::RunId::generate().to_string();
                let mut entry = make(run_id.clone(), self.now_ms(), &mut txn.fx);
                entry.max_history_bytes = self.config.max_history_bytes;
                st.open_ids.insert(key, run_id.clone().into());
                Self::note_session_runs(st, &RunId::from(&run_id), &entry);
                st.runs.insert(run_id.clone().into(), entry);
                txn.touched.insert(run_id.clone().into());
                Ok(Ok(run_id))
            }
        })?;
        let run_id = match started {
            Ok(run_id) => run_id,
            Err((existing, seq)) => {
                self.durable(seq).await?;
                return Ok((existing.into(), true));
            }
        };
        let handed_over = txn.handed_over;
        self.finish(commit, txn).await?;
        Ok((run_id, handed_over))
    }

    /// The closed run a start with `request_id` made, if the id's latest run is one: the
    /// answer to a start resent after its reply was lost and its run finished meanwhile. A
    /// read of the store, so only for starts that say they are resent.
    pub(super) async fn closed_run_started_by(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
    ) -> Option<String> {
        if request_id.is_empty() {
            return None;
        }
        let latest = self
            .load_stored(&if standalone {
                RunSelector::activity(namespace, id, "")
            } else {
                RunSelector::workflow(namespace, id, "")
            })
            .await
            .ok()?;
        (latest.start_request_id == request_id && latest.status != ExecutionStatus::Running as i32)
            .then_some(latest.run_id)
    }

    /// Whether a start with `request_id` already made a run of `id` (open, or closed when the
    /// start is resent): then it is answered with that run, whatever changed since.
    pub(super) async fn started_already(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
        resent: bool,
    ) -> bool {
        if request_id.is_empty() {
            return false;
        }
        let open = {
            let st = self.state.lock();
            st.open_ids
                .get(&(namespace.to_string(), standalone, id.to_string()))
                .and_then(|run_id| st.runs.get(run_id))
                .is_some_and(|e| e.state.start_request_id == request_id)
        };
        open || (resent
            && self
                .closed_run_started_by(namespace, standalone, id, request_id)
                .await
                .is_some())
    }

    /// Starts a standalone activity.
    pub async fn start_activity(
        &self,
        req: pb::StartActivityRequest,
    ) -> Result<StartedActivity, EngineError> {
        self.check_healthy()?;
        let mut options = req.options.clone().unwrap_or_default();
        if !options.session_id.is_empty() {
            let open = {
                let st = self.state.lock();
                let open = st
                    .sessions
                    .get(&options.session_id)
                    .and_then(|s| s.info.as_ref())
                    .is_some_and(|i| {
                        sessions::is_in(i, SessionPhase::Open) && i.namespace == req.namespace
                    });
                if open {
                    Self::route_session_activity(&st, &mut options);
                }
                open
            };
            // A retry of a start that got through is answered with its run, though the
            // session may have closed since.
            let retried = !open
                && self
                    .started_already(
                        &req.namespace,
                        true,
                        &req.activity_id,
                        &req.request_id,
                        req.resent,
                    )
                    .await;
            if !open && !retried {
                let info = self
                    .describe_session(
                        &Namespace::from(&req.namespace),
                        &SessionId::from(&options.session_id),
                    )
                    .await?;
                return Err(EngineError::NotRunning(format!(
                    "session {} is {}{}",
                    info.session_id,
                    info.state,
                    if info.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", info.reason)
                    }
                )));
            }
        }
        let options = history::normalize_activity_options(Some(options), &req.task_queue)?;
        let (queue, requirements) = (options.task_queue.clone(), options.requirements.clone());
        let (run_id, handed_over) = self
            .start_run(
                &req.namespace,
                true,
                &req.activity_id,
                &req.request_id,
                req.resent,
                |run_id, now, fx| {
                    RunEntry::start_standalone_activity(&req, options, run_id, now, fx)
                },
            )
            .await?;
        Ok(StartedActivity {
            run_id,
            handed_over,
            queue,
            requirements,
        })
    }

    /// Why an activity started on `queue` with `requirements` waits instead of being taken:
    /// no live worker satisfies its requirements, or none polls the queue ("" when one can).
    pub fn placement_note(
        &self,
        namespace: &Namespace,
        queue: &TaskQueue,
        requirements: &str,
    ) -> String {
        self.matcher.placement_note(
            namespace,
            queue,
            requirements,
            self.now_ms(),
            self.config.worker_liveness_timeout,
        )
    }
}
