//! What the engine and every store agree on: the write batches, what recovery reads back, and
//! the [`Store`] trait itself.

use crate::state::{RunState, SessionState};
use tether_core::types::{Namespace, RunId, SessionId};
use tether_wire::pb::{HistoryEvent, NamespaceInfo};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored bytes did not decode (corruption or a newer format).
    #[error("stored record could not be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The data directory could not be used.
    #[error("data directory {path}: {source}")]
    Io {
        /// The path involved.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// PostgreSQL reported an error, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The writer thread is gone (the store was closed or a previous commit failed).
    #[error("the store's writer has stopped; restart the server")]
    WriterGone,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message (with its severity and code) says more than the driver's.
        StoreError::Postgres(match e.as_db_error() {
            Some(db) => format!("{db} (SQLSTATE {})", db.code().code()),
            None => e.to_string(),
        })
    }
}

/// One write inside a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or replace a namespace.
    Namespace(NamespaceInfo),
    /// Create or replace the mutable state of a run.
    Run {
        /// The run's state; its ids and status are also written to indexed columns.
        state: Box<RunState>,
        /// Once the run is closed, its hand-out rows that are its own (not shared with a
        /// session still open) are deleted with it; false says there are none, and saves the
        /// look.
        may_own_started: bool,
    },
    /// Create or replace a session.
    Session {
        /// Its state.
        state: Box<SessionState>,
    },
    /// The hand-out rows of a session that closed (its final count is in its own row): those
    /// of runs still open become the runs' own, as they may record attempts still running (a
    /// session its owner completed lets them finish); the others are deleted. The engine names
    /// the runs: it knows which runs scheduled activities in the session (after a restart,
    /// through [`Recovered::session_rows`]), so no index over the rows' sessions is needed.
    ReleaseSessionRows {
        /// The session.
        session_id: SessionId,
        /// Runs still open: their rows in the session become theirs alone.
        runs_still_open: Vec<RunId>,
        /// Runs closed: their rows in the session are deleted.
        runs_closed: Vec<RunId>,
    },
    /// Delete closed sessions (retention).
    DeleteSessions {
        /// The sessions.
        session_ids: Vec<SessionId>,
    },
    /// Delete closed runs with their history (retention).
    DeleteRuns {
        /// The runs.
        run_ids: Vec<RunId>,
    },
    /// Record who runs an attempt (or, with `started_ms` 0, that hand-out `dispatch` was taken
    /// back). A small row of its own, so that a hand-out does not rewrite the run's whole
    /// state; recovery folds it into the run's state (the higher `dispatch` wins).
    Started {
        /// The run.
        run_id: RunId,
        /// The activity.
        scheduled_event_id: u64,
        /// Its attempt.
        attempt: u32,
        /// Which hand-out.
        dispatch: u64,
        /// When it was handed out (0: taken back).
        started_ms: i64,
        /// The worker.
        worker: String,
        /// Its process.
        instance: String,
        /// The session the activity runs in, and the session's count of hand-outs with this
        /// one: the row outlives the run (until the session closes), so the count survives a
        /// restart without the session's row being rewritten each time.
        session_id: Option<SessionId>,
        /// See `session_id`.
        session_activities_run: u64,
    },
    /// Append history events to a run.
    Events {
        /// The run.
        run_id: RunId,
        /// Events in order.
        events: Vec<HistoryEvent>,
    },
}

/// The namespace lease a cluster replica writes under: the transaction that commits the batch
/// checks, before anything else, that `owner` still holds `namespace` at `epoch` with time
/// left, and locks the lease row until it commits, so a takeover (which bumps the epoch) is
/// ordered after it. A replica that lost the lease commits nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The replica.
    pub owner: std::sync::Arc<str>,
    /// The namespace.
    pub namespace: Namespace,
    /// The lease's epoch when the replica took it.
    pub epoch: i64,
}

/// Writes that become durable together, in order with every batch submitted before them.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// The writes.
    pub writes: Vec<Write>,
}

impl WriteBatch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// A pending commit: resolves once the batch is durable (or failed).
pub type CommitReceiver = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// What a submitter wants done the moment its batch is durable (tasks handed to parked polls,
/// waiters answered), before `done` resolves: run by the store's writer, which saves the
/// latency of waking the submitter first just to do it. Never run when the batch fails. It
/// must not block, and it runs after every earlier batch's.
pub type OnDurable = Box<dyn FnOnce() + Send>;

/// A submitted batch: its place in the order of submissions, and the answer to wait for.
pub struct Commit {
    /// Batches are numbered from 1 in submission order.
    pub seq: u64,
    /// Resolves once the batch is durable, or with why it never will be.
    pub done: CommitReceiver,
}

