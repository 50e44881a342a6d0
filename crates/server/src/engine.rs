//! The runner around the per-run state machine: it holds the open runs in memory, applies one
//! request (or timer firing) at a time under a lock, hands the resulting writes to the store in
//! order, waits for the commit, and only then offers tasks, arms timers and wakes waiters.

use super::history::{self, Effects, RunEntry, WorkflowTaskCompletion};
use super::matching::{ClaimedPoll, Handover, Matcher, QueueKey, TaskKind, TaskRef};
use super::sessions::{self, Placement, Reservations};
use super::timers::{TimerKey, TimerQueue};
use crate::config::ServerConfig;
use crate::error::EngineError;
use crate::state::RunState;
use crate::state::SessionState;
use crate::store::{Commit, RunFilter, Store, Write, WriteBatch};
use foldhash::{HashMap, HashMapExt, HashSet};
use parking_lot::Mutex;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tether_wire::now_ms;
use tether_wire::pb::{self, ExecutionStatus, NamespaceInfo};
use tokio::sync::{oneshot, watch};

type IdKey = (String, bool, String);

#[derive(Default)]
struct EngineState {
    namespaces: BTreeMap<String, NamespaceInfo>,
    /// Open runs, and closed ones until their close is durable.
    runs: HashMap<String, RunEntry>,
    /// (namespace, standalone activity, id) -> run id of the open run.
    open_ids: HashMap<IdKey, String>,
    /// Callers waiting for a run to close.
    waiters: HashMap<String, Vec<oneshot::Sender<pb::GetWorkflowResultResponse>>>,
    /// Sessions that are creating or open (closed ones until their close is durable).
    sessions: HashMap<String, SessionState>,
    /// Run id -> the sessions it owns (created by its workflow), which close with it.
    session_owners: HashMap<String, Vec<String>>,
    /// Session id -> the runs that scheduled activities in it (some may have closed since):
    /// where a closing session's activities are, without a look at every run.
    session_runs: HashMap<String, HashSet<String>>,
    reservations: Reservations,
    /// Callers waiting for a session to be placed (or to fail).
    session_waiters: HashMap<String, Vec<oneshot::Sender<pb::SessionInfo>>>,
    /// The number of the last batch submitted to the store: a read waits until it is durable,
    /// so it never shows state that might not be written.
    last_submitted_seq: u64,
}

/// A session's owning run, when a workflow owns it (`run:RUN_ID:SEQ`).
fn owner_run(owner: &str) -> Option<(&str, u32)> {
    let (run_id, seq) = owner.strip_prefix("run:")?.rsplit_once(':')?;
    Some((run_id, seq.parse().ok()?))
}

/// A store lookup of closed rows past a cutoff: (namespace, closed before, limit) → ids.
type ExpiredLookup =
    fn(&dyn Store, &str, i64, usize) -> Result<Vec<String>, crate::store::StoreError>;

/// Most expired runs deleted in one commit, and batches per namespace per sweep.
const PURGE_BATCH: usize = 2_000;
const PURGE_BATCHES_PER_SWEEP: usize = 50;

/// Retention is off (0) or at least a second: anything shorter is a typo for a unit.
fn check_retention(retention_ms: u64) -> Result<(), EngineError> {
    if retention_ms != 0 && retention_ms < 1_000 {
        return Err(EngineError::InvalidArgument(format!(
            "retention of {retention_ms} ms is too short; give at least 1 s, or 0 to keep closed \
             runs forever"
        )));
    }
    Ok(())
}

/// How often idle queues and long-dead workers are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// A queue, poller or dead worker unseen for this long is forgotten (`queue describe` and
/// `workers list` stop showing it).
const FORGET_IDLE_AFTER: Duration = Duration::from_secs(3600);

/// Default idle timeout of a session a client owns.
const DEFAULT_SESSION_IDLE_MS: u64 = 10 * 60_000;

/// Work collected while the lock is held.
#[derive(Default)]
struct Txn {
    fx: Effects,
    touched: BTreeSet<String>,
    touched_sessions: BTreeSet<String>,
    extra: Vec<Write>,
    /// Attempts dispatched inside the transaction to parked polls, handed over after the commit.
    handovers: Vec<(ClaimedPoll, pb::PollActivityTaskResponse)>,
    /// Hand-outs (and take-backs) of runs not otherwise written in this transaction.
    started: Vec<Write>,
    /// Sessions closed in this transaction -> the runs that scheduled activities in them.
    closed_session_runs: HashMap<String, HashSet<String>>,
}

/// Where a completion's worker wants its next activity tasks from (taken in the completion's
/// own transaction).
#[derive(Debug, Clone)]
pub struct NextTasks {
    /// Namespace.
    pub namespace: String,
    /// Queues, tried in order.
    pub queues: Vec<String>,
    /// The worker.
    pub identity: String,
    /// Its process (`NextTaskRequest.instance_id`).
    pub instance: String,
    /// Most tasks to take.
    pub max: usize,
}

/// Each outcome's own result, and the next tasks handed to the worker.
pub type RespondedActivities = (
    Vec<Result<(), EngineError>>,
    Vec<pb::PollActivityTaskResponse>,
);

/// Attempts dispatched for a caller that may go away before they reach it (its request
/// future dropped while the commit was under way): given back, and so taken back by the
/// engine, unless the caller takes them out first.
struct GiveBackOnDrop<'a> {
    matcher: &'a Matcher,
    responses: Vec<pb::PollActivityTaskResponse>,
}

impl<'a> GiveBackOnDrop<'a> {
    fn many(matcher: &'a Matcher, responses: Vec<pb::PollActivityTaskResponse>) -> Self {
        GiveBackOnDrop { matcher, responses }
    }

    fn take(&mut self) -> Vec<pb::PollActivityTaskResponse> {
        std::mem::take(&mut self.responses)
    }
}

impl Drop for GiveBackOnDrop<'_> {
    fn drop(&mut self) {
        for response in self.responses.drain(..) {
            self.matcher.give_back(Box::new(response));
        }
    }
}

/// What a transaction leaves to do once its commit is durable: offer its tasks, arm its
/// timers, hand its dispatched attempts over, answer its waiters. The request that made it
/// awaits it; should that request go away first (its caller disconnected, its deadline
/// passed), the rest is done on a task of its own, for a durable write's effects are never
/// skipped (a task nobody offers, or an id nobody frees, waits for a restart).
struct PendingEffects {
    engine: Weak<Engine>,
    commit: Option<Commit>,
    fx: Option<Effects>,
    handovers: Vec<(ClaimedPoll, pb::PollActivityTaskResponse)>,
}

impl Drop for PendingEffects {
    fn drop(&mut self) {
        let Some(fx) = self.fx.take() else {
            return;
        };
        let (Some(engine), Ok(runtime)) =
            (self.engine.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let commit = self.commit.take();
        let handovers = std::mem::take(&mut self.handovers);
        runtime.spawn(async move {
            let txn = Txn {
                fx,
                handovers,
                ..Default::default()
            };
            let _ = engine.finish(commit, txn).await;
        });
    }
}

/// A standalone activity just started.
#[derive(Debug, Clone)]
pub struct StartedActivity {
    /// Its run.
    pub run_id: String,
    /// Its first attempt went straight to a waiting worker.
    pub handed_over: bool,
    /// The queue it waits on.
    pub queue: String,
    /// Its requirements (canonical).
    pub requirements: String,
}

/// Why the store stopped taking writes, once it did.
#[derive(Debug, Clone)]
pub struct StorageFailure {
    /// What the store said.
    pub reason: String,
    /// When it happened.
    pub at_ms: i64,
}

/// Counts of what the engine holds in memory, for operators and tests: each must go back down
/// once the work it belongs to is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Runs held in memory (open, or closing).
    pub runs: usize,
    /// Sessions held in memory (creating, open, or closing).
    pub sessions: usize,
    /// Armed timers.
    pub timers: usize,
    /// Callers waiting for a run's result.
    pub result_waiters: usize,
    /// Callers waiting for a session's placement.
    pub session_waiters: usize,
}

/// The server's engine: history, matching and timers over a [`Store`].
pub struct Engine {
    /// The engine itself, for work that must go on after the request that began it is gone.
    me: Weak<Engine>,
    state: Mutex<EngineState>,
    store: Arc<dyn Store>,
    matcher: Matcher,
    timers: TimerQueue,
    config: ServerConfig,
    storage_failed: AtomicBool,
    /// Set with the first failed commit; `tether server` watches it to exit.
    storage_failure: watch::Sender<Option<StorageFailure>>,
    shutdown: watch::Sender<bool>,
    /// When this engine started: workers get one liveness timeout from here to re-register.
    started_ms: i64,
    /// The access rules in force (None: authorization off). Replaceable while running, so an
    /// operator can change grants without a restart.
    access: parking_lot::RwLock<Option<Arc<super::auth::Access>>>,
}

/// A run found for a read: either the live in-memory entry's snapshot or the stored state.
struct RunSnapshot {
    state: RunState,
    pending: Vec<pb::PendingActivityInfo>,
}

