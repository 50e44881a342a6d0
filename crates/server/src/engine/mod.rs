//! The runner around the per-run state machine: it holds the open runs in memory, applies one
//! request (or timer firing) at a time under a lock, hands the resulting writes to the store in
//! order, waits for the commit, and only then offers tasks, arms timers and wakes waiters.

mod activity_tasks;
mod control;
mod dispatch;
mod loops;
mod namespaces;
mod reads;
mod recovery;
mod session_ops;
mod session_placement;
mod start;
#[cfg(test)]
mod tests;
mod workers;
mod workflow_tasks;

use crate::config::ServerConfig;
use crate::error::EngineError;
use crate::history::{self, Effects, RunEntry, WorkflowTaskCompletion};
use crate::matching::{ClaimedPoll, Handover, Matcher, QueueKey, TaskKind, TaskRef};
use crate::sessions::{self, OwnerNotice, Reservations, SessionEnd, SessionOwner, SessionPhase};
use crate::state::RunState;
use crate::state::SessionState;
use crate::store::{Commit, OnDurable, RunFilter, RunMatch, Store, Write, WriteBatch};
use crate::timers::{TimerKey, TimerQueue};
use foldhash::{HashMap, HashMapExt, HashSet};
use parking_lot::Mutex;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tether_core::types::{
    ActivityId, Namespace, RunId, SessionId, TaskQueue, WorkerId, WorkflowId,
};
use tether_wire::pb::{self, ExecutionStatus, NamespaceInfo};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// (namespace, standalone activity, workflow or activity id).
type IdKey = (String, bool, String);

#[derive(Default)]
struct EngineState {
    namespaces: BTreeMap<String, NamespaceInfo>,
    /// Open runs, and closed ones until their close is durable.
    runs: HashMap<RunId, RunEntry>,
    /// (namespace, standalone activity, id) -> run id of the open run.
    open_ids: HashMap<IdKey, RunId>,
    /// Callers waiting for a run to close.
    waiters: HashMap<RunId, Vec<oneshot::Sender<pb::GetWorkflowResultResponse>>>,
    /// Sessions that are creating or open (closed ones until their close is durable).
    sessions: HashMap<SessionId, SessionState>,
    /// Run id -> the sessions it owns (created by its workflow), which close with it.
    session_owners: HashMap<RunId, Vec<SessionId>>,
    /// Session id -> the runs that scheduled activities in it (some may have closed since):
    /// where a closing session's activities are, without a look at every run.
    session_runs: HashMap<SessionId, HashSet<RunId>>,
    reservations: Reservations,
    /// Callers waiting for a session to be placed (or to fail).
    session_waiters: HashMap<SessionId, Vec<oneshot::Sender<pb::SessionInfo>>>,
    /// The creating sessions, oldest first: what a release tries to place.
    waiting_sessions: session_placement::WaitingSessions,
    /// The number of the last batch submitted to the store: a read waits until it is durable,
    /// so it never shows state that might not be written.
    last_submitted_seq: u64,
}

/// A session's owning run, when a workflow owns it.
fn owner_run(info: &pb::SessionInfo) -> Option<(RunId, u32)> {
    SessionOwner::parse(&info.owner)
        .workflow()
        .map(|(run_id, seq)| (run_id.clone(), seq))
}

/// A store lookup of closed rows past a cutoff: (namespace, closed before, limit) → ids.
type ExpiredLookup<Id> =
    fn(&dyn Store, &Namespace, i64, usize) -> Result<Vec<Id>, crate::store::StoreError>;

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
    touched: BTreeSet<RunId>,
    touched_sessions: BTreeSet<SessionId>,
    extra: Vec<Write>,
    /// Attempts dispatched inside the transaction to parked polls, handed over after the commit.
    handovers: Vec<(ClaimedPoll, pb::PollActivityTaskResponse)>,
    /// Whether any were (`handovers` goes to the store's writer with the batch).
    handed_over: bool,
    /// Hand-outs (and take-backs) of runs not otherwise written in this transaction.
    started: Vec<Write>,
    /// Sessions closed in this transaction -> the runs that scheduled activities in them.
    closed_session_runs: HashMap<SessionId, HashSet<RunId>>,
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
    access: parking_lot::RwLock<Option<Arc<crate::auth::Access>>>,
    /// The one namespace this engine serves (a cluster replica's engine), or None for all.
    scope: Option<Namespace>,
    /// Delivers signals to namespaces this engine does not serve (set on a replica's engines).
    foreign: Option<Arc<dyn ForeignSignals>>,
}

