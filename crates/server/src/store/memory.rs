//! A [`Store`] that keeps everything in memory: for unit tests of the engine, which then run
//! without a data directory, a writer thread or gRPC. Nothing in it is durable; it says so in
//! the log when it is made, and `tether server` never uses it.
//!
//! It keeps the contract of the SQLite store, row for row: batches become "durable" in
//! submission order, the first failed commit stops it for good, hand-out rows are folded into
//! their runs at recovery and released with their sessions, an open run or session is never
//! deleted, and listings page newest first with the same tie-breaks. The contract tests in
//! `store::contract` run against both.

use super::api::{
    fold_hand_outs, fold_session_counts, Commit, Durability, HandOutRow, OnDurable, Recovered,
    RunFilter, Store, StoreError, Write, WriteBatch,
};
use crate::state::{RunState, SessionState};
use foldhash::HashMap;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use tether_core::types::{Namespace, RunId, SessionId};
use tether_wire::pb::{ExecutionStatus, HistoryEvent, NamespaceInfo};

/// In-memory [`Store`], for tests only (see the module's documentation).
pub struct MemoryStore {
    tables: Mutex<Tables>,
    durability: tokio::sync::watch::Sender<Durability>,
    /// To the task that runs what follows each commit, in order (see [`OnDurable`]): a task
    /// of the runtime, not a thread, so that a test's paused clock waits for it.
    after_commit: Mutex<Option<tokio::sync::mpsc::UnboundedSender<OnDurable>>>,
}

#[derive(Default)]
struct Tables {
    namespaces: BTreeMap<String, NamespaceInfo>,
    runs: HashMap<RunId, StoredRun>,
    /// Run id -> its events by event id.
    events: HashMap<RunId, BTreeMap<u64, HistoryEvent>>,
    sessions: HashMap<SessionId, StoredSession>,
    /// (run id, activity) -> the newest hand-out row.
    started: BTreeMap<(RunId, u64), StartedRow>,
    /// Batches submitted so far.
    submitted: u64,
    /// Order of first insertion, the tie-break of runs that started in the same millisecond.
    next_row: u64,
    /// Set by the first failed commit, or by [`MemoryStore::fail_from_now`].
    failed: Option<Arc<str>>,
}

struct StoredRun {
    state: RunState,
    row: u64,
    /// 0 while the run is open.
    close_ms: i64,
}

struct StoredSession {
    state: SessionState,
    /// Order of first insertion (recovery hands sessions back in it, as SQLite does).
    row: u64,
    /// As first written (a session keeps its place in the listing).
    created_ms: i64,
    /// 0 while the session is creating or open.
    closed_ms: i64,
}

struct StartedRow {
    row: HandOutRow,
    session_id: Option<SessionId>,
    session_activities_run: u64,
}

impl MemoryStore {
    /// An empty store. Logs a warning: nothing written to it survives the process.
    pub fn new() -> MemoryStore {
        tracing::warn!("in-memory store (a test fake): nothing is durable");
        let (durability, _) = tokio::sync::watch::channel(Durability::default());
        MemoryStore {
            tables: Mutex::new(Tables::default()),
            durability,
            after_commit: Mutex::new(None),
        }
    }

