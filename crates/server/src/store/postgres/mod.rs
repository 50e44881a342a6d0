//! The PostgreSQL store: the same rows and the same contract as the SQLite store (the tests in
//! `store::contract` run against both), on a shared database that several servers can reach.
//!
//! The driver is async (tokio-postgres, with a deadpool pool of connections) while the
//! [`Store`] trait is synchronous: the store runs its own small tokio runtime, and each call
//! hands its query to that runtime and waits for the answer. Writes go through the same group
//! commit as SQLite's (`store::group_commit`): one PostgreSQL transaction per group of batches,
//! acknowledged only after `COMMIT` returns.

mod cluster;
mod leases;
mod schema;
mod writer;

pub use cluster::TestCluster;

use super::api::{
    fold_hand_outs, fold_session_counts, ClosedRows, Commit, Durability, Fence, HandOutRow,
    OnDurable, Recovered, RunFilter, Store, StoreError, WriteBatch, CLOSED_RUNS, CLOSED_SESSIONS,
};
use super::group_commit::GroupCommit;
use crate::state::{RunState, SessionState};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use prost::Message;
use std::collections::HashMap;
use std::future::Future;
use tether_core::types::{Namespace, RunId, SessionId};
use tether_wire::pb::{ExecutionStatus, HistoryEvent, NamespaceInfo};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

/// Connections the pool keeps for reads and lease work (the writer has one of its own).
const POOL_SIZE: usize = 8;

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    /// Taken only on drop (shut down in the background: the store may be dropped inside
    /// another runtime, where a blocking shutdown is not allowed).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    writer: GroupCommit,
}

