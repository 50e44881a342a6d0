//! Dispatch: handing queued tasks to parked polls inside a transaction, and taking back those whose poll went away.

use super::*;

impl Engine {
    /// New activity tasks go straight to a parked poll that can take them, dispatched in this
    /// same transaction: the worker waiting for work gets it without a second commit, and the
    /// hand-out is durable before the worker sees it.
    pub(super) fn hand_new_tasks_to_parked_polls(
        &self,
        st: &mut EngineState,
        now: i64,
        txn: &mut Txn,
    ) {
        if txn.fx.tasks.is_empty() || self.storage_failed.load(Ordering::Relaxed) {
            return;
        }
        let tasks = std::mem::take(&mut txn.fx.tasks);
        for (key, task, requirements) in tasks {
            if key.kind != TaskKind::Activity {
                // Workflow tasks are handed out without a commit of their own: they must not
                // be seen before the write that caused them is durable (apply_effects).
                txn.fx.tasks.push((key, task, requirements));
                continue;
            }
            // Every hand-out of an activity attempt commits before the worker sees it, and
            // commits are ordered: the task may go in the backlog right away.
            let Some((claim, task)) = self.matcher.claim_or_enqueue(&key, task, &requirements)
            else {
                continue;
            };
            if !self
                .matcher
                .may_hold(&key.namespace, &claim.identity, &claim.instance)
            {
                // A poll of a process replaced under its identity: it ends empty (its next
                // call is refused), and the task waits for another.
                drop(claim);
                txn.fx.tasks.push((key, task, requirements));
                continue;
            }
            let TaskRef::Activity {
                run_id,
                scheduled_event_id,
                attempt,
            } = &task
            else {
                continue;
            };
            let dispatched = self.dispatch_locked(
                st,
                &RunId::from(run_id.as_str()),
                *scheduled_event_id,
                *attempt,
                &claim.identity,
                &claim.instance,
                now,
                txn,
            );
            match dispatched {
                Some(response) => txn.handovers.push((claim, response)),
                // Stale already: nothing to hand over, the poll waits on.
                None => self.matcher.unclaim(claim),
            }
        }
    }

