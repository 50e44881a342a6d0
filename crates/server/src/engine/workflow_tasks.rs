//! Workflow tasks: polls, the next task handed back with a completion, completions and failures.

use super::*;

impl Engine {
    pub(super) async fn poll_queue(
        &self,
        key: &QueueKey,
        identity: &str,
        timeout: Duration,
    ) -> Option<TaskRef> {
        let mut shutdown = self.shutdown.subscribe();
        if *shutdown.borrow() {
            return None;
        }
        let handover = tokio::select! {
            task = self.matcher.poll(key, identity, self.now_ms(), timeout) => task,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        match handover? {
            Handover::Task(task) => Some(task),
            Handover::Dispatched(response) => {
                // Only activity attempts are dispatched ahead; a workflow queue never holds one.
                self.matcher.give_back(response);
                None
            }
        }
    }

    pub(super) fn poll_timeout(&self, requested_ms: u64) -> Duration {
        if requested_ms == 0 {
            self.config.long_poll_timeout
        } else {
            Duration::from_millis(requested_ms).min(self.config.long_poll_timeout)
        }
    }

    /// A registered identity's work goes to its own process only: a poll from any other is
    /// refused (a second process started with the same identity, or a stale one).
    pub(super) fn check_poller(
        &self,
        namespace: &str,
        identity: &str,
        instance: &str,
    ) -> Result<(), EngineError> {
        if self.matcher.may_hold(namespace, identity, instance) {
            return Ok(());
        }
        match self.matcher.instance_of(namespace, identity) {
            Some(holder) if holder != instance => Err(EngineError::AlreadyExists(format!(
                "worker identity {identity:?} is registered by another worker process \
                 (instance {holder}); this poll came from {}; two processes may not share an \
                 identity",
                if instance.is_empty() {
                    "a caller that gave no instance_id".to_string()
                } else {
                    format!("instance {instance}")
                }
            ))),
            _ => Ok(()),
        }
    }

    /// Long-polls for a workflow task.
    pub async fn poll_workflow_task(
        &self,
        req: pb::PollWorkflowTaskRequest,
    ) -> Result<pb::PollWorkflowTaskResponse, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        self.check_poller(&req.namespace, &req.identity, &req.instance_id)?;
        let wait = self.poll_timeout(req.poll_timeout_ms);
        let task = self
            .take_workflow_task(
                &req.namespace,
                &req.task_queue,
                &req.identity,
                &req.sticky_queue,
                wait,
            )
            .await;
        self.check_healthy()?;
        Ok(task.unwrap_or_default())
    }

    /// A workflow task waiting right now on one of `queues` (tried in order), if any: lets a
    /// worker that just completed one take the next without a separate poll.
    pub async fn next_workflow_task_now(
        &self,
        namespace: &Namespace,
        queues: &[String],
        identity: &WorkerId,
        sticky_queue: &str,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        if self.check_healthy().is_err() {
            return None;
        }
        for queue in queues {
            let taken = self
                .take_workflow_task(namespace, queue, identity, sticky_queue, Duration::ZERO)
                .await;
            if taken.is_some() {
                return taken;
            }
        }
        None
    }

