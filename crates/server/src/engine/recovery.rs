//! Opening the engine over a store: what recovery loads, re-offers and re-arms, and the attempts given back at shutdown.

use super::*;

impl Engine {
    /// Opens the engine over a store: loads namespaces and open runs, re-offers their pending
    /// tasks and re-arms their timers.
    pub async fn open(
        store: Arc<dyn Store>,
        config: ServerConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        Self::open_scoped(store, config, None).await
    }

    /// Opens the engine of one namespace (a cluster replica's, over a store that reads and
    /// writes that namespace alone): the same recovery, but it creates no other namespace.
    pub async fn open_namespace(
        store: Arc<dyn Store>,
        config: ServerConfig,
        namespace: &Namespace,
        foreign: Arc<dyn ForeignSignals>,
    ) -> Result<Arc<Engine>, EngineError> {
        Self::open_scoped(store, config, Some((namespace, foreign))).await
    }

    async fn open_scoped(
        store: Arc<dyn Store>,
        config: ServerConfig,
        scope: Option<(&Namespace, Arc<dyn ForeignSignals>)>,
    ) -> Result<Arc<Engine>, EngineError> {
        let only = scope.as_ref().map(|(n, _)| *n);
        // The default namespace exists from the first start; an engine of another namespace
        // must not write it (its row is its own engine's).
        let creates_default =
            only.is_none_or(|n| n.as_str() == tether_core::types::DEFAULT_NAMESPACE);
        let store_for_recovery = store.clone();
        let recovered = tokio::task::spawn_blocking(move || store_for_recovery.recover())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(format!("could not read the store: {e}")))?;
        let now = config.clock.now_ms();
        let (shutdown, _) = watch::channel(false);
        let (storage_failure, _) = watch::channel(None);
        let engine = Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            access: parking_lot::RwLock::new(config.access.clone()),
            state: Mutex::new(EngineState::default()),
            store,
            matcher: Matcher::default(),
            timers: TimerQueue::default(),
            config,
            storage_failed: AtomicBool::new(false),
            storage_failure,
            shutdown,
            started_ms: now,
            scope: only.cloned(),
            foreign: scope.as_ref().map(|(_, f)| f.clone()),
        });
        engine
            .transact(|st, txn| {
                for ns in recovered.namespaces {
                    st.namespaces.insert(ns.name.clone(), ns);
                }
                if creates_default
                    && !st
                        .namespaces
                        .contains_key(tether_core::types::DEFAULT_NAMESPACE)
                {
                    let info = NamespaceInfo {
                        name: tether_core::types::DEFAULT_NAMESPACE.into(),
                        description: "created at first start".into(),
                        created_ms: now,
                        retention_ms: 0,
                    };
                    st.namespaces.insert(info.name.clone(), info.clone());
                    txn.extra.push(Write::Namespace(info));
                }
                let count = recovered.open_runs.len();
                let newest_dispatch = recovered
                    .open_runs
                    .iter()
                    .flat_map(|(state, _)| state.activities.values())
                    .map(|a| a.started_dispatch)
                    .max()
                    .unwrap_or(0);
                crate::history::dispatch_after(newest_dispatch);
                // Sessions first: a run records which open sessions its activities are in.
                for session in recovered.open_sessions {
                    let info = session.info.clone().unwrap_or_default();
                    if sessions::is_in(&info, SessionPhase::Open) {
                        st.reservations
                            .reserve(&info.namespace, &sessions::placement_of(&info));
                    }
                    if let Some((run_id, _)) = owner_run(&info) {
                        st.session_owners
                            .entry(run_id)
                            .or_default()
                            .push(info.session_id.clone().into());
                    }
                    if session.creation_deadline_ms > 0
                        && sessions::is_in(&info, SessionPhase::Creating)
                    {
                        txn.fx.timers.push((
                            session.creation_deadline_ms,
                            TimerKey::SessionCreation {
                                session_id: info.session_id.clone().into(),
                            },
                        ));
                    }
                    txn.fx.timers.push((
                        session.execution_deadline_ms,
                        TimerKey::SessionExpiry {
                            session_id: info.session_id.clone().into(),
                        },
                    ));
                    if sessions::is_in(&info, SessionPhase::Creating) {
                        Self::enqueue_waiting(&mut st.waiting_sessions, &info);
                    }
                    st.sessions.insert(info.session_id.clone().into(), session);
                }
                for (state, history) in recovered.open_runs {
                    let had_buffered = !state.buffered.is_empty();
                    let mut entry = RunEntry::new(state, history);
                    entry.max_history_bytes = engine.config.max_history_bytes;
                    entry.recover(now, &mut txn.fx);
                    if engine.scope.is_some() {
                        // Signals to other namespaces not resolved when the namespace was last
                        // served: sent again (the request id keeps them from landing twice).
                        txn.fx.foreign_signals.extend(
                            entry.unresolved_external_signals().into_iter().filter(|s| {
                                engine
                                    .scope
                                    .as_ref()
                                    .is_some_and(|own| **own != s.namespace)
                            }),
                        );
                    }
                    let key = (
                        entry.state.namespace.clone(),
                        entry.state.standalone_activity,
                        entry.state.workflow_id.clone(),
                    );
                    let run_id = entry.state.run_id.clone();
                    if had_buffered {
                        txn.touched.insert(run_id.clone().into());
                    }
                    st.open_ids.insert(key, run_id.clone().into());
                    Self::note_session_runs(st, &RunId::from(&run_id), &entry);
                    st.runs.insert(run_id.into(), entry);
                }
                // Hand-out rows kept for sessions: an open session releases them when it closes
                // (closed runs' rows too, which no open run's state names); rows of a session that
                // is no longer open should not exist, and are released now.
                let mut released: HashMap<SessionId, Vec<RunId>> = HashMap::new();
                for (session_id, run_id) in recovered.session_rows {
                    if st.sessions.contains_key(&session_id) {
                        st.session_runs
                            .entry(session_id)
                            .or_default()
                            .insert(run_id);
                    } else {
                        released.entry(session_id).or_default().push(run_id);
                    }
                }
                for (session_id, runs) in released {
                    tracing::warn!(
                        session_id = session_id.as_str(),
                        runs = runs.len(),
                        "hand-out rows of a closed session were left behind; releasing them"
                    );
                    let write = Self::release_session_rows(st, session_id, runs);
                    txn.extra.push(write);
                }
                tracing::info!(open_runs = count, "recovered state from the store");
                // A session whose owner run closed while it stayed open (stored by an older version)
                // is released now.
                let orphaned: Vec<String> = st
                    .sessions
                    .values()
                    .filter_map(|s| s.info.as_ref())
                    .filter(|i| owner_run(i).is_some_and(|(r, _)| !st.runs.contains_key(&r)))
                    .map(|i| i.session_id.clone())
                    .collect();
                for id in orphaned {
                    engine.close_session(
                        st,
                        &SessionId::from(id),
                        SessionEnd::Completed,
                        "released: the workflow run that owns it is closed",
                        true,
                        now,
                        txn,
                    );
                }
                Ok(())
            })
            .await?;
        let returns = engine.clone();
        tokio::spawn(async move { returns.take_back_returned().await });
        Ok(engine)
    }

    /// Takes back attempts handed to polls that ended before their caller saw them, for as
    /// long as the engine lives.
    pub(super) async fn take_back_returned(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let returned = tokio::select! {
                r = self.matcher.returned() => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if let Err(e) = self.undispatch(returned).await {
                tracing::warn!(error = %e, "taking back undelivered attempts failed");
            }
        }
    }

    /// Waits until every batch this engine submitted is durable (or failed): an engine handing
    /// its namespace to another replica calls it before it gives up the lease.
    pub async fn quiesce(&self) -> Result<(), EngineError> {
        let seq = self.state.lock().last_submitted_seq;
        self.durable(seq).await
    }

    /// Takes back what polls gave back while the server shut down (shutdown itself ends the
    /// parked polls): called once no request runs any more, before the store closes, so those
    /// attempts wait in their queues after a restart rather than out their timeouts.
    pub async fn take_back_remaining(&self) {
        let returned = self.matcher.take_returned();
        if returned.is_empty() || self.storage_failed.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.undispatch(returned).await {
            tracing::warn!(error = %e, "taking back undelivered attempts at shutdown failed");
        }
    }
}