    /// Queues `run` for the task that runs what follows commits, starting that task on the
    /// caller's runtime when there is none yet (or its runtime has gone).
    fn run_after_commit(&self, run: OnDurable) {
        let mut sender = self.after_commit.lock();
        let run = match sender.as_ref() {
            Some(tx) => match tx.send(run) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::SendError(run)) => run,
            },
            None => run,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait for it: a thread of its own.
            std::thread::spawn(run);
            return;
        };
        let (tx, mut to_run) = tokio::sync::mpsc::unbounded_channel::<OnDurable>();
        runtime.spawn(async move {
            while let Some(run) = to_run.recv().await {
                // One that panics must not stop those after it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
            }
        });
        let _ = tx.send(run);
        *sender = Some(tx);
    }

    /// Makes every commit from now on fail with `why`, as a full disk or a lost database
    /// would: for tests of what the engine does once its store fails.
    pub fn fail_from_now(&self, why: &str) {
        let mut tables = self.tables.lock();
        let why: Arc<str> = why.into();
        tables.failed = Some(why.clone());
        self.durability.send_modify(|d| d.failed = Some(why));
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl Tables {
    fn apply(&mut self, write: Write) {
        match write {
            Write::Namespace(info) => {
                self.namespaces.insert(info.name.clone(), info);
            }
            Write::Run {
                state,
                may_own_started,
            } => {
                let open = state.status == ExecutionStatus::Running as i32;
                if may_own_started && !open {
                    self.started
                        .retain(|(run_id, _), r| *run_id != state.run_id || r.session_id.is_some());
                }
                let close_ms = if open { 0 } else { state.close_ms.max(1) };
                let next_row = &mut self.next_row;
                let stored = self
                    .runs
                    .entry(RunId::from(state.run_id.as_str()))
                    .or_insert_with(|| {
                        *next_row += 1;
                        StoredRun {
                            state: RunState::default(),
                            row: *next_row,
                            close_ms: 0,
                        }
                    });
                stored.state = *state;
                stored.close_ms = close_ms;
            }
            Write::Session { state } => {
                let info = state.info.clone().unwrap_or_default();
                let closed_ms = if crate::sessions::is_live(&info) {
                    0
                } else {
                    info.closed_ms.max(1)
                };
                let next_row = &mut self.next_row;
                let stored = self
                    .sessions
                    .entry(SessionId::from(info.session_id.as_str()))
                    .or_insert_with(|| {
                        *next_row += 1;
                        StoredSession {
                            state: SessionState::default(),
                            row: *next_row,
                            created_ms: info.created_ms,
                            closed_ms: 0,
                        }
                    });
                stored.state = *state;
                stored.closed_ms = closed_ms;
            }
            Write::ReleaseSessionRows {
                session_id,
                runs_still_open,
                runs_closed,
            } => {
                for run_id in runs_still_open {
                    for ((_, _), r) in self.started.range_mut(run_rows(&run_id)) {
                        if r.session_id.as_ref() == Some(&session_id) {
                            r.session_id = None;
                        }
                    }
                }
                for run_id in runs_closed {
                    self.started.retain(|(run, _), r| {
                        *run != run_id || r.session_id.as_ref() != Some(&session_id)
                    });
                }
            }
            Write::DeleteSessions { session_ids } => {
                for id in session_ids {
                    if self.sessions.get(&id).is_some_and(|s| s.closed_ms > 0) {
                        self.sessions.remove(&id);
                    }
                }
            }
            Write::DeleteRuns { run_ids } => {
                for id in run_ids {
                    // Only closed runs: an open run is never deleted, whatever asked for it.
                    if self.runs.get(&id).is_some_and(|r| r.close_ms > 0) {
                        self.runs.remove(&id);
                        self.events.remove(&id);
                        self.started.retain(|(run_id, _), _| *run_id != id);
                    }
                }
            }
            Write::Started {
                run_id,
                scheduled_event_id,
                attempt,
                dispatch,
                started_ms,
                worker,
                instance,
                session_id,
                session_activities_run,
            } => {
                self.started.insert(
                    (run_id, scheduled_event_id),
                    StartedRow {
                        row: HandOutRow {
                            scheduled_event_id,
                            attempt,
                            dispatch,
                            started_ms,
                            worker,
                            instance,
                        },
                        session_id,
                        session_activities_run,
                    },
                );
            }
            Write::Events { run_id, events } => {
                let stored = self.events.entry(run_id).or_default();
                for event in events {
                    stored.insert(event.event_id, event);
                }
            }
        }
    }

    fn history(&self, run_id: &RunId) -> Vec<HistoryEvent> {
        self.events
            .get(run_id)
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of up to `limit` closed rows of a namespace closed before `before_ms`, oldest first.
    fn closed_before<'a, Id: Ord + Clone + 'a>(
        rows: impl Iterator<Item = (&'a Id, i64)>,
        before_ms: i64,
        limit: usize,
    ) -> Vec<Id> {
        let mut closed: Vec<(i64, &Id)> = rows
            .filter(|(_, closed_ms)| *closed_ms > 0 && *closed_ms < before_ms)
            .map(|(id, closed_ms)| (closed_ms, id))
            .collect();
        closed.sort();
        closed.truncate(limit);
        closed.into_iter().map(|(_, id)| id.clone()).collect()
    }
}

/// The key range of one run's hand-out rows.
fn run_rows(run_id: &RunId) -> std::ops::RangeInclusive<(RunId, u64)> {
    (run_id.clone(), 0)..=(run_id.clone(), u64::MAX)
}

impl Store for MemoryStore {
    fn submit_then(&self, batch: WriteBatch, on_durable: Option<OnDurable>) -> Commit {
        let (tx, done) = tokio::sync::oneshot::channel();
        let mut tables = self.tables.lock();
        tables.submitted += 1;
        let seq = tables.submitted;
        let outcome = match &tables.failed {
            Some(why) => Err(format!("not written: an earlier commit failed ({why})")),
            None => {
                for write in batch.writes {
                    tables.apply(write);
                }
                self.durability.send_modify(|d| d.seq = seq);
                Ok(())
            }
        };
        match (outcome, on_durable) {
            (Ok(()), Some(on_durable)) => {
                // Never on the submitter's stack: it may hold a lock that `on_durable` takes.
                // Run in order, as a writer thread would, before `done` resolves.
                let run = move || {
                    on_durable();
                    let _ = tx.send(Ok(()));
                };
                // Queued under the tables' lock, so in the order of the commits.
                self.run_after_commit(Box::new(run));
            }
            (outcome, _) => {
                let _ = tx.send(outcome);
            }
        }
        drop(tables);
        Commit { seq, done }
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.durability.subscribe()
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        let tables = self.tables.lock();
        let mut out = Recovered {
            namespaces: tables.namespaces.values().cloned().collect(),
            ..Default::default()
        };
        // In the order the rows were first written, as SQLite hands them back.
        let mut open_runs: Vec<(&RunId, &StoredRun)> = tables
            .runs
            .iter()
            .filter(|(_, r)| r.close_ms == 0 && r.state.status == ExecutionStatus::Running as i32)
            .collect();
        open_runs.sort_by_key(|(_, r)| r.row);
        for (run_id, stored) in open_runs {
            let mut state = stored.state.clone();
            let rows = tables
                .started
                .range(run_rows(run_id))
                .map(|(_, r)| r.row.clone());
            fold_hand_outs(&mut state, rows);
            out.open_runs.push((state, tables.history(run_id)));
        }
        // Per (session, run): the highest count and the latest hand-out.
        let mut per_session_run: BTreeMap<(&str, &str), (u64, i64)> = BTreeMap::new();
        for ((run_id, _), r) in &tables.started {
            let Some(session_id) = &r.session_id else {
                continue;
            };
            let seen = per_session_run
                .entry((session_id.as_str(), run_id.as_str()))
                .or_default();
            *seen = (
                seen.0.max(r.session_activities_run),
                seen.1.max(r.row.started_ms),
            );
        }
        for (session_id, run_id) in per_session_run.keys() {
            out.session_rows
                .push((SessionId::from(*session_id), RunId::from(*run_id)));
        }
        let mut open_sessions: Vec<(&SessionId, &StoredSession)> = tables
            .sessions
            .iter()
            .filter(|(_, s)| s.closed_ms == 0)
            .collect();
        open_sessions.sort_by_key(|(_, s)| s.row);
        for (session_id, stored) in open_sessions {
            let mut session = stored.state.clone();
            let rows = per_session_run
                .range((session_id.as_str(), "")..)
                .take_while(|((s, _), _)| *s == session_id.as_str())
                .map(|(_, counts)| *counts);
            fold_session_counts(&mut session, rows);
            out.open_sessions.push(session);
        }
        Ok(out)
    }

    fn load_run(&self, run_id: &RunId) -> Result<Option<RunState>, StoreError> {
        Ok(self.tables.lock().runs.get(run_id).map(|r| r.state.clone()))
    }

    fn latest_run(
        &self,
        namespace: &Namespace,
        standalone_activity: bool,
        id: &str,
    ) -> Result<Option<RunState>, StoreError> {
        let tables = self.tables.lock();
        Ok(tables
            .runs
            .values()
            .filter(|r| {
                r.state.namespace == *namespace
                    && r.state.standalone_activity == standalone_activity
                    && r.state.workflow_id == id
            })
            .max_by_key(|r| (r.state.start_ms, r.row))
            .map(|r| r.state.clone()))
    }

    fn history(&self, run_id: &RunId) -> Result<Vec<HistoryEvent>, StoreError> {
        Ok(self.tables.lock().history(run_id))
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunState>, StoreError> {
        let tables = self.tables.lock();
        let mut runs: Vec<&RunState> = tables
            .runs
            .values()
            .map(|r| &r.state)
            .filter(|s| {
                s.namespace == filter.namespace
                    && s.standalone_activity == filter.standalone_activity
                    && filter.status.is_none_or(|status| s.status == status)
                    && filter
                        .after
                        .as_ref()
                        .is_none_or(|(ms, id)| (s.start_ms, s.run_id.as_str()) < (*ms, id.as_str()))
            })
            .collect();
        runs.sort_by(|a, b| (b.start_ms, &b.run_id).cmp(&(a.start_ms, &a.run_id)));
        runs.truncate(filter.limit.max(1));
        Ok(runs.into_iter().cloned().collect())
    }

    fn expired_runs(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<RunId>, StoreError> {
        let tables = self.tables.lock();
        let rows = tables
            .runs
            .iter()
            .filter(|(_, r)| r.state.namespace == *namespace)
            .map(|(id, r)| (id, r.close_ms));
        Ok(Tables::closed_before(rows, closed_before_ms, limit))
    }

    fn expired_sessions(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        let tables = self.tables.lock();
        let rows = tables
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.state
                    .info
                    .as_ref()
                    .is_some_and(|i| i.namespace == *namespace)
            })
            .map(|(id, s)| (id, s.closed_ms));
        Ok(Tables::closed_before(rows, closed_before_ms, limit))
    }

    fn list_sessions(
        &self,
        namespace: &Namespace,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<SessionState>, StoreError> {
        let tables = self.tables.lock();
        let mut sessions: Vec<(i64, &str, &SessionState)> = tables
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.state
                    .info
                    .as_ref()
                    .is_some_and(|i| i.namespace == *namespace)
            })
            .map(|(id, s)| (s.created_ms, id.as_str(), &s.state))
            .filter(|(created_ms, id, _)| {
                after
                    .as_ref()
                    .is_none_or(|(ms, after_id)| (*created_ms, *id) < (*ms, after_id.as_str()))
            })
            .collect();
        sessions.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
        sessions.truncate(limit.max(1));
        Ok(sessions.into_iter().map(|(_, _, s)| s.clone()).collect())
    }

    fn load_session(&self, session_id: &SessionId) -> Result<Option<SessionState>, StoreError> {
        Ok(self
            .tables
            .lock()
            .sessions
            .get(session_id)
            .map(|s| s.state.clone()))
    }
}
