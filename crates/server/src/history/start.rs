//! A run's beginning: a workflow or standalone activity started, and a run rebuilt from storage at recovery (its tasks re-offered, its timers re-armed).

use super::*;

impl RunEntry {
    /// Creates a new workflow run with its first workflow task.
    pub fn start_workflow(
        req: &pb::StartWorkflowRequest,
        run_id: String,
        now: i64,
        fx: &mut Effects,
    ) -> RunEntry {
        let task_timeout_ms = if req.task_timeout_ms == 0 {
            DEFAULT_WORKFLOW_TASK_TIMEOUT_MS
        } else {
            req.task_timeout_ms
        };
        let state = RunState {
            namespace: req.namespace.clone(),
            workflow_id: req.workflow_id.clone(),
            run_id: run_id.clone(),
            workflow_type: req.workflow_type.clone(),
            task_queue: req.task_queue.clone(),
            status: ExecutionStatus::Running as i32,
            start_ms: now,
            next_event_id: 1,
            run_timeout_ms: req.run_timeout_ms,
            task_timeout_ms,
            start_request_id: req.request_id.clone(),
            ..Default::default()
        };
        let mut entry = RunEntry::new(state, Vec::new());
        entry.persisted_events = 0;
        entry.append(
            Attributes::WorkflowExecutionStarted(pb::WorkflowExecutionStarted {
                workflow_type: req.workflow_type.clone(),
                task_queue: req.task_queue.clone(),
                input: req.input.clone(),
                workflow_id: req.workflow_id.clone(),
                run_id,
                run_timeout_ms: req.run_timeout_ms,
                task_timeout_ms,
                identity: req.identity.clone(),
            }),
            now,
        );
        if req.run_timeout_ms > 0 {
            fx.timers.push((
                deadline(now, req.run_timeout_ms),
                TimerKey::RunTimeout {
                    run_id: entry.run_id(),
                },
            ));
        }
        entry.schedule_workflow_task(now, fx);
        entry
    }

    /// Creates a standalone activity execution: one activity, no workflow code.
    pub fn start_standalone_activity(
        req: &pb::StartActivityRequest,
        options: ActivityOptions,
        run_id: String,
        now: i64,
        fx: &mut Effects,
    ) -> RunEntry {
        let state = RunState {
            namespace: req.namespace.clone(),
            workflow_id: req.activity_id.clone(),
            run_id,
            workflow_type: req.activity_type.clone(),
            task_queue: options.task_queue.clone(),
            standalone_activity: true,
            status: ExecutionStatus::Running as i32,
            start_ms: now,
            next_event_id: 1,
            start_request_id: req.request_id.clone(),
            ..Default::default()
        };
        let mut entry = RunEntry::new(state, Vec::new());
        entry.persisted_events = 0;
        entry.schedule_activity(
            pb::ScheduleActivityCommand {
                seq: 1,
                activity_id: req.activity_id.clone(),
                activity_type: req.activity_type.clone(),
                input: req.input.clone(),
                options: Some(options),
            },
            now,
            fx,
        );
        entry
    }

    /// The signals this run sent to other workflows that are not resolved in its history yet
    /// (sent to another namespace's engine when the server stopped).
    pub fn unresolved_external_signals(&self) -> Vec<super::OutgoingSignal> {
        use tether_wire::pb::history_event::Attributes;
        let resolved: std::collections::HashSet<u32> = self
            .history
            .iter()
            .filter_map(|e| match &e.attributes {
                Some(Attributes::SignalExternalResolved(r)) => Some(r.seq),
                _ => None,
            })
            .collect();
        self.history
            .iter()
            .filter_map(|e| match &e.attributes {
                Some(Attributes::SignalExternalInitiated(s)) if !resolved.contains(&s.seq) => {
                    Some(super::OutgoingSignal {
                        from_run: self.run_id(),
                        seq: s.seq,
                        namespace: if s.namespace.is_empty() {
                            self.state.namespace.clone()
                        } else {
                            s.namespace.clone()
                        },
                        workflow_id: s.workflow_id.clone(),
                        signal_name: s.signal_name.clone(),
                        input: s.input.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Re-offers whatever was pending when the server stopped (start-up only).
    pub fn recover(&mut self, now: i64, fx: &mut Effects) {
        // Which hand-out rows the store holds is not looked at here: assume some are its own.
        self.rt.may_own_started = true;
        // A workflow task that was running when the server stopped is gone with the process:
        // whatever arrived meanwhile belongs in the history now.
        self.flush_buffered();
        if self.state.workflow_task.is_some() {
            fx.tasks.push((
                self.workflow_queue(),
                TaskRef::Workflow {
                    run_id: self.run_id(),
                },
                String::new(),
            ));
        }
        let run_id = self.run_id();
        for a in self.state.activities.values() {
            let options = a.options.clone().unwrap_or_default();
            if a.started_ms > 0 {
                // Handed out before the restart: its worker may well still run it, so it is not
                // handed out again. It ends as any running attempt does: an outcome, a timeout,
                // or its worker coming back as a new process (then it was lost, and retried).
                let dispatch = a.started_dispatch;
                self.rt.started_activities.insert(
                    a.scheduled_event_id,
                    StartedActivity {
                        attempt: a.attempt,
                        worker: a.started_worker.clone(),
                        instance: a.started_instance.clone(),
                        started_ms: a.started_ms,
                        last_heartbeat_ms: now,
                        dispatch,
                    },
                );
                // Start-to-close counts from the hand-out; heartbeats from now (none could
                // arrive while the server was down).
                arm_attempt_timers(
                    fx,
                    &run_id,
                    (a.scheduled_event_id, a.attempt, dispatch),
                    deadline(a.started_ms, options.start_to_close_timeout_ms),
                    &options,
                    now,
                );
            } else if a.backoff_until_ms > 0 {
                fx.timers.push((
                    a.backoff_until_ms,
                    TimerKey::ActivityRetry {
                        run_id: run_id.clone(),
                        scheduled_event_id: a.scheduled_event_id,
                        attempt: a.attempt,
                    },
                ));
            } else {
                fx.tasks
                    .push(activity_task(&self.state.namespace, &run_id, a, a.attempt));
                if options.schedule_to_start_timeout_ms > 0 {
                    fx.timers.push((
                        deadline(a.attempt_scheduled_ms, options.schedule_to_start_timeout_ms),
                        TimerKey::ActivityScheduleToStart {
                            run_id: run_id.clone(),
                            scheduled_event_id: a.scheduled_event_id,
                            attempt: a.attempt,
                        },
                    ));
                }
            }
            if options.schedule_to_close_timeout_ms > 0 {
                fx.timers.push((
                    deadline(a.scheduled_ms, options.schedule_to_close_timeout_ms),
                    TimerKey::ActivityScheduleToClose {
                        run_id: run_id.clone(),
                        scheduled_event_id: a.scheduled_event_id,
                    },
                ));
            }
        }
        for t in self.state.timers.values() {
            fx.timers.push((
                t.fire_at_ms,
                TimerKey::WorkflowTimer {
                    run_id: run_id.clone(),
                    seq: t.seq,
                },
            ));
        }
        if self.state.run_timeout_ms > 0 {
            fx.timers.push((
                deadline(self.state.start_ms, self.state.run_timeout_ms),
                TimerKey::RunTimeout { run_id },
            ));
        }
    }

    // ------------------------------------------------------------------------------------------
    // Workflow tasks
    // ------------------------------------------------------------------------------------------
}
