//! Signal, cancel and terminate: what a client or another workflow does to an open run.

use super::*;

impl Engine {
    /// A signal a workflow sent to another (or to itself), applied in the sender's transaction.
    pub(super) fn deliver_signal(
        &self,
        st: &mut EngineState,
        sig: history::OutgoingSignal,
        now: i64,
        txn: &mut Txn,
    ) {
        let target_key = (sig.namespace.clone(), false, sig.workflow_id.clone());
        let not_running = || {
            format!(
                "workflow {:?} is not running in namespace {:?}",
                sig.workflow_id, sig.namespace
            )
        };
        let failure = if !st.namespaces.contains_key(&sig.namespace) {
            Some(format!("namespace {:?} does not exist", sig.namespace))
        } else if let Some(target_id) = st.open_ids.get(&target_key).cloned() {
            let target = st
                .runs
                .get_mut(&target_id)
                .expect("open id points at a run");
            let size = sig.input.as_ref().map_or(0, |p| p.data.len() as u64) + 128;
            if !target.is_open() {
                // Closing in this very transaction (a run that signals itself as it completes):
                // nothing may follow its terminal event.
                Some(not_running())
            } else if !target.history_has_room(size) {
                Some(target.history_full("the signal", size).to_string())
            } else {
                target.signal(
                    &sig.signal_name,
                    sig.input.clone(),
                    "",
                    "",
                    now,
                    &mut txn.fx,
                );
                txn.touched.insert(target_id);
                None
            }
        } else {
            Some(not_running())
        };
        if let Some(source) = st.runs.get_mut(&sig.from_run) {
            if source.is_open() {
                let failure = failure.map(|message| pb::Failure {
                    message,
                    kind: pb::FailureKind::Application as i32,
                    error_type: "SignalTargetNotFound".into(),
                    ..Default::default()
                });
                source.signal_external_resolved(sig.seq, failure, now, &mut txn.fx);
                txn.touched.insert(sig.from_run.clone());
            }
        }
    }

    /// Hands signals to other namespaces to the replica, and resolves each in its sender's
    /// history when delivered (or refused). Never lost: an unresolved one is sent again when
    /// the sender's namespace is next opened, under the same request id.
    pub(super) fn send_foreign_signals(&self, signals: Vec<history::OutgoingSignal>) {
        let Some(foreign) = self.foreign.clone() else {
            return;
        };
        for sig in signals {
            let request_id = format!("signal-external:{}:{}", sig.from_run, sig.seq);
            let (from_run, seq) = (sig.from_run.clone(), sig.seq);
            let delivery = foreign.deliver(sig, request_id);
            let engine = self.me.clone();
            tokio::spawn(async move {
                let failure = delivery.await;
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let resolved = engine
                    .transact(|st, txn| {
                        if let Some(source) = st.runs.get_mut(&from_run) {
                            if source.is_open() && !source.signal_external_is_resolved(seq) {
                                let failure = failure.map(|message| pb::Failure {
                                    message,
                                    kind: pb::FailureKind::Application as i32,
                                    error_type: "SignalTargetNotFound".into(),
                                    ..Default::default()
                                });
                                source.signal_external_resolved(
                                    seq,
                                    failure,
                                    engine.now_ms(),
                                    &mut txn.fx,
                                );
                                txn.touched.insert(from_run.clone());
                            }
                        }
                        Ok(())
                    })
                    .await;
                if let Err(e) = resolved {
                    tracing::warn!(run = %from_run, seq, error = %e, "a signal to another namespace was delivered but its resolution not written; it is resolved when the namespace is next opened");
                }
            });
        }
    }

    /// The open run a mutation (signal, cancel, terminate) names, from memory. None when there
    /// is none: then [`Engine::not_running`] says why, reading the store outside the lock.
    pub(super) fn find_open_run(
        st: &EngineState,
        run: &RunSelector,
    ) -> Result<Option<RunId>, EngineError> {
        let (namespace, standalone, id, run_id) = run.parts();
        Self::check_namespace(st, namespace)?;
        let found = if run_id.is_empty() {
            st.open_ids
                .get(&(namespace.to_string(), standalone, id.to_string()))
                .cloned()
        } else {
            Some(run_id.clone())
        };
        Ok(found.filter(|r| {
            st.runs.get(r).is_some_and(|e| {
                e.state.namespace == namespace
                    && e.state.workflow_id == id
                    && e.state.standalone_activity == standalone
                    && e.is_open()
            })
        }))
    }