/// Where a scoped engine's signals to other namespaces go: the replica that runs it, which
/// finds the engine serving the target (in this process or another replica) and delivers it
/// there. The outcome (None, or why it failed) is then resolved in the sender's history.
pub trait ForeignSignals: Send + Sync + 'static {
    /// Delivers `signal`, with `request_id` so a redelivery after a restart is not applied
    /// twice; retries while the target's namespace is between replicas.
    fn deliver(
        &self,
        signal: history::OutgoingSignal,
        request_id: String,
    ) -> futures::future::BoxFuture<'static, Option<String>>;
}

/// Which run a read or an operator's request names: the current run of a workflow (or of a
/// standalone activity) by its id, or one run of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSelector {
    /// The namespace.
    pub namespace: Namespace,
    /// Whose runs.
    pub target: RunTarget,
    /// One run; empty for the current (latest) one.
    pub run_id: RunId,
}

/// Whose runs a [`RunSelector`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunTarget {
    /// A workflow, by id.
    Workflow(WorkflowId),
    /// A standalone activity, by id.
    Activity(ActivityId),
}

impl RunSelector {
    /// A workflow's run (`run_id` empty: its current one).
    pub fn workflow(
        namespace: impl Into<Namespace>,
        workflow_id: impl Into<WorkflowId>,
        run_id: impl Into<RunId>,
    ) -> RunSelector {
        RunSelector {
            namespace: namespace.into(),
            target: RunTarget::Workflow(workflow_id.into()),
            run_id: run_id.into(),
        }
    }

    /// A standalone activity's run (`run_id` empty: its current one).
    pub fn activity(
        namespace: impl Into<Namespace>,
        activity_id: impl Into<ActivityId>,
        run_id: impl Into<RunId>,
    ) -> RunSelector {
        RunSelector {
            namespace: namespace.into(),
            target: RunTarget::Activity(activity_id.into()),
            run_id: run_id.into(),
        }
    }

    /// (namespace, standalone activity, id, run id), as a run's state keeps them.
    fn parts(&self) -> (&str, bool, &str, &RunId) {
        let (standalone, id) = match &self.target {
            RunTarget::Workflow(id) => (false, id.as_str()),
            RunTarget::Activity(id) => (true, id.as_str()),
        };
        (&self.namespace, standalone, id, &self.run_id)
    }
}

/// A run found for a read: either the live in-memory entry's snapshot or the stored state.
struct RunSnapshot {
    state: RunState,
    pending: Vec<pb::PendingActivityInfo>,
}