    /// Takes (waiting up to `wait`) the next current workflow task of a queue and dispatches it.
    pub(super) async fn take_workflow_task(
        &self,
        namespace: &str,
        queue: &str,
        identity: &str,
        sticky_queue: &str,
        wait: Duration,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        let key = QueueKey::new(namespace, queue, TaskKind::Workflow);
        let deadline = Instant::now() + wait;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let task = self.poll_queue(&key, identity, remaining).await?;
            let TaskRef::Workflow { run_id } = task else {
                continue;
            };
            let submitted = self.submit(|st, txn| {
                let response = st.runs.get_mut(&run_id).and_then(|entry| {
                    entry.dispatch_workflow_task(identity, sticky_queue, self.now_ms(), &mut txn.fx)
                });
                if response.is_some() {
                    txn.touched.insert(run_id.clone());
                }
                Ok(response)
            });
            // Dispatch may move buffered events into the history. They were durable already
            // (as buffered events), so the task need not wait for this write: it is ordered
            // before the worker's completion, which is all that matters.
            if let Ok((_not_awaited, txn, Some(response))) = submitted {
                self.apply_effects(txn.fx, txn.handovers);
                return Some(response);
            }
            if remaining.is_zero() {
                return None;
            }
        }
    }

    /// Refuses a completion that would take a run past the history or pending-activity limits.
    pub(super) fn check_run_limits(
        &self,
        entry: &RunEntry,
        commands: &[pb::Command],
    ) -> Result<(), EngineError> {
        let new_activities = commands
            .iter()
            .filter(|c| matches!(c.kind, Some(pb::command::Kind::ScheduleActivity(_))))
            .count();
        let pending = entry.state.activities.len() + new_activities;
        if pending > self.config.max_pending_activities {
            return Err(EngineError::ResourceExhausted(format!(
                "workflow {} would have {pending} pending activities; the limit is {}",
                entry.state.workflow_id, self.config.max_pending_activities
            )));
        }
        let events = entry.state.next_event_id.saturating_sub(1) + 1 + commands.len() as u64;
        if events > self.config.max_history_events {
            return Err(EngineError::ResourceExhausted(format!(
                "workflow {} would have {events} history events; the limit is {} (continue as a new workflow)",
                entry.state.workflow_id, self.config.max_history_events
            )));
        }
        Ok(())
    }

    pub(crate) fn decode_token(bytes: &[u8]) -> Result<pb::TaskToken, EngineError> {
        let token = pb::TaskToken::decode(bytes).map_err(|_| {
            EngineError::InvalidArgument(
                "task token is malformed; pass the token the poll returned".into(),
            )
        })?;
        if token.run_id.is_empty() {
            return Err(EngineError::InvalidArgument(
                "task token is empty; pass the token the poll returned".into(),
            ));
        }
        Ok(token)
    }

    /// Runs `f` on the run a token names, in one transaction.
    pub(super) async fn with_token_run<T>(
        &self,
        token_bytes: &[u8],
        f: impl FnOnce(&mut RunEntry, &pb::TaskToken, &mut Effects) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.check_healthy()?;
        let token = Self::decode_token(token_bytes)?;
        let value = self
            .transact(|st, txn| {
                Self::check_namespace(st, &token.namespace)?;
                let entry = open_run(&mut st.runs, &RunId::from(&token.run_id))?;
                let value = f(entry, &token, &mut txn.fx)?;
                txn.touched.insert(token.run_id.clone().into());
                Ok(value)
            })
            .await?;
        Ok(value)
    }

    /// Applies a workflow task's commands.
    pub async fn complete_workflow_task(
        &self,
        req: pb::CompleteWorkflowTaskRequest,
    ) -> Result<(), EngineError> {
        let max = self.config.max_payload_bytes;
        self.check_healthy()?;
        let token = Self::decode_token(&req.task_token)?;
        let mut commands = req.commands;
        let now = self.now_ms();
        let completion = self
            .transact(|st, txn| {
                Self::check_namespace(st, &token.namespace)?;
                let mut sessions_used: Vec<String> = Vec::new();
                for c in commands.iter_mut() {
                    if let Some(pb::command::Kind::ScheduleActivity(a)) = c.kind.as_mut() {
                        if let Some(o) = a.options.as_mut() {
                            Self::route_session_activity(st, o);
                            if !o.session_id.is_empty() && !sessions_used.contains(&o.session_id) {
                                sessions_used.push(o.session_id.clone());
                            }
                        }
                    }
                }
                let entry = open_run(&mut st.runs, &RunId::from(&token.run_id))?;
                entry.validate_commands(&commands, max)?;
                self.check_run_limits(entry, &commands)?;
                let completion = entry.complete_workflow_task(
                    &token,
                    commands,
                    &req.identity,
                    &req.sticky_queue,
                    now,
                    &mut txn.fx,
                )?;
                txn.touched.insert(token.run_id.clone().into());
                for session_id in sessions_used {
                    if session_is_open(&st.sessions, &SessionId::from(&session_id)) {
                        st.session_runs
                            .entry(session_id.into())
                            .or_default()
                            .insert(token.run_id.clone().into());
                    }
                }
                Self::fail_activities_of_closed_sessions(st, &RunId::from(&token.run_id), now, txn);
                self.apply_session_commands(st, &token.namespace, now, txn);
                Ok(completion)
            })
            .await?;
        match completion {
            WorkflowTaskCompletion::Applied => Ok(()),
            WorkflowTaskCompletion::Rejected(why) => Err(EngineError::Aborted(why)),
        }
    }

    /// Records a failed workflow task.
    pub async fn fail_workflow_task(
        &self,
        req: pb::FailWorkflowTaskRequest,
    ) -> Result<(), EngineError> {
        self.with_token_run(&req.task_token, |entry, token, fx| {
            entry.fail_workflow_task(
                token,
                &req.cause,
                req.failure,
                &req.identity,
                self.now_ms(),
                fx,
            )
        })
        .await
    }
}
