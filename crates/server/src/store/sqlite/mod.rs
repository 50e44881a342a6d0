//! The embedded store: SQLite in WAL mode, one writer thread that group-commits.
//!
//! Every batch submitted while the writer is busy joins the next transaction, so one fsync serves
//! many callers; that is what lets a durable server keep up with thousands of requests a second.

mod schema;
mod writer;

use super::api::{
    fold_hand_outs, fold_session_counts, ClosedRows, Commit, Durability, HandOutRow, OnDurable,
    Recovered, RunFilter, Store, StoreError, WriteBatch, CLOSED_RUNS, CLOSED_SESSIONS,
};
use super::group_commit::GroupCommit;
use crate::state::{RunState, SessionState};
use parking_lot::Mutex;
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};
pub use schema::SyncMode;
use schema::{decode_run, migrate, open_connection, SCHEMA};
use std::path::{Path, PathBuf};
use tether_core::types::{Namespace, RunId, SessionId};
use tether_wire::pb::{ExecutionStatus, HistoryEvent, NamespaceInfo};
use writer::commit_jobs;

/// How long a commit waits for another process's lock on the database file before it fails.
pub const DEFAULT_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    writer: GroupCommit,
    reader: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path, sync: SyncMode) -> Result<Self, StoreError> {
        Self::open_with(data_dir, sync, DEFAULT_BUSY_TIMEOUT)
    }

    /// Like [`SqliteStore::open`], with how long a commit may wait for another process's lock on
    /// the database file before it fails (and stops the store).
    pub fn open_with(
        data_dir: &Path,
        sync: SyncMode,
        busy_timeout: std::time::Duration,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join("tether.db");
        let mut writer_conn = open_connection(&path, sync, busy_timeout)?;
        writer_conn.execute_batch(SCHEMA)?;
        migrate(&mut writer_conn)?;
        let reader = open_connection(&path, sync, busy_timeout)?;
        let writer = GroupCommit::start("tether-store-writer", move |jobs| {
            commit_jobs(&mut writer_conn, jobs)
        })
        .map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(SqliteStore {
            writer,
            reader: Mutex::new(reader),
            path,
        })
    }

    /// How many transactions and batches the writer has committed.
    pub fn stats(&self) -> (u64, u64) {
        self.writer.stats()
    }

    /// Ids of up to `limit` rows of `table` in `namespace` closed before `before_ms`, oldest
    /// first (served by the partial close-time indexes).
    fn closed_before<Id: From<String>>(
        &self,
        rows: &ClosedRows,
        namespace: &str,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Id>, StoreError> {
        let ClosedRows {
            table,
            id,
            closed_at,
        } = rows;
        let conn = self.reader.lock();
        let ids: Vec<String> = conn
            .prepare_cached(&format!(
                "SELECT {id} FROM {table}
                 WHERE namespace = ?1 AND {closed_at} > 0 AND {closed_at} < ?2
                 ORDER BY {closed_at} LIMIT ?3"
            ))?
            .query_map(params![namespace, before_ms, limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(ids.into_iter().map(Id::from).collect())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the writer after it has committed everything already submitted.
    pub fn close(&self) {
        self.writer.close();
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Folds a run's hand-out rows into its state (see [`fold_hand_outs`]).
fn apply_started_rows(conn: &Connection, state: &mut RunState) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT scheduled_event_id, attempt, dispatch, started_ms, worker, instance
         FROM started WHERE run_id = ?1",
    )?;
    let rows = stmt
        .query_map(params![state.run_id], |r| {
            Ok(HandOutRow {
                scheduled_event_id: r.get::<_, i64>(0)? as u64,
                attempt: r.get(1)?,
                dispatch: r.get::<_, i64>(2)? as u64,
                started_ms: r.get(3)?,
                worker: r.get(4)?,
                instance: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    fold_hand_outs(state, rows);
    Ok(())
}

fn read_history(conn: &Connection, run_id: &str) -> Result<Vec<HistoryEvent>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT event FROM events WHERE run_id = ?1 ORDER BY event_id")?;
    let rows = stmt.query_map(params![run_id], |r| r.get::<_, Vec<u8>>(0))?;
    let mut events = Vec::new();
    for row in rows {
        events.push(HistoryEvent::decode(row?.as_slice())?);
    }
    Ok(events)
}

impl Store for SqliteStore {
    fn list_sessions(
        &self,
        namespace: &Namespace,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<SessionState>, StoreError> {
        let conn = self.reader.lock();
        let limit = limit.max(1) as i64;
        // Newest first, ties broken by id, so that a page boundary is exact.
        let rows: Vec<Vec<u8>> = match after {
            None => conn
                .prepare_cached(
                    "SELECT state FROM sessions WHERE namespace = ?1
                     ORDER BY created_ms DESC, session_id DESC LIMIT ?2",
                )?
                .query_map(params![namespace.as_str(), limit], |r| r.get(0))?
                .collect::<Result<_, _>>()?,
            Some((created_ms, session_id)) => conn
                .prepare_cached(
                    "SELECT state FROM sessions WHERE namespace = ?1
                     AND (created_ms, session_id) < (?2, ?3)
                     ORDER BY created_ms DESC, session_id DESC LIMIT ?4",
                )?
                .query_map(
                    params![namespace.as_str(), created_ms, session_id.as_str(), limit],
                    |r| r.get(0),
                )?
                .collect::<Result<_, _>>()?,
        };
        rows.iter()
            .map(|b| Ok(SessionState::decode(b.as_slice())?))
            .collect()
    }

    fn load_session(&self, session_id: &SessionId) -> Result<Option<SessionState>, StoreError> {
        let conn = self.reader.lock();
        let bytes: Option<Vec<u8>> = conn
            .prepare_cached("SELECT state FROM sessions WHERE session_id = ?1")?
            .query_row(params![session_id.as_str()], |r| r.get(0))
            .optional()?;
        bytes
            .map(|b| Ok(SessionState::decode(b.as_slice())?))
            .transpose()
    }

    fn submit_then(&self, batch: WriteBatch, on_durable: Option<OnDurable>) -> Commit {
        self.writer.submit(batch, None, on_durable)
    }

    fn close(&self) {
        SqliteStore::close(self);
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.writer.durability()
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        let conn = self.reader.lock();
        let mut out = Recovered::default();
        {
            let mut stmt = conn.prepare("SELECT info FROM namespaces ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            for row in rows {
                out.namespaces.push(NamespaceInfo::decode(row?.as_slice())?);
            }
        }
        let mut stmt = conn.prepare("SELECT state FROM runs WHERE status = ?1")?;
        let rows = stmt.query_map(params![ExecutionStatus::Running as i32], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut states = Vec::new();
        for row in rows {
            states.push(decode_run(row?)?);
        }
        for mut state in states {
            let history = read_history(&conn, &state.run_id)?;
            apply_started_rows(&conn, &mut state)?;
            out.open_runs.push((state, history));
        }
        let mut stmt = conn.prepare("SELECT state FROM sessions WHERE open = 1")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut sessions = Vec::new();
        for row in rows {
            sessions.push(SessionState::decode(row?.as_slice())?);
        }
        // An open session's count and last use since its row was written are in its
        // hand-out rows. One pass over them: the table holds only the hand-outs of open runs
        // and of open sessions.
        let mut per_session: std::collections::HashMap<String, Vec<(u64, i64)>> =
            Default::default();
        let mut stmt = conn.prepare(
            "SELECT session_id, run_id, MAX(session_activities_run), MAX(started_ms)
             FROM started WHERE session_id != '' GROUP BY session_id, run_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (session_id, run_id, count, used) = row?;
            per_session
                .entry(session_id.clone())
                .or_default()
                .push((count as u64, used));
            out.session_rows
                .push((SessionId::from(session_id), RunId::from(run_id)));
        }
        for mut session in sessions {
            let id = session.info.as_ref().map(|i| i.session_id.as_str());
            if let Some(rows) = id.and_then(|id| per_session.remove(id)) {
                fold_session_counts(&mut session, rows);
            }
            out.open_sessions.push(session);
        }
        Ok(out)
    }

    fn load_run(&self, run_id: &RunId) -> Result<Option<RunState>, StoreError> {
        let conn = self.reader.lock();
        let bytes: Option<Vec<u8>> = conn
            .prepare_cached("SELECT state FROM runs WHERE run_id = ?1")?
            .query_row(params![run_id.as_str()], |r| r.get(0))
            .optional()?;
        bytes.map(decode_run).transpose()
    }

    fn latest_run(
        &self,
        namespace: &Namespace,
        standalone_activity: bool,
        id: &str,
    ) -> Result<Option<RunState>, StoreError> {
        let conn = self.reader.lock();
        let bytes: Option<Vec<u8>> = conn
            .prepare_cached(
                "SELECT state FROM runs WHERE namespace = ?1 AND standalone = ?2 AND workflow_id = ?3
                 ORDER BY start_ms DESC, rowid DESC LIMIT 1",
            )?
            .query_row(params![namespace.as_str(), standalone_activity as i64, id], |r| {
                r.get(0)
            })
            .optional()?;
        bytes.map(decode_run).transpose()
    }

    fn history(&self, run_id: &RunId) -> Result<Vec<HistoryEvent>, StoreError> {
        read_history(&self.reader.lock(), run_id.as_str())
    }

    fn expired_runs(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<RunId>, StoreError> {
        self.closed_before(&CLOSED_RUNS, namespace, closed_before_ms, limit)
    }

    fn expired_sessions(
        &self,
        namespace: &Namespace,
        closed_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.closed_before(&CLOSED_SESSIONS, namespace, closed_before_ms, limit)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunState>, StoreError> {
        let conn = self.reader.lock();
        let limit = filter.limit.max(1) as i64;
        let standalone = filter.standalone_activity as i64;
        // A status of -1 matches every row: one statement serves both filters. Newest first,
        // ties broken by run id, so that a page boundary is exact.
        let status = filter.status.unwrap_or(-1);
        let (after_ms, after_id) = filter
            .after
            .clone()
            // (i64::MAX, "") sorts after every row: the first page.
            .unwrap_or((i64::MAX, RunId::default()));
        let rows: Vec<Vec<u8>> = conn
            .prepare_cached(
                "SELECT state FROM runs WHERE namespace = ?1 AND standalone = ?2
                 AND (?3 = -1 OR status = ?3)
                 AND (start_ms, run_id) < (?4, ?5)
                 ORDER BY start_ms DESC, run_id DESC LIMIT ?6",
            )?
            .query_map(
                params![
                    filter.namespace.as_str(),
                    standalone,
                    status,
                    after_ms,
                    after_id.as_str(),
                    limit
                ],
                |r| r.get(0),
            )?
            .collect::<Result<_, _>>()?;
        rows.into_iter().map(decode_run).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::api::Write;

    fn run(id: &str, status: ExecutionStatus) -> RunState {
        RunState {
            namespace: "default".into(),
            workflow_id: "wf".into(),
            run_id: id.into(),
            status: status as i32,
            start_ms: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_store_from_before_retention_is_migrated_and_purges_only_closed_rows() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The runs table as it was before close_ms existed, with one closed and one open run.
            let conn = Connection::open(dir.path().join("tether.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE runs (run_id TEXT PRIMARY KEY, namespace TEXT NOT NULL,
                 standalone INTEGER NOT NULL, workflow_id TEXT NOT NULL, status INTEGER NOT NULL,
                 start_ms INTEGER NOT NULL, state BLOB NOT NULL);",
            )
            .unwrap();
            conn.execute_batch(
                "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, namespace TEXT NOT NULL,
                 open INTEGER NOT NULL, created_ms INTEGER NOT NULL, state BLOB NOT NULL);",
            )
            .unwrap();
            for (id, open, closed_ms) in [("s-old", 0, 700), ("s-open", 1, 0)] {
                let state = SessionState {
                    info: Some(tether_wire::pb::SessionInfo {
                        session_id: id.into(),
                        namespace: "default".into(),
                        closed_ms,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                conn.execute(
                    "INSERT INTO sessions VALUES (?1, 'default', ?2, 1, ?3)",
                    params![id, open, state.encode_to_vec()],
                )
                .unwrap();
            }
            let mut closed = run("old", ExecutionStatus::Completed);
            closed.close_ms = 500;
            for state in [closed, run("open", ExecutionStatus::Running)] {
                conn.execute(
                    "INSERT INTO runs VALUES (?1, 'default', 0, 'wf', ?2, 1, ?3)",
                    params![state.run_id, state.status, state.encode_to_vec()],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(dir.path(), SyncMode::Normal).unwrap();
        assert!(store
            .expired_runs(&"default".into(), 500, 10)
            .unwrap()
            .is_empty());
        assert_eq!(
            store.expired_runs(&"default".into(), 501, 10).unwrap(),
            vec!["old"]
        );
        // Even when told to, a delete never removes an open run.
        store
            .submit(WriteBatch {
                writes: vec![Write::DeleteRuns {
                    run_ids: vec!["old".into(), "open".into()],
                }],
            })
            .done
            .await
            .unwrap()
            .unwrap();
        assert!(store.load_run(&"old".into()).unwrap().is_none());
        assert!(store.load_run(&"open".into()).unwrap().is_some());
        assert_eq!(
            store.expired_sessions(&"default".into(), 701, 10).unwrap(),
            vec!["s-old"]
        );
        store
            .submit(WriteBatch {
                writes: vec![Write::DeleteSessions {
                    session_ids: vec!["s-old".into(), "s-open".into()],
                }],
            })
            .done
            .await
            .unwrap()
            .unwrap();
        let left: Vec<String> = store
            .list_sessions(&"default".into(), None, 10)
            .unwrap()
            .into_iter()
            .filter_map(|s| s.info.map(|i| i.session_id))
            .collect();
        assert_eq!(left, vec!["s-open"], "an open session is never deleted");
    }

    #[tokio::test]
    async fn committed_batches_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path(), SyncMode::Full).unwrap();
            let batch = WriteBatch {
                writes: vec![
                    Write::Run {
                        state: Box::new(run("r1", ExecutionStatus::Running)),
                        may_own_started: true,
                    },
                    Write::Events {
                        run_id: "r1".into(),
                        events: vec![HistoryEvent {
                            event_id: 1,
                            time_ms: 5,
                            attributes: None,
                        }],
                    },
                    Write::Run {
                        state: Box::new(run("r2", ExecutionStatus::Completed)),
                        may_own_started: true,
                    },
                ],
            };
            store.submit(batch).done.await.unwrap().unwrap();
        }
        let store = SqliteStore::open(dir.path(), SyncMode::Full).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.open_runs.len(), 1, "only the running run is open");
        assert_eq!(recovered.open_runs[0].1.len(), 1);
        assert!(store.load_run(&"r2".into()).unwrap().is_some());
        assert!(store
            .latest_run(&"default".into(), false, "wf")
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn many_concurrent_batches_all_commit_in_fewer_transactions() {
        let dir = tempfile::tempdir().unwrap();
        // FULL: each transaction costs an fsync, so batches queue up behind it and get grouped.
        let store = std::sync::Arc::new(SqliteStore::open(dir.path(), SyncMode::Full).unwrap());
        let receivers: Vec<_> = (0..500)
            .map(|i| {
                store.submit(WriteBatch {
                    writes: vec![Write::Run {
                        state: Box::new(run(&format!("r{i}"), ExecutionStatus::Running)),
                        may_own_started: true,
                    }],
                })
            })
            .collect();
        for r in receivers {
            r.done.await.unwrap().unwrap();
        }
        assert_eq!(store.recover().unwrap().open_runs.len(), 500);
        let (transactions, batches) = store.stats();
        assert_eq!(batches, 500);
        assert!(
            transactions < batches,
            "group commit: {batches} batches took {transactions} transactions"
        );
    }

    #[tokio::test]
    async fn the_first_failed_commit_stops_every_later_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(
            dir.path(),
            SyncMode::Normal,
            std::time::Duration::from_millis(100),
        )
        .unwrap();
        let put = |id: &str| WriteBatch {
            writes: vec![Write::Run {
                state: Box::new(run(id, ExecutionStatus::Running)),
                may_own_started: true,
            }],
        };
        store.submit(put("before")).done.await.unwrap().unwrap();
        // Another process holds the write lock longer than the busy timeout.
        let other = Connection::open(dir.path().join("tether.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let failed = store.submit(put("during"));
        let behind = store.submit(put("behind"));
        assert!(failed.done.await.unwrap().is_err());
        other.execute_batch("ROLLBACK").unwrap();
        // The lock is gone, but nothing after the failure may land.
        assert!(behind.done.await.unwrap().is_err());
        let later = store.submit(put("later"));
        assert!(later.done.await.unwrap().is_err());
        let durability = store.durability().borrow().clone();
        assert_eq!(durability.seq, 1, "only the first batch is durable");
        assert!(durability.failed.is_some());
        drop(store);
        let store = SqliteStore::open(dir.path(), SyncMode::Normal).unwrap();
        let ids: Vec<String> = store
            .recover()
            .unwrap()
            .open_runs
            .into_iter()
            .map(|(s, _)| s.run_id)
            .collect();
        assert_eq!(ids, vec!["before"]);
    }

    #[test]
    fn the_lookups_on_every_commit_use_an_index() {
        // A scan here costs a commit time proportional to the table: it showed as a 30% slower
        // session benchmark once.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SyncMode::Normal).unwrap();
        let conn = store.reader.lock();
        for sql in [
            "DELETE FROM started WHERE run_id = ?1 AND session_id = ?2",
            "DELETE FROM started WHERE run_id = ?1 AND session_id = ''",
            "UPDATE started SET session_id = '' WHERE run_id = ?1 AND session_id = ?2",
        ] {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let values = vec!["x"; explain.parameter_count()];
            let plan: Vec<String> = explain
                .query_map(rusqlite::params_from_iter(values), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| !step.starts_with("SCAN")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_sessions_hand_out_rows_go_with_it_but_those_of_runs_still_open() {
        use tether_wire::pb::SessionInfo;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SyncMode::Normal).unwrap();
        let session = |state: &str| Write::Session {
            state: Box::new(SessionState {
                info: Some(SessionInfo {
                    session_id: "s".into(),
                    namespace: "default".into(),
                    state: state.into(),
                    created_ms: 1,
                    closed_ms: if state == "open" { 0 } else { 5 },
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let handed_out = |run_id: &str, count: u64| Write::Started {
            run_id: run_id.into(),
            scheduled_event_id: 1,
            attempt: 1,
            dispatch: count,
            started_ms: 10,
            worker: "w".into(),
            instance: "w-process".into(),
            session_id: Some("s".into()),
            session_activities_run: count,
        };
        let commit = |writes: Vec<Write>| {
            let done = store.submit(WriteBatch { writes }).done;
            async move { done.await.unwrap().unwrap() }
        };
        commit(vec![
            session("open"),
            Write::Run {
                state: Box::new(run("r-running", ExecutionStatus::Running)),
                may_own_started: false,
            },
            Write::Run {
                state: Box::new(run("r-done", ExecutionStatus::Running)),
                may_own_started: false,
            },
            handed_out("r-running", 1),
            handed_out("r-done", 2),
        ])
        .await;
        // r-done closes while the session is open: its row keeps the session's count.
        commit(vec![Write::Run {
            state: Box::new(run("r-done", ExecutionStatus::Completed)),
            may_own_started: false,
        }])
        .await;
        let rows = || -> Vec<(String, String)> {
            let conn = store.reader.lock();
            let mut stmt = conn
                .prepare("SELECT run_id, session_id FROM started ORDER BY run_id")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(
            rows(),
            vec![
                ("r-done".into(), "s".into()),
                ("r-running".into(), "s".into())
            ]
        );
        let recovered = store.recover().unwrap();
        let mut session_rows = recovered.session_rows.clone();
        session_rows.sort();
        assert_eq!(
            session_rows,
            vec![
                ("s".into(), "r-done".into()),
                ("s".into(), "r-running".into())
            ],
            "a closed run's rows are found for its session too"
        );
        let count = recovered.open_sessions[0]
            .info
            .as_ref()
            .unwrap()
            .activities_run;
        assert_eq!(count, 2, "the session's count comes from its rows");
        commit(vec![
            session("completed"),
            Write::ReleaseSessionRows {
                session_id: "s".into(),
                runs_still_open: vec!["r-running".into()],
                runs_closed: vec!["r-done".into()],
            },
        ])
        .await;
        assert_eq!(
            rows(),
            vec![("r-running".into(), String::new())],
            "the closed session's rows are gone, but the one of the run still open, now its own"
        );
        let recovered = store.recover().unwrap();
        let running = recovered
            .open_runs
            .iter()
            .find(|(s, _)| s.run_id == "r-running");
        assert!(running.is_some(), "{:?}", recovered.open_runs);
        commit(vec![Write::Run {
            state: Box::new(run("r-running", ExecutionStatus::Completed)),
            may_own_started: true,
        }])
        .await;
        assert_eq!(
            rows(),
            Vec::<(String, String)>::new(),
            "its row went with it"
        );
    }
}
