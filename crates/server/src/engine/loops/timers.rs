//! The timer loop: fires durable timers and timeouts when they fall due.

use super::super::*;

impl Engine {
    /// Fires due timers until shutdown.
    pub async fn run_timers(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = self.now_ms();
            let due = self.timers.take_due(now);
            if !due.is_empty() {
                if let Err(e) = self.fire(due).await {
                    tracing::error!(error = %e, "applying due timers failed");
                }
                continue;
            }
            let sleep = match self.timers.next_deadline() {
                Some(at) => Duration::from_millis((at - now).max(1) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.timers.changed() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    pub(super) async fn fire(&self, due: Vec<TimerKey>) -> Result<(), EngineError> {
        let now = self.now_ms();
        self.transact(|st, txn| {
            for key in due {
                match &key {
                    TimerKey::SessionCreation { session_id } => {
                        let creating = st.sessions.get(session_id).is_some_and(|s| {
                            s.info
                                .as_ref()
                                .is_some_and(|i| sessions::is_in(i, SessionPhase::Creating))
                        });
                        if creating {
                            let reason = st.sessions[session_id]
                                .info
                                .as_ref()
                                .map(|i| i.reason.clone())
                                .unwrap_or_default();
                            self.close_session(
                                st,
                                session_id,
                                SessionEnd::Failed,
                                &format!(
                                    "no worker could host it before the creation timeout: {reason}"
                                ),
                                true,
                                now,
                                txn,
                            );
                        }
                        continue;
                    }
                    TimerKey::SessionExpiry { session_id } => {
                        let live = st.sessions.get(session_id).is_some_and(|s| {
                            s.execution_deadline_ms <= now
                                && s.info.as_ref().is_some_and(sessions::is_live)
                        });
                        if live {
                            self.close_session(
                                st,
                                session_id,
                                SessionEnd::TimedOut,
                                "execution timeout reached",
                                true,
                                now,
                                txn,
                            );
                        }
                        continue;
                    }
                    _ => {}
                }
                let Some(entry) = key.run_id().and_then(|r| st.runs.get_mut(r)) else {
                    continue;
                };
                let changed = match &key {
                    TimerKey::WorkflowTimer { seq, .. } => {
                        entry.timer_fired(*seq, now, &mut txn.fx)
                    }
                    TimerKey::RunTimeout { .. } => {
                        let deadline =
                            history::deadline(entry.state.start_ms, entry.state.run_timeout_ms);
                        deadline <= now && entry.run_timed_out(now, &mut txn.fx)
                    }
                    TimerKey::WorkflowTaskTimeout { dispatch, .. } => {
                        entry.workflow_task_timed_out(*dispatch, now, &mut txn.fx)
                    }
                    TimerKey::WorkflowTaskRetry { attempt, .. } => {
                        entry.workflow_task_retry_due(*attempt, &mut txn.fx)
                    }
                    TimerKey::StickyScheduleToStart { enqueue, .. } => {
                        entry.sticky_timed_out(*enqueue, &mut txn.fx)
                    }
                    TimerKey::ActivityScheduleToStart {
                        scheduled_event_id, ..
                    } => {
                        let note = entry
                            .state
                            .activities
                            .get(scheduled_event_id)
                            .map(|a| {
                                let reqs = a
                                    .options
                                    .as_ref()
                                    .map(|o| o.requirements.as_str())
                                    .unwrap_or("");
                                self.matcher
                                    .explain(&entry.state.namespace, &a.task_queue, reqs)
                            })
                            .unwrap_or_default();
                        entry.activity_timer(&key, &note, now, &mut txn.fx)
                    }
                    _ => entry.activity_timer(&key, "", now, &mut txn.fx),
                };
                if changed {
                    txn.touched.insert(entry.state.run_id.clone().into());
                }
            }
            Ok(())
        })
        .await
    }

    // ------------------------------------------------------------------------------------------
    // Sessions
    // ------------------------------------------------------------------------------------------
}