impl Engine {
    /// The time now, by the engine's clock (see [`ServerConfig::clock`]).
    fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
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
        // Cloned out at once: the watch's guard must not live across an await.
        let failure = rx.wait_for(|f| f.is_some()).await.map(|f| f.clone());
        match failure {
            Ok(f) => f.expect("waited for it"),
            // The engine is gone: it never failed.
            Err(_) => std::future::pending().await,
        }
    }

    /// The request rate limit per caller (0 = off).
    pub fn max_requests_per_second(&self) -> u32 {
        self.config.max_requests_per_second
    }

    /// The access rules in force, if authorization is on.
    pub fn access(&self) -> Option<Arc<crate::auth::Access>> {
        self.access.read().clone()
    }

    /// Puts new access rules in force for every request from now on. Authorization cannot be
    /// turned on or off this way: that needs a restart (it depends on client certificates).
    pub fn replace_access(&self, access: crate::auth::Access) -> Result<(), EngineError> {
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
            if let Some(namespace) = &self.scope {
                // A cluster replica's engine: the namespace is reopened from what is durable,
                // here or on another replica, and the caller's retry reaches it there.
                return Err(EngineError::Unavailable(format!(
                    "this replica stopped serving namespace {namespace:?} at a write that \
                     failed ({reason}); nothing after it was acknowledged; retry: the \
                     namespace is reopened from the database, here or on another replica"
                )));
            }
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
        match &self.scope {
            Some(namespace) => tracing::warn!(
                reason,
                %namespace,
                "a commit failed: this namespace's engine stops, and is reopened from the database"
            ),
            None => tracing::error!(
                reason,
                "a commit failed: every request is refused until the server is restarted"
            ),
        }
        self.storage_failure.send_replace(Some(StorageFailure {
            reason: reason.to_string(),
            at_ms: self.now_ms(),
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

    /// One transaction, the way an operation changes state: under the state lock `apply`
    /// changes it and records in the [`Txn`] what it touched and caused; the writes are
    /// submitted to the store before the lock is released (so commits are in lock order); once
    /// they are durable the effects are applied (tasks offered, timers armed, waiters woken)
    /// and `apply`'s value is returned. An error from `apply` submits nothing, so `apply` must
    /// check before it changes anything.
    async fn transact<T>(
        &self,
        apply: impl FnOnce(&mut EngineState, &mut Txn) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let (commit, txn, value) = self.submit(apply)?;
        self.finish(commit, txn).await?;
        Ok(value)
    }

    /// The locked half of [`Engine::transact`], for the operations that must look at what the
    /// transaction did (or wait for something else) before they [`Engine::finish`] it.
    fn submit<T>(
        &self,
        apply: impl FnOnce(&mut EngineState, &mut Txn) -> Result<T, EngineError>,
    ) -> Result<(Option<Commit>, Txn, T), EngineError> {
        let mut txn = Txn::default();
        let mut st = self.state.lock();
        let value = apply(&mut st, &mut txn)?;
        let commit = self.commit_locked(&mut st, &mut txn);
        Ok((commit, txn, value))
    }

    /// Turns the touched runs into one ordered write batch and submits it (under the lock, so
    /// batches reach the store in the order they were applied). Before that, everything that
    /// belongs in the same transaction is applied: signals to other workflows, the release of
    /// sessions whose owner closed, and the hand-over of new activity tasks to parked polls.
    fn commit_locked(&self, st: &mut EngineState, txn: &mut Txn) -> Option<Commit> {
        let now = self.now_ms();
        let mut closed_seen = 0;
        loop {
            while let Some(sig) = txn.fx.signals.pop() {
                if self
                    .scope
                    .as_ref()
                    .is_some_and(|own| **own != sig.namespace)
                {
                    txn.fx.foreign_signals.push(sig);
                } else {
                    self.deliver_signal(st, sig, now, txn);
                }
            }
            // A session never outlives its owner: it closes in the transaction that closes the
            // run, and its reservation is freed with it.
            let closed: Vec<(RunId, i32)> = txn.fx.closed[closed_seen..]
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
                        .is_some_and(sessions::is_live);
                    if live {
                        let status = ExecutionStatus::try_from(status).unwrap_or_default();
                        let reason = format!(
                            "released: workflow run {run_id}, which owns it, closed ({})",
                            status.short_name()
                        );
                        self.close_session(
                            st,
                            &session_id,
                            SessionEnd::Completed,
                            &reason,
                            true,
                            now,
                            txn,
                        );
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
                } => session_id.is_some() || *started_ms == 0 || !txn.touched.contains(run_id),
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
            // Nothing to wait for: `finish` applies the effects once the lock is released.
            None
        } else {
            txn.handed_over = !txn.handovers.is_empty();
            let commit = self
                .store
                .submit_then(batch, Some(self.effects_once_durable(txn)));
            st.last_submitted_seq = commit.seq;
            Some(commit)
        }
    }

    /// The transaction's effects, to be applied by the store's writer the moment its batch is
    /// durable: whoever waits on them (a parked poll, a result waiter) is woken straight from
    /// there, not by way of the request that made them; and they are applied, in commit order,
    /// even when that request went away meanwhile (a task nobody offers, or an id nobody
    /// frees, would wait for a restart). When the commit fails they are dropped: the claimed
    /// polls with them, their callers get nothing.
    fn effects_once_durable(&self, txn: &mut Txn) -> OnDurable {
        let fx = std::mem::take(&mut txn.fx);
        let handovers = std::mem::take(&mut txn.handovers);
        let engine = self.me.clone();
        // The writer is no runtime thread; what the effects spawn (deliveries of signals to
        // other namespaces) goes to the engine's.
        let runtime = tokio::runtime::Handle::try_current().ok();
        Box::new(move || {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let _in_runtime = runtime.as_ref().map(|r| r.enter());
            engine.apply_effects(fx, handovers);
        })
    }

    /// The write that releases a closed session's hand-out rows: those of runs still open
    /// become the runs' own (they may record attempts still running) and go when the runs
    /// close; those of closed runs go now.
    fn release_session_rows(
        st: &mut EngineState,
        session_id: SessionId,
        runs: impl IntoIterator<Item = RunId>,
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

    /// Waits for the commit (whose writer has applied the effects by then: see
    /// [`Engine::effects_once_durable`]), or applies the effects of a transaction that wrote
    /// nothing. Nothing is offered, armed, handed over or answered before the writes that
    /// caused it are durable.
    async fn finish(&self, commit: Option<Commit>, txn: Txn) -> Result<(), EngineError> {
        if let Some(commit) = commit {
            let outcome = commit
                .done
                .await
                .unwrap_or_else(|_| Err("the store's writer stopped".to_string()));
            if let Err(e) = outcome {
                self.fail_storage(&e);
                return Err(self.check_healthy().unwrap_err());
            }
        }
        self.apply_effects(txn.fx, txn.handovers);
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
        if !fx.foreign_signals.is_empty() {
            self.send_foreign_signals(fx.foreign_signals);
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
                if !sessions::is_live(&info) {
                    // Closed for good: reads go to the store, and its timers have nothing to do.
                    st.sessions.remove(&info.session_id);
                    self.timers
                        .cancel_session(&SessionId::from(&info.session_id));
                    if let Some((run_id, _)) = owner_run(&info) {
                        if let Some(owned) = st.session_owners.get_mut(&run_id) {
                            owned.retain(|s| *s != info.session_id);
                            if owned.is_empty() {
                                st.session_owners.remove(&run_id);
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
                    self.timers.cancel_run(&RunId::from(closed.run_id.as_str()));
                }
            }
        }
    }
}

/// The open run a task token names; a closed (or unknown) one makes the token stale.
fn open_run<'a>(
    runs: &'a mut HashMap<RunId, RunEntry>,
    run_id: &RunId,
) -> Result<&'a mut RunEntry, EngineError> {
    runs.get_mut(run_id).ok_or_else(|| {
        EngineError::StaleTask(format!(
            "run {run_id} is not open (it closed, or never existed)"
        ))
    })
}

/// The run held in memory (open, or closing) that a read names: the current run of `id`, or the
/// run `run_id` if it belongs to `id`.
fn live_entry<'a>(st: &'a EngineState, run: &RunSelector) -> Option<&'a RunEntry> {
    let (namespace, standalone, id, run_id) = run.parts();
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

fn not_found(run: &RunSelector) -> EngineError {
    let (namespace, standalone, id, run_id) = run.parts();
    let what = if standalone { "activity" } else { "workflow" };
    EngineError::NotFound(if run_id.is_empty() {
        format!("{what} {id:?} was not found in namespace {namespace:?}")
    } else {
        format!("{what} {id:?} run {run_id:?} was not found in namespace {namespace:?}")
    })
}

/// Default session creation timeout.
const DEFAULT_SESSION_CREATION_MS: u64 = 60_000;
/// Default session execution timeout.
const DEFAULT_SESSION_EXECUTION_MS: u64 = 24 * 3_600_000;

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
fn forget_gone_waiters<K, T>(waiters: &mut HashMap<K, Vec<oneshot::Sender<T>>>, key: &str)
where
    K: std::hash::Hash + Eq + std::borrow::Borrow<str>,
{
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
fn session_is_open(sessions: &HashMap<SessionId, SessionState>, session_id: &SessionId) -> bool {
    sessions
        .get(session_id)
        .and_then(|s| s.info.as_ref())
        .is_some_and(sessions::is_live)
}