/// How far the store has got: every batch numbered up to `seq` is durable. Once a commit
/// failed, `failed` says why, and no later batch is ever made durable.
#[derive(Debug, Clone, Default)]
pub struct Durability {
    /// The highest batch number made durable (every lower one is durable too).
    pub seq: u64,
    /// Set for good by the first failed commit.
    pub failed: Option<std::sync::Arc<str>>,
}

/// What the server needs at start-up to rebuild its in-memory state.
#[derive(Debug, Default)]
pub struct Recovered {
    /// All namespaces.
    pub namespaces: Vec<NamespaceInfo>,
    /// Every run that is still open, with its history.
    pub open_runs: Vec<(RunState, Vec<HistoryEvent>)>,
    /// Sessions that are creating or open.
    pub open_sessions: Vec<SessionState>,
    /// (session id, run id) of every hand-out row kept for a session: the runs whose rows a
    /// closing session releases, closed runs included.
    pub session_rows: Vec<(SessionId, RunId)>,
}

/// Filter for [`Store::list_runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Namespace to list.
    pub namespace: Namespace,
    /// Standalone activities instead of workflows.
    pub standalone_activity: bool,
    /// Only this status (raw enum value), if set.
    pub status: Option<i32>,
    /// At most this many, newest first.
    pub limit: usize,
    /// Only runs that sort after this one, newest first: (start time, run id) of the last run
    /// of the previous page.
    pub after: Option<(i64, RunId)>,
}

/// What a listing keeps beyond its namespace, kind and status (empty: everything).
#[derive(Debug, Clone, Default)]
pub struct RunMatch {
    /// Workflow (or activity) type, exactly.
    pub workflow_type: String,
    /// Task queue, exactly.
    pub task_queue: String,
    /// Start of the workflow (or activity) id.
    pub id_prefix: String,
}

impl RunMatch {
    pub(crate) fn is_empty(&self) -> bool {
        self.workflow_type.is_empty() && self.task_queue.is_empty() && self.id_prefix.is_empty()
    }

    pub(crate) fn matches(&self, run: &RunState) -> bool {
        (self.workflow_type.is_empty() || run.workflow_type == self.workflow_type)
            && (self.task_queue.is_empty() || run.task_queue == self.task_queue)
            && run.workflow_id.starts_with(&self.id_prefix)
    }
}