impl Engine {
    /// Opens the engine over a store: loads namespaces and open runs, re-offers their pending
    /// tasks and re-arms their timers.
    pub async fn open(
        store: Arc<dyn Store>,
        config: ServerConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        let store_for_recovery = store.clone();
        let recovered = tokio::task::spawn_blocking(move || store_for_recovery.recover())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(format!("could not read the store: {e}")))?;
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
            started_ms: now_ms(),
        });
        let now = now_ms();
        let mut txn = Txn::default();
        let commit = {
            let mut st = engine.state.lock();
            for ns in recovered.namespaces {
                st.namespaces.insert(ns.name.clone(), ns);
            }
            if !st
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
            super::history::dispatch_after(newest_dispatch);
            // Sessions first: a run records which open sessions its activities are in.
            for session in recovered.open_sessions {
                let info = session.info.clone().unwrap_or_default();
                if info.state == "open" {
                    st.reservations
                        .reserve(&info.namespace, &placement_of(&info));
                }
                if let Some((run_id, _)) = owner_run(&info.owner) {
                    st.session_owners
                        .entry(run_id.to_string())
                        .or_default()
                        .push(info.session_id.clone());
                }
                if session.creation_deadline_ms > 0 && info.state == "creating" {
                    txn.fx.timers.push((
                        session.creation_deadline_ms,
                        TimerKey::SessionCreation {
                            run_id: info.session_id.clone(),
                        },
                    ));
                }
                txn.fx.timers.push((
                    session.execution_deadline_ms,
                    TimerKey::SessionExpiry {
                        run_id: info.session_id.clone(),
                    },
                ));
                st.sessions.insert(info.session_id.clone(), session);
            }
            for (state, history) in recovered.open_runs {
                let had_buffered = !state.buffered.is_empty();
                let mut entry = RunEntry::new(state, history);
                entry.max_history_bytes = engine.config.max_history_bytes;
                entry.recover(now, &mut txn.fx);
                let key = (
                    entry.state.namespace.clone(),
                    entry.state.standalone_activity,
                    entry.state.workflow_id.clone(),
                );
                let run_id = entry.state.run_id.clone();
                if had_buffered {
                    txn.touched.insert(run_id.clone());
                }
                st.open_ids.insert(key, run_id.clone());
                Self::note_session_runs(&mut st, &run_id, &entry);
                st.runs.insert(run_id, entry);
            }
            // Hand-out rows kept for sessions: an open session releases them when it closes
            // (closed runs' rows too, which no open run's state names); rows of a session that
            // is no longer open should not exist, and are released now.
            let mut released: HashMap<String, Vec<String>> = HashMap::new();
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
                    session_id,
                    runs = runs.len(),
                    "hand-out rows of a closed session were left behind; releasing them"
                );
                let write = Self::release_session_rows(&mut st, session_id, runs);
                txn.extra.push(write);
            }
            tracing::info!(open_runs = count, "recovered state from the store");
            // A session whose owner run closed while it stayed open (stored by an older version)
            // is released now.
            let orphaned: Vec<String> = st
                .sessions
                .values()
                .filter_map(|s| s.info.as_ref())
                .filter(|i| owner_run(&i.owner).is_some_and(|(r, _)| !st.runs.contains_key(r)))
                .map(|i| i.session_id.clone())
                .collect();
            for id in orphaned {
                engine.close_session(
                    &mut st,
                    &id,
                    "completed",
                    "released: the workflow run that owns it is closed",
                    true,
                    now,
                    &mut txn,
                );
            }
            engine.commit_locked(&mut st, &mut txn)
        };
        engine.finish(commit, txn).await?;
        let returns = engine.clone();
        tokio::spawn(async move { returns.take_back_returned().await });
        Ok(engine)
    }

    /// Takes back attempts handed to polls that ended before their caller saw them, for as
    /// long as the engine lives.
    async fn take_back_returned(self: Arc<Self>) {
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

    /// What the engine holds in memory now.
    pub fn stats(&self) -> EngineStats {
        let st = self.state.lock();
        EngineStats {
            runs: st.runs.len(),
            sessions: st.sessions.len(),
            timers: self.timers.len(),
            result_waiters: st.waiters.values().map(Vec::len).sum(),
            session_waiters: st.session_waiters.values().map(Vec::len).sum(),
        }
    }

    /// Resolves with the first storage failure (never, while the store works).
    pub async fn storage_failed(&self) -> StorageFailure {
        let mut rx = self.storage_failure.subscribe();
        let failure = rx.wait_for(|f| f.is_some()).await;
        match failure {
            Ok(f) => f.clone().expect("waited for it"),
            // The engine is gone: it never failed.
            Err(_) => std::future::pending().await,
        }
    }

    /// The request rate limit per caller (0 = off).
    pub fn max_requests_per_second(&self) -> u32 {
        self.config.max_requests_per_second
    }

    /// The access rules in force, if authorization is on.
    pub fn access(&self) -> Option<Arc<super::auth::Access>> {
        self.access.read().clone()
    }

    /// Puts new access rules in force for every request from now on. Authorization cannot be
    /// turned on or off this way: that needs a restart (it depends on client certificates).
    pub fn replace_access(&self, access: super::auth::Access) -> Result<(), EngineError> {
        let mut current = self.access.write();
        if current.is_none() {
            return Err(EngineError::InvalidArgument(
                "authorization is off (the server started without an access file); restart it \
                 with --access to turn it on"
                    .into(),
            ));
        }
        *current = Some(Arc::new(access));
        Ok(())
    }

    /// Whether metrics are recorded.
    pub fn metrics_enabled(&self) -> bool {
        self.config.metrics
    }

    /// Sets the gauges: open runs, sessions, workers and backlogs. Every namespace gets every
    /// series (0 when there is nothing), so a value never lingers after its last run closed.
    fn export_gauges(&self) {
        let mut runs: HashMap<(String, bool), usize> = HashMap::new();
        let mut sessions: HashMap<(String, String), usize> = HashMap::new();
        let namespaces: Vec<String> = {
            let st = self.state.lock();
            for entry in st.runs.values().filter(|e| e.is_open()) {
                *runs
                    .entry((
                        entry.state.namespace.clone(),
                        entry.state.standalone_activity,
                    ))
                    .or_default() += 1;
            }
            for info in st.sessions.values().filter_map(|s| s.info.as_ref()) {
                *sessions
                    .entry((info.namespace.clone(), info.state.clone()))
                    .or_default() += 1;
            }
            st.namespaces.keys().cloned().collect()
        };
        let workers = self.matcher.worker_counts();
        for ns in namespaces {
            for (standalone, kind) in [(false, "workflow"), (true, "activity")] {
                let n = runs.get(&(ns.clone(), standalone)).copied().unwrap_or(0);
                metrics::gauge!("tether_runs_open", "namespace" => ns.clone(), "kind" => kind)
                    .set(n as f64);
            }
            for state in ["creating", "open"] {
                let n = sessions
                    .get(&(ns.clone(), state.to_string()))
                    .copied()
                    .unwrap_or(0);
                metrics::gauge!("tether_sessions", "namespace" => ns.clone(), "state" => state)
                    .set(n as f64);
            }
            for (alive, state) in [(true, "alive"), (false, "dead")] {
                let n = workers.get(&(ns.clone(), alive)).copied().unwrap_or(0);
                metrics::gauge!("tether_workers", "namespace" => ns.clone(), "state" => state)
                    .set(n as f64);
            }
        }
        for (key, len) in self.matcher.backlogs() {
            metrics::gauge!(
                "tether_task_queue_backlog",
                "namespace" => key.namespace,
                "queue" => key.queue,
                "kind" => key.kind.name()
            )
            .set(len as f64);
        }
    }

    /// The payload size limit in force.
    pub fn max_payload_bytes(&self) -> usize {
        self.config.max_payload_bytes
    }

    /// Stops parked polls and result waits so the gRPC server can shut down promptly.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    fn check_healthy(&self) -> Result<(), EngineError> {
        if self.storage_failed.load(Ordering::Relaxed) {
            let failure = self.storage_failure.borrow().clone();
            let (reason, at) = failure
                .map(|f| (f.reason, f.at_ms))
                .unwrap_or_else(|| ("unknown".into(), 0));
            return Err(EngineError::Unavailable(format!(
                "storage failed at {at} ms since the epoch ({reason}); nothing after that write \
                 was acknowledged; restart the server to recover from the last durable state"
            )));
        }
        Ok(())
    }

    /// The first failed commit stops the engine: nothing is built on a write that failed.
    /// Waiting calls are woken (they answer UNAVAILABLE), and the loops that write stop.
    fn fail_storage(&self, reason: &str) {
        if self.storage_failed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(
            reason,
            "a commit failed: every request is refused until the server is restarted"
        );
        self.storage_failure.send_replace(Some(StorageFailure {
            reason: reason.to_string(),
            at_ms: now_ms(),
        }));
        let _ = self.shutdown.send(true);
    }

    /// Waits until everything submitted to the store before `seq` is durable, so a read never
    /// shows state that might not be written.
    async fn durable(&self, seq: u64) -> Result<(), EngineError> {
        let mut durability = self.store.durability();
        let reached = durability
            .wait_for(|d| d.seq >= seq || d.failed.is_some())
            .await
            .map(|d| d.failed.is_none())
            .unwrap_or(false);
        if reached {
            Ok(())
        } else {
            self.fail_storage("the store stopped before this state was written");
            Err(self.check_healthy().unwrap_err())
        }
    }

    /// Turns the touched runs into one ordered write batch and submits it (under the lock, so
    /// batches reach the store in the order they were applied). Before that, everything that
    /// belongs in the same transaction is applied: signals to other workflows, the release of
    /// sessions whose owner closed, and the hand-over of new activity tasks to parked polls.
    fn commit_locked(&self, st: &mut EngineState, txn: &mut Txn) -> Option<Commit> {
        let now = now_ms();
        let mut closed_seen = 0;
        loop {
            while let Some(sig) = txn.fx.signals.pop() {
                self.deliver_signal(st, sig, now, txn);
            }
            // A session never outlives its owner: it closes in the transaction that closes the
            // run, and its reservation is freed with it.
            let closed: Vec<(String, i32)> = txn.fx.closed[closed_seen..]
                .iter()
                .map(|c| (c.run_id.clone(), c.outcome.status))
                .collect();
            closed_seen = txn.fx.closed.len();
            for (run_id, status) in closed {
                let owned = st.session_owners.get(&run_id).cloned().unwrap_or_default();
                for session_id in owned {
                    let live = st
                        .sessions
                        .get(&session_id)
                        .and_then(|s| s.info.as_ref())
                        .is_some_and(|i| matches!(i.state.as_str(), "creating" | "open"));
                    if live {
                        let status = ExecutionStatus::try_from(status).unwrap_or_default();
                        let reason = format!(
                            "released: workflow run {run_id}, which owns it, closed ({})",
                            status.short_name()
                        );
                        self.close_session(st, &session_id, "completed", &reason, true, now, txn);
                    }
                }
            }
            if txn.fx.signals.is_empty() && closed_seen == txn.fx.closed.len() {
                break;
            }
        }
        self.hand_new_tasks_to_parked_polls(st, now, txn);
        let mut batch = WriteBatch {
            writes: std::mem::take(&mut txn.extra),
        };
        // A run written whole carries its hand-outs already; not a session's count, though,
        // and a take-back must replace the row of the hand-out it takes back.
        batch
            .writes
            .extend(txn.started.drain(..).filter(|w| match w {
                Write::Started {
                    run_id,
                    session_id,
                    started_ms,
                    ..
                } => !session_id.is_empty() || *started_ms == 0 || !txn.touched.contains(run_id),
                _ => true,
            }));
        for run_id in &txn.touched {
            let Some(entry) = st.runs.get_mut(run_id) else {
                continue;
            };
            if entry.persisted_events < entry.history.len() {
                batch.writes.push(Write::Events {
                    run_id: run_id.clone(),
                    events: entry.history[entry.persisted_events..].to_vec(),
                });
                entry.persisted_events = entry.history.len();
            }
            batch.writes.push(Write::Run {
                state: Box::new(entry.state.clone()),
                may_own_started: entry.rt.may_own_started,
            });
        }
        for id in &txn.touched_sessions {
            if let Some(session) = st.sessions.get(id) {
                batch.writes.push(Write::Session {
                    state: Box::new(session.clone()),
                });
            }
            if let Some(runs) = txn.closed_session_runs.remove(id) {
                batch
                    .writes
                    .push(Self::release_session_rows(st, id.clone(), runs));
            }
        }
        if batch.is_empty() {
            None
        } else {
            let commit = self.store.submit(batch);
            st.last_submitted_seq = commit.seq;
            Some(commit)
        }
    }

    /// The write that releases a closed session's hand-out rows: those of runs still open
    /// become the runs' own (they may record attempts still running) and go when the runs
    /// close; those of closed runs go now.
    fn release_session_rows(
        st: &mut EngineState,
        session_id: String,
        runs: impl IntoIterator<Item = String>,
    ) -> Write {
        let (mut runs_still_open, mut runs_closed) = (Vec::new(), Vec::new());
        for run_id in runs {
            match st
                .runs
                .get_mut(&run_id)
                .filter(|e| e.state.status == ExecutionStatus::Running as i32)
            {
                Some(entry) => {
                    entry.rt.may_own_started = true;
                    runs_still_open.push(run_id);
                }
                None => runs_closed.push(run_id),
            }
        }
        Write::ReleaseSessionRows {
            session_id,
            runs_still_open,
            runs_closed,
        }
    }

    /// A signal a workflow sent to another (or to itself), applied in the sender's transaction.
    fn deliver_signal(
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

    /// New activity tasks go straight to a parked poll that can take them, dispatched in this
    /// same transaction: the worker waiting for work gets it without a second commit, and the
    /// hand-out is durable before the worker sees it.
    fn hand_new_tasks_to_parked_polls(&self, st: &mut EngineState, now: i64, txn: &mut Txn) {
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
                run_id,
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
    fn dispatch_locked(
        &self,
        st: &mut EngineState,
        run_id: &str,
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
            if info.state != "open" || info.worker_identity != identity {
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
                (session_id, info.activities_run)
            }
            None => {
                entry.rt.may_own_started = true;
                (String::new(), 0)
            }
        };
        // Durable before the worker sees it, as a small row rather than the run's (and the
        // session's) whole state.
        txn.started.push(Write::Started {
            run_id: run_id.to_string(),
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
    fn undispatch(
        &self,
        responses: Vec<pb::PollActivityTaskResponse>,
    ) -> futures::future::BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let mut txn = Txn::default();
            let commit = {
                let mut st = self.state.lock();
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
                        .filter(|s| session_is_open(&st.sessions, &s.session_id));
                    if session.is_none() {
                        if let Some(entry) = st.runs.get_mut(&token.run_id) {
                            entry.rt.may_own_started = true;
                        }
                    }
                    txn.started.push(Write::Started {
                        run_id: token.run_id.clone(),
                        scheduled_event_id: token.scheduled_event_id,
                        attempt: token.attempt,
                        dispatch: token.dispatch,
                        started_ms: 0,
                        worker: String::new(),
                        instance: String::new(),
                        session_id: session.map(|s| s.session_id.clone()).unwrap_or_default(),
                        session_activities_run: session.map_or(0, |s| s.activities_run),
                    });
                }
                self.commit_locked(&mut st, &mut txn)
            };
            self.finish(commit, txn).await
        })
    }

    /// Waits for the commit, then applies the effects. Nothing is offered, armed, handed over
    /// or answered before the writes that caused it are durable; and once they are, all of it
    /// is, even when the request that made them went away meanwhile (see [`PendingEffects`]).
    async fn finish(&self, commit: Option<Commit>, txn: Txn) -> Result<(), EngineError> {
        let Txn { fx, handovers, .. } = txn;
        let mut pending = PendingEffects {
            engine: self.me.clone(),
            commit,
            fx: Some(fx),
            handovers,
        };
        if let Some(commit) = pending.commit.as_mut() {
            let outcome = (&mut commit.done)
                .await
                .unwrap_or_else(|_| Err("the store's writer stopped".to_string()));
            pending.commit = None;
            if let Err(e) = outcome {
                // Nothing of it happens: the claimed polls are dropped, their callers get
                // nothing.
                pending.fx = None;
                pending.handovers.clear();
                self.fail_storage(&e);
                return Err(EngineError::Unavailable(format!(
                    "the write could not be made durable ({e}); nothing of this request was \
                     acknowledged, and the server refuses every request until it is restarted"
                )));
            }
        }
        let fx = pending.fx.take().expect("taken only here");
        self.apply_effects(fx, std::mem::take(&mut pending.handovers));
        Ok(())
    }

    /// Applies what a durable transaction caused. Attempts dispatched to polls that ended
    /// meanwhile are given back, to be taken back by [`Engine::take_back_returned`].
    fn apply_effects(
        &self,
        fx: Effects,
        handovers: Vec<(ClaimedPoll, pb::PollActivityTaskResponse)>,
    ) {
        for (key, task, requirements) in fx.tasks {
            self.matcher.add(&key, task, &requirements);
        }
        if !fx.timers.is_empty() {
            self.timers.arm(fx.timers);
        }
        for (claim, response) in handovers {
            if let Err(response) = claim.hand_over(response) {
                self.matcher.give_back(response);
            }
        }
        if !fx.sessions_settled.is_empty() {
            let mut st = self.state.lock();
            for info in fx.sessions_settled {
                if let Some(waiters) = st.session_waiters.remove(&info.session_id) {
                    for w in waiters {
                        let _ = w.send(info.clone());
                    }
                }
                if !matches!(info.state.as_str(), "creating" | "open") {
                    // Closed for good: reads go to the store, and its timers have nothing to do.
                    st.sessions.remove(&info.session_id);
                    self.timers.cancel_run(&info.session_id);
                    if let Some((run_id, _)) = owner_run(&info.owner) {
                        if let Some(owned) = st.session_owners.get_mut(run_id) {
                            owned.retain(|s| *s != info.session_id);
                            if owned.is_empty() {
                                st.session_owners.remove(run_id);
                            }
                        }
                    }
                }
            }
        }
        if !fx.closed.is_empty() {
            let mut st = self.state.lock();
            for closed in fx.closed {
                // The close is durable: only now may the id start a new run (a failed close
                // must not have let another run start under it).
                if let Some(entry) = st.runs.get(&closed.run_id) {
                    let key = (
                        entry.state.namespace.clone(),
                        entry.state.standalone_activity,
                        entry.state.workflow_id.clone(),
                    );
                    if st.open_ids.get(&key) == Some(&closed.run_id) {
                        st.open_ids.remove(&key);
                    }
                }
                if let Some(waiters) = st.waiters.remove(&closed.run_id) {
                    for w in waiters {
                        let _ = w.send(closed.outcome.clone());
                    }
                }
                // Reads of this run now go to the store, and its timers have nothing left to do.
                if st.runs.get(&closed.run_id).is_some_and(|e| !e.is_open()) {
                    st.runs.remove(&closed.run_id);
                    self.timers.cancel_run(&closed.run_id);
                }
            }
        }
    }

    fn check_namespace(st: &EngineState, namespace: &str) -> Result<(), EngineError> {
        if st.namespaces.contains_key(namespace) {
            Ok(())
        } else {
            Err(EngineError::NamespaceNotFound(namespace.to_string()))
        }
    }

    /// The open run a mutation (signal, cancel, terminate) names, from memory. None when there
    /// is none: then [`Engine::not_running`] says why, reading the store outside the lock.
    fn find_open_run(
        st: &EngineState,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> Result<Option<String>, EngineError> {
        Self::check_namespace(st, namespace)?;
        let found = if run_id.is_empty() {
            st.open_ids
                .get(&(namespace.to_string(), standalone, id.to_string()))
                .cloned()
        } else {
            Some(run_id.to_string())
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
    async fn not_running(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> EngineError {
        let what = if standalone { "activity" } else { "workflow" };
        // A run still closing is in memory: its status is the one it is about to have.
        let closing = {
            let st = self.state.lock();
            live_entry(&st, namespace, standalone, id, run_id)
                .map(|e| (e.state.run_id.clone(), e.state.status))
        };
        let found = match closing {
            Some(found) => Some(found),
            None => self
                .load_stored(namespace, standalone, id, run_id)
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
            None => not_found(namespace, standalone, id, run_id),
        }
    }

    // ------------------------------------------------------------------------------------------
    // Namespaces
    // ------------------------------------------------------------------------------------------

    /// Creates a namespace.
    pub async fn register_namespace(
        &self,
        name: &str,
        description: &str,
        retention_ms: u64,
    ) -> Result<(), EngineError> {
        self.check_healthy()?;
        check_retention(retention_ms)?;
        let mut txn = Txn::default();
        let commit = {
            let mut st = self.state.lock();
            if st.namespaces.contains_key(name) {
                return Err(EngineError::AlreadyExists(format!(
                    "namespace {name:?} already exists"
                )));
            }
            let info = NamespaceInfo {
                name: name.to_string(),
                description: description.to_string(),
                created_ms: now_ms(),
                retention_ms,
            };
            st.namespaces.insert(name.to_string(), info.clone());
            txn.extra.push(Write::Namespace(info));
            self.commit_locked(&mut st, &mut txn)
        };
        self.finish(commit, txn).await
    }

    /// Changes a namespace's description and/or retention; returns it as it now is.
    pub async fn update_namespace(
        &self,
        req: pb::UpdateNamespaceRequest,
    ) -> Result<NamespaceInfo, EngineError> {
        self.check_healthy()?;
        if let Some(retention_ms) = req.retention_ms {
            check_retention(retention_ms)?;
        }
        let mut txn = Txn::default();
        let (commit, info) = {
            let mut st = self.state.lock();
            let Some(info) = st.namespaces.get_mut(&req.namespace) else {
                return Err(EngineError::NamespaceNotFound(req.namespace));
            };
            if let Some(description) = req.description {
                info.description = description;
            }
            if let Some(retention_ms) = req.retention_ms {
                info.retention_ms = retention_ms;
            }
            let info = info.clone();
            txn.extra.push(Write::Namespace(info.clone()));
            (self.commit_locked(&mut st, &mut txn), info)
        };
        self.finish(commit, txn).await?;
        Ok(info)
    }

    /// Deletes closed runs (with their history) and closed sessions older than their
    /// namespace's retention, in bounded batches so that other commits are not held up behind
    /// one huge delete. Returns how many runs and sessions were deleted.
    pub async fn purge_expired(&self, now: i64) -> Result<(usize, usize), EngineError> {
        let namespaces: Vec<(String, u64)> = self
            .state
            .lock()
            .namespaces
            .values()
            .filter(|n| n.retention_ms > 0)
            .map(|n| (n.name.clone(), n.retention_ms))
            .collect();
        let (mut runs, mut sessions) = (0, 0);
        for (namespace, retention_ms) in namespaces {
            let before = now.saturating_sub(retention_ms as i64);
            runs += self
                .purge(&namespace, before, Store::expired_runs, |run_ids| {
                    Write::DeleteRuns { run_ids }
                })
                .await?;
            sessions += self
                .purge(&namespace, before, Store::expired_sessions, |session_ids| {
                    Write::DeleteSessions { session_ids }
                })
                .await?;
        }
        Ok((runs, sessions))
    }

    /// Finds (`expired`) and deletes (`delete`) closed rows of one kind, batch by batch.
    async fn purge(
        &self,
        namespace: &str,
        closed_before_ms: i64,
        expired: ExpiredLookup,
        delete: fn(Vec<String>) -> Write,
    ) -> Result<usize, EngineError> {
        let mut deleted = 0;
        for _ in 0..PURGE_BATCHES_PER_SWEEP {
            self.check_healthy()?;
            let store = self.store.clone();
            let ns = namespace.to_string();
            let ids = tokio::task::spawn_blocking(move || {
                expired(store.as_ref(), &ns, closed_before_ms, PURGE_BATCH)
            })
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(format!("reading expired rows: {e}")))?;
            if ids.is_empty() {
                break;
            }
            let count = ids.len();
            let commit = self.store.submit(WriteBatch {
                writes: vec![delete(ids)],
            });
            self.finish(Some(commit), Txn::default()).await?;
            deleted += count;
            if count < PURGE_BATCH {
                break;
            }
        }
        Ok(deleted)
    }

    /// All namespaces.
    pub fn list_namespaces(&self) -> Vec<NamespaceInfo> {
        self.state.lock().namespaces.values().cloned().collect()
    }

    // ------------------------------------------------------------------------------------------
    // Client operations
    // ------------------------------------------------------------------------------------------

    /// Starts a workflow run; fails with AlreadyExists if the id is running (unless the running
    /// run was started by this same request: a retried start; a resent one is also answered
    /// with the closed run it started).
    pub async fn start_workflow(
        &self,
        req: pb::StartWorkflowRequest,
    ) -> Result<String, EngineError> {
        tether_core::types::check_duration_ms("run_timeout_ms", req.run_timeout_ms)
            .and_then(|_| {
                tether_core::types::check_duration_ms("task_timeout_ms", req.task_timeout_ms)
            })
            .map_err(EngineError::InvalidArgument)?;
        let (run_id, _) = self
            .start_run(
                &req.namespace,
                false,
                &req.workflow_id,
                &req.request_id,
                req.resent,
                |run_id, now, fx| RunEntry::start_workflow(&req, run_id, now, fx),
            )
            .await?;
        Ok(run_id)
    }

    /// Records which open sessions `entry`'s activities were scheduled in, so a closing
    /// session finds its activities without a look at every run. (An activity scheduled in a
    /// session that is closed already fails at once: nothing to remember.)
    fn note_session_runs(st: &mut EngineState, run_id: &str, entry: &RunEntry) {
        let EngineState {
            sessions,
            session_runs,
            ..
        } = st;
        for a in entry.state.activities.values() {
            if let Some(o) = a
                .options
                .as_ref()
                .filter(|o| session_is_open(sessions, &o.session_id))
            {
                session_runs
                    .entry(o.session_id.clone())
                    .or_default()
                    .insert(run_id.to_string());
            }
        }
    }

    /// Creates a run under an id that must not be running already, in one transaction. Returns
    /// the run id and whether its first task went straight to a waiting worker.
    async fn start_run(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
        resent: bool,
        make: impl FnOnce(String, i64, &mut Effects) -> RunEntry,
    ) -> Result<(String, bool), EngineError> {
        self.check_healthy()?;
        if resent {
            if let Some(run_id) = self
                .closed_run_started_by(namespace, standalone, id, request_id)
                .await
            {
                return Ok((run_id, true));
            }
        }
        let mut txn = Txn::default();
        let started = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            let key = (namespace.to_string(), standalone, id.to_string());
            if let Some(existing) = st.open_ids.get(&key) {
                let same_request = !request_id.is_empty()
                    && st
                        .runs
                        .get(existing)
                        .is_some_and(|e| e.state.start_request_id == request_id);
                if !same_request {
                    return Err(EngineError::WorkflowAlreadyStarted {
                        workflow_id: id.to_string(),
                        run_id: existing.clone(),
                        standalone,
                    });
                }
                // A retry of a start that got through: the same answer again, once durable.
                Err((existing.clone(), st.last_submitted_seq))
            } else {
                let run_id = tether_core::types::RunId::generate().to_string();
                let mut entry = make(run_id.clone(), now_ms(), &mut txn.fx);
                entry.max_history_bytes = self.config.max_history_bytes;
                st.open_ids.insert(key, run_id.clone());
                Self::note_session_runs(&mut st, &run_id, &entry);
                st.runs.insert(run_id.clone(), entry);
                txn.touched.insert(run_id.clone());
                Ok((self.commit_locked(&mut st, &mut txn), run_id))
            }
        };
        let (commit, run_id) = match started {
            Ok(started) => started,
            Err((existing, seq)) => {
                self.durable(seq).await?;
                return Ok((existing, true));
            }
        };
        let handed_over = !txn.handovers.is_empty();
        self.finish(commit, txn).await?;
        Ok((run_id, handed_over))
    }

    /// The closed run a start with `request_id` made, if the id's latest run is one: the
    /// answer to a start resent after its reply was lost and its run finished meanwhile. A
    /// read of the store, so only for starts that say they are resent.
    async fn closed_run_started_by(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
    ) -> Option<String> {
        if request_id.is_empty() {
            return None;
        }
        let latest = self.load_stored(namespace, standalone, id, "").await.ok()?;
        (latest.start_request_id == request_id && latest.status != ExecutionStatus::Running as i32)
            .then_some(latest.run_id)
    }

    /// Whether a start with `request_id` already made a run of `id` (open, or closed when the
    /// start is resent): then it is answered with that run, whatever changed since.
    async fn started_already(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        request_id: &str,
        resent: bool,
    ) -> bool {
        if request_id.is_empty() {
            return false;
        }
        let open = {
            let st = self.state.lock();
            st.open_ids
                .get(&(namespace.to_string(), standalone, id.to_string()))
                .and_then(|run_id| st.runs.get(run_id))
                .is_some_and(|e| e.state.start_request_id == request_id)
        };
        open || (resent
            && self
                .closed_run_started_by(namespace, standalone, id, request_id)
                .await
                .is_some())
    }

    /// Starts a standalone activity.
    pub async fn start_activity(
        &self,
        req: pb::StartActivityRequest,
    ) -> Result<StartedActivity, EngineError> {
        self.check_healthy()?;
        let mut options = req.options.clone().unwrap_or_default();
        if !options.session_id.is_empty() {
            let open = {
                let st = self.state.lock();
                let open = st
                    .sessions
                    .get(&options.session_id)
                    .and_then(|s| s.info.as_ref())
                    .is_some_and(|i| i.state == "open" && i.namespace == req.namespace);
                if open {
                    Self::route_session_activity(&st, &mut options);
                }
                open
            };
            // A retry of a start that got through is answered with its run, though the
            // session may have closed since.
            let retried = !open
                && self
                    .started_already(
                        &req.namespace,
                        true,
                        &req.activity_id,
                        &req.request_id,
                        req.resent,
                    )
                    .await;
            if !open && !retried {
                let info = self
                    .describe_session(&req.namespace, &options.session_id)
                    .await?;
                return Err(EngineError::NotRunning(format!(
                    "session {} is {}{}",
                    info.session_id,
                    info.state,
                    if info.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", info.reason)
                    }
                )));
            }
        }
        let options = history::normalize_activity_options(Some(options), &req.task_queue)?;
        let (queue, requirements) = (options.task_queue.clone(), options.requirements.clone());
        let (run_id, handed_over) = self
            .start_run(
                &req.namespace,
                true,
                &req.activity_id,
                &req.request_id,
                req.resent,
                |run_id, now, fx| {
                    RunEntry::start_standalone_activity(&req, options, run_id, now, fx)
                },
            )
            .await?;
        Ok(StartedActivity {
            run_id,
            handed_over,
            queue,
            requirements,
        })
    }

    /// Why an activity started on `queue` with `requirements` waits instead of being taken:
    /// no live worker satisfies its requirements, or none polls the queue ("" when one can).
    pub fn placement_note(&self, namespace: &str, queue: &str, requirements: &str) -> String {
        self.matcher.placement_note(
            namespace,
            queue,
            requirements,
            now_ms(),
            self.config.worker_liveness_timeout,
        )
    }

    /// Delivers a signal to a running workflow. A signal whose request id the run already
    /// recorded (a client's retry) is acknowledged without being delivered again.
    pub async fn signal(&self, req: pb::SignalWorkflowRequest) -> Result<(), EngineError> {
        self.check_healthy()?;
        let mut txn = Txn::default();
        let found = {
            let mut st = self.state.lock();
            match Self::find_open_run(&st, &req.namespace, false, &req.workflow_id, &req.run_id)? {
                None => None,
                Some(run_id) => {
                    let entry = st.runs.get_mut(&run_id).expect("open run");
                    if entry.has_signal_request(&req.request_id) {
                        let seq = st.last_submitted_seq;
                        Some(Err(seq))
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
                            now_ms(),
                            &mut txn.fx,
                        );
                        txn.touched.insert(run_id);
                        Some(Ok(self.commit_locked(&mut st, &mut txn)))
                    }
                }
            }
        };
        match found {
            None => Err(self
                .not_running(&req.namespace, false, &req.workflow_id, &req.run_id)
                .await),
            // Delivered before: once what recorded it is durable, acknowledge again.
            Some(Err(seq)) => self.durable(seq).await,
            Some(Ok(commit)) => self.finish(commit, txn).await,
        }
    }

    /// Asks a workflow (or standalone activity) to cancel.
    pub async fn request_cancel(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
        reason: &str,
        identity: &str,
    ) -> Result<(), EngineError> {
        self.mutate_open_run(namespace, standalone, id, run_id, |entry, fx| {
            entry.request_cancel(reason, identity, now_ms(), fx)
        })
        .await
    }

    /// Ends a workflow (or standalone activity) at once.
    pub async fn terminate(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
        reason: &str,
        identity: &str,
    ) -> Result<(), EngineError> {
        self.mutate_open_run(namespace, standalone, id, run_id, |entry, fx| {
            entry.terminate(reason, identity, now_ms(), fx)
        })
        .await
    }

    /// Applies `f` to the open run an operator's call names, in one transaction.
    async fn mutate_open_run(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
        f: impl FnOnce(&mut RunEntry, &mut Effects),
    ) -> Result<(), EngineError> {
        self.check_healthy()?;
        let mut txn = Txn::default();
        let commit = {
            let mut st = self.state.lock();
            match Self::find_open_run(&st, namespace, standalone, id, run_id)? {
                None => None,
                Some(open) => {
                    let entry = st.runs.get_mut(&open).expect("open run");
                    f(entry, &mut txn.fx);
                    txn.touched.insert(open);
                    Some(self.commit_locked(&mut st, &mut txn))
                }
            }
        };
        match commit {
            None => Err(self.not_running(namespace, standalone, id, run_id).await),
            Some(commit) => self.finish(commit, txn).await,
        }
    }

    /// Finds a run for reading: memory first, then the store.
    async fn snapshot(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> Result<RunSnapshot, EngineError> {
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            live_entry(&st, namespace, standalone, id, run_id).map(|entry| {
                (
                    RunSnapshot {
                        state: entry.state.clone(),
                        pending: entry.pending_activities(),
                    },
                    st.last_submitted_seq,
                )
            })
        };
        if let Some((snapshot, seq)) = live {
            self.durable(seq).await?;
            return Ok(snapshot);
        }
        let state = self.load_stored(namespace, standalone, id, run_id).await?;
        let pending = state
            .activities
            .values()
            .map(|a| pb::PendingActivityInfo {
                seq: a.seq,
                scheduled_event_id: a.scheduled_event_id,
                activity_id: a.activity_id.clone(),
                activity_type: a.activity_type.clone(),
                state: if a.started_ms > 0 {
                    "started"
                } else if a.backoff_until_ms > 0 {
                    "backoff"
                } else {
                    "scheduled"
                }
                .into(),
                attempt: a.attempt,
                last_failure: a.last_failure.clone(),
                last_worker: a.last_worker.clone(),
                last_heartbeat_ms: 0,
                next_attempt_ms: a.backoff_until_ms,
                task_queue: a.task_queue.clone(),
            })
            .collect();
        Ok(RunSnapshot { state, pending })
    }

    async fn load_stored(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> Result<RunState, EngineError> {
        let store = self.store.clone();
        let (ns, idc, rid) = (namespace.to_string(), id.to_string(), run_id.to_string());
        let found = tokio::task::spawn_blocking(move || {
            if rid.is_empty() {
                store.latest_run(&ns, standalone, &idc)
            } else {
                store.load_run(&rid)
            }
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        match found {
            Some(s)
                if s.namespace == namespace
                    && s.workflow_id == id
                    && s.standalone_activity == standalone =>
            {
                Ok(s)
            }
            _ => Err(not_found(namespace, standalone, id, run_id)),
        }
    }

    /// Describes a run.
    pub async fn describe(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> Result<pb::DescribeWorkflowResponse, EngineError> {
        let snap = self.snapshot(namespace, standalone, id, run_id).await?;
        let s = snap.state;
        Ok(pb::DescribeWorkflowResponse {
            info: Some(execution_info(&s)),
            pending_activities: snap.pending,
            pending_timers: s.timers.len() as u32,
            last_workflow_task_failure: s.last_workflow_task_failure.clone(),
            result: s.result.clone(),
            failure: s.failure.clone(),
            workflow_task_failures: s.workflow_task_failures,
        })
    }

    /// A run's history.
    pub async fn history(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
    ) -> Result<Vec<pb::HistoryEvent>, EngineError> {
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            live_entry(&st, namespace, standalone, id, run_id)
                .map(|entry| (entry.history.clone(), st.last_submitted_seq))
        };
        if let Some((history, seq)) = live {
            self.durable(seq).await?;
            return Ok(history);
        }
        let state = self.load_stored(namespace, standalone, id, run_id).await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.history(&state.run_id))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))
    }

    /// Lists runs, newest first, a page at a time: returns the page and the token of the next
    /// one ("" after the last).
    pub async fn list(
        &self,
        namespace: &str,
        standalone: bool,
        status: Option<i32>,
        limit: usize,
        page_token: &str,
    ) -> Result<(Vec<pb::ExecutionInfo>, String), EngineError> {
        self.check_healthy()?;
        {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
        }
        let after = parse_page_token(page_token)?;
        let store = self.store.clone();
        let filter = RunFilter {
            namespace: namespace.to_string(),
            standalone_activity: standalone,
            status,
            limit,
            after,
        };
        let runs = tokio::task::spawn_blocking(move || store.list_runs(&filter))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let next = match runs.last() {
            Some(last) if runs.len() >= limit => page_token_of(last.start_ms, &last.run_id),
            _ => String::new(),
        };
        Ok((runs.iter().map(execution_info).collect(), next))
    }

    /// The outcome of a run, waiting up to `wait` for it to close (and for the close to be
    /// durable): RUNNING only once the wait is over.
    pub async fn result(
        &self,
        namespace: &str,
        standalone: bool,
        id: &str,
        run_id: &str,
        wait: Duration,
    ) -> Result<pb::GetWorkflowResultResponse, EngineError> {
        self.check_healthy()?;
        let wait = wait.min(self.config.long_poll_timeout);
        let receiver = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            match live_entry(&st, namespace, standalone, id, run_id) {
                // A closing run's close is not durable yet: wait for it like for an open one.
                Some(entry) => {
                    let r = entry.state.run_id.clone();
                    if entry.is_open() && wait.is_zero() {
                        return Ok(pb::GetWorkflowResultResponse {
                            run_id: r,
                            status: ExecutionStatus::Running as i32,
                            ..Default::default()
                        });
                    }
                    let (tx, rx) = oneshot::channel();
                    st.waiters.entry(r.clone()).or_default().push(tx);
                    Some((r, rx))
                }
                None => None,
            }
        };
        if let Some((run_id, rx)) = receiver {
            if let Some(outcome) = self.wait_for_answer(rx, wait).await? {
                return Ok(outcome);
            }
            forget_gone_waiters(&mut self.state.lock().waiters, &run_id);
            return Ok(pb::GetWorkflowResultResponse {
                run_id,
                status: ExecutionStatus::Running as i32,
                ..Default::default()
            });
        }
        let state = self.load_stored(namespace, standalone, id, run_id).await?;
        Ok(pb::GetWorkflowResultResponse {
            run_id: state.run_id,
            status: state.status,
            result: state.result,
            failure: state.failure,
        })
    }

    /// Waits up to `wait` for what a waiter list answers (None when the wait ended first, or
    /// the server is shutting down); UNAVAILABLE if storage failed meanwhile.
    async fn wait_for_answer<T>(
        &self,
        rx: oneshot::Receiver<T>,
        wait: Duration,
    ) -> Result<Option<T>, EngineError> {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            answer = rx => {
                if let Ok(answer) = answer {
                    return Ok(Some(answer));
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        self.check_healthy()?;
        Ok(None)
    }

    // ------------------------------------------------------------------------------------------
    // Worker operations
    // ------------------------------------------------------------------------------------------

    async fn poll_queue(
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
            task = self.matcher.poll(key, identity, now_ms(), timeout) => task,
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

    fn poll_timeout(&self, requested_ms: u64) -> Duration {
        if requested_ms == 0 {
            self.config.long_poll_timeout
        } else {
            Duration::from_millis(requested_ms).min(self.config.long_poll_timeout)
        }
    }

    /// A registered identity's work goes to its own process only: a poll from any other is
    /// refused (a second process started with the same identity, or a stale one).
    fn check_poller(
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
        namespace: &str,
        queues: &[String],
        identity: &str,
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
    async fn take_workflow_task(
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
            let mut txn = Txn::default();
            let dispatched = {
                let mut st = self.state.lock();
                let response = st.runs.get_mut(&run_id).and_then(|entry| {
                    entry.dispatch_workflow_task(identity, sticky_queue, now_ms(), &mut txn.fx)
                });
                if response.is_some() {
                    // Dispatch may move buffered events into the history. They were durable
                    // already (as buffered events), so the task need not wait for this write:
                    // it is ordered before the worker's completion, which is all that matters.
                    txn.touched.insert(run_id.clone());
                    let _ = self.commit_locked(&mut st, &mut txn);
                }
                response
            };
            if let Some(response) = dispatched {
                self.apply_effects(std::mem::take(&mut txn.fx), txn.handovers);
                return Some(response);
            }
            if remaining.is_zero() {
                return None;
            }
        }
    }

    /// Refuses a completion that would take a run past the history or pending-activity limits.
    fn check_run_limits(
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

    fn decode_token(bytes: &[u8]) -> Result<pb::TaskToken, EngineError> {
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
    async fn with_token_run<T>(
        &self,
        token_bytes: &[u8],
        f: impl FnOnce(&mut RunEntry, &pb::TaskToken, &mut Effects) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.check_healthy()?;
        let token = Self::decode_token(token_bytes)?;
        let mut txn = Txn::default();
        let (commit, value) = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, &token.namespace)?;
            let entry = open_run(&mut st.runs, &token.run_id)?;
            let value = f(entry, &token, &mut txn.fx)?;
            txn.touched.insert(token.run_id.clone());
            (self.commit_locked(&mut st, &mut txn), value)
        };
        self.finish(commit, txn).await?;
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
        let now = now_ms();
        let mut txn = Txn::default();
        let (commit, completion) = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, &token.namespace)?;
            let mut sessions_used: Vec<String> = Vec::new();
            for c in commands.iter_mut() {
                if let Some(pb::command::Kind::ScheduleActivity(a)) = c.kind.as_mut() {
                    if let Some(o) = a.options.as_mut() {
                        Self::route_session_activity(&st, o);
                        if !o.session_id.is_empty() && !sessions_used.contains(&o.session_id) {
                            sessions_used.push(o.session_id.clone());
                        }
                    }
                }
            }
            let entry = open_run(&mut st.runs, &token.run_id)?;
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
            txn.touched.insert(token.run_id.clone());
            for session_id in sessions_used {
                if session_is_open(&st.sessions, &session_id) {
                    st.session_runs
                        .entry(session_id)
                        .or_default()
                        .insert(token.run_id.clone());
                }
            }
            Self::fail_activities_of_closed_sessions(&mut st, &token.run_id, now, &mut txn);
            self.apply_session_commands(&mut st, &token.namespace, now, &mut txn);
            (self.commit_locked(&mut st, &mut txn), completion)
        };
        self.finish(commit, txn).await?;
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
            entry.fail_workflow_task(token, &req.cause, req.failure, &req.identity, now_ms(), fx)
        })
        .await
    }

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
                task = self.matcher.poll_many(&keys, &req.identity, &req.instance_id, now_ms(), remaining) => task,
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

    /// Dispatches a task a poll took from a backlog, and makes the hand-out durable before the
    /// worker gets it. None when the task was stale.
    async fn dispatch_polled(
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
        let mut txn = Txn::default();
        let (commit, response) = {
            let mut st = self.state.lock();
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
                &mut st,
                &run_id,
                scheduled_event_id,
                attempt,
                identity,
                instance,
                now_ms(),
                &mut txn,
            ) else {
                return Ok(None);
            };
            (self.commit_locked(&mut st, &mut txn), response)
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
    fn take_next_locked(
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
                    &run_id,
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

    /// Records a heartbeat; returns whether the activity should cancel.
    pub async fn heartbeat(&self, req: pb::HeartbeatActivityRequest) -> Result<bool, EngineError> {
        let details = req.details;
        // Heartbeats without details change only in-memory liveness: no write needed.
        if details.is_none() {
            self.check_healthy()?;
            let token = Self::decode_token(&req.task_token)?;
            let mut st = self.state.lock();
            let entry = open_run(&mut st.runs, &token.run_id)?;
            return entry.activity_heartbeat(&token, None, &req.identity, now_ms());
        }
        self.with_token_run(&req.task_token, |entry, token, _fx| {
            entry.activity_heartbeat(token, details, &req.identity, now_ms())
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
    async fn respond_one(
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
        identity: &str,
        outcomes: Vec<pb::ActivityOutcome>,
        next: Option<NextTasks>,
    ) -> Result<RespondedActivities, EngineError> {
        self.respond(identity, outcomes, next, false).await
    }

    /// [`Engine::respond_activities`]; with `next_only_if_all_applied`, no next task is taken
    /// when any outcome was refused.
    async fn respond(
        &self,
        identity: &str,
        outcomes: Vec<pb::ActivityOutcome>,
        next: Option<NextTasks>,
        next_only_if_all_applied: bool,
    ) -> Result<RespondedActivities, EngineError> {
        self.check_healthy()?;
        let now = now_ms();
        let mut txn = Txn::default();
        let mut results = Vec::with_capacity(outcomes.len());
        let (commit, next_tasks) = {
            let mut st = self.state.lock();
            for outcome in outcomes {
                let applied = Self::decode_token(&outcome.task_token).and_then(|token| {
                    Self::check_namespace(&st, &token.namespace)?;
                    let EngineState { runs, sessions, .. } = &mut *st;
                    let entry = open_run(runs, &token.run_id)?;
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
                    txn.touched.insert(token.run_id);
                    Ok(())
                });
                results.push(applied);
            }
            let refused = results.iter().any(Result::is_err);
            let next_tasks = match &next {
                Some(next) if !(refused && next_only_if_all_applied) => {
                    self.take_next_locked(&mut st, next, now, &mut txn)
                }
                _ => Vec::new(),
            };
            (self.commit_locked(&mut st, &mut txn), next_tasks)
        };
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

    /// Fires due timers until shutdown.
    pub async fn run_timers(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = now_ms();
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

    async fn fire(&self, due: Vec<TimerKey>) -> Result<(), EngineError> {
        let mut txn = Txn::default();
        let now = now_ms();
        let commit = {
            let mut st = self.state.lock();
            for key in due {
                match &key {
                    TimerKey::SessionCreation { run_id } => {
                        let creating = st.sessions.get(run_id).is_some_and(|s| {
                            s.info.as_ref().is_some_and(|i| i.state == "creating")
                        });
                        if creating {
                            let reason = st.sessions[run_id]
                                .info
                                .as_ref()
                                .map(|i| i.reason.clone())
                                .unwrap_or_default();
                            self.close_session(
                                &mut st,
                                run_id,
                                "failed",
                                &format!(
                                    "no worker could host it before the creation timeout: {reason}"
                                ),
                                true,
                                now,
                                &mut txn,
                            );
                        }
                        continue;
                    }
                    TimerKey::SessionExpiry { run_id } => {
                        let live = st.sessions.get(run_id).is_some_and(|s| {
                            s.execution_deadline_ms <= now
                                && s.info.as_ref().is_some_and(|i| {
                                    matches!(i.state.as_str(), "creating" | "open")
                                })
                        });
                        if live {
                            self.close_session(
                                &mut st,
                                run_id,
                                "timed_out",
                                "execution timeout reached",
                                true,
                                now,
                                &mut txn,
                            );
                        }
                        continue;
                    }
                    _ => {}
                }
                let Some(entry) = st.runs.get_mut(key.run_id()) else {
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
                    txn.touched.insert(key.run_id().to_string());
                }
            }
            self.commit_locked(&mut st, &mut txn)
        };
        self.finish(commit, txn).await
    }

    // ------------------------------------------------------------------------------------------
    // Sessions
    // ------------------------------------------------------------------------------------------

    /// Tries to place a creating session now. Returns whether it was placed.
    fn try_place(&self, st: &mut EngineState, session_id: &str, now: i64, txn: &mut Txn) -> bool {
        let Some(session) = st.sessions.get(session_id) else {
            return false;
        };
        let info = session.info.clone().unwrap_or_default();
        if info.state != "creating" {
            return false;
        }
        let options = info.options.clone().unwrap_or_default();
        let request = sessions::Request {
            requirements: tether_core::requirements::Requirements::parse(&options.requirements)
                .unwrap_or_default(),
            gpus: options.gpus,
            resources: options.resources.clone().into_iter().collect(),
            packing: sessions::Packing::parse(&options.packing).unwrap_or_default(),
        };
        let workers: Vec<super::matching::WorkerRecord> = self
            .matcher
            .workers_in(&info.namespace)
            .into_iter()
            .filter(|w| w.alive && w.task_queues.contains(&options.task_queue))
            .filter(|w| options.worker.is_empty() || w.identity == options.worker)
            // A worker silent for longer than the session tolerates is not a candidate, even
            // before the registry marks it dead.
            .filter(|w| now - w.last_seen_ms <= options.liveness_timeout_ms.max(1) as i64)
            .collect();
        let candidates: Vec<sessions::Candidate<'_>> = workers
            .iter()
            .map(|w| sessions::Candidate {
                identity: &w.identity,
                caps: &w.caps,
                max_sessions: if w.max_sessions == 0 {
                    DEFAULT_MAX_SESSIONS
                } else {
                    w.max_sessions
                },
            })
            .collect();
        let session = st.sessions.get_mut(session_id).expect("checked");
        let info_mut = session.info.as_mut().expect("has info");
        match sessions::place(&info.namespace, &request, &candidates, &st.reservations) {
            Ok(placement) => {
                st.reservations.reserve(&info.namespace, &placement);
                let worker = workers.iter().find(|w| w.identity == placement.identity);
                info_mut.state = "open".into();
                info_mut.reason.clear();
                info_mut.worker_identity = placement.identity.clone();
                info_mut.hostname = worker
                    .and_then(|w| w.caps.host.as_ref())
                    .map(|h| h.hostname.clone())
                    .unwrap_or_default();
                info_mut.host_queue = super::matching::host_queue_name(&placement.identity);
                info_mut.gpus = placement
                    .gpus
                    .iter()
                    .map(|g| pb::ReservedGpu {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        name: g.name.clone(),
                        memory_total_bytes: g.memory_total_bytes,
                    })
                    .collect();
                info_mut.resources = placement.resources.clone().into_iter().collect();
                info_mut.last_used_ms = now;
                tracing::info!(session_id, worker = placement.identity, gpus = ?info_mut.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), "session placed");
                let placed = info_mut.clone();
                txn.fx.sessions_settled.push(placed.clone());
                txn.touched_sessions.insert(session_id.to_string());
                Self::notify_session_owner(st, &placed, Ok(()), now, txn);
                true
            }
            Err(reason) => {
                if info_mut.reason != reason {
                    info_mut.reason = reason;
                    txn.touched_sessions.insert(session_id.to_string());
                }
                false
            }
        }
    }

    /// A workflow that asked for a session learns its placement (or failure) as an event.
    fn notify_session_owner(
        st: &mut EngineState,
        info: &pb::SessionInfo,
        outcome: Result<(), String>,
        now: i64,
        txn: &mut Txn,
    ) {
        let Some((run_id, seq)) = owner_run(&info.owner) else {
            return;
        };
        if let Some(entry) = st.runs.get_mut(run_id) {
            let outcome = outcome
                .map(|_| info.clone())
                .map_err(|reason| (info.session_id.clone(), reason));
            entry.session_resolved(seq, outcome, now, &mut txn.fx);
            txn.touched.insert(run_id.to_string());
        }
    }

    /// Records a new session (defaults filled in), arms its creation and execution timers and
    /// tries to place it at once. Returns whether it was placed.
    #[allow(clippy::too_many_arguments)]
    fn insert_session(
        &self,
        st: &mut EngineState,
        session_id: &str,
        namespace: &str,
        owner: &str,
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
        st.sessions.insert(
            session_id.to_string(),
            SessionState {
                info: Some(pb::SessionInfo {
                    session_id: session_id.to_string(),
                    namespace: namespace.to_string(),
                    state: "creating".into(),
                    options: Some(options),
                    created_ms: now,
                    owner: owner.to_string(),
                    last_used_ms: now,
                    ..Default::default()
                }),
                creation_deadline_ms,
                execution_deadline_ms,
            },
        );
        if let Some((run_id, _)) = owner_run(owner) {
            st.session_owners
                .entry(run_id.to_string())
                .or_default()
                .push(session_id.to_string());
        }
        txn.touched_sessions.insert(session_id.to_string());
        txn.fx.timers.push((
            creation_deadline_ms,
            TimerKey::SessionCreation {
                run_id: session_id.to_string(),
            },
        ));
        txn.fx.timers.push((
            execution_deadline_ms,
            TimerKey::SessionExpiry {
                run_id: session_id.to_string(),
            },
        ));
        self.try_place(st, session_id, now, txn)
    }

    /// Creates the sessions a workflow task asked for and completes the ones it completed.
    fn apply_session_commands(
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
            let owner = format!("run:{run_id}:{seq}");
            self.insert_session(st, &session_id, namespace, &owner, options, now, txn);
        }
        for session_id in std::mem::take(&mut txn.fx.session_completions) {
            let live = st
                .sessions
                .get(&session_id)
                .and_then(|s| s.info.as_ref())
                .is_some_and(|i| matches!(i.state.as_str(), "creating" | "open"));
            if live {
                self.close_session(st, &session_id, "completed", "", false, now, txn);
            }
        }
    }

    fn try_place_pending(&self, st: &mut EngineState, now: i64, txn: &mut Txn) {
        let mut pending: Vec<(i64, String)> = st
            .sessions
            .values()
            .filter_map(|s| s.info.as_ref())
            .filter(|i| i.state == "creating")
            .map(|i| (i.created_ms, i.session_id.clone()))
            .collect();
        // Oldest first, so an early large request is not starved by later small ones.
        pending.sort();
        for (_, id) in pending {
            self.try_place(st, &id, now, txn);
        }
    }

    /// Ends a session and releases its reservation; with `fail_activities`, its pending
    /// activities fail with SessionFailed (a session completed by its owner has none left that
    /// matter: the owner decided it was done).
    #[allow(clippy::too_many_arguments)]
    fn close_session(
        &self,
        st: &mut EngineState,
        session_id: &str,
        state: &str,
        reason: &str,
        fail_activities: bool,
        now: i64,
        txn: &mut Txn,
    ) {
        let Some(session) = st.sessions.get_mut(session_id) else {
            return;
        };
        let info = session.info.as_mut().expect("has info");
        let was_open = info.state == "open";
        let was_creating = info.state == "creating";
        info.state = state.to_string();
        info.reason = reason.to_string();
        info.closed_ms = now;
        let info = info.clone();
        if was_open {
            st.reservations
                .release(&info.namespace, &placement_of(&info));
        }
        if state != "completed" {
            tracing::warn!(session_id, state, reason, "session ended");
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
                entry.fail_session_activities(session_id, reason, now, &mut txn.fx)
            } else {
                entry.fail_waiting_session_activities(
                    session_id,
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
            .entry(session_id.to_string())
            .or_default()
            .extend(runs);
        if was_creating {
            Self::notify_session_owner(st, &info, Err(reason.to_string()), now, txn);
        } else if was_open && state != "completed" {
            // The owning workflow sees the session's state change, not only its failed activities.
            if let Some((run_id, _)) = owner_run(&info.owner) {
                if let Some(entry) = st.runs.get_mut(run_id) {
                    entry.session_ended(&info.session_id, state, reason, now, &mut txn.fx);
                    txn.touched.insert(run_id.to_string());
                }
            }
        }
        txn.fx.sessions_settled.push(info);
        txn.touched_sessions.insert(session_id.to_string());
        // Released resources may let a waiting session in.
        self.try_place_pending(st, now, txn);
    }

    /// Ends the open sessions of a worker whose GPUs they hold no longer exist there (it came
    /// back with fewer, or other, GPUs).
    fn fail_sessions_on_vanished_gpus(
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
                i.state == "open" && i.namespace == namespace && i.worker_identity == identity
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
            self.close_session(st, &session_id, "failed", &reason, true, now, txn);
        }
    }

    /// Fails sessions whose worker went silent for longer than the session's liveness timeout,
    /// closes client sessions idle past their idle timeout, and retries placing the ones still
    /// waiting.
    async fn check_sessions(&self) -> Result<(), EngineError> {
        let now = now_ms();
        let mut txn = Txn::default();
        let commit = {
            let mut st = self.state.lock();
            if st.sessions.is_empty() {
                return Ok(());
            }
            let mut silent: Vec<(String, String)> = Vec::new();
            let mut idle: Vec<(String, u64)> = Vec::new();
            for s in st.sessions.values() {
                let Some(info) = s.info.as_ref().filter(|i| i.state == "open") else {
                    continue;
                };
                let options = info.options.clone().unwrap_or_default();
                let limit = options.liveness_timeout_ms as i64;
                let seen = self
                    .matcher
                    .last_seen(&info.namespace, &info.worker_identity)
                    .unwrap_or(0)
                    // After a server restart, workers get one liveness timeout to come back.
                    .max(self.started_ms);
                if now - seen > limit {
                    silent.push((
                        info.session_id.clone(),
                        format!(
                            "worker {} stopped heartbeating ({} ms without a heartbeat; liveness timeout {} ms)",
                            info.worker_identity,
                            now - seen,
                            limit
                        ),
                    ));
                    continue;
                }
                let idle_limit = if options.idle_timeout_ms == 0 {
                    DEFAULT_SESSION_IDLE_MS
                } else {
                    options.idle_timeout_ms
                };
                let used = info.last_used_ms.max(self.started_ms);
                if owner_run(&info.owner).is_none() && now.saturating_sub(used) > idle_limit as i64
                {
                    idle.push((info.session_id.clone(), idle_limit));
                }
            }
            for (id, reason) in silent {
                self.close_session(&mut st, &id, "failed", &reason, true, now, &mut txn);
            }
            if !idle.is_empty() {
                // An activity still running in the session is use: only the truly idle close.
                let busy: BTreeSet<String> = st
                    .runs
                    .values()
                    .flat_map(|e| e.state.activities.values())
                    .filter_map(|a| a.options.as_ref())
                    .map(|o| o.session_id.clone())
                    .filter(|s| !s.is_empty())
                    .collect();
                for (id, idle_limit) in idle {
                    if busy.contains(&id) {
                        if let Some(info) = st.sessions.get_mut(&id).and_then(|s| s.info.as_mut()) {
                            info.last_used_ms = now;
                        }
                        continue;
                    }
                    let reason = format!(
                        "idle: no activity ran in it for {} (its idle timeout); a client's \
                         session ends by itself so its reservation cannot leak",
                        duration_text(idle_limit)
                    );
                    self.close_session(&mut st, &id, "timed_out", &reason, true, now, &mut txn);
                }
            }
            self.try_place_pending(&mut st, now, &mut txn);
            self.commit_locked(&mut st, &mut txn)
        };
        self.finish(commit, txn).await
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
        let session_id = if req.session_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            tether_core::types::validate_name("session id", &req.session_id)
                .map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
            req.session_id.clone()
        };
        let now = now_ms();
        let mut txn = Txn::default();
        let (commit, waiter) = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, &req.namespace)?;
            let existing = st.sessions.get(&session_id).and_then(|s| s.info.clone());
            let placed_or_closed = match existing {
                Some(info) => {
                    // Same id again (a client's retry, or its next wait): idempotent.
                    if info.namespace != req.namespace {
                        return Err(EngineError::AlreadyExists(format!(
                            "session id {session_id:?} is in use"
                        )));
                    }
                    info.state != "creating"
                }
                None => self.insert_session(
                    &mut st,
                    &session_id,
                    &req.namespace,
                    &req.owner,
                    options,
                    now,
                    &mut txn,
                ),
            };
            let waiter = if placed_or_closed || req.wait_ms == 0 {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.session_waiters
                    .entry(session_id.clone())
                    .or_default()
                    .push(tx);
                Some(rx)
            };
            (self.commit_locked(&mut st, &mut txn), waiter)
        };
        self.finish(commit, txn).await?;
        if let Some(rx) = waiter {
            let wait = Duration::from_millis(req.wait_ms).min(self.config.long_poll_timeout);
            if let Some(info) = self.wait_for_answer(rx, wait).await? {
                return Ok(info);
            }
            forget_gone_waiters(&mut self.state.lock().session_waiters, &session_id);
        }
        if let Some(info) = self
            .session_from_store_if_gone(&req.namespace, &session_id)
            .await?
        {
            return Ok(info);
        }
        self.describe_session(&req.namespace, &session_id).await
    }

    /// None while the session is in memory; its stored state once it left (closed for good).
    async fn session_from_store_if_gone(
        &self,
        namespace: &str,
        session_id: &str,
    ) -> Result<Option<pb::SessionInfo>, EngineError> {
        if self.state.lock().sessions.contains_key(session_id) {
            return Ok(None);
        }
        self.describe_session(namespace, session_id).await.map(Some)
    }

    /// Completes a session and releases its reservation.
    pub async fn complete_session(
        &self,
        namespace: &str,
        session_id: &str,
    ) -> Result<pb::SessionInfo, EngineError> {
        self.end_session(namespace, session_id, |state| {
            let reason = if state == "creating" {
                "completed before it was placed".to_string()
            } else {
                String::new()
            };
            ("completed", reason, false)
        })
        .await
    }

    /// Ends any session at once (an operator's call): its reservation is freed, its pending
    /// activities fail with SessionFailed, its owner workflow is told.
    pub async fn terminate_session(
        &self,
        namespace: &str,
        session_id: &str,
        reason: &str,
        identity: &str,
    ) -> Result<pb::SessionInfo, EngineError> {
        let reason = match (reason.is_empty(), identity.is_empty()) {
            (true, true) => "terminated by an operator".to_string(),
            (true, false) => format!("terminated by {identity}"),
            (false, true) => format!("terminated: {reason}"),
            (false, false) => format!("terminated by {identity}: {reason}"),
        };
        self.end_session(namespace, session_id, |_| ("terminated", reason, true))
            .await
    }

    /// Closes a live session as `decide` says (state, reason, fail its activities) given its
    /// current state; a closed one is NotRunning saying how it ended.
    async fn end_session(
        &self,
        namespace: &str,
        session_id: &str,
        decide: impl FnOnce(&str) -> (&'static str, String, bool),
    ) -> Result<pb::SessionInfo, EngineError> {
        self.check_healthy()?;
        let now = now_ms();
        let mut txn = Txn::default();
        let done = {
            let mut st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            let live = st
                .sessions
                .get(session_id)
                .and_then(|s| s.info.as_ref())
                .filter(|i| {
                    i.namespace == namespace && matches!(i.state.as_str(), "creating" | "open")
                })
                .map(|i| i.state.clone());
            match live {
                None => None,
                Some(current) => {
                    let (state, reason, fail) = decide(&current);
                    self.close_session(&mut st, session_id, state, &reason, fail, now, &mut txn);
                    let info = st.sessions[session_id].info.clone().unwrap_or_default();
                    Some((self.commit_locked(&mut st, &mut txn), info))
                }
            }
        };
        let Some((commit, info)) = done else {
            let stored = self.describe_session(namespace, session_id).await?;
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
        self.finish(commit, txn).await?;
        Ok(info)
    }

    /// A session, live or closed (looked up by id at any age).
    pub async fn describe_session(
        &self,
        namespace: &str,
        session_id: &str,
    ) -> Result<pb::SessionInfo, EngineError> {
        self.check_healthy()?;
        let live = {
            let st = self.state.lock();
            Self::check_namespace(&st, namespace)?;
            st.sessions
                .get(session_id)
                .and_then(|s| s.info.clone())
                .filter(|i| i.namespace == namespace)
                .map(|i| (i, st.last_submitted_seq))
        };
        if let Some((info, seq)) = live {
            self.durable(seq).await?;
            return Ok(info);
        }
        let store = self.store.clone();
        let id = session_id.to_string();
        let found = tokio::task::spawn_blocking(move || store.load_session(&id))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Unavailable(e.to_string()))?
            .and_then(|s| s.info)
            .filter(|i| i.namespace == namespace);
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
        namespace: &str,
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
                .filter(|i| {
                    i.namespace == namespace
                        && matches!(i.state.as_str(), "creating" | "open")
                        && before_cursor(i)
                })
                .collect();
            (live, st.last_submitted_seq)
        };
        self.durable(seq).await?;
        if include_closed {
            let store = self.store.clone();
            let ns = namespace.to_string();
            let after = after.clone();
            let stored =
                tokio::task::spawn_blocking(move || store.list_sessions(&ns, after, page_size))
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
    fn route_session_activity(st: &EngineState, options: &mut pb::ActivityOptions) {
        if options.session_id.is_empty() {
            return;
        }
        if let Some(info) = st
            .sessions
            .get(&options.session_id)
            .and_then(|s| s.info.as_ref())
        {
            if info.state == "open" {
                options.worker = info.worker_identity.clone();
            }
        }
    }

    /// Fails activities just scheduled on sessions that are not open.
    fn fail_activities_of_closed_sessions(
        st: &mut EngineState,
        run_id: &str,
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
                Some(i) if i.state == "open" => continue,
                Some(i) => format!("session is {}: {}", i.state, i.reason),
                None => "session is not open (unknown or already closed)".to_string(),
            };
            if !dead.iter().any(|(s, _)| *s == sid) {
                dead.push((sid, reason));
            }
        }
        let entry = st.runs.get_mut(run_id).expect("checked");
        for (sid, reason) in dead {
            entry.fail_session_activities(&sid, &reason, now, &mut txn.fx);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Operations
    // ------------------------------------------------------------------------------------------

    /// Backlog, pollers and per-requirement backlogs of a task queue.
    pub fn describe_queue(
        &self,
        namespace: &str,
        queue: &str,
    ) -> Result<pb::DescribeTaskQueueResponse, EngineError> {
        Self::check_namespace(&self.state.lock(), namespace)?;
        let wf = self
            .matcher
            .stats(&QueueKey::new(namespace, queue, TaskKind::Workflow));
        let act = self
            .matcher
            .stats(&QueueKey::new(namespace, queue, TaskKind::Activity));
        let state_of = |identity: &str| -> String {
            match self.matcher.worker(namespace, identity) {
                Some(w) if w.stopped => "stopped",
                Some(w) if w.alive => "alive",
                Some(_) => "dead",
                None => "unregistered",
            }
            .into()
        };
        let mut pollers: Vec<pb::PollerInfo> = wf
            .pollers
            .iter()
            .map(|(id, t)| pb::PollerInfo {
                identity: id.clone(),
                kind: TaskKind::Workflow.name().into(),
                last_poll_ms: *t,
                state: state_of(id),
            })
            .chain(act.pollers.iter().map(|(id, t)| pb::PollerInfo {
                identity: id.clone(),
                kind: TaskKind::Activity.name().into(),
                last_poll_ms: *t,
                state: state_of(id),
            }))
            .collect();
        pollers.sort_by(|a, b| (&a.identity, &a.kind).cmp(&(&b.identity, &b.kind)));
        let mut requirement_backlogs: Vec<pb::RequirementBacklog> = act
            .classes
            .iter()
            .map(|(requirements, tasks)| {
                let explanation = self.matcher.explain(namespace, queue, requirements);
                pb::RequirementBacklog {
                    requirements: requirements.clone(),
                    tasks: *tasks as u64,
                    unplaceable: !explanation.is_empty(),
                    explanation,
                }
            })
            .collect();
        requirement_backlogs.sort_by(|a, b| a.requirements.cmp(&b.requirements));
        Ok(pb::DescribeTaskQueueResponse {
            workflow_backlog: wf.backlog as u64,
            activity_backlog: act.backlog as u64,
            pollers,
            requirement_backlogs,
        })
    }

    fn worker_info(&self, w: &super::matching::WorkerRecord) -> pb::WorkerInfo {
        let mut queues: Vec<String> = w.task_queues.clone();
        queues.sort();
        queues.dedup();
        pb::WorkerInfo {
            identity: w.identity.clone(),
            task_queues: queues,
            last_seen_ms: w.last_seen_ms,
            namespace: w.namespace.clone(),
            state: if w.stopped {
                "stopped"
            } else if w.alive {
                "alive"
            } else {
                "dead"
            }
            .into(),
            host_queue: super::matching::host_queue_name(&w.identity),
            capabilities: Some((*w.caps).clone()),
            registered_ms: w.registered_ms,
            instance_id: w.instance_id.clone(),
            pid: w.pid,
            stop_reason: w.stop_reason.clone(),
        }
    }

    /// Workers of a namespace by identity, a page at a time: registered ones with their state,
    /// plus pollers that never registered. Returns the page and the next page's token.
    pub fn list_workers(
        &self,
        namespace: &str,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<pb::WorkerInfo>, String), EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), namespace)?;
        let after = page_token;
        let mut by_identity: BTreeMap<String, pb::WorkerInfo> = self
            .matcher
            .workers_in(namespace)
            .iter()
            .filter(|w| after.is_empty() || w.identity.as_str() > after)
            .map(|w| (w.identity.clone(), self.worker_info(w)))
            .collect();
        for (identity, queue, _kind, seen) in self.matcher.pollers_in(namespace) {
            if !after.is_empty() && identity.as_str() <= after {
                continue;
            }
            let w = by_identity
                .entry(identity.clone())
                .or_insert_with(|| pb::WorkerInfo {
                    identity,
                    namespace: namespace.to_string(),
                    state: "unregistered".into(),
                    ..Default::default()
                });
            let internal = queue.starts_with(tether_wire::STICKY_QUEUE_PREFIX)
                || queue.starts_with(super::matching::HOST_QUEUE_PREFIX);
            if !internal && !w.task_queues.contains(&queue) {
                w.task_queues.push(queue);
            }
            w.last_seen_ms = w.last_seen_ms.max(seen);
        }
        let more = by_identity.len() > page_size;
        let page: Vec<pb::WorkerInfo> = by_identity
            .into_values()
            .take(page_size)
            .map(|mut w| {
                w.task_queues.sort();
                w
            })
            .collect();
        let next = if more {
            page.last().map(|w| w.identity.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// One worker.
    pub fn describe_worker(
        &self,
        namespace: &str,
        identity: &str,
    ) -> Result<pb::WorkerInfo, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), namespace)?;
        if let Some(w) = self.matcher.worker(namespace, identity) {
            return Ok(self.worker_info(&w));
        }
        // Seen polling, never registered.
        let polled: Vec<(String, String, TaskKind, i64)> = self
            .matcher
            .pollers_in(namespace)
            .into_iter()
            .filter(|(id, ..)| id == identity)
            .collect();
        if polled.is_empty() {
            return Err(EngineError::NotFound(format!(
                "worker {identity:?} is not known in namespace {namespace:?}"
            )));
        }
        let mut queues: Vec<String> = polled
            .iter()
            .map(|(_, q, ..)| q.clone())
            .filter(|q| {
                !q.starts_with(tether_wire::STICKY_QUEUE_PREFIX)
                    && !q.starts_with(super::matching::HOST_QUEUE_PREFIX)
            })
            .collect();
        queues.sort();
        queues.dedup();
        Ok(pb::WorkerInfo {
            identity: identity.to_string(),
            namespace: namespace.to_string(),
            state: "unregistered".into(),
            task_queues: queues,
            last_seen_ms: polled.iter().map(|(.., t)| *t).max().unwrap_or(0),
            ..Default::default()
        })
    }

    /// Registers a worker process; returns its host queue. An identity belongs to one live
    /// process at a time: another process's registration is refused (ALREADY_EXISTS naming the
    /// holder) while the holder lives, unless it says it replaces the holder.
    pub async fn register_worker(
        &self,
        req: pb::RegisterWorkerRequest,
    ) -> Result<pb::RegisterWorkerResponse, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        let now = now_ms();
        let caps = req.capabilities.unwrap_or_default();
        let registered = self
            .matcher
            .register_instance(
                super::matching::Registration {
                    namespace: req.namespace.clone(),
                    identity: req.identity.clone(),
                    instance_id: req.instance_id.clone(),
                    previous_instance_id: req.previous_instance_id.clone(),
                    pid: req.pid,
                    caps: caps.clone(),
                    task_queues: req.task_queues,
                    max_sessions: req.max_concurrent_sessions,
                },
                now,
                self.config.worker_liveness_timeout,
            )
            .map_err(EngineError::AlreadyExists)?;
        tracing::info!(
            namespace = req.namespace,
            identity = req.identity,
            instance = req.instance_id,
            outcome = ?registered,
            "worker registered"
        );
        let mut txn = Txn::default();
        let commit = {
            let mut st = self.state.lock();
            // A new process under this identity: whatever an earlier process of it was running
            // (handed out durably, so this holds across server restarts too) is gone with that
            // process. Retry it now rather than after its timeouts; but a process that shut
            // down gracefully may still be finishing its attempts, which stay its own.
            let keep: Option<Vec<&str>> = match &registered {
                super::matching::Registered::Again => None,
                super::matching::Registered::New => Some(vec![&req.instance_id]),
                super::matching::Registered::Replaced {
                    previous,
                    previous_draining,
                } => Some(if *previous_draining {
                    vec![&req.instance_id, previous]
                } else {
                    vec![&req.instance_id]
                }),
            };
            if let Some(keep) = keep {
                for (run_id, entry) in st.runs.iter_mut() {
                    if entry.state.namespace == req.namespace
                        && entry.worker_restarted(&req.identity, &keep, now, &mut txn.fx)
                    {
                        txn.touched.insert(run_id.clone());
                    }
                }
            }
            self.fail_sessions_on_vanished_gpus(
                &mut st,
                &req.namespace,
                &req.identity,
                &caps,
                now,
                &mut txn,
            );
            // A new worker may be able to host sessions that are waiting for a placement.
            self.try_place_pending(&mut st, now, &mut txn);
            self.commit_locked(&mut st, &mut txn)
        };
        self.finish(commit, txn).await?;
        let liveness = self.config.worker_liveness_timeout;
        Ok(pb::RegisterWorkerResponse {
            host_queue: super::matching::host_queue_name(&req.identity),
            heartbeat_interval_ms: (liveness.as_millis() as u64 / 3).max(100),
            liveness_timeout_ms: liveness.as_millis() as u64,
        })
    }

    /// Records a worker heartbeat; false when the worker must register again. New capabilities
    /// that lost GPUs end the sessions reserved on them.
    pub async fn worker_heartbeat(
        &self,
        req: pb::WorkerHeartbeatRequest,
    ) -> Result<bool, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        match self.matcher.instance_of(&req.namespace, &req.identity) {
            None => return Ok(false),
            Some(holder) if holder != req.instance_id => {
                return Err(EngineError::AlreadyExists(format!(
                    "worker identity {:?} is held by another process (instance {holder}) now; \
                     this process (instance {}) must stop or take another identity",
                    req.identity, req.instance_id
                )))
            }
            Some(_) => {}
        }
        let gpus_before = self
            .matcher
            .worker(&req.namespace, &req.identity)
            .map(|w| w.caps.gpus.clone());
        let caps = req.capabilities.clone();
        let known =
            self.matcher
                .heartbeat(&req.namespace, &req.identity, req.capabilities, now_ms());
        let lost_gpus = match (&caps, gpus_before) {
            (Some(caps), Some(before)) => before.iter().any(|g| {
                !caps
                    .gpus
                    .iter()
                    .any(|h| h.index == g.index && h.uuid == g.uuid)
            }),
            _ => false,
        };
        if known && lost_gpus {
            let caps = caps.expect("checked");
            let now = now_ms();
            let mut txn = Txn::default();
            let commit = {
                let mut st = self.state.lock();
                self.fail_sessions_on_vanished_gpus(
                    &mut st,
                    &req.namespace,
                    &req.identity,
                    &caps,
                    now,
                    &mut txn,
                );
                self.commit_locked(&mut st, &mut txn)
            };
            self.finish(commit, txn).await?;
        }
        Ok(known)
    }

    /// A worker shut down: it is stopped at once (nothing new is placed on or dispatched to
    /// it), and the sessions it hosts end now with the reason given (default "worker shut
    /// down") instead of after the liveness timeout. Its running attempts may still report.
    pub async fn deregister_worker(
        &self,
        req: pb::DeregisterWorkerRequest,
    ) -> Result<Vec<String>, EngineError> {
        self.check_healthy()?;
        Self::check_namespace(&self.state.lock(), &req.namespace)?;
        let reason = if req.reason.is_empty() {
            format!("worker {} shut down", req.identity)
        } else {
            req.reason.clone()
        };
        if !self
            .matcher
            .deregister(&req.namespace, &req.identity, &req.instance_id, &reason)
        {
            return Err(EngineError::NotFound(format!(
                "worker {:?} (instance {}) is not registered in namespace {:?}; nothing to \
                 deregister",
                req.identity, req.instance_id, req.namespace
            )));
        }
        tracing::info!(
            namespace = req.namespace,
            identity = req.identity,
            "worker stopped"
        );
        let now = now_ms();
        let mut txn = Txn::default();
        let (commit, ended) = {
            let mut st = self.state.lock();
            let ended: Vec<String> = st
                .sessions
                .values()
                .filter_map(|s| s.info.as_ref())
                .filter(|i| {
                    i.state == "open"
                        && i.namespace == req.namespace
                        && i.worker_identity == req.identity
                })
                .map(|i| i.session_id.clone())
                .collect();
            for id in &ended {
                self.close_session(&mut st, id, "failed", &reason, true, now, &mut txn);
            }
            (self.commit_locked(&mut st, &mut txn), ended)
        };
        self.finish(commit, txn).await?;
        Ok(ended)
    }

    /// Marks workers dead when they miss the liveness timeout, until shutdown.
    pub async fn run_liveness(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let timeout = self.config.worker_liveness_timeout;
        let tick = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            for (namespace, identity) in self.matcher.expire(now_ms(), timeout) {
                tracing::warn!(
                    namespace,
                    identity,
                    "worker missed its liveness timeout: marked dead"
                );
            }
            if let Err(e) = self.check_sessions().await {
                tracing::error!(error = %e, "checking sessions failed");
            }
            if self.config.metrics {
                self.export_gauges();
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.prune_idle(now_ms());
            }
        }
    }

    /// Deletes closed runs past their namespace's retention, every
    /// `retention_sweep_interval`, until shutdown.
    pub async fn run_retention(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.retention_sweep_interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match self.purge_expired(now_ms()).await {
                Ok((0, 0)) => {}
                Ok((runs, sessions)) => {
                    tracing::info!(
                        runs,
                        sessions,
                        "deleted closed runs and sessions past their retention"
                    )
                }
                Err(e) => tracing::error!(error = %e, "deleting expired runs and sessions failed"),
            }
        }
    }

    /// Drops queues, pollers and dead workers idle for longer than [`FORGET_IDLE_AFTER`] (dead
    /// workers that an open session still names are kept).
    fn prune_idle(&self, now: i64) {
        let before = now - FORGET_IDLE_AFTER.as_millis() as i64;
        let hosts: BTreeSet<(String, String)> = self
            .state
            .lock()
            .sessions
            .values()
            .filter_map(|s| s.info.as_ref())
            .map(|i| (i.namespace.clone(), i.worker_identity.clone()))
            .collect();
        let (queues, workers) = self.matcher.prune(before, |namespace, identity| {
            hosts.contains(&(namespace.to_string(), identity.to_string()))
        });
        if queues > 0 || workers > 0 {
            tracing::info!(
                queues,
                workers,
                "forgot idle task queues and long-dead workers"
            );
        }
    }
}