    /// Hands one activity attempt to worker `identity` (process `instance`) inside the current
    /// transaction. None when the task is stale.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch_locked(
        &self,
        st: &mut EngineState,
        run_id: &RunId,
        scheduled_event_id: u64,
        attempt: u32,
        identity: &str,
        instance: &str,
        now: i64,
        txn: &mut Txn,
    ) -> Option<pb::PollActivityTaskResponse> {
        let EngineState { runs, sessions, .. } = st;
        let entry = runs.get_mut(run_id)?;
        let session_id = entry
            .state
            .activities
            .get(&scheduled_event_id)
            .and_then(|a| a.options.as_ref())
            .map(|o| o.session_id.clone())
            .unwrap_or_default();
        let session = if session_id.is_empty() {
            None
        } else {
            // A session activity runs on its session's worker only, and only while it is open
            // (a closed session fails its activities in the same transaction).
            let info = sessions.get_mut(&session_id)?.info.as_mut()?;
            if !sessions::is_in(info, SessionPhase::Open) || info.worker_identity != identity {
                return None;
            }
            Some(info)
        };
        let mut response = entry.dispatch_activity(
            scheduled_event_id,
            attempt,
            identity,
            instance,
            now,
            &mut txn.fx,
        )?;
        let dispatch = entry
            .rt
            .started_activities
            .get(&scheduled_event_id)
            .map_or(0, |s| s.dispatch);
        let (session_id, session_activities_run) = match session {
            Some(info) => {
                info.activities_run += 1;
                info.last_used_ms = now;
                response.session = Some(info.clone());
                (Some(SessionId::from(session_id)), info.activities_run)
            }
            None => {
                entry.rt.may_own_started = true;
                (None, 0)
            }
        };
        // Durable before the worker sees it, as a small row rather than the run's (and the
        // session's) whole state.
        txn.started.push(Write::Started {
            run_id: run_id.clone(),
            scheduled_event_id,
            attempt,
            dispatch,
            started_ms: now,
            worker: identity.to_string(),
            instance: instance.to_string(),
            session_id,
            session_activities_run,
        });
        Some(response)
    }

    /// Takes back attempts whose worker never received them: each waits in its queue again.
    pub(super) fn undispatch(
        &self,
        responses: Vec<pb::PollActivityTaskResponse>,
    ) -> futures::future::BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            self.transact(|st, txn| {
                for response in responses {
                    let Ok(token) = Self::decode_token(&response.task_token) else {
                        continue;
                    };
                    let Some(entry) = st.runs.get_mut(&token.run_id) else {
                        continue;
                    };
                    if !entry.undispatch_activity(
                        token.scheduled_event_id,
                        token.attempt,
                        token.dispatch,
                        &mut txn.fx,
                    ) {
                        continue;
                    }
                    tracing::debug!(
                        run_id = token.run_id,
                        attempt = token.attempt,
                        "attempt taken back: its poll ended before it was delivered"
                    );
                    // The session's count is of hand-outs, this one included: it stays. Once
                    // the session is closed, its count is final and the row is the run's alone.
                    let session = response
                        .session
                        .as_ref()
                        .filter(|s| session_is_open(&st.sessions, &SessionId::from(&s.session_id)));
                    if session.is_none() {
                        if let Some(entry) = st.runs.get_mut(&token.run_id) {
                            entry.rt.may_own_started = true;
                        }
                    }
                    txn.started.push(Write::Started {
                        run_id: token.run_id.clone().into(),
                        scheduled_event_id: token.scheduled_event_id,
                        attempt: token.attempt,
                        dispatch: token.dispatch,
                        started_ms: 0,
                        worker: String::new(),
                        instance: String::new(),
                        session_id: session.map(|s| SessionId::from(s.session_id.as_str())),
                        session_activities_run: session.map_or(0, |s| s.activities_run),
                    });
                }
                Ok(())
            })
            .await
        })
    }

    /// Dispatches a task a poll took from a backlog, and makes the hand-out durable before the
    /// worker gets it. None when the task was stale.
    pub(super) async fn dispatch_polled(
        &self,
        task: TaskRef,
        identity: &str,
        instance: &str,
    ) -> Result<Option<pb::PollActivityTaskResponse>, EngineError> {
        let TaskRef::Activity {
            run_id,
            scheduled_event_id,
            attempt,
        } = task
        else {
            return Ok(None);
        };
        let (commit, txn, response) = self.submit(|st, txn| {
            let Some(entry) = st.runs.get(&run_id) else {
                return Ok(None);
            };
            if let Err(refused) = self.check_poller(&entry.state.namespace, identity, instance) {
                // Its process was replaced under its identity since the poll began: the task
                // waits for the process that holds it now.
                if let Some((key, task, requirements)) =
                    entry.waiting_activity_task(scheduled_event_id, attempt)
                {
                    self.matcher.put_back(&key, task, &requirements);
                }
                return Err(refused);
            }
            let Some(response) = self.dispatch_locked(
                st,
                &RunId::from(run_id.as_str()),
                scheduled_event_id,
                attempt,
                identity,
                instance,
                self.now_ms(),
                txn,
            ) else {
                return Ok(None);
            };
            Ok(Some(response))
        })?;
        let Some(response) = response else {
            return Ok(None);
        };
        // Should the poll's caller go away while the commit is under way, the attempt is taken
        // back instead of waiting out its timeout on a worker that never got it.
        let mut undo = GiveBackOnDrop::many(&self.matcher, vec![response]);
        let finished = self.finish(commit, txn).await;
        let response = undo.take().pop();
        finished?;
        Ok(response)
    }

    /// Dispatches up to `next.max` waiting tasks to the worker of a completion, inside the
    /// completion's own transaction (one commit for the outcomes and the new hand-outs).
    pub(super) fn take_next_locked(
        &self,
        st: &mut EngineState,
        next: &NextTasks,
        now: i64,
        txn: &mut Txn,
    ) -> Vec<pb::PollActivityTaskResponse> {
        let mut taken = Vec::new();
        if next.max == 0 || self.storage_failed.load(Ordering::Relaxed) || *self.shutdown.borrow() {
            return taken;
        }
        // Only the process that holds the identity gets work under it (a replaced one would
        // run it where nobody expects it to).
        if !self
            .matcher
            .may_hold(&next.namespace, &next.identity, &next.instance)
        {
            return taken;
        }
        for queue in &next.queues {
            let key = QueueKey::new(&next.namespace, queue, TaskKind::Activity);
            while taken.len() < next.max {
                let Some(task) = self.matcher.try_take(&key, &next.identity, now) else {
                    break;
                };
                let TaskRef::Activity {
                    run_id,
                    scheduled_event_id,
                    attempt,
                } = task
                else {
                    continue;
                };
                // A stale entry (its run closed, its attempt moved on) is just skipped.
                if let Some(response) = self.dispatch_locked(
                    st,
                    &RunId::from(run_id.as_str()),
                    scheduled_event_id,
                    attempt,
                    &next.identity,
                    &next.instance,
                    now,
                    txn,
                ) {
                    taken.push(response);
                }
            }
        }
        taken
    }
}