impl PostgresStore {
    /// Connects to the database `url` names (`postgres://user@host:port/database`), creates or
    /// migrates its tables, and starts the writer.
    pub fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Postgres(format!(
                "{} is not a PostgreSQL URL ({e}); give postgres://USER@HOST:PORT/DATABASE",
                redact(url)
            ))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tether-postgres")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: "the PostgreSQL store's runtime".into(),
                source,
            })?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let setup = pool.clone();
        run_on(&runtime, async move {
            let client = setup.get().await.map_err(pool_error)?;
            client.batch_execute(schema::SCHEMA).await?;
            Ok(())
        })
        .map_err(|e| match e {
            StoreError::Postgres(why) => StoreError::Postgres(format!(
                "could not reach or set up the database at {}: {why}",
                redact(url)
            )),
            other => other,
        })?;
        let mut writer = writer::Writer::new(config).map_err(|source| StoreError::Io {
            path: "the PostgreSQL store's writer".into(),
            source,
        })?;
        let writer = GroupCommit::start("tether-postgres-writer", move |jobs| writer.commit(jobs))
            .map_err(|source| StoreError::Io {
                path: "the PostgreSQL store's writer".into(),
                source,
            })?;
        Ok(PostgresStore {
            runtime: Some(runtime),
            pool,
            writer,
        })
    }

    /// Queues a batch written under a namespace lease: it commits only while the lease is
    /// still the fence's (see [`Fence`]).
    pub fn submit_fenced(&self, batch: WriteBatch, fence: Fence) -> Commit {
        self.submit_fenced_then(batch, fence, None)
    }

    /// [`PostgresStore::submit_fenced`], with what to run once it is durable (see
    /// [`OnDurable`]).
    pub fn submit_fenced_then(
        &self,
        batch: WriteBatch,
        fence: Fence,
        on_durable: Option<OnDurable>,
    ) -> Commit {
        self.writer.submit(batch, Some(fence), on_durable)
    }

    /// What recovery reads, of one namespace (a replica taking it over) or of all. Five
    /// queries whatever the number of open runs: a takeover reloads thousands of runs in well
    /// under a second.
    pub fn recover_namespaces(&self, only: Option<&Namespace>) -> Result<Recovered, StoreError> {
        let only: Option<String> = only.map(|n| n.to_string());
        self.query(move |client| async move {
            let mut out = Recovered::default();
            for row in client
                .query(
                    "SELECT info FROM namespaces WHERE ($1::text IS NULL OR name = $1) ORDER BY name",
                    &[&only],
                )
                .await?
            {
                out.namespaces
                    .push(NamespaceInfo::decode(row.get::<_, &[u8]>(0))?);
            }
            let running = ExecutionStatus::Running as i32;
            let mut runs: Vec<RunState> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            for row in client
                .query(
                    "SELECT state FROM runs WHERE close_ms = 0 AND status = $1
                     AND ($2::text IS NULL OR namespace = $2) ORDER BY row_order",
                    &[&running, &only],
                )
                .await?
            {
                let state = decode_run(row.get(0))?;
                index.insert(state.run_id.clone(), runs.len());
                runs.push(state);
            }
            let mut histories: Vec<Vec<HistoryEvent>> = vec![Vec::new(); runs.len()];
            for row in client
                .query(
                    "SELECT e.run_id, e.event FROM events e JOIN runs r ON r.run_id = e.run_id
                     WHERE r.close_ms = 0 AND r.status = $1 AND ($2::text IS NULL OR r.namespace = $2)
                     ORDER BY e.run_id, e.event_id",
                    &[&running, &only],
                )
                .await?
            {
                if let Some(&i) = index.get(row.get::<_, &str>(0)) {
                    histories[i].push(HistoryEvent::decode(row.get::<_, &[u8]>(1))?);
                }
            }
            let mut hand_outs: Vec<Vec<HandOutRow>> = vec![Vec::new(); runs.len()];
            for r in client
                .query(
                    "SELECT s.run_id, s.scheduled_event_id, s.attempt, s.dispatch, s.started_ms,
                            s.worker, s.instance
                     FROM started s JOIN runs r ON r.run_id = s.run_id
                     WHERE r.close_ms = 0 AND r.status = $1 AND ($2::text IS NULL OR r.namespace = $2)",
                    &[&running, &only],
                )
                .await?
            {
                if let Some(&i) = index.get(r.get::<_, &str>(0)) {
                    hand_outs[i].push(HandOutRow {
                        scheduled_event_id: r.get::<_, i64>(1) as u64,
                        attempt: r.get::<_, i32>(2) as u32,
                        dispatch: r.get::<_, i64>(3) as u64,
                        started_ms: r.get(4),
                        worker: r.get(5),
                        instance: r.get(6),
                    });
                }
            }
            for ((mut state, history), rows) in runs.into_iter().zip(histories).zip(hand_outs) {
                fold_hand_outs(&mut state, rows);
                out.open_runs.push((state, history));
            }
            // An open session's count and last use since its row was written are in its
            // hand-out rows. A row's namespace is its run's (a session's runs are all of the
            // session's namespace).
            let mut per_session: HashMap<String, Vec<(u64, i64)>> = HashMap::new();
            let rows = client
                .query(
                    "SELECT s.session_id, s.run_id, MAX(s.session_activities_run), MAX(s.started_ms)
                     FROM started s JOIN runs r ON r.run_id = s.run_id
                     WHERE s.session_id <> '' AND ($1::text IS NULL OR r.namespace = $1)
                     GROUP BY s.session_id, s.run_id ORDER BY s.session_id, s.run_id",
                    &[&only],
                )
                .await?;
            for row in rows {
                let (session_id, run_id): (String, String) = (row.get(0), row.get(1));
                per_session
                    .entry(session_id.clone())
                    .or_default()
                    .push((row.get::<_, i64>(2) as u64, row.get::<_, i64>(3)));
                out.session_rows
                    .push((SessionId::from(session_id), RunId::from(run_id)));
            }
            let sessions = client
                .query(
                    "SELECT state FROM sessions WHERE open AND ($1::text IS NULL OR namespace = $1)
                     ORDER BY row_order",
                    &[&only],
                )
                .await?;
            for row in sessions {
                let mut session = decode_session(row.get(0))?;
                let id = session.info.as_ref().map(|i| i.session_id.clone());
                if let Some(rows) = id.and_then(|id| per_session.remove(&id)) {
                    fold_session_counts(&mut session, rows);
                }
                out.open_sessions.push(session);
            }
            Ok(out)
        })
    }

    /// How many transactions and batches the writer has committed.
    pub fn stats(&self) -> (u64, u64) {
        self.writer.stats()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("taken only on drop")
    }

    /// Runs a query on the store's runtime and waits for it. Called from threads that may
    /// be inside another runtime (the engine's blocking pool, tests): the wait is a plain
    /// blocking one, never a nested `block_on`.
    fn query<T, F, Fut>(&self, run: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        run_on(self.runtime(), async move {
            let client = pool.get().await.map_err(pool_error)?;
            run(client).await
        })
    }

    /// Ids of up to `limit` rows of `table` in `namespace` closed before `before_ms`, oldest
    /// first (served by the partial close-time indexes).
    fn closed_before<Id: From<String> + Send + 'static>(
        &self,
        rows: &ClosedRows,
        namespace: &Namespace,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<Id>, StoreError> {
        let ClosedRows {
            table,
            id,
            closed_at,
        } = rows;
        let sql = format!(
            "SELECT {id} FROM {table}
             WHERE namespace = $1 AND {closed_at} > 0 AND {closed_at} < $2
             ORDER BY {closed_at}, {id} LIMIT $3"
        );
        let namespace = namespace.to_string();
        self.query(move |client| async move {
            let rows = client
                .query(&sql, &[&namespace, &before_ms, &(limit as i64)])
                .await?;
            Ok(rows
                .iter()
                .map(|r| Id::from(r.get::<_, String>(0)))
                .collect())
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.writer.close();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `work` on `runtime` from a thread that may itself be in a runtime, and waits.
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv().map_err(|_| StoreError::WriterGone)?
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Postgres(format!("no connection to the database: {e}"))
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn decode_run(bytes: &[u8]) -> Result<RunState, StoreError> {
    Ok(RunState::decode(bytes)?)
}

fn decode_session(bytes: &[u8]) -> Result<SessionState, StoreError> {
    Ok(SessionState::decode(bytes)?)
}

async fn read_history(
    client: &deadpool_postgres::Object,
    run_id: &str,
) -> Result<Vec<HistoryEvent>, StoreError> {
    let rows = client
        .query(
            "SELECT event FROM events WHERE run_id = $1 ORDER BY event_id",
            &[&run_id],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(HistoryEvent::decode(r.get::<_, &[u8]>(0))?))
        .collect()
}

impl Store for PostgresStore {
    fn submit_then(&self, batch: WriteBatch, on_durable: Option<OnDurable>) -> Commit {
        self.writer.submit(batch, None, on_durable)
    }

    fn close(&self) {
        self.writer.close();
    }

    fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.writer.durability()
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        self.recover_namespaces(None)
    }

    fn load_run(&self, run_id: &RunId) -> Result<Option<RunState>, StoreError> {
        let run_id = run_id.to_string();
        self.query(move |client| async move {
            let row = client
                .query_opt("SELECT state FROM runs WHERE run_id = $1", &[&run_id])
                .await?;
            row.map(|r| decode_run(r.get(0))).transpose()
        })
    }

    fn latest_run(
        &self,
        namespace: &Namespace,
        standalone_activity: bool,
        id: &str,
    ) -> Result<Option<RunState>, StoreError> {
        let (namespace, id) = (namespace.to_string(), id.to_string());
        self.query(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT state FROM runs
                     WHERE namespace = $1 AND standalone = $2 AND workflow_id = $3
                     ORDER BY start_ms DESC, row_order DESC LIMIT 1",
                    &[&namespace, &standalone_activity, &id],
                )
                .await?;
            row.map(|r| decode_run(r.get(0))).transpose()
        })
    }

    fn history(&self, run_id: &RunId) -> Result<Vec<HistoryEvent>, StoreError> {
        let run_id = run_id.to_string();
        self.query(move |client| async move { read_history(&client, &run_id).await })
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunState>, StoreError> {
        let filter = filter.clone();
        self.query(move |client| async move {
            // A status of -1 matches every row; (i64::MAX, "") sorts after every row.
            let status = filter.status.unwrap_or(-1);
            let (after_ms, after_id) = filter
                .after
                .map(|(ms, id)| (ms, id.to_string()))
                .unwrap_or((i64::MAX, String::new()));
            let params: [&(dyn ToSql + Sync); 6] = [
                &filter.namespace.as_str(),
                &filter.standalone_activity,
                &status,
                &after_ms,
                &after_id,
                &(filter.limit.max(1) as i64),
            ];
            let rows = client
                .query(
                    "SELECT state FROM runs WHERE namespace = $1 AND standalone = $2
                     AND ($3 = -1 OR status = $3)
                     AND (start_ms, run_id) < ($4, $5)
                     ORDER BY start_ms DESC, run_id DESC LIMIT $6",
                    &params,
                )
                .await?;
            rows.iter().map(|r| decode_run(r.get(0))).collect()
        })
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

    fn list_sessions(
        &self,
        namespace: &Namespace,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<SessionState>, StoreError> {
        let namespace = namespace.to_string();
        self.query(move |client| async move {
            // Newest first, ties broken by id, so that a page boundary is exact.
            let (after_ms, after_id) = after
                .map(|(ms, id)| (ms, id.to_string()))
                .unwrap_or((i64::MAX, String::new()));
            let params: [&(dyn ToSql + Sync); 4] =
                [&namespace, &after_ms, &after_id, &(limit.max(1) as i64)];
            let rows = client
                .query(
                    "SELECT state FROM sessions WHERE namespace = $1
                     AND (created_ms, session_id) < ($2, $3)
                     ORDER BY created_ms DESC, session_id DESC LIMIT $4",
                    &params,
                )
                .await?;
            rows.iter().map(|r| decode_session(r.get(0))).collect()
        })
    }

    fn load_session(&self, session_id: &SessionId) -> Result<Option<SessionState>, StoreError> {
        let session_id = session_id.to_string();
        self.query(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT state FROM sessions WHERE session_id = $1",
                    &[&session_id],
                )
                .await?;
            row.map(|r| decode_session(r.get(0))).transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::api::Write;

    fn running(id: &str) -> Write {
        Write::Run {
            state: Box::new(RunState {
                namespace: "default".into(),
                workflow_id: "wf".into(),
                run_id: id.into(),
                status: ExecutionStatus::Running as i32,
                start_ms: 1,
                ..Default::default()
            }),
            may_own_started: false,
        }
    }

    /// `running(id)` closed, its own hand-out rows going with it.
    fn completed(id: &str) -> Write {
        let Write::Run { mut state, .. } = running(id) else {
            unreachable!()
        };
        state.status = ExecutionStatus::Completed as i32;
        state.close_ms = 2;
        Write::Run {
            state,
            may_own_started: true,
        }
    }

    fn event_of(run_id: &str) -> Write {
        Write::Events {
            run_id: run_id.into(),
            events: vec![HistoryEvent {
                event_id: 1,
                time_ms: 1,
                attributes: None,
            }],
        }
    }

    fn handed_out(run_id: &str) -> Write {
        Write::Started {
            run_id: run_id.into(),
            scheduled_event_id: 1,
            attempt: 1,
            dispatch: 1,
            started_ms: 1,
            worker: "w".into(),
            instance: "w-1".into(),
            session_id: None,
            session_activities_run: 0,
        }
    }

    fn running_in(namespace: &str, id: &str) -> Write {
        match running(id) {
            Write::Run {
                mut state,
                may_own_started,
            } => {
                state.namespace = namespace.into();
                Write::Run {
                    state,
                    may_own_started,
                }
            }
            _ => unreachable!(),
        }
    }

    /// A store on a database of a cluster of the test's own (stopped when it is dropped).
    async fn store_on_a_new_cluster(database: &str) -> (TestCluster, String, PostgresStore) {
        let cluster =
            TestCluster::start().unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"));
        let url = cluster.create_database(database).await.unwrap();
        let store = PostgresStore::connect(&url).unwrap();
        (cluster, url, store)
    }

    /// A connection of the test's own, beside the store's: another replica, an administrator.
    async fn side_connection(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// The epoch a claim that had to wait got.
    async fn claimed(claiming: tokio::task::JoinHandle<Result<Option<i64>, StoreError>>) -> i64 {
        claiming
            .await
            .unwrap()
            .unwrap()
            .expect("claimed once it could")
    }

    fn fence(owner: &str, namespace: &str, epoch: i64) -> Fence {
        Fence {
            owner: owner.into(),
            namespace: namespace.into(),
            epoch,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_plans_each_of_its_statements_once() {
        // Planning the fence check again at every commit cost more than running it (see
        // `writer::Connection::open`). pg_stat_statements counts plans; it ships with
        // PostgreSQL (Debian: in the postgresql-15 package).
        let cluster = TestCluster::start_with_settings(&[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track_planning=on",
        ])
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL with pg_stat_statements: {e}"));
        let url = cluster.create_database("plans").await.unwrap();
        let side = side_connection(&url).await;
        side.batch_execute("CREATE EXTENSION pg_stat_statements")
            .await
            .unwrap();
        let store = PostgresStore::connect(&url).unwrap();
        let ns = Namespace::from("default");
        let epoch = store.claim_lease("r1", &ns, 60_000).unwrap().unwrap();
        const COMMITS: i64 = 20;
        for i in 0..COMMITS {
            let id = format!("run-{i}");
            // Runs, events and hand-out rows: one statement. With a close after a hand-out of
            // the same run: one by one.
            for writes in [
                vec![running(&id), event_of(&id), handed_out(&id)],
                vec![running(&id), event_of(&id), handed_out(&id), completed(&id)],
            ] {
                store
                    .submit_fenced(WriteBatch { writes }, fence("r1", "default", epoch))
                    .done
                    .await
                    .unwrap()
                    .expect("the write lands");
            }
        }
        let rows = side
            .query(
                "SELECT query, calls, plans FROM pg_stat_statements
                 WHERE query LIKE 'SELECT tether_fence_lost%' OR query LIKE 'INSERT INTO runs%'
                    OR query LIKE 'INSERT INTO events%' OR query LIKE 'INSERT INTO started%'
                    OR query LIKE 'WITH held AS%'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.len(),
            5,
            "the one-statement write, the fence check and the three inserts ran"
        );
        for row in rows {
            let (query, calls, plans): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(calls, COMMITS, "{query}");
            assert!(
                plans <= 1,
                "planned {plans} times in {calls} calls: {query}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_forgets_replicas_long_gone_but_not_one_that_holds_a_lease() {
        let (_cluster, url, store) = store_on_a_new_cluster("replicas").await;
        for id in ["gone", "holder", "recent"] {
            store
                .register_replica(id, &format!("http://{id}:7233"))
                .unwrap();
        }
        store
            .claim_lease("holder", &Namespace::from("default"), 60_000)
            .unwrap()
            .expect("a free lease is taken");
        let side = side_connection(&url).await;
        side.batch_execute(
            "UPDATE replicas SET seen_at = now() - interval '2 hours'
             WHERE replica_id IN ('gone', 'holder')",
        )
        .await
        .unwrap();
        store.register_replica("new", "http://new:7233").unwrap();
        let mut listed: Vec<String> = store
            .cluster_view()
            .unwrap()
            .replicas
            .into_iter()
            .map(|r| r.replica_id)
            .collect();
        listed.sort();
        assert_eq!(listed, ["holder", "new", "recent"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_under_a_lost_lease_lands_nothing_and_other_namespaces_go_on() {
        let (_cluster, url, store) = store_on_a_new_cluster("fencing").await;
        let (a, b) = (Namespace::from("ns-a"), Namespace::from("ns-b"));
        // The store's calls block on its own runtime, so a test may make them from here.
        let epoch_a = store.claim_lease("r1", &a, 60_000).unwrap().unwrap();
        let epoch_b = store.claim_lease("r1", &b, 60_000).unwrap().unwrap();
        let write = |ns: &str, id: &str, f: Fence| {
            store
                .submit_fenced(
                    WriteBatch {
                        writes: vec![running_in(ns, id)],
                    },
                    f,
                )
                .done
        };
        write("ns-a", "before", fence("r1", "ns-a", epoch_a))
            .await
            .unwrap()
            .unwrap();
        // Another replica takes ns-a over (its lease lapsed, as a paused replica's does).
        let other = side_connection(&url).await;
        other
            .batch_execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE namespace = 'ns-a'")
            .await
            .unwrap();
        let epoch_new = store
            .claim_lease("r2", &a, 60_000)
            .unwrap()
            .expect("a lapsed lease can be taken over");
        assert_eq!(epoch_new, epoch_a + 1);
        let refused = write("ns-a", "after", fence("r1", "ns-a", epoch_a))
            .await
            .unwrap();
        let why = refused.unwrap_err();
        assert!(why.contains("no longer holds the lease"), "{why}");
        assert!(
            store.load_run(&"after".into()).unwrap().is_none(),
            "nothing of it landed"
        );
        // The old holder's other namespace goes on; its later writes to ns-a fail too (each
        // builds on the one that failed), while the new holder's land.
        write("ns-b", "other", fence("r1", "ns-b", epoch_b))
            .await
            .unwrap()
            .unwrap();
        assert!(write("ns-a", "later", fence("r1", "ns-a", epoch_a))
            .await
            .unwrap()
            .is_err());
        write("ns-a", "new-holder", fence("r2", "ns-a", epoch_new))
            .await
            .unwrap()
            .unwrap();
        assert!(store.load_run(&"later".into()).unwrap().is_none());
        assert!(store.load_run(&"new-holder".into()).unwrap().is_some());
        // A lease that lapsed with nobody taking it over refuses its old holder's writes too.
        other
            .batch_execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE namespace = 'ns-b'")
            .await
            .unwrap();
        assert!(write("ns-b", "lapsed", fence("r1", "ns-b", epoch_b))
            .await
            .unwrap()
            .is_err());
        assert!(store.load_run(&"lapsed".into()).unwrap().is_none());
        assert!(
            store.durability().borrow().failed.is_none(),
            "the store itself goes on"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_replaces_a_connection_the_database_closed_while_it_was_idle() {
        let (_cluster, url, store) = store_on_a_new_cluster("writer_reconnect").await;
        let write = |id: &str| {
            store
                .submit(WriteBatch {
                    writes: vec![running(id)],
                })
                .done
        };
        write("first").await.unwrap().unwrap();
        // What an administrator's pg_terminate_backend, or an idle-session timeout, does.
        let admin = side_connection(&url).await;
        let writers = "FROM pg_stat_activity WHERE application_name = 'tether writer'";
        let terminated = admin
            .query(&format!("SELECT pg_terminate_backend(pid) {writers}"), &[])
            .await
            .unwrap();
        assert_eq!(terminated.len(), 1, "the writer's connection is named");
        // Until its backend is gone, a write could still reach it.
        while !admin
            .query(&format!("SELECT pid {writers}"), &[])
            .await
            .unwrap()
            .is_empty()
        {
            tokio::task::yield_now().await;
        }
        write("second")
            .await
            .unwrap()
            .expect("the write goes through a new connection");
        assert!(store.load_run(&"second".into()).unwrap().is_some());
        assert!(store.durability().borrow().failed.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_waits_for_the_transaction_that_passed_the_fence() {
        let cluster =
            TestCluster::start().unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"));
        let url = cluster.create_database("fence_order").await.unwrap();
        let store = std::sync::Arc::new(PostgresStore::connect(&url).unwrap());
        let ns = Namespace::from("ns-o");
        let epoch = store.claim_lease("r1", &ns, 60_000).unwrap().unwrap();
        // The old holder's transaction passes the fence and is still open when its lease
        // lapses and another replica claims it.
        let old = side_connection(&url).await;
        old.batch_execute("BEGIN").await.unwrap();
        let names = vec!["ns-o".to_string()];
        old.execute(schema::FENCE_LOCK, &[&names]).await.unwrap();
        old.execute(schema::FENCE_CHECK, &[&"r1", &names, &vec![epoch]])
            .await
            .unwrap();
        let admin = side_connection(&url).await;
        admin
            .batch_execute("UPDATE leases SET expires_at = now() - interval '1 second'")
            .await
            .unwrap();
        let claiming = {
            let (store, ns) = (store.clone(), ns.clone());
            tokio::task::spawn_blocking(move || store.claim_lease("r2", &ns, 60_000))
        };
        // The claim is held back by the open transaction: it cannot finish before it.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!claiming.is_finished(), "the takeover did not wait");
        old.execute(
            "INSERT INTO namespaces (name, info) VALUES ('written-before', '')",
            &[],
        )
        .await
        .unwrap();
        old.batch_execute("COMMIT").await.unwrap();
        assert_eq!(claimed(claiming).await, epoch + 1);
        let seen = admin
            .query(
                "SELECT name FROM namespaces WHERE name = 'written-before'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            seen.len(),
            1,
            "what passed the fence committed before the takeover"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_deletes_hand_out_rows_by_index_after_the_table_was_analyzed_small() {
        let (_cluster, url, _store) = store_on_a_new_cluster("plans_small").await;
        let side = side_connection(&url).await;
        side.batch_execute(writer::SESSION_SETTINGS).await.unwrap();
        // What an autovacuum ANALYZE between two bursts sees (see SESSION_SETTINGS): a few
        // rows, a page or two.
        side.batch_execute(
            "INSERT INTO started (run_id, scheduled_event_id, attempt, dispatch, started_ms,
                                  worker, instance)
             SELECT 'r' || g, 1, 1, 1, 1, 'w', 'i' FROM generate_series(1, 30) g;
             ANALYZE started;",
        )
        .await
        .unwrap();
        side.batch_execute(&format!(
            "PREPARE delete_own(text[]) AS {}",
            schema::DELETE_OWN_STARTED_OF_RUNS
        ))
        .await
        .unwrap();
        let plan: Vec<String> = side
            .simple_query("EXPLAIN EXECUTE delete_own(ARRAY['r1'])")
            .await
            .unwrap()
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        assert!(
            plan.iter().any(|line| line.contains("started_pkey"))
                && !plan.iter().any(|line| line.contains("Seq Scan")),
            "the plan: {plan:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_waits_for_a_one_statement_write_that_passed_the_fence() {
        let (_cluster, url, store) = store_on_a_new_cluster("fence_row_lock").await;
        let store = std::sync::Arc::new(store);
        let ns = Namespace::from("ns-r");
        const LEASE_MS: u64 = 1_000;
        let epoch = store.claim_lease("r1", &ns, LEASE_MS).unwrap().unwrap();
        // The writer's one statement, run inside a transaction left open: it has passed the
        // fence and holds the lease's row when the lease lapses and another replica claims it.
        let old = side_connection(&url).await;
        let statement = old
            .prepare(&schema::one_statement_write(true))
            .await
            .unwrap();
        let (names, epochs) = (vec!["ns-r".to_string()], vec![epoch]);
        let text = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        old.batch_execute("BEGIN").await.unwrap();
        old.execute(
            &statement,
            &[
                &"r1",
                &names,
                &epochs,
                &Vec::<String>::new(),
                &text(&["written-before"]),
                &text(&["ns-r"]),
                &vec![false],
                &text(&["wf"]),
                &vec![ExecutionStatus::Running as i32],
                &vec![1i64],
                &vec![Vec::<u8>::new()],
                &vec![0i64],
                &Vec::<String>::new(),
                &Vec::<i64>::new(),
                &Vec::<Vec<u8>>::new(),
                // No hand-out rows.
                &Vec::<String>::new(),
                &Vec::<i64>::new(),
                &Vec::<i32>::new(),
                &Vec::<i64>::new(),
                &Vec::<i64>::new(),
                &Vec::<String>::new(),
                &Vec::<String>::new(),
                &Vec::<String>::new(),
                &Vec::<i64>::new(),
            ],
        )
        .await
        .unwrap();
        // The lease lapses by the clock (an UPDATE of its row would wait for the lock too).
        tokio::time::sleep(std::time::Duration::from_millis(LEASE_MS + 100)).await;
        let claiming = {
            let (store, ns) = (store.clone(), ns.clone());
            tokio::task::spawn_blocking(move || store.claim_lease("r2", &ns, 60_000))
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!claiming.is_finished(), "the takeover did not wait");
        old.batch_execute("COMMIT").await.unwrap();
        assert_eq!(claimed(claiming).await, epoch + 1);
        assert!(
            store.load_run(&"written-before".into()).unwrap().is_some(),
            "what passed the fence committed before the takeover"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_waited_for_a_takeover_sees_it_and_lands_nothing() {
        let (_cluster, url, store) = store_on_a_new_cluster("fence_snapshot").await;
        let ns = Namespace::from("ns-s");
        let epoch = store.claim_lease("r1", &ns, 60_000).unwrap().unwrap();
        // A takeover half done: it holds the namespace's lock and has changed the lease, but
        // not committed yet.
        let takeover = side_connection(&url).await;
        takeover
            .batch_execute(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(7233, hashtext('ns-s'));
                 UPDATE leases SET owner = 'r2', epoch = epoch + 1 WHERE namespace = 'ns-s';",
            )
            .await
            .unwrap();
        let write = store.submit_fenced(
            WriteBatch {
                writes: vec![running_in("ns-s", "during-takeover")],
            },
            fence("r1", "ns-s", epoch),
        );
        // The old holder's fence is waiting for the lock (its lease, as last committed, is
        // still its own)...
        let admin = side_connection(&url).await;
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while admin
            .query("SELECT 1 FROM pg_locks WHERE NOT granted", &[])
            .await
            .unwrap()
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < give_up,
                "the write never waited for the lease the takeover holds"
            );
            tokio::task::yield_now().await;
        }
        // ...when the takeover commits: the check must read the lease as it is now.
        takeover.batch_execute("COMMIT").await.unwrap();
        let why = write.done.await.unwrap().unwrap_err();
        assert!(why.contains("no longer holds the lease"), "{why}");
        assert!(store.load_run(&"during-takeover".into()).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_that_fails_half_way_writes_nothing_and_stops_the_store() {
        let (_cluster, url, store) = store_on_a_new_cluster("half_way").await;
        let batch = |writes| WriteBatch { writes };
        store
            .submit(batch(vec![running("before"), event_of("before")]))
            .done
            .await
            .unwrap()
            .unwrap();
        // Another client takes the events table away: the group's second statement fails.
        let other = side_connection(&url).await;
        other.batch_execute("DROP TABLE events").await.unwrap();
        let failed = store.submit(batch(vec![running("during"), event_of("during")]));
        let why = failed.done.await.unwrap().unwrap_err();
        assert!(why.contains("events"), "{why}");
        assert!(
            store.load_run(&"during".into()).unwrap().is_none(),
            "the run written before the failing statement was rolled back with it"
        );
        assert!(store.load_run(&"before".into()).unwrap().is_some());
        let later = store.submit(batch(vec![running("later")]));
        assert!(
            later.done.await.unwrap().is_err(),
            "nothing lands after a failure"
        );
        assert!(store.durability().borrow().failed.is_some());
    }
}