/// The open run a task token names; a closed (or unknown) one makes the token stale.
fn open_run<'a>(
    runs: &'a mut HashMap<String, RunEntry>,
    run_id: &str,
) -> Result<&'a mut RunEntry, EngineError> {
    runs.get_mut(run_id).ok_or_else(|| {
        EngineError::StaleTask(format!(
            "run {run_id} is not open (it closed, or never existed)"
        ))
    })
}

/// The run held in memory (open, or closing) that a read names: the current run of `id`, or the
/// run `run_id` if it belongs to `id`.
fn live_entry<'a>(
    st: &'a EngineState,
    namespace: &str,
    standalone: bool,
    id: &str,
    run_id: &str,
) -> Option<&'a RunEntry> {
    let entry = if run_id.is_empty() {
        st.open_ids
            .get(&(namespace.to_string(), standalone, id.to_string()))
            .and_then(|r| st.runs.get(r))
    } else {
        st.runs.get(run_id)
    };
    entry.filter(|e| {
        e.state.workflow_id == id
            && e.state.namespace == namespace
            && e.state.standalone_activity == standalone
    })
}

fn not_found(namespace: &str, standalone: bool, id: &str, run_id: &str) -> EngineError {
    let what = if standalone { "activity" } else { "workflow" };
    EngineError::NotFound(if run_id.is_empty() {
        format!("{what} {id:?} was not found in namespace {namespace:?}")
    } else {
        format!("{what} {id:?} run {run_id:?} was not found in namespace {namespace:?}")
    })
}

