//! The database file: its tables and indexes, migrations of older files, and how each
//! connection is opened.

use crate::state::{RunState, SessionState};
use crate::store::api::StoreError;
use prost::Message;
use rusqlite::{params, Connection};
use std::path::Path;
use tether_wire::pb::ExecutionStatus;

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fsync on every commit (`synchronous=FULL`): survives power loss. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode: survives a crash of the server process (kill -9), but
    /// the last commits may be lost if the machine itself loses power.
    Normal,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            other => Err(format!(
                "unknown sync mode {other:?}: expected \"full\" or \"normal\""
            )),
        }
    }
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    info BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    standalone INTEGER NOT NULL,
    workflow_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    state BLOB NOT NULL,
    close_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_id ON runs(namespace, standalone, workflow_id, start_ms);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs(namespace, standalone, start_ms);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    open INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    state BLOB NOT NULL,
    closed_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_ns ON sessions(namespace, created_ms);
CREATE TABLE IF NOT EXISTS started (
    run_id TEXT NOT NULL,
    scheduled_event_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    dispatch INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    worker TEXT NOT NULL,
    instance TEXT NOT NULL,
    session_id TEXT NOT NULL DEFAULT '',
    session_activities_run INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, scheduled_event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (run_id, event_id)
) WITHOUT ROWID;
";

/// Brings a database made by an older version up to this schema.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // Closed runs and sessions get their close time from their state, so retention finds them.
    add_close_column(
        conn,
        "runs",
        "run_id",
        "close_ms",
        &format!("status != {}", ExecutionStatus::Running as i32),
        |state| Ok(decode_run(state)?.close_ms),
    )?;
    add_close_column(
        conn,
        "sessions",
        "session_id",
        "closed_ms",
        "open = 0",
        |state| {
            Ok(SessionState::decode(state.as_slice())?
                .info
                .map(|i| i.closed_ms)
                .unwrap_or(0))
        },
    )?;
    // Hand-out rows are found by run (the engine names a closing session's runs): an index
    // by session, made by an older version, would only cost a B-tree write per hand-out.
    conn.execute_batch("DROP INDEX IF EXISTS started_by_session")?;
    // Only closed rows are indexed by close time: the retention sweep's lookups stay small.
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_by_close ON runs(namespace, close_ms) WHERE close_ms > 0;
         CREATE INDEX IF NOT EXISTS sessions_by_close ON sessions(namespace, closed_ms)
             WHERE closed_ms > 0;",
    )?;
    Ok(())
}

/// Adds `column` (a close time, 0 while open) to `table` if it lacks it, filled in for the rows
/// matching `closed` from their encoded state.
pub(super) fn add_close_column(
    conn: &mut Connection,
    table: &str,
    id_column: &str,
    column: &str,
    closed: &str,
    close_time: impl Fn(Vec<u8>) -> Result<i64, StoreError>,
) -> Result<(), StoreError> {
    let present = conn
        .prepare(&format!(
            "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
        ))?
        .exists([])?;
    if present {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(&format!(
        "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
    ))?;
    let rows: Vec<(String, Vec<u8>)> = tx
        .prepare(&format!(
            "SELECT {id_column}, state FROM {table} WHERE {closed}"
        ))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    {
        let mut set = tx.prepare(&format!(
            "UPDATE {table} SET {column} = ?2 WHERE {id_column} = ?1"
        ))?;
        for (id, state) in rows {
            // Closed is never 0 here: 0 means open to the retention sweep.
            set.execute(params![id, close_time(state)?.max(1)])?;
        }
    }
    tx.commit()?;
    tracing::info!(
        table,
        column,
        "store migrated: close time added for retention"
    );
    Ok(())
}

pub(super) fn open_connection(
    path: &Path,
    sync: SyncMode,
    busy_timeout: std::time::Duration,
) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "sqlite did not switch to WAL mode");
    }
    let sync_value = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync_value)?;
    conn.busy_timeout(busy_timeout)?;
    // Checkpoint less often than the default 1,000 pages: a page changed by many commits is then
    // copied into the database once, not once per checkpoint.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    Ok(conn)
}

pub(super) fn decode_run(bytes: Vec<u8>) -> Result<RunState, StoreError> {
    Ok(RunState::decode(bytes.as_slice())?)
}
