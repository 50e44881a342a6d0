//! Workflow tasks: scheduled, handed out, completed with commands (checked against the history first), failed, retried, timed out.

use super::*;

impl RunEntry {
    /// Puts a workflow task on the queue unless one is already pending.
    pub(super) fn schedule_workflow_task(&mut self, now: i64, fx: &mut Effects) {
        if self.state.standalone_activity || !self.is_open() || self.state.workflow_task.is_some() {
            return;
        }
        self.state.workflow_task = Some(WorkflowTaskState {
            attempt: 1,
            scheduled_ms: now,
        });
        self.enqueue_workflow_task(now, fx);
    }

    pub(super) fn enqueue_workflow_task(&mut self, now: i64, fx: &mut Effects) {
        self.rt.enqueues += 1;
        let task = TaskRef::Workflow {
            run_id: self.run_id(),
        };
        if !self.state.sticky_queue.is_empty() && self.rt.sticky_sent_up_to > 0 {
            let key = QueueKey::new(
                &self.state.namespace,
                &self.state.sticky_queue,
                TaskKind::Workflow,
            );
            fx.tasks.push((key, task, String::new()));
            fx.timers.push((
                now.saturating_add(STICKY_SCHEDULE_TO_START_MS),
                TimerKey::StickyScheduleToStart {
                    run_id: self.run_id(),
                    enqueue: self.rt.enqueues,
                },
            ));
        } else {
            fx.tasks.push((self.workflow_queue(), task, String::new()));
        }
    }

    /// Hands the pending workflow task to a poller. Returns None if the task is stale.
    pub fn dispatch_workflow_task(
        &mut self,
        identity: &str,
        poller_sticky_queue: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        if !self.is_open() || self.rt.workflow_task.is_some() {
            return None;
        }
        let attempt = self.state.workflow_task.as_ref()?.attempt;
        self.flush_buffered();
        let dispatch = next_dispatch();
        self.rt.workflow_task = Some(StartedWorkflowTask {
            dispatch,
            identity: identity.to_string(),
            sticky_queue: poller_sticky_queue.to_string(),
        });
        fx.timers.push((
            deadline(now, self.state.task_timeout_ms),
            TimerKey::WorkflowTaskTimeout {
                run_id: self.run_id(),
                dispatch,
            },
        ));
        let partial = !poller_sticky_queue.is_empty()
            && poller_sticky_queue == self.state.sticky_queue
            && self.rt.sticky_sent_up_to > 0;
        let events: Vec<HistoryEvent> = if partial {
            let from = self.rt.sticky_sent_up_to;
            self.history
                .iter()
                .filter(|e| e.event_id > from)
                .cloned()
                .collect()
        } else {
            self.history.clone()
        };
        self.rt.sticky_sent_up_to = self.state.next_event_id.saturating_sub(1);
        let token = pb::TaskToken {
            namespace: self.state.namespace.clone(),
            run_id: self.state.run_id.clone(),
            scheduled_event_id: 0,
            attempt,
            dispatch,
        };
        Some(pb::PollWorkflowTaskResponse {
            task_token: prost::Message::encode_to_vec(&token),
            workflow_id: self.state.workflow_id.clone(),
            run_id: self.state.run_id.clone(),
            workflow_type: self.state.workflow_type.clone(),
            events,
            full_history: !partial,
            attempt,
            namespace: self.state.namespace.clone(),
        })
    }

    pub(super) fn check_workflow_task(&self, token: &pb::TaskToken) -> Result<(), EngineError> {
        if !self.is_open() {
            return Err(EngineError::StaleTask(format!(
                "workflow run {} is already closed",
                self.state.run_id
            )));
        }
        match &self.rt.workflow_task {
            Some(started) if started.dispatch == token.dispatch => Ok(()),
            _ => Err(EngineError::StaleTask(format!(
                "workflow task (dispatch {}) of run {} is no longer current; it timed out or was \
                 handed to another worker",
                token.dispatch, self.state.run_id
            ))),
        }
    }

