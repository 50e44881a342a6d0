//! Activities: scheduled, handed out (and taken back), completed, failed and retried, cancelled, heartbeating, timed out.

use super::*;

impl RunEntry {
    pub(super) fn schedule_activity(
        &mut self,
        a: pb::ScheduleActivityCommand,
        now: i64,
        fx: &mut Effects,
    ) {
        // Validated before (validate_commands / the frontend), so defaults apply cleanly here.
        let options = normalize_activity_options(a.options.clone(), &self.state.task_queue)
            .unwrap_or_default();
        let activity_id = if a.activity_id.is_empty() {
            a.seq.to_string()
        } else {
            a.activity_id.clone()
        };
        let scheduled_event_id = self.push_attr(
            Attributes::ActivityTaskScheduled(pb::ActivityTaskScheduled {
                seq: a.seq,
                activity_id: activity_id.clone(),
                activity_type: a.activity_type.clone(),
                input: a.input.clone(),
                options: Some(options.clone()),
            }),
            now,
        );
        let state = ActivityState {
            seq: a.seq,
            scheduled_event_id,
            activity_id,
            activity_type: a.activity_type,
            task_queue: options.task_queue.clone(),
            input: a.input,
            options: Some(options.clone()),
            attempt: 1,
            scheduled_ms: now,
            attempt_scheduled_ms: now,
            cancel_requested: self.state.cancel_requested && self.state.standalone_activity,
            ..Default::default()
        };
        let run_id = self.run_id();
        fx.tasks
            .push(activity_task(&self.state.namespace, &run_id, &state, 1));
        self.state.activities.insert(scheduled_event_id, state);
        if options.schedule_to_start_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, options.schedule_to_start_timeout_ms),
                TimerKey::ActivityScheduleToStart {
                    run_id: run_id.clone(),
                    scheduled_event_id,
                    attempt: 1,
                },
            ));
        }
        if options.schedule_to_close_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, options.schedule_to_close_timeout_ms),
                TimerKey::ActivityScheduleToClose {
                    run_id,
                    scheduled_event_id,
                },
            ));
        }
    }

    /// Hands an activity attempt to a poller (worker `identity`, process `instance`). None if
    /// the task is stale. The hand-out is recorded in the attempt's persisted state: the caller
    /// makes it durable before the worker gets the task.
    pub fn dispatch_activity(
        &mut self,
        scheduled_event_id: u64,
        attempt: u32,
        identity: &str,
        instance: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Option<pb::PollActivityTaskResponse> {
        if !self.is_open() || self.rt.started_activities.contains_key(&scheduled_event_id) {
            return None;
        }
        let a = self.state.activities.get_mut(&scheduled_event_id)?;
        if a.attempt != attempt || a.backoff_until_ms > 0 || a.started_ms > 0 {
            return None;
        }
        a.last_worker = identity.to_string();
        a.started_ms = now;
        a.started_worker = identity.to_string();
        a.started_instance = instance.to_string();
        let options = a.options.clone().unwrap_or_default();
        let mut attempt_deadline = deadline(now, options.start_to_close_timeout_ms);
        if options.schedule_to_close_timeout_ms > 0 {
            attempt_deadline = attempt_deadline.min(deadline(
                a.scheduled_ms,
                options.schedule_to_close_timeout_ms,
            ));
        }
        let run_id = RunId::from(self.state.run_id.as_str());
        let dispatch = next_dispatch();
        a.started_dispatch = dispatch;
        arm_attempt_timers(
            fx,
            &run_id,
            (scheduled_event_id, attempt, dispatch),
            deadline(now, options.start_to_close_timeout_ms),
            &options,
            now,
        );
        let token = pb::TaskToken {
            namespace: self.state.namespace.clone(),
            run_id: run_id.as_str().to_string(),
            scheduled_event_id,
            attempt,
            dispatch,
        };
        let response = pb::PollActivityTaskResponse {
            task_token: prost::Message::encode_to_vec(&token),
            activity_id: a.activity_id.clone(),
            activity_type: a.activity_type.clone(),
            input: a.input.clone(),
            attempt,
            heartbeat_details: a.heartbeat_details.clone(),
            workflow_id: if self.state.standalone_activity {
                String::new()
            } else {
                self.state.workflow_id.clone()
            },
            run_id: run_id.into(),
            start_to_close_timeout_ms: options.start_to_close_timeout_ms,
            heartbeat_timeout_ms: options.heartbeat_timeout_ms,
            scheduled_ms: a.attempt_scheduled_ms,
            deadline_ms: attempt_deadline,
            namespace: self.state.namespace.clone(),
            workflow_type: if self.state.standalone_activity {
                String::new()
            } else {
                self.state.workflow_type.clone()
            },
            session: None,
            task_queue: a.task_queue.clone(),
        };
        self.rt.started_activities.insert(
            scheduled_event_id,
            StartedActivity {
                attempt,
                worker: identity.to_string(),
                instance: instance.to_string(),
                started_ms: now,
                last_heartbeat_ms: now,
                dispatch,
            },
        );
        Some(response)
    }

    /// The task of attempt `attempt` of an activity, when that attempt waits to be handed out
    /// (to offer it again after a poll took it but could not be given it).
    pub fn waiting_activity_task(
        &self,
        scheduled_event_id: u64,
        attempt: u32,
    ) -> Option<(QueueKey, TaskRef, String)> {
        if !self.is_open() || self.rt.started_activities.contains_key(&scheduled_event_id) {
            return None;
        }
        let a = self.state.activities.get(&scheduled_event_id)?;
        if a.attempt != attempt || a.backoff_until_ms > 0 || a.started_ms > 0 {
            return None;
        }
        Some(activity_task(
            &self.state.namespace,
            &self.state.run_id,
            a,
            attempt,
        ))
    }

    /// Takes back a hand-out the worker never received (its poll ended before the reply went
    /// out): the attempt waits in its queue again, with the same number, since it never ran.
    /// Returns whether anything changed.
    pub fn undispatch_activity(
        &mut self,
        scheduled_event_id: u64,
        attempt: u32,
        dispatch: u64,
        fx: &mut Effects,
    ) -> bool {
        let current = self
            .rt
            .started_activities
            .get(&scheduled_event_id)
            .is_some_and(|s| s.attempt == attempt && s.dispatch == dispatch);
        if !current || !self.is_open() {
            return false;
        }
        self.rt.started_activities.remove(&scheduled_event_id);
        let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
            return false;
        };
        clear_started(a);
        fx.tasks.push(activity_task(
            &self.state.namespace,
            &self.state.run_id,
            a,
            attempt,
        ));
        true
    }

    /// Checks that a token names the current attempt of a pending activity, as handed out to
    /// this worker (`identity`; empty skips that check).
    pub(super) fn check_activity(
        &self,
        token: &pb::TaskToken,
        identity: &str,
    ) -> Result<(), EngineError> {
        if !self.is_open() {
            return Err(EngineError::StaleTask(format!(
                "run {} is already closed",
                self.state.run_id
            )));
        }
        let Some(a) = self.state.activities.get(&token.scheduled_event_id) else {
            return Err(EngineError::StaleTask(format!(
                "activity (scheduled event {}) of run {} is no longer pending",
                token.scheduled_event_id, self.state.run_id
            )));
        };
        if a.attempt != token.attempt {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} is no longer current (attempt {} is)",
                token.attempt, a.activity_id, a.attempt
            )));
        }
        let Some(started) = self.rt.started_activities.get(&token.scheduled_event_id) else {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} is not handed out to any worker (it waits in its \
                 queue or in a retry backoff)",
                token.attempt, a.activity_id
            )));
        };
        // Tokens from before hand-outs were numbered carry 0: accepted by attempt alone.
        if token.dispatch != 0 && started.dispatch != token.dispatch {
            return Err(EngineError::StaleTask(format!(
                "this hand-out of attempt {} of activity {} is no longer current (it was handed \
                 out again)",
                token.attempt, a.activity_id
            )));
        }
        if !identity.is_empty() && !started.worker.is_empty() && started.worker != identity {
            return Err(EngineError::StaleTask(format!(
                "attempt {} of activity {} was handed to worker {}, not to {identity}",
                token.attempt, a.activity_id, started.worker
            )));
        }
        Ok(())
    }

    /// An activity attempt succeeded.
    pub fn activity_completed(
        &mut self,
        token: &pb::TaskToken,
        result: Option<Payload>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        // The event's size, near enough: its payload and identity, and room for its numbers.
        let size = result
            .as_ref()
            .map_or(0, |r| prost::Message::encoded_len(r) as u64)
            + identity.len() as u64
            + 64;
        if !self.history_has_room(size) {
            // Refusing the report would only make the worker run the activity again and again:
            // the workflow hears of it as a failure it can act on instead.
            let message = self.history_full("the activity's result", size).to_string();
            let failure = Failure {
                message,
                error_type: "HistorySizeLimit".into(),
                non_retryable: true,
                kind: FailureKind::Application as i32,
                ..Default::default()
            };
            self.attempt_failed(token.scheduled_event_id, failure, identity, now, fx);
            return Ok(());
        }
        let a = self.remove_activity(token.scheduled_event_id);
        self.append(
            Attributes::ActivityTaskCompleted(pb::ActivityTaskCompleted {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                result,
                attempt: token.attempt,
                identity: identity.to_string(),
            }),
            now,
        );
        self.after_activity_outcome(ExecutionStatus::Completed, now, fx);
        Ok(())
    }

    pub(super) fn remove_activity(&mut self, scheduled_event_id: u64) -> ActivityState {
        self.rt.started_activities.remove(&scheduled_event_id);
        self.state
            .activities
            .remove(&scheduled_event_id)
            .unwrap_or_default()
    }

    pub(super) fn after_activity_outcome(
        &mut self,
        status: ExecutionStatus,
        now: i64,
        fx: &mut Effects,
    ) {
        if self.state.standalone_activity {
            self.close_with_last_event(status, now, fx);
        } else {
            self.schedule_workflow_task(now, fx);
        }
    }

    /// An activity attempt failed: retry per policy, or record the failure.
    pub fn activity_failed(
        &mut self,
        token: &pb::TaskToken,
        failure: Failure,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        let mut failure = failure;
        let size = prost::Message::encoded_len(&failure) as u64 + 64;
        if !self.history_has_room(size) {
            // Keep what the workflow needs to decide; the details would not fit.
            failure.details = None;
            failure.encoded_attributes = None;
            failure.cause = None;
            failure.message = tether_core::types::quote_prefix(&failure.message, 256);
        }
        self.attempt_failed(token.scheduled_event_id, failure, identity, now, fx);
        Ok(())
    }

    /// Shared by failures and attempt timeouts: schedule the next attempt or give up.
    pub(super) fn attempt_failed(
        &mut self,
        scheduled_event_id: u64,
        failure: Failure,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        self.rt.started_activities.remove(&scheduled_event_id);
        let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
            return;
        };
        clear_started(a);
        let options = a.options.clone().unwrap_or_default();
        let policy = options.retry_policy.clone().unwrap_or_default();
        let non_retryable = failure.non_retryable
            || failure.kind == FailureKind::Canceled as i32
            || (!failure.error_type.is_empty()
                && policy
                    .non_retryable_error_types
                    .iter()
                    .any(|t| t == &failure.error_type));
        let attempts_left = policy.maximum_attempts == 0 || a.attempt < policy.maximum_attempts;
        let next_attempt = a.attempt + 1;
        let delay = backoff_ms(&policy, next_attempt);
        let within_deadline = options.schedule_to_close_timeout_ms == 0
            || now.saturating_add(delay)
                < deadline(a.scheduled_ms, options.schedule_to_close_timeout_ms);
        if !non_retryable && attempts_left && within_deadline && !a.cancel_requested {
            a.attempt = next_attempt;
            a.backoff_until_ms = now.saturating_add(delay).max(1);
            a.last_failure = Some(failure);
            a.last_worker = identity.to_string();
            fx.timers.push((
                a.backoff_until_ms,
                TimerKey::ActivityRetry {
                    run_id: self.run_id(),
                    scheduled_event_id,
                    attempt: next_attempt,
                },
            ));
            return;
        }
        let a = self.remove_activity(scheduled_event_id);
        let attrs = if failure.kind == FailureKind::Timeout as i32 {
            Attributes::ActivityTaskTimedOut(pb::ActivityTaskTimedOut {
                seq: a.seq,
                scheduled_event_id,
                failure: Some(failure),
                attempt: a.attempt,
            })
        } else {
            Attributes::ActivityTaskFailed(pb::ActivityTaskFailed {
                seq: a.seq,
                scheduled_event_id,
                failure: Some(failure),
                attempt: a.attempt,
                identity: identity.to_string(),
            })
        };
        let status = if matches!(attrs, Attributes::ActivityTaskTimedOut(_)) {
            ExecutionStatus::TimedOut
        } else {
            ExecutionStatus::Failed
        };
        self.append(attrs, now);
        self.after_activity_outcome(status, now, fx);
    }

    /// The worker confirms a cancel-requested activity stopped.
    pub fn activity_canceled(
        &mut self,
        token: &pb::TaskToken,
        details: Option<Payload>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_activity(token, identity)?;
        let a = &self.state.activities[&token.scheduled_event_id];
        if !a.cancel_requested {
            return Err(EngineError::InvalidArgument(format!(
                "activity {} was not asked to cancel; report a failure instead",
                a.activity_id
            )));
        }
        let a = self.remove_activity(token.scheduled_event_id);
        self.append(
            Attributes::ActivityTaskCanceled(pb::ActivityTaskCanceled {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                details,
            }),
            now,
        );
        self.after_activity_outcome(ExecutionStatus::Canceled, now, fx);
        Ok(())
    }

    /// Records a heartbeat; returns whether cancellation was requested.
    pub fn activity_heartbeat(
        &mut self,
        token: &pb::TaskToken,
        details: Option<Payload>,
        identity: &str,
        now: i64,
    ) -> Result<bool, EngineError> {
        self.check_activity(token, identity)?;
        if let Some(started) = self
            .rt
            .started_activities
            .get_mut(&token.scheduled_event_id)
        {
            started.last_heartbeat_ms = now;
        }
        let a = self
            .state
            .activities
            .get_mut(&token.scheduled_event_id)
            .expect("checked above");
        if details.is_some() {
            a.heartbeat_details = details;
        }
        Ok(a.cancel_requested)
    }

    /// An activity timer fired. Returns whether anything changed. `placement_note` explains,
    /// for a schedule-to-start timeout, why no worker could take the task.
    pub fn activity_timer(
        &mut self,
        key: &TimerKey,
        placement_note: &str,
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        match *key {
            TimerKey::ActivityRetry {
                scheduled_event_id,
                attempt,
                ..
            } => {
                let Some(a) = self.state.activities.get_mut(&scheduled_event_id) else {
                    return false;
                };
                if a.attempt != attempt || a.backoff_until_ms == 0 {
                    return false;
                }
                a.backoff_until_ms = 0;
                a.attempt_scheduled_ms = now;
                let options = a.options.clone().unwrap_or_default();
                fx.tasks.push(activity_task(
                    &self.state.namespace,
                    &self.state.run_id,
                    a,
                    attempt,
                ));
                if options.schedule_to_start_timeout_ms > 0 {
                    fx.timers.push((
                        deadline(now, options.schedule_to_start_timeout_ms),
                        TimerKey::ActivityScheduleToStart {
                            run_id: self.run_id(),
                            scheduled_event_id,
                            attempt,
                        },
                    ));
                }
                true
            }
            TimerKey::ActivityScheduleToStart {
                scheduled_event_id,
                attempt,
                ..
            } => {
                let waiting = self
                    .state
                    .activities
                    .get(&scheduled_event_id)
                    .is_some_and(|a| a.attempt == attempt && a.backoff_until_ms == 0)
                    && !self.rt.started_activities.contains_key(&scheduled_event_id);
                if !waiting {
                    return false;
                }
                let mut f = timeout_failure("schedule_to_start", None);
                if !placement_note.is_empty() {
                    f.message = format!("{}: no worker could take it: {placement_note}", f.message);
                }
                f.non_retryable = true;
                self.attempt_failed(scheduled_event_id, f, "", now, fx);
                true
            }
            TimerKey::ActivityStartToClose {
                scheduled_event_id,
                attempt,
                dispatch,
                ..
            } => {
                let running = self
                    .rt
                    .started_activities
                    .get(&scheduled_event_id)
                    .is_some_and(|s| s.attempt == attempt && s.dispatch == dispatch);
                if !running {
                    return false;
                }
                let worker = self.rt.started_activities[&scheduled_event_id]
                    .worker
                    .clone();
                self.attempt_failed(
                    scheduled_event_id,
                    timeout_failure("start_to_close", None),
                    &worker,
                    now,
                    fx,
                );
                true
            }
            TimerKey::ActivityHeartbeat {
                ref run_id,
                scheduled_event_id,
                attempt,
                dispatch,
            } => {
                let Some(started) = self.rt.started_activities.get(&scheduled_event_id) else {
                    return false;
                };
                if started.attempt != attempt || started.dispatch != dispatch {
                    return false;
                }
                let timeout = self
                    .state
                    .activities
                    .get(&scheduled_event_id)
                    .and_then(|a| a.options.as_ref())
                    .map(|o| o.heartbeat_timeout_ms as i64)
                    .unwrap_or(0);
                let due = started.last_heartbeat_ms.saturating_add(timeout);
                if due > now {
                    fx.timers.push((
                        due,
                        TimerKey::ActivityHeartbeat {
                            run_id: run_id.clone(),
                            scheduled_event_id,
                            attempt,
                            dispatch,
                        },
                    ));
                    return false;
                }
                let worker = started.worker.clone();
                self.attempt_failed(
                    scheduled_event_id,
                    timeout_failure("heartbeat", None),
                    &worker,
                    now,
                    fx,
                );
                true
            }
            TimerKey::ActivityScheduleToClose {
                scheduled_event_id, ..
            } => {
                let Some(a) = self.state.activities.get(&scheduled_event_id) else {
                    return false;
                };
                let last = a.last_failure.clone();
                let mut f = timeout_failure("schedule_to_close", last.as_ref());
                f.non_retryable = true;
                self.attempt_failed(scheduled_event_id, f, "", now, fx);
                true
            }
            _ => false,
        }
    }

    /// Worker `identity` is now process `keep[0]`: attempts other processes of it (but those
    /// in `keep`) were running are lost with them, and retried now (as new attempts).
    pub fn worker_restarted(
        &mut self,
        identity: &str,
        keep: &[&str],
        now: i64,
        fx: &mut Effects,
    ) -> bool {
        if !self.is_open() {
            return false;
        }
        let lost: Vec<u64> = self
            .rt
            .started_activities
            .iter()
            .filter(|(_, s)| s.worker == identity && !keep.contains(&s.instance.as_str()))
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            let failure = Failure {
                message: format!("worker {identity} restarted while running this attempt"),
                error_type: "WorkerRestarted".into(),
                kind: FailureKind::Server as i32,
                ..Default::default()
            };
            self.attempt_failed(*id, failure, identity, now, fx);
        }
        !lost.is_empty()
    }

    /// What `describe` shows about pending activities.
    pub fn pending_activities(&self) -> Vec<pb::PendingActivityInfo> {
        self.state
            .activities
            .values()
            .map(|a| {
                let started = self.rt.started_activities.get(&a.scheduled_event_id);
                let state = if started.is_some() {
                    if a.cancel_requested {
                        "cancel_requested"
                    } else {
                        "started"
                    }
                } else if a.backoff_until_ms > 0 {
                    "backoff"
                } else {
                    "scheduled"
                };
                pb::PendingActivityInfo {
                    seq: a.seq,
                    scheduled_event_id: a.scheduled_event_id,
                    activity_id: a.activity_id.clone(),
                    activity_type: a.activity_type.clone(),
                    state: state.into(),
                    attempt: a.attempt,
                    last_failure: a.last_failure.clone(),
                    last_worker: started
                        .map(|s| s.worker.clone())
                        .unwrap_or_else(|| a.last_worker.clone()),
                    last_heartbeat_ms: started.map(|s| s.last_heartbeat_ms).unwrap_or(0),
                    next_attempt_ms: a.backoff_until_ms,
                    task_queue: a.task_queue.clone(),
                }
            })
            .collect()
    }
}