/// The reservation a session's info describes.
fn placement_of(info: &pb::SessionInfo) -> Placement {
    Placement {
        identity: info.worker_identity.clone(),
        gpus: info
            .gpus
            .iter()
            .map(|g| pb::GpuDevice {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total_bytes: g.memory_total_bytes,
                ..Default::default()
            })
            .collect(),
        resources: info.resources.clone().into_iter().collect(),
    }
}

/// Default session creation timeout.
const DEFAULT_SESSION_CREATION_MS: u64 = 60_000;
/// Default session execution timeout.
const DEFAULT_SESSION_EXECUTION_MS: u64 = 24 * 3_600_000;
/// Default session slots per worker.
pub const DEFAULT_MAX_SESSIONS: u32 = 10;

fn execution_info(s: &RunState) -> pb::ExecutionInfo {
    pb::ExecutionInfo {
        namespace: s.namespace.clone(),
        workflow_id: s.workflow_id.clone(),
        run_id: s.run_id.clone(),
        workflow_type: s.workflow_type.clone(),
        task_queue: s.task_queue.clone(),
        status: s.status,
        start_ms: s.start_ms,
        close_ms: s.close_ms,
        history_length: s.next_event_id.saturating_sub(1),
        kind: if s.standalone_activity {
            "activity"
        } else {
            "workflow"
        }
        .into(),
    }
}