/// The persistence contract of the engine.
///
/// `submit` must make batches durable in submission order: the engine relies on it to acknowledge
/// a request only after its batch (and every earlier one) has committed. The first failed
/// commit stops the store for good: that batch, every batch queued behind it and every later
/// one fail, because each is a delta on top of the state the failed one would have made.
pub trait Store: Send + Sync + 'static {
    /// Queues a batch; `done` resolves after it is durable.
    fn submit(&self, batch: WriteBatch) -> Commit {
        self.submit_then(batch, None)
    }
    /// Queues a batch; once it is durable `on_durable` runs (see [`OnDurable`]), and then
    /// `done` resolves.
    fn submit_then(&self, batch: WriteBatch, on_durable: Option<OnDurable>) -> Commit;
    /// Watches how far commits have got (and whether one failed).
    fn durability(&self) -> tokio::sync::watch::Receiver<Durability>;
    /// Loads namespaces and open runs (start-up only).
    fn recover(&self) -> Result<Recovered, StoreError>;
    /// The state of one run, open or closed.
    fn load_run(&self, run_id: &RunId) -> Result<Option<RunState>, StoreError>;
    /// The most recent run of an id (workflow id, or activity id for standalone activities).
    fn latest_run(
        &self,
        namespace: &Namespace,
        standalone_activity: bool,
        id: &str,
    ) -> Result<Option<RunState>, StoreError>;
    /// A run's full history.
    fn history(&self, run_id: &RunId) -> Result<Vec<HistoryEvent>, StoreError>;
    /// Runs in a namespace, newest first.
    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunState>, StoreError>;
    /// Up to `limit` runs of a namespace that closed before `closed_before_ms`, oldest first.
    fn expired_runs(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<RunId>, StoreError>;
    /// Up to `limit` sessions of a namespace that closed before `closed_before_ms`, oldest first.
    fn expired_sessions(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError>;
    /// Sessions of a namespace (closed ones too), newest first, at most `limit`, only those
    /// that sort after `after` (creation time, session id) when it is given.
    fn list_sessions(
        &self,
        namespace: &Namespace,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<SessionState>, StoreError>;
    /// One session, open or closed, by id.
    fn load_session(&self, session_id: &SessionId) -> Result<Option<SessionState>, StoreError>;
    /// Stops the writer once everything already submitted is committed (a server shutting
    /// down). Nothing by default: a store with no writer of its own has nothing to stop.
    fn close(&self) {}
}

/// Where a table keeps the close time of its rows, for the retention lookups
/// ([`Store::expired_runs`], [`Store::expired_sessions`]) of the SQL stores.
pub struct ClosedRows {
    /// The table.
    pub table: &'static str,
    /// Its id column.
    pub id: &'static str,
    /// Its close-time column (0 while open).
    pub closed_at: &'static str,
}

/// Closed runs.
pub const CLOSED_RUNS: ClosedRows = ClosedRows {
    table: "runs",
    id: "run_id",
    closed_at: "close_ms",
};

/// Closed sessions.
pub const CLOSED_SESSIONS: ClosedRows = ClosedRows {
    table: "sessions",
    id: "session_id",
    closed_at: "closed_ms",
};

/// One hand-out row (see [`Write::Started`]) as a store reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOutRow {
    /// The activity.
    pub scheduled_event_id: u64,
    /// Its attempt.
    pub attempt: u32,
    /// Which hand-out.
    pub dispatch: u64,
    /// When it was handed out (0: taken back).
    pub started_ms: i64,
    /// The worker.
    pub worker: String,
    /// Its process.
    pub instance: String,
}

/// Folds a run's hand-out rows into its state at recovery, the same way in every store: for
/// the current attempt of an activity, the newest record of who runs it (by hand-out number; a
/// take-back of the same hand-out wins over the hand-out) replaces what the state says. Rows
/// of attempts since replaced, or of an activity waiting out a retry backoff, change nothing.
pub fn fold_hand_outs(state: &mut RunState, rows: impl IntoIterator<Item = HandOutRow>) {
    for row in rows {
        let Some(a) = state.activities.get_mut(&row.scheduled_event_id) else {
            continue;
        };
        if a.attempt != row.attempt || a.backoff_until_ms > 0 {
            continue;
        }
        let newer = row.dispatch > a.started_dispatch
            || (row.dispatch == a.started_dispatch && row.started_ms == 0);
        if newer {
            a.started_dispatch = if row.started_ms == 0 { 0 } else { row.dispatch };
            a.started_ms = row.started_ms;
            a.started_worker = row.worker;
            a.started_instance = row.instance;
            if row.started_ms > 0 {
                a.last_worker = a.started_worker.clone();
            }
        }
    }
}

/// Brings an open session's count of activities and its last use up to what its hand-out rows
/// say (they are written without rewriting the session's own row): `rows` are, per run with
/// rows in the session, the highest count and the latest hand-out time.
pub fn fold_session_counts(session: &mut SessionState, rows: impl IntoIterator<Item = (u64, i64)>) {
    if let Some(info) = session.info.as_mut() {
        for (count, used_ms) in rows {
            info.activities_run = info.activities_run.max(count);
            info.last_used_ms = info.last_used_ms.max(used_ms);
        }
    }
}

// The cluster's rows (PostgreSQL only), as the replicas read them.

/// A replica as the database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    /// Its id.
    pub replica_id: String,
    /// Where clients reach it.
    pub address: String,
    /// Milliseconds since it last renewed (its heartbeat).
    pub seen_ms_ago: i64,
    /// Milliseconds since it started.
    pub up_ms: i64,
}

/// A namespace's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The namespace.
    pub namespace: String,
    /// The replica holding it ("" when none does).
    pub owner: String,
    /// Bumped by every takeover.
    pub epoch: i64,
    /// Milliseconds since the owner took it.
    pub held_ms: i64,
    /// Milliseconds since the owner last renewed it.
    pub renewed_ms_ago: i64,
    /// Milliseconds until it lapses (negative: it has lapsed).
    pub expires_in_ms: i64,
}

impl LeaseRow {
    /// Whether some replica holds it now.
    pub fn is_held(&self) -> bool {
        !self.owner.is_empty() && self.expires_in_ms > 0
    }
}

/// Replicas and leases, as one read saw them.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Every replica that registered, newest heartbeat first.
    pub replicas: Vec<ReplicaRow>,
    /// Every namespace's lease, by namespace.
    pub leases: Vec<LeaseRow>,
}

impl ClusterView {
    /// The address of the replica that holds `namespace` now, if one does.
    pub fn owner_address(&self, namespace: &str) -> Option<&str> {
        let lease = self
            .leases
            .iter()
            .find(|l| l.namespace == namespace && l.is_held())?;
        self.replicas
            .iter()
            .find(|r| r.replica_id == lease.owner)
            .map(|r| r.address.as_str())
    }
}