    /// Why a mutation found no open run: it closed (and how), or never existed.
    pub(super) async fn not_running(&self, run: &RunSelector) -> EngineError {
        let (_, standalone, id, _) = run.parts();
        let what = if standalone { "activity" } else { "workflow" };
        // A run still closing is in memory: its status is the one it is about to have.
        let closing = {
            let st = self.state.lock();
            live_entry(&st, run).map(|e| (e.state.run_id.clone(), e.state.status))
        };
        let found = match closing {
            Some(found) => Some(found),
            None => self
                .load_stored(run)
                .await
                .ok()
                .map(|s| (s.run_id, s.status)),
        };
        match found {
            Some((run_id, status)) => {
                let status = ExecutionStatus::try_from(status).unwrap_or_default();
                EngineError::NotRunning(format!(
                    "{what} {id:?} (run {run_id}) is not running: it is {}",
                    status.short_name()
                ))
            }
            None => not_found(run),
        }
    }

    // ------------------------------------------------------------------------------------------
    // Namespaces
    // ------------------------------------------------------------------------------------------
    /// Delivers a signal to a running workflow. A signal whose request id the run already
    /// recorded (a client's retry) is acknowledged without being delivered again.
    pub async fn signal(&self, req: pb::SignalWorkflowRequest) -> Result<(), EngineError> {
        self.check_healthy()?;
        let run = RunSelector::workflow(&req.namespace, &req.workflow_id, &req.run_id);
        let found = self
            .transact(|st, txn| match Self::find_open_run(st, &run)? {
                None => Ok(None),
                Some(run_id) => {
                    let entry = st.runs.get_mut(&run_id).expect("open run");
                    if entry.has_signal_request(&req.request_id) {
                        let seq = st.last_submitted_seq;
                        Ok(Some(Err(seq)))
                    } else {
                        let events = entry.state.next_event_id.saturating_sub(1)
                            + entry.state.buffered.len() as u64;
                        if events >= self.config.max_history_events {
                            return Err(EngineError::ResourceExhausted(format!(
                                "workflow {} has {events} history events; the limit is {}",
                                req.workflow_id, self.config.max_history_events
                            )));
                        }
                        let size = req
                            .input
                            .as_ref()
                            .map_or(0, |p| prost::Message::encoded_len(p) as u64)
                            + req.signal_name.len() as u64
                            + req.identity.len() as u64
                            + 32;
                        if !entry.history_has_room(size) {
                            return Err(entry.history_full("the signal", size));
                        }
                        entry.signal(
                            &req.signal_name,
                            req.input,
                            &req.identity,
                            &req.request_id,
                            self.now_ms(),
                            &mut txn.fx,
                        );
                        txn.touched.insert(run_id);
                        Ok(Some(Ok(())))
                    }
                }
            })
            .await?;
        match found {
            None => Err(self.not_running(&run).await),
            // Delivered before: once what recorded it is durable, acknowledge again.
            Some(Err(seq)) => self.durable(seq).await,
            Some(Ok(())) => Ok(()),
        }
    }

    /// Asks a workflow (or standalone activity) to cancel.
    pub async fn request_cancel(
        &self,
        run: &RunSelector,
        reason: &str,
        identity: &str,
    ) -> Result<(), EngineError> {
        self.mutate_open_run(run, |entry, fx| {
            entry.request_cancel(reason, identity, self.now_ms(), fx)
        })
        .await
    }

    /// Ends a workflow (or standalone activity) at once.
    pub async fn terminate(
        &self,
        run: &RunSelector,
        reason: &str,
        identity: &str,
    ) -> Result<(), EngineError> {
        self.mutate_open_run(run, |entry, fx| {
            entry.terminate(reason, identity, self.now_ms(), fx)
        })
        .await
    }

    /// Applies `f` to the open run an operator's call names, in one transaction.
    pub(super) async fn mutate_open_run(
        &self,
        run: &RunSelector,
        f: impl FnOnce(&mut RunEntry, &mut Effects),
    ) -> Result<(), EngineError> {
        self.check_healthy()?;
        let found = self
            .transact(|st, txn| {
                Ok(match Self::find_open_run(st, run)? {
                    None => false,
                    Some(open) => {
                        let entry = st.runs.get_mut(&open).expect("open run");
                        f(entry, &mut txn.fx);
                        txn.touched.insert(open);
                        true
                    }
                })
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(self.not_running(run).await)
        }
    }
}