/// Drops the senders of callers that stopped waiting (their wait ended), and the list with
/// the last of them: a wait that times out leaves nothing behind.
fn forget_gone_waiters<T>(waiters: &mut HashMap<String, Vec<oneshot::Sender<T>>>, key: &str) {
    if let Some(list) = waiters.get_mut(key) {
        list.retain(|w| !w.is_closed());
        if list.is_empty() {
            waiters.remove(key);
        }
    }
}

/// A page token: where the previous page ended, as (time, id).
fn page_token_of(ms: i64, id: &str) -> String {
    format!("{ms}:{id}")
}

fn parse_page_token(token: &str) -> Result<Option<(i64, String)>, EngineError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .split_once(':')
        .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_string())))
        .map(Some)
        .ok_or_else(|| {
            EngineError::InvalidArgument(format!(
                "page_token {:?} is not one this server gave out; pass next_page_token from \
                 the previous reply, or nothing for the first page",
                tether_core::types::quote_prefix(token, 40)
            ))
        })
}

/// A duration in milliseconds as a person reads it: 10m, 90s, 1500ms.
fn duration_text(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// Whether `session_id` is a session still creating or open (a closed one stays in memory
/// until its close is durable).
fn session_is_open(sessions: &HashMap<String, SessionState>, session_id: &str) -> bool {
    sessions
        .get(session_id)
        .and_then(|s| s.info.as_ref())
        .is_some_and(|i| matches!(i.state.as_str(), "creating" | "open"))
}