    /// Checks a completion's commands before anything is applied, so that bad commands change
    /// nothing.
    pub fn validate_commands(
        &self,
        commands: &[pb::Command],
        max_payload: usize,
    ) -> Result<(), EngineError> {
        let bad =
            |i: usize, msg: String| EngineError::InvalidArgument(format!("command #{i}: {msg}"));
        let mut seen_terminal = false;
        // Each seq names one command of its kind: a second one would make its outcome
        // ambiguous, so the completion is refused whole.
        let mut seqs: std::collections::HashSet<(&'static str, u32)> = Default::default();
        let mut unique = |i: usize, kind: &'static str, seq: u32| {
            if seqs.insert((kind, seq)) {
                Ok(())
            } else {
                Err(bad(
                    i,
                    format!("{kind} seq {seq} appears twice in this completion; give each command its own seq"),
                ))
            }
        };
        for (i, c) in commands.iter().enumerate() {
            let Some(kind) = &c.kind else {
                return Err(bad(i, "command has no kind".into()));
            };
            match kind {
                command::Kind::ScheduleActivity(a) => unique(i, "activity", a.seq)?,
                command::Kind::StartTimer(t) => unique(i, "timer", t.seq)?,
                command::Kind::RecordMarker(m) => unique(i, "marker", m.seq)?,
                command::Kind::SignalExternal(sig) => unique(i, "signal", sig.seq)?,
                command::Kind::CreateSession(c) => unique(i, "session", c.seq)?,
                command::Kind::CompleteSession(c) => unique(i, "session completion", c.seq)?,
                command::Kind::CancelTimer(t) => unique(i, "timer cancellation", t.seq)?,
                command::Kind::RequestCancelActivity(r) => {
                    unique(i, "activity cancellation", r.seq)?
                }
                command::Kind::CompleteWorkflow(_)
                | command::Kind::FailWorkflow(_)
                | command::Kind::CancelWorkflow(_) => {}
            }
            if seen_terminal {
                return Err(bad(
                    i,
                    "no command may follow complete/fail/cancel workflow".into(),
                ));
            }
            match kind {
                command::Kind::ScheduleActivity(a) => {
                    tether_core::types::validate_name("activity type", &a.activity_type)
                        .map_err(|e| bad(i, e.to_string()))?;
                    normalize_activity_options(a.options.clone(), &self.state.task_queue)
                        .map_err(|e| bad(i, e.to_string()))?;
                    check_payload("activity input", a.input.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                    if self.state.activities.values().any(|x| x.seq == a.seq) {
                        return Err(bad(i, format!("activity seq {} is already in use", a.seq)));
                    }
                }
                command::Kind::StartTimer(t) => {
                    if self.state.timers.contains_key(&t.seq) {
                        return Err(bad(i, format!("timer seq {} is already in use", t.seq)));
                    }
                    check_duration("duration_ms", t.duration_ms)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::RecordMarker(m) => {
                    check_payload("marker data", m.data.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::SignalExternal(s) => {
                    tether_core::types::validate_name("signal name", &s.signal_name)
                        .map_err(|e| bad(i, e.to_string()))?;
                    tether_core::types::validate_name("workflow id", &s.workflow_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                    check_payload("signal input", s.input.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CompleteWorkflow(c) => {
                    seen_terminal = true;
                    check_payload("workflow result", c.result.as_ref(), max_payload)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::FailWorkflow(_) | command::Kind::CancelWorkflow(_) => {
                    seen_terminal = true;
                }
                command::Kind::CreateSession(c) => {
                    tether_core::types::validate_name("session id", &c.session_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                    let o = c.options.clone().unwrap_or_default();
                    tether_core::requirements::Requirements::parse(&o.requirements)
                        .map_err(|e| bad(i, e.to_string()))?;
                    crate::sessions::Packing::parse(&o.packing).map_err(|e| bad(i, e))?;
                    check_session_durations(&o).map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CompleteSession(c) => {
                    tether_core::types::validate_name("session id", &c.session_id)
                        .map_err(|e| bad(i, e.to_string()))?;
                }
                command::Kind::CancelTimer(_) | command::Kind::RequestCancelActivity(_) => {}
            }
        }
        Ok(())
    }

    /// Applies a workflow task completion: marks the activation, records the commands as events
    /// and acts on them.
    pub fn complete_workflow_task(
        &mut self,
        token: &pb::TaskToken,
        commands: Vec<pb::Command>,
        identity: &str,
        sticky_queue: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<WorkflowTaskCompletion, EngineError> {
        self.check_workflow_task(token)?;
        let closes = commands.iter().any(|c| {
            matches!(
                c.kind,
                Some(
                    command::Kind::CompleteWorkflow(_)
                        | command::Kind::FailWorkflow(_)
                        | command::Kind::CancelWorkflow(_)
                )
            )
        });
        if closes && !self.state.buffered.is_empty() {
            // The workflow decided to close without seeing what arrived meanwhile (a signal, an
            // activity outcome): closing now would drop an acknowledged signal. Nothing of this
            // task is applied; a new task carries the new events, replayed from full history
            // because the worker's cached state ran ahead of it.
            let arrived = self.state.buffered.len();
            self.rt.workflow_task = None;
            self.rt.sticky_sent_up_to = 0;
            self.state.workflow_task = None;
            self.flush_buffered();
            self.schedule_workflow_task(now, fx);
            return Ok(WorkflowTaskCompletion::Rejected(format!(
                "{arrived} new event(s) arrived while the workflow task that closes the run was \
                 running; the completion was not applied and a new workflow task delivers them"
            )));
        }
        self.rt.workflow_task = None;
        self.state.workflow_task = None;
        self.state.last_workflow_task_failure = None;
        self.state.sticky_queue = sticky_queue.to_string();
        self.push_history(HistoryEvent {
            event_id: 0,
            time_ms: now,
            attributes: Some(Attributes::WorkflowTaskCompleted(
                pb::WorkflowTaskCompleted {
                    identity: identity.to_string(),
                },
            )),
        });
        // Outcomes produced by the commands themselves (an activity cancelled before it started)
        // go after all command events, as the next activation's input.
        let mut deferred: Vec<Attributes> = Vec::new();
        let mut terminal: Option<(ExecutionStatus, Attributes)> = None;
        for c in commands {
            let Some(kind) = c.kind else { continue };
            match kind {
                command::Kind::ScheduleActivity(a) => self.schedule_activity(a, now, fx),
                command::Kind::StartTimer(t) => {
                    let id = self.push_attr(
                        Attributes::TimerStarted(pb::TimerStarted {
                            seq: t.seq,
                            duration_ms: t.duration_ms,
                        }),
                        now,
                    );
                    let fire_at_ms = deadline(now, t.duration_ms);
                    self.state.timers.insert(
                        t.seq,
                        TimerState {
                            seq: t.seq,
                            fire_at_ms,
                            started_event_id: id,
                        },
                    );
                    fx.timers.push((
                        fire_at_ms,
                        TimerKey::WorkflowTimer {
                            run_id: self.run_id(),
                            seq: t.seq,
                        },
                    ));
                }
                command::Kind::CancelTimer(t) => {
                    self.state.timers.remove(&t.seq);
                    self.push_attr(
                        Attributes::TimerCanceled(pb::TimerCanceled { seq: t.seq }),
                        now,
                    );
                }
                command::Kind::RequestCancelActivity(r) => {
                    self.push_attr(
                        Attributes::ActivityCancelRequested(pb::ActivityCancelRequested {
                            seq: r.seq,
                        }),
                        now,
                    );
                    if let Some(outcome) = self.request_activity_cancel(r.seq) {
                        deferred.push(outcome);
                    }
                }
                command::Kind::RecordMarker(m) => {
                    self.push_attr(
                        Attributes::MarkerRecorded(pb::MarkerRecorded {
                            seq: m.seq,
                            marker_name: m.marker_name,
                            data: m.data,
                        }),
                        now,
                    );
                }
                command::Kind::SignalExternal(s) => {
                    self.push_attr(
                        Attributes::SignalExternalInitiated(pb::SignalExternalInitiated {
                            seq: s.seq,
                            namespace: s.namespace.clone(),
                            workflow_id: s.workflow_id.clone(),
                            signal_name: s.signal_name.clone(),
                            input: s.input.clone(),
                        }),
                        now,
                    );
                    fx.signals.push(OutgoingSignal {
                        from_run: self.run_id(),
                        seq: s.seq,
                        namespace: if s.namespace.is_empty() {
                            self.state.namespace.clone()
                        } else {
                            s.namespace
                        },
                        workflow_id: s.workflow_id,
                        signal_name: s.signal_name,
                        input: s.input,
                    });
                }
                command::Kind::CreateSession(c) => {
                    let mut options = c.options.unwrap_or_default();
                    if options.task_queue.is_empty() {
                        options.task_queue = self.state.task_queue.clone();
                    }
                    self.push_attr(
                        Attributes::SessionCreateRequested(pb::SessionCreateRequested {
                            seq: c.seq,
                            session_id: c.session_id.clone(),
                            options: Some(options.clone()),
                        }),
                        now,
                    );
                    fx.session_requests
                        .push((self.run_id(), c.seq, c.session_id.into(), options));
                }
                command::Kind::CompleteSession(c) => {
                    self.push_attr(
                        Attributes::SessionCompleteRequested(pb::SessionCompleteRequested {
                            seq: c.seq,
                            session_id: c.session_id.clone(),
                        }),
                        now,
                    );
                    fx.session_completions.push(c.session_id.into());
                }
                command::Kind::CompleteWorkflow(c) => {
                    terminal = Some((
                        ExecutionStatus::Completed,
                        Attributes::WorkflowExecutionCompleted(pb::WorkflowExecutionCompleted {
                            result: c.result,
                        }),
                    ));
                }
                command::Kind::FailWorkflow(f) => {
                    terminal = Some((
                        ExecutionStatus::Failed,
                        Attributes::WorkflowExecutionFailed(pb::WorkflowExecutionFailed {
                            failure: f.failure,
                        }),
                    ));
                }
                command::Kind::CancelWorkflow(c) => {
                    terminal = Some((
                        ExecutionStatus::Canceled,
                        Attributes::WorkflowExecutionCanceled(pb::WorkflowExecutionCanceled {
                            details: c.details,
                        }),
                    ));
                }
            }
        }
        let had_buffered = self.flush_buffered();
        for attrs in &deferred {
            self.push_attr(attrs.clone(), now);
        }
        if let Some((status, attrs)) = terminal {
            self.close(status, attrs, now, fx);
            return Ok(WorkflowTaskCompletion::Applied);
        }
        if had_buffered || !deferred.is_empty() {
            self.schedule_workflow_task(now, fx);
        }
        Ok(WorkflowTaskCompletion::Applied)
    }

    /// Records a failed workflow task (e.g. non-determinism) and offers it again after a backoff,
    /// so a fixed worker can continue the run.
    pub fn fail_workflow_task(
        &mut self,
        token: &pb::TaskToken,
        cause: &str,
        failure: Option<Failure>,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        self.check_workflow_task(token)?;
        let message = failure.map(|f| f.message).unwrap_or_default();
        tracing::warn!(run_id = %self.state.run_id, cause, %message, identity, "workflow task failed");
        self.retry_workflow_task(cause, message, identity, now, fx);
        Ok(())
    }

    pub(super) fn retry_workflow_task(
        &mut self,
        cause: &str,
        message: String,
        identity: &str,
        now: i64,
        fx: &mut Effects,
    ) {
        self.rt.workflow_task = None;
        self.rt.sticky_sent_up_to = 0;
        self.state.sticky_queue.clear();
        self.flush_buffered();
        let task = self
            .state
            .workflow_task
            .get_or_insert_with(Default::default);
        task.attempt += 1;
        task.scheduled_ms = now;
        let attempt = task.attempt;
        self.state.workflow_task_failures += 1;
        self.state.last_workflow_task_failure = Some(pb::WorkflowTaskFailureInfo {
            cause: cause.to_string(),
            message,
            attempt: attempt - 1,
            identity: identity.to_string(),
            time_ms: now,
        });
        let delay = (250i64 << (attempt.saturating_sub(2)).min(10)).min(MAX_WORKFLOW_TASK_RETRY_MS);
        fx.timers.push((
            now + delay,
            TimerKey::WorkflowTaskRetry {
                run_id: self.run_id(),
                attempt,
            },
        ));
    }

    /// A workflow task's start-to-close timeout fired.
    pub fn workflow_task_timed_out(&mut self, dispatch: u64, now: i64, fx: &mut Effects) -> bool {
        match &self.rt.workflow_task {
            Some(t) if t.dispatch == dispatch && self.is_open() => {
                let identity = t.identity.clone();
                self.retry_workflow_task(
                    "timeout",
                    format!(
                        "workflow task timed out after {} ms on worker {identity}",
                        self.state.task_timeout_ms
                    ),
                    &identity,
                    now,
                    fx,
                );
                true
            }
            _ => false,
        }
    }

    /// The retry backoff of a failed workflow task ended.
    pub fn workflow_task_retry_due(&mut self, attempt: u32, fx: &mut Effects) -> bool {
        let pending = self.state.workflow_task.as_ref().map(|t| t.attempt) == Some(attempt);
        if pending && self.rt.workflow_task.is_none() && self.is_open() {
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.run_id(),
                },
                String::new(),
            ));
        }
        false
    }

    /// Nobody took the task from the sticky queue in time: any worker may now have it.
    pub fn sticky_timed_out(&mut self, enqueue: u64, fx: &mut Effects) -> bool {
        if self.rt.enqueues == enqueue
            && self.rt.workflow_task.is_none()
            && self.state.workflow_task.is_some()
            && self.is_open()
        {
            self.rt.sticky_sent_up_to = 0;
            self.state.sticky_queue.clear();
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.run_id(),
                },
                String::new(),
            ));
            return true;
        }
        false
    }

    // ------------------------------------------------------------------------------------------
    // Signals, cancellation, termination, timers
    // ------------------------------------------------------------------------------------------
}
