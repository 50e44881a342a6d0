//! Sessions in the engine: creation, completion and termination, the owner's notification, and what becomes of the activities of a closed session.

use super::*;

impl Engine {
    /// A workflow that asked for a session learns its placement (or failure) as an event.
    pub(super) fn notify_session_owner(
        st: &mut EngineState,
        info: &pb::SessionInfo,
        outcome: Result<(), String>,
        now: i64,
        txn: &mut Txn,
    ) {
        let Some((run_id, seq)) = owner_run(info) else {
            return;
        };
        if let Some(entry) = st.runs.get_mut(&run_id) {
            let outcome = outcome
                .map(|_| info.clone())
                .map_err(|reason| (info.session_id.clone(), reason));
            entry.session_resolved(seq, outcome, now, &mut txn.fx);
            txn.touched.insert(run_id.to_string().into());
        }
    }

    /// Records a new session (defaults filled in), arms its creation and execution timers and
    /// tries to place it at once. Returns whether it was placed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_session(
        &self,
        st: &mut EngineState,
        session_id: &SessionId,
        namespace: &str,
        owner: &SessionOwner,
        mut options: pb::SessionOptions,
        now: i64,
        txn: &mut Txn,
    ) -> bool {
        if options.creation_timeout_ms == 0 {
            options.creation_timeout_ms = DEFAULT_SESSION_CREATION_MS;
        }
        if options.execution_timeout_ms == 0 {
            options.execution_timeout_ms = DEFAULT_SESSION_EXECUTION_MS;
        }
        if options.liveness_timeout_ms == 0 {
            options.liveness_timeout_ms = self.config.worker_liveness_timeout.as_millis() as u64;
        }
        if options.idle_timeout_ms == 0 {
            options.idle_timeout_ms = DEFAULT_SESSION_IDLE_MS;
        }
        let creation_deadline_ms = history::deadline(now, options.creation_timeout_ms);
        let execution_deadline_ms = history::deadline(now, options.execution_timeout_ms);
        // Kept with the session for whoever shows it (the UI links it): the owner's text names
        // only the run.
        let owner_workflow_id = owner
            .workflow()
            .and_then(|(run_id, _)| st.runs.get(run_id))
            .map(|entry| entry.state.workflow_id.clone())
            .unwrap_or_default();
        st.sessions.insert(
            session_id.to_string().into(),
            SessionState {
                info: Some(pb::SessionInfo {
                    session_id: session_id.to_string(),
                    namespace: namespace.to_string(),
                    state: SessionPhase::Creating.name().into(),
                    options: Some(options),
                    created_ms: now,
                    owner: owner.to_string(),
                    owner_workflow_id,
                    last_used_ms: now,
                    ..Default::default()
                }),
                creation_deadline_ms,
                execution_deadline_ms,
            },
        );
        if let Some((run_id, _)) = owner.workflow() {
            st.session_owners
                .entry(run_id.as_str().to_string().into())
                .or_default()
                .push(session_id.to_string().into());
        }
        txn.touched_sessions.insert(session_id.to_string().into());
        txn.fx.timers.push((
            creation_deadline_ms,
            TimerKey::SessionCreation {
                session_id: session_id.to_string().into(),
            },
        ));
        txn.fx.timers.push((
            execution_deadline_ms,
            TimerKey::SessionExpiry {
                session_id: session_id.to_string().into(),
            },
        ));
        let placed = self.try_place(st, session_id, now, txn);
        if !placed {
            if let Some(info) = st.sessions.get(session_id).and_then(|s| s.info.as_ref()) {
                Self::enqueue_waiting(&mut st.waiting_sessions, info);
            }
        }
        placed
    }

    /// Creates the sessions a workflow task asked for and completes the ones it completed.
    pub(super) fn apply_session_commands(
        &self,
        st: &mut EngineState,
        namespace: &str,
        now: i64,
        txn: &mut Txn,
    ) {
        for (run_id, seq, session_id, mut options) in std::mem::take(&mut txn.fx.session_requests) {
            if st.sessions.contains_key(&session_id) {
                continue;
            }
            // Validated with the workflow task's commands; canonical form for the class key.
            options.requirements =
                tether_core::requirements::Requirements::parse(&options.requirements)
                    .map(|r| r.to_string())
                    .unwrap_or_default();
            let owner = SessionOwner::Workflow {
                run_id: tether_core::types::RunId::new(run_id),
                seq,
            };
            self.insert_session(
                st,
                &SessionId::from(session_id.as_str()),
                namespace,
                &owner,
                options,
                now,
                txn,
            );
        }
        for session_id in std::mem::take(&mut txn.fx.session_completions) {
            let live = st
                .sessions
                .get(&session_id)
                .and_then(|s| s.info.as_ref())
                .is_some_and(sessions::is_live);
            if live {
                self.close_session(st, &session_id, SessionEnd::Completed, "", false, now, txn);
            }
        }
    }

    /// Ends a session and releases its reservation; with `fail_activities`, its pending
    /// activities fail with SessionFailed (a session completed by its owner has none left that
    /// matter: the owner decided it was done).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn close_session(
        &self,
        st: &mut EngineState,
        session_id: &SessionId,
        how: SessionEnd,
        reason: &str,
        fail_activities: bool,
        now: i64,
        txn: &mut Txn,
    ) {
        let Some(session) = st.sessions.get_mut(session_id) else {
            return;
        };
        let info = session.info.as_mut().expect("has info");
        let ending = match SessionPhase::of(info).map(|p| p.end(how)) {
            Some(Ok(ending)) => ending,
            // Closed already (or a phase this version does not know): nothing to end.
            _ => return,
        };
        if sessions::is_in(info, SessionPhase::Creating) {
            st.waiting_sessions
                .remove(&(info.created_ms, session_id.clone()));
        }
        let state = ending.phase.name();
        info.state = state.to_string();
        info.reason = reason.to_string();
        info.closed_ms = now;
        let info = info.clone();
        if ending.release_reservation {
            st.reservations
                .release(&info.namespace, &sessions::placement_of(&info));
        }
        if how != SessionEnd::Completed {
            tracing::warn!(
                session_id = session_id.as_str(),
                state,
                reason,
                "session ended"
            );
        }
        // Closed without failing (its owner completed it): the attempts running in it may
        // finish, but those never handed out can no longer run anywhere.
        let never_handed_out = format!("it was {state} before this activity was handed out");
        let runs = st.session_runs.remove(session_id).unwrap_or_default();
        for run_id in &runs {
            let Some(entry) = st.runs.get_mut(run_id) else {
                continue;
            };
            let failed = if fail_activities {
                entry.fail_session_activities(
                    &SessionId::from(session_id.as_str()),
                    reason,
                    now,
                    &mut txn.fx,
                )
            } else {
                entry.fail_waiting_session_activities(
                    &SessionId::from(session_id.as_str()),
                    &never_handed_out,
                    now,
                    &mut txn.fx,
                )
            };
            if failed {
                txn.touched.insert(run_id.clone());
            }
        }
        txn.closed_session_runs
            .entry(session_id.to_string().into())
            .or_default()
            .extend(runs);
        match ending.tell_owner {
            OwnerNotice::CreationFailed => {
                Self::notify_session_owner(st, &info, Err(reason.to_string()), now, txn);
            }
            // The owning workflow sees the session's state change, not only its failed activities.
            OwnerNotice::Ended => {
                if let Some((run_id, _)) = owner_run(&info) {
                    if let Some(entry) = st.runs.get_mut(&run_id) {
                        entry.session_ended(
                            &SessionId::from(&info.session_id),
                            state,
                            reason,
                            now,
                            &mut txn.fx,
                        );
                        txn.touched.insert(run_id.to_string().into());
                    }
                }
            }
            OwnerNotice::Nothing => {}
        }
        txn.fx.sessions_settled.push(info);
        txn.touched_sessions.insert(session_id.to_string().into());
        // Released resources may let a waiting session in.
        self.try_place_pending(st, now, txn);
    }

    /// Ends the open sessions of a worker whose GPUs they hold no longer exist there (it came
    /// back with fewer, or other, GPUs).
    pub(super) fn fail_sessions_on_vanished_gpus(
        &self,
        st: &mut EngineState,
        namespace: &str,
        identity: &str,
        caps: &pb::Capabilities,
        now: i64,
        txn: &mut Txn,
    ) {
        let vanished: Vec<(String, String)> = st
            .sessions
            .values()
            .filter_map(|s| s.info.as_ref())
            .filter(|i| {
                sessions::is_in(i, SessionPhase::Open)
                    && i.namespace == namespace
                    && i.worker_identity == identity
            })
            .filter_map(|i| {
                let gone: Vec<String> = i
                    .gpus
                    .iter()
                    .filter(|g| {
                        !caps.gpus.iter().any(|have| {
                            have.index == g.index
                                && (g.uuid.is_empty()
                                    || have.uuid.is_empty()
                                    || have.uuid == g.uuid)
                        })
                    })
                    .map(|g| {
                        if g.uuid.is_empty() {
                            format!("GPU {}", g.index)
                        } else {
                            format!("GPU {} ({})", g.index, g.uuid)
                        }
                    })
                    .collect();
                (!gone.is_empty()).then(|| {
                    (
                        i.session_id.clone(),
                        format!(
                            "{} reserved for it vanished from worker {identity} (it now has {} \
                             GPU(s))",
                            gone.join(", "),
                            caps.gpus.len()
                        ),
                    )
                })
            })
            .collect();
        for (session_id, reason) in vanished {
            self.close_session(
                st,
                &SessionId::from(session_id),
                SessionEnd::Failed,
                &reason,
                true,
                now,
                txn,
            );
        }
    }

    /// Creates a session and waits (up to `wait`) for its placement. Asking again for the same
    /// session id waits the same way (it does not answer at once while the session waits).
    pub async fn create_session(
        &self,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::SessionInfo, EngineError> {
        self.check_healthy()?;
        let mut options = req.options.unwrap_or_default();
        tether_core::types::validate_name("session task queue", &options.task_queue)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        options.requirements =
            tether_core::requirements::Requirements::parse(&options.requirements)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?
                .to_string();
        sessions::Packing::parse(&options.packing).map_err(EngineError::InvalidArgument)?;
        history::check_session_durations(&options)?;
        for name in options.resources.keys() {
            tether_core::types::validate_name("resource name", name)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
        }
        let owner = SessionOwner::client(&req.owner).map_err(EngineError::InvalidArgument)?;
        let session_id = if req.session_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            tether_core::types::validate_name("session id", &req.session_id)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
            req.session_id.clone()
        };
        let now = self.now_ms();
        let waiter = self
            .transact(|st, txn| {
                Self::check_namespace(st, &req.namespace)?;
                let existing = st.sessions.get(&session_id).and_then(|s| s.info.clone());
                let placed_or_closed = match existing {
                    Some(info) => {
                        // Same id again (a client's retry, or its next wait): idempotent.
                        if info.namespace != req.namespace {
                            return Err(EngineError::AlreadyExists(format!(
                                "session id {session_id:?} is in use"
                            )));
                        }
                        !sessions::is_in(&info, SessionPhase::Creating)
                    }
                    None => self.insert_session(
                        st,
                        &SessionId::from(&session_id),
                        &req.namespace,
                        &owner,
                        options,
                        now,
                        txn,
                    ),
                };
                let waiter = if placed_or_closed || req.wait_ms == 0 {
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    st.session_waiters
                        .entry(session_id.clone().into())
                        .or_default()
                        .push(tx);
                    Some(rx)
                };
                Ok(waiter)
            })
            .await?;
        if let Some(rx) = waiter {
            let wait = Duration::from_millis(req.wait_ms).min(self.config.long_poll_timeout);
            if let Some(info) = self.wait_for_answer(rx, wait).await? {
                return Ok(info);
            }
            forget_gone_waiters(&mut self.state.lock().session_waiters, &session_id);
        }
        if let Some(info) = self
            .session_from_store_if_gone(&req.namespace, &SessionId::from(&session_id))
            .await?
        {
            return Ok(info);
        }
        self.describe_session(
            &Namespace::from(&req.namespace),
            &SessionId::from(&session_id),
        )
        .await
    }

    /// None while the session is in memory; its stored state once it left (closed for good).
    pub(super) async fn session_from_store_if_gone(
        &self,
        namespace: &str,
        session_id: &SessionId,
    ) -> Result<Option<pb::SessionInfo>, EngineError> {
        if self.state.lock().sessions.contains_key(session_id) {
            return Ok(None);
        }
        self.describe_session(&Namespace::from(namespace), session_id)
            .await
            .map(Some)
    }

    /// Completes a session and releases its reservation.
    pub async fn complete_session(
        &self,
        namespace: &Namespace,
        session_id: &SessionId,
    ) -> Result<pb::SessionInfo, EngineError> {
        self.end_session(namespace, session_id, |phase| {
            let reason = if phase == SessionPhase::Creating {
                "completed before it was placed".to_string()
            } else {
                String::new()
            };
            (SessionEnd::Completed, reason, false)
        })
        .await
    }

    /// Ends any session at once (an operator's call): its reservation is freed, its pending
    /// activities fail with SessionFailed, its owner workflow is told.
    pub async fn terminate_session(
        &self,
        namespace: &Namespace,
        session_id: &SessionId,
        reason: &str,
        identity: &str,
    ) -> Result<pb::SessionInfo, EngineError> {
        let reason = match (reason.is_empty(), identity.is_empty()) {
            (true, true) => "terminated by an operator".to_string(),
            (true, false) => format!("terminated by {identity}"),
            (false, true) => format!("terminated: {reason}"),
            (false, false) => format!("terminated by {identity}: {reason}"),
        };
        self.end_session(namespace, session_id, |_| {
            (SessionEnd::Terminated, reason, true)
        })
        .await
    }

    /// Closes a live session as `decide` says (state, reason, fail its activities) given its
    /// current state; a closed one is NotRunning saying how it ended.
    pub(super) async fn end_session(
        &self,
        namespace: &str,
        session_id: &SessionId,
        decide: impl FnOnce(SessionPhase) -> (SessionEnd, String, bool),
    ) -> Result<pb::SessionInfo, EngineError> {
        self.check_healthy()?;
        let now = self.now_ms();
        let done = self
            .transact(|st, txn| {
                Self::check_namespace(st, namespace)?;
                let live = st
                    .sessions
                    .get(session_id)
                    .and_then(|s| s.info.as_ref())
                    .filter(|i| i.namespace == namespace)
                    .and_then(SessionPhase::of)
                    .filter(|p| p.is_live());
                Ok(match live {
                    None => None,
                    Some(current) => {
                        let (how, reason, fail) = decide(current);
                        self.close_session(st, session_id, how, &reason, fail, now, txn);
                        let info = st.sessions[session_id].info.clone().unwrap_or_default();
                        Some(info)
                    }
                })
            })
            .await?;
        let Some(info) = done else {
            let stored = self
                .describe_session(&Namespace::from(namespace), session_id)
                .await?;
            return Err(EngineError::NotRunning(format!(
                "session {session_id} is already {}{}",
                stored.state,
                if stored.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", stored.reason)
                }
            )));
        };
        Ok(info)
    }

    /// A session, live or closed (looked up by id at any age).
    pub async fn describe_session(
        &self,
        namespace: &Namespace,
        session_id: &SessionId,
    ) -> Result<pb::SessionInfo, EngineError> {
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            st.sessions
                .get(session_id)
                .and_then(|s| s.info.clone())
                .filter(|i| i.namespace == *namespace)
                .map(|i| (i, st.last_submitted_seq))
        };
        if let Some((info, seq)) = live {
            self.durable(seq).await?;
            return Ok(info);
        }
        let store = self.store.clone();
        let id = session_id.to_string();
        let found = tokio::task::spawn_blocking(move || store.load_session(&SessionId::from(id)))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?
            .and_then(|s| s.info)
            .filter(|i| i.namespace == *namespace);
        found.ok_or_else(|| {
            EngineError::NotFound(format!(
                "session {session_id:?} was not found in namespace {namespace:?}"
            ))
        })
    }

    /// Sessions of a namespace, newest first, a page at a time: live ones, and closed ones too
    /// when asked. Returns the page and the next page's token ("" after the last).
    pub async fn list_sessions(
        &self,
        namespace: &Namespace,
        include_closed: bool,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<pb::SessionInfo>, String), EngineError> {
        self.check_healthy()?;
        let after = parse_page_token(page_token)?;
        let before_cursor = |i: &pb::SessionInfo| match &after {
            None => true,
            Some((ms, id)) => (i.created_ms, i.session_id.as_str()) < (*ms, id.as_str()),
        };
        let (mut page, seq): (Vec<pb::SessionInfo>, u64) = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            let live = st
                .sessions
                .values()
                .filter_map(|s| s.info.clone())
                .filter(|i| i.namespace == *namespace && sessions::is_live(i) && before_cursor(i))
                .collect();
            (live, st.last_submitted_seq)
        };
        self.durable(seq).await?;
        if include_closed {
            let store = self.store.clone();
            let ns = namespace.clone();
            let after = after.clone();
            let stored = tokio::task::spawn_blocking(move || {
                store.list_sessions(
                    &ns,
                    after.map(|(ms, id)| (ms, SessionId::from(id))),
                    page_size,
                )
            })
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
            for info in stored.into_iter().filter_map(|s| s.info) {
                // The live copy is newer than what the store holds of an open session.
                if !page.iter().any(|l| l.session_id == info.session_id) {
                    page.push(info);
                }
            }
        }
        page.sort_by(|a, b| (b.created_ms, &b.session_id).cmp(&(a.created_ms, &a.session_id)));
        let next = if page.len() > page_size {
            page.truncate(page_size);
            page.last()
                .map(|l| page_token_of(l.created_ms, &l.session_id))
                .unwrap_or_default()
        } else if include_closed && page.len() == page_size {
            page.last()
                .map(|l| page_token_of(l.created_ms, &l.session_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// Points activities scheduled in a session at its worker's host queue; a session that is not
    /// open makes them fail at once (checked after they are recorded).
    pub(super) fn route_session_activity(st: &EngineState, options: &mut pb::ActivityOptions) {
        if options.session_id.is_empty() {
            return;
        }
        if let Some(info) = st
            .sessions
            .get(&options.session_id)
            .and_then(|s| s.info.as_ref())
        {
            if sessions::is_in(info, SessionPhase::Open) {
                options.worker = info.worker_identity.clone();
            }
        }
    }

    /// Fails activities just scheduled on sessions that are not open.
    pub(super) fn fail_activities_of_closed_sessions(
        st: &mut EngineState,
        run_id: &RunId,
        now: i64,
        txn: &mut Txn,
    ) {
        let Some(entry) = st.runs.get(run_id) else {
            return;
        };
        let mut dead: Vec<(String, String)> = Vec::new();
        for a in entry.state.activities.values() {
            let Some(sid) = a
                .options
                .as_ref()
                .map(|o| o.session_id.clone())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let reason = match st.sessions.get(&sid).and_then(|s| s.info.as_ref()) {
                Some(i) if sessions::is_in(i, SessionPhase::Open) => continue,
                Some(i) => format!("session is {}: {}", i.state, i.reason),
                None => "session is not open (unknown or already closed)".to_string(),
            };
            if !dead.iter().any(|(s, _)| *s == sid) {
                dead.push((sid, reason));
            }
        }
        let entry = st.runs.get_mut(run_id).expect("checked");
        for (sid, reason) in dead {
            entry.fail_session_activities(&SessionId::from(&sid), &reason, now, &mut txn.fx);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Operations
    // ------------------------------------------------------------------------------------------
}
