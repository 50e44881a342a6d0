//! Activity tasks: polls, heartbeats, completions, failures and cancellations, one by one or batched.

use super::*;

impl Engine {
    /// Long-polls for an activity task.
    pub async fn poll_activity_task(
        &self,
        req: pb::PollActivityTaskRequest,
    ) -> Result<pb::PollActivityTaskResponse, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        self.check_poller(&req.namespace, &req.identity, &req.instance_id)?;
        let keys: Vec<QueueKey> = req
            .additional_task_queues
            .iter()
            .chain(std::iter::once(&req.task_queue))
            .map(|q| QueueKey::new(&req.namespace, q, TaskKind::Activity))
            .collect();
        let deadline = Instant::now() + self.poll_timeout(req.poll_timeout_ms);
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if *shutdown.borrow() {
                self.check_healthy()?;
                return Ok(Default::default());
            }
            let polled = tokio::select! {
                task = self.matcher.poll_many(&keys, &req.identity, &req.instance_id, self.now_ms(), remaining) => task,
                _ = shutdown.wait_for(|s| *s) => None,
            };
            match polled {
                None => {
                    self.check_healthy()?;
                    return Ok(Default::default());
                }
                // Dispatched (and made durable) in the transaction that created the task.
                Some((Handover::Dispatched(response), _)) => return Ok(*response),
                Some((Handover::Task(task), _)) => {
                    if let Some(response) = self
                        .dispatch_polled(task, &req.identity, &req.instance_id)
                        .await?
                    {
                        return Ok(response);
                    }
                }
            }
            if remaining.is_zero() {
                return Ok(Default::default());
            }
        }
    }

    /// Records a heartbeat; returns whether the activity should cancel.
    pub async fn heartbeat(&self, req: pb::HeartbeatActivityRequest) -> Result<bool, EngineError> {
        let details = req.details;
        // Heartbeats without details change only in-memory liveness: no write needed.
        if details.is_none() {
            self.check_healthy()?;
            let token = Self::decode_token(&req.task_token)?;
            let mut st = self.state.lock();
            let entry = open_run(&mut st.runs, &RunId::from(&token.run_id))?;
            return entry.activity_heartbeat(&token, None, &req.identity, self.now_ms());
        }
        self.with_token_run(&req.task_token, |entry, token, _fx| {
            entry.activity_heartbeat(token, details, &req.identity, self.now_ms())
        })
        .await
    }

    /// An activity attempt succeeded; returns the next waiting task when one was asked for.
    pub async fn complete_activity(
        &self,
        req: pb::CompleteActivityTaskRequest,
        next: Option<NextTasks>,
    ) -> Result<Option<pb::PollActivityTaskResponse>, EngineError> {
        let outcome = pb::ActivityOutcome {
            task_token: req.task_token,
            outcome: Some(pb::activity_outcome::Outcome::Completed(
                pb::ActivityCompleted { result: req.result },
            )),
        };
        self.respond_one(&req.identity, outcome, next).await
    }

    /// One outcome, with the all-or-nothing error of a single call.
    pub(super) async fn respond_one(
        &self,
        identity: &str,
        outcome: pb::ActivityOutcome,
        next: Option<NextTasks>,
    ) -> Result<Option<pb::PollActivityTaskResponse>, EngineError> {
        // A refused outcome takes no next task: the error would leave it on no worker.
        let (mut results, mut next_tasks) =
            self.respond(identity, vec![outcome], next, true).await?;
        results.pop().expect("one outcome, one result")?;
        Ok(next_tasks.pop())
    }

    /// Several activity outcomes from one worker, applied under one lock and made durable in
    /// one batch, with up to `next.max` waiting tasks dispatched to it in the same batch. Each
    /// outcome is judged on its own (a stale attempt is refused, the others are still
    /// recorded); the outer error is for the batch as a whole (store unavailable).
    pub async fn respond_activities(
        &self,
        identity: &WorkerId,
        outcomes: Vec<pb::ActivityOutcome>,
        next: Option<NextTasks>,
    ) -> Result<RespondedActivities, EngineError> {
        self.respond(identity, outcomes, next, false).await
    }

    /// [`Engine::respond_activities`]; with `next_only_if_all_applied`, no next task is taken
    /// when any outcome was refused.
    pub(super) async fn respond(
        &self,
        identity: &str,
        outcomes: Vec<pb::ActivityOutcome>,
        next: Option<NextTasks>,
        next_only_if_all_applied: bool,
    ) -> Result<RespondedActivities, EngineError> {
        self.check_healthy()?;
        let now = self.now_ms();
        let mut results = Vec::with_capacity(outcomes.len());
        let (commit, txn, next_tasks) = self.submit(|st, txn| {
            for outcome in outcomes {
                let applied = Self::decode_token(&outcome.task_token).and_then(|token| {
                    Self::check_namespace(st, &token.namespace)?;
                    let EngineState { runs, sessions, .. } = &mut *st;
                    let entry = open_run(runs, &RunId::from(&token.run_id))?;
                    let session_id = entry
                        .state
                        .activities
                        .get(&token.scheduled_event_id)
                        .and_then(|a| a.options.as_ref())
                        .filter(|o| !o.session_id.is_empty())
                        .map(|o| o.session_id.clone())
                        .unwrap_or_default();
                    match outcome.outcome {
                        Some(pb::activity_outcome::Outcome::Completed(c)) => {
                            entry.activity_completed(&token, c.result, identity, now, &mut txn.fx)
                        }
                        Some(pb::activity_outcome::Outcome::Failed(failure)) => {
                            entry.activity_failed(&token, failure, identity, now, &mut txn.fx)
                        }
                        Some(pb::activity_outcome::Outcome::Canceled(c)) => {
                            entry.activity_canceled(&token, c.details, identity, now, &mut txn.fx)
                        }
                        None => Err(EngineError::InvalidArgument(
                            "an activity outcome names no result, failure or cancellation; set \
                             one of completed, failed or canceled"
                                .into(),
                        )),
                    }?;
                    if !session_id.is_empty() {
                        // Used just now: the idle timeout counts from here. Kept in memory (a
                        // restart counts from the last hand-out, or from the restart).
                        if let Some(info) =
                            sessions.get_mut(&session_id).and_then(|s| s.info.as_mut())
                        {
                            info.last_used_ms = now;
                        }
                    }
                    txn.touched.insert(token.run_id.into());
                    Ok(())
                });
                results.push(applied);
            }
            let refused = results.iter().any(Result::is_err);
            let next_tasks = match &next {
                Some(next) if !(refused && next_only_if_all_applied) => {
                    self.take_next_locked(st, next, now, txn)
                }
                _ => Vec::new(),
            };
            Ok(next_tasks)
        })?;
        let mut undo = GiveBackOnDrop::many(&self.matcher, next_tasks);
        self.finish(commit, txn).await?;
        Ok((results, undo.take()))
    }

    /// An activity attempt failed; returns the next waiting task when one was asked for.
    pub async fn fail_activity(
        &self,
        req: pb::FailActivityTaskRequest,
        next: Option<NextTasks>,
    ) -> Result<Option<pb::PollActivityTaskResponse>, EngineError> {
        let failure = req.failure.unwrap_or_else(|| pb::Failure {
            message: "activity failed without a failure message".into(),
            kind: pb::FailureKind::Application as i32,
            ..Default::default()
        });
        let outcome = pb::ActivityOutcome {
            task_token: req.task_token,
            outcome: Some(pb::activity_outcome::Outcome::Failed(failure)),
        };
        self.respond_one(&req.identity, outcome, next).await
    }

    /// An activity stopped after a cancel request.
    pub async fn activity_canceled(
        &self,
        req: pb::ReportActivityCanceledRequest,
    ) -> Result<(), EngineError> {
        let outcome = pb::ActivityOutcome {
            task_token: req.task_token,
            outcome: Some(pb::activity_outcome::Outcome::Canceled(
                pb::ActivityCanceledAfterRequest {
                    details: req.details,
                },
            )),
        };
        self.respond_one(&req.identity, outcome, None).await?;
        Ok(())
    }

    // ------------------------------------------------------------------------------------------
    // Timers
    // ------------------------------------------------------------------------------------------
}
