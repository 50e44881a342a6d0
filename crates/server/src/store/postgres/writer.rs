//! The PostgreSQL store's writer: each group of batches the group commit hands it becomes one
//! pipelined transaction on a connection of its own.

use super::schema;
use crate::state::RunState;
use crate::store::api::{Fence, StoreError, Write};
use crate::store::group_commit::Job;
use prost::Message;
use std::collections::{HashMap, HashSet};
use tether_wire::pb::{ExecutionStatus, HistoryEvent};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

/// One statement of a transaction, with its values.
type Planned = (tokio_postgres::Statement, Values);

/// The writer's own connection, driven on the writer thread by a runtime of its own: a commit
/// then costs no hop between threads on its way to the database and back. (Through a pooled
/// connection driven on the store's multi-threaded runtime, W2's p50, two commits a round trip,
/// was 2.18 ms; with this, 1.44–1.53 ms in runs minutes apart.)
pub(super) struct Writer {
    runtime: tokio::runtime::Runtime,
    config: tokio_postgres::Config,
    /// Opened at the first commit and after a failed one (its answers may still be on their
    /// way, so it is not reused).
    connection: Option<Connection>,
}

struct Connection {
    client: tokio_postgres::Client,
    statements: Statements,
}

impl Writer {
    pub(super) fn new(mut config: tokio_postgres::Config) -> std::io::Result<Writer> {
        // So that it can be told apart in pg_stat_activity.
        config.application_name("tether writer");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Writer {
            runtime,
            config,
            connection: None,
        })
    }

    /// Commits a group of batches as one transaction (see [`transact`]). Called on the writer
    /// thread only, which is in no runtime: blocking on this one is allowed there.
    pub(super) fn commit(&mut self, jobs: &[Job]) -> Result<(), StoreError> {
        let Writer {
            runtime,
            config,
            connection,
        } = self;
        runtime.block_on(async {
            // A connection the database closed while the writer was idle (a restart, an
            // administrator's pg_terminate_backend, an idle timeout) is replaced: when that is
            // known before anything is sent, and else when the group's BEGIN fails because the
            // session had ended, for then the database did none of it (answers come in order:
            // a COMMIT that took effect follows a BEGIN that was answered). Once only: a
            // database that refuses a fresh connection too has failed the commit.
            let mut tries_left = 2;
            loop {
                tries_left -= 1;
                if connection.as_ref().is_some_and(|c| c.client.is_closed()) {
                    *connection = None;
                }
                let open = match connection {
                    Some(open) => open,
                    None => connection.insert(Connection::open(config).await?),
                };
                match transact(&open.client, &open.statements, jobs).await {
                    Ok(()) => return Ok(()),
                    Err(Failed { not_begun, error }) => {
                        // Answers may still be on their way: this connection is not reused.
                        *connection = None;
                        if !not_begun || tries_left == 0 {
                            return Err(error);
                        }
                        tracing::info!(%error, "the PostgreSQL writer's connection was lost before a commit; committing on a new one");
                    }
                }
            }
        })
    }
}

/// Why a transaction failed, and whether it is known that the database did none of it.
struct Failed {
    not_begun: bool,
    error: StoreError,
}

/// How the writer's connection plans its statements.
///
/// PostgreSQL plans a prepared statement anew at each execution for as long as it judges a
/// plan for the values at hand cheaper than one for any values; for FENCE_CHECK it always did,
/// and planning cost more than executing (pg_stat_statements under W2: 82 µs planning and 20
/// µs executing, at every commit). So one generic plan serves each statement.
///
/// A generic plan is made from the table's statistics, though, and `started` churns: a row
/// for each task handed out, deleted when its run closes, so an ANALYZE mostly finds it nearly
/// empty, and the plan it then gets for deleting a group's rows (`run_id = ANY(..)`) scans the
/// whole table, dead rows and all. After a burst that is thousands of rows at every commit:
/// the end_to_end bench once ran W2 at 8.5 ms p50 instead of 1.5. Every statement the writer
/// runs finds its rows by primary key, so it never wants a sequential scan: with them priced
/// out, the plan uses the index whatever the statistics say (a statement without a usable
/// index would still scan).
pub(super) const SESSION_SETTINGS: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off";

impl Connection {
    async fn open(config: &tokio_postgres::Config) -> Result<Connection, StoreError> {
        let (client, driver) = config.connect(NoTls).await.map_err(|e| {
            StoreError::Postgres(format!("the writer could not connect to the database: {e}"))
        })?;
        // Runs on the writer's runtime, so it makes progress while a commit is awaited (and
        // only then, which is all it is needed for); it ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::warn!(error = %e, "the PostgreSQL writer's connection closed");
            }
        });
        client.batch_execute(SESSION_SETTINGS).await?;
        let statements = Statements::prepare(&client).await?;
        Ok(Connection { client, statements })
    }
}

/// A group of batches as one transaction, in order. `BEGIN`, every statement and `COMMIT` are
/// pipelined: all are sent before the first answer is awaited, and PostgreSQL runs them in the
/// order sent, so a group costs one round trip (and one WAL flush), not one per row. A statement
/// that fails aborts the transaction, and PostgreSQL answers the `COMMIT` behind it with a
/// rollback: nothing of the group is written, and its error is what this returns.
async fn transact(
    client: &tokio_postgres::Client,
    statements: &Statements,
    jobs: &[Job],
) -> Result<(), Failed> {
    if let Some((statement, values)) = statements.one_statement(jobs) {
        return client
            .execute_raw(
                &statement,
                values.iter().map(|v| &**v as &(dyn ToSql + Sync)),
            )
            .await
            .map(drop)
            .map_err(|e| Failed {
                // Its writes are all upserts of whole rows and deletes: should the connection
                // have failed after PostgreSQL committed it, writing it again changes nothing.
                not_begun: session_ended(&e),
                error: e.into(),
            });
    }
    let mut plan: Vec<Planned> = Vec::new();
    // The leases this group writes under are checked (and locked) before any write.
    if let Some((owner, names, epochs)) = fence_values(jobs) {
        plan.push((statements.fence_lock.clone(), vec![Box::new(names.clone())]));
        plan.push((
            statements.fence_check.clone(),
            vec![Box::new(owner), Box::new(names), Box::new(epochs)],
        ));
    }
    let mut rows = Rows::default();
    for Job { batch, .. } in jobs {
        for write in &batch.writes {
            statements.plan(write, &mut plan, &mut rows);
        }
    }
    rows.flush(statements, &mut plan);
    let writes = futures::future::try_join_all(plan.iter().map(|(statement, values)| {
        client.execute_raw(
            statement,
            values.iter().map(|v| &**v as &(dyn ToSql + Sync)),
        )
    }));
    // join! first polls them in the order given, and each sends its messages when first
    // polled: BEGIN, the statements, COMMIT go out in that order.
    let (begin, writes, commit) = futures::join!(
        client.batch_execute("BEGIN"),
        writes,
        client.batch_execute("COMMIT")
    );
    // Only a BEGIN refused because the session ended (the connection closed, or a FATAL
    // error, after which the backend exits) shows that nothing behind it ran: a BEGIN that
    // failed on a live session would leave the statements behind it to run on their own.
    let not_begun = begin.as_ref().err().is_some_and(session_ended);
    // The first failure is the cause; what follows it failed because of it.
    begin.and(writes.map(drop)).and(commit).map_err(|e| Failed {
        not_begun,
        error: e.into(),
    })
}

/// The owner, namespaces and epochs of the leases a group is written under (each once, in
/// namespace order), if any.
fn fence_values(jobs: &[Job]) -> Option<(String, Vec<String>, Vec<i64>)> {
    let mut fences: Vec<&Fence> = jobs.iter().filter_map(|job| job.fence.as_ref()).collect();
    let owner = fences.first()?.owner.to_string();
    fences.sort_by(|a, b| (&a.namespace, a.epoch).cmp(&(&b.namespace, b.epoch)));
    fences.dedup();
    let names = fences.iter().map(|f| f.namespace.to_string()).collect();
    let epochs = fences.iter().map(|f| f.epoch).collect();
    Some((owner, names, epochs))
}

/// Whether `e` says the session had ended (the connection closed, or a FATAL error, after which
/// the backend exits).
fn session_ended(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// The statements a transaction uses, prepared once per connection.
struct Statements {
    /// `schema::one_statement_write`, with a fence and without.
    one_statement_fenced: tokio_postgres::Statement,
    one_statement: tokio_postgres::Statement,
    fence_lock: tokio_postgres::Statement,
    fence_check: tokio_postgres::Statement,
    put_namespace: tokio_postgres::Statement,
    put_runs: tokio_postgres::Statement,
    put_session: tokio_postgres::Statement,
    delete_own_started_of_runs: tokio_postgres::Statement,
    keep_session_started: tokio_postgres::Statement,
    delete_session_started: tokio_postgres::Statement,
    delete_session: tokio_postgres::Statement,
    delete_run_events: tokio_postgres::Statement,
    delete_run_started: tokio_postgres::Statement,
    delete_run: tokio_postgres::Statement,
    put_started: tokio_postgres::Statement,
    put_events: tokio_postgres::Statement,
}

/// The rows of a group, gathered into one multi-row statement per table (PostgreSQL's cost is
/// per statement more than per row: under W1 a group hands out and closes dozens of tasks). A
/// run, an event or a hand-out row written several times is written once, as it is last.
///
/// Gathered rows are written at a flush, in this order: runs, events, the hand-out rows of the
/// runs that closed, then new hand-out rows. That is the order of the writes themselves except
/// where a hand-out row gathered before a run's close would be written after the close deletes
/// that run's rows: such a close flushes what is gathered first (see [`Rows::close`]).
#[derive(Default)]
struct Rows {
    run_index: HashMap<String, usize>,
    run_ids: Vec<String>,
    namespaces: Vec<String>,
    standalone: Vec<bool>,
    workflow_ids: Vec<String>,
    statuses: Vec<i32>,
    start_ms: Vec<i64>,
    states: Vec<Vec<u8>>,
    close_ms: Vec<i64>,
    event_index: HashMap<(String, i64), usize>,
    event_runs: Vec<String>,
    event_ids: Vec<i64>,
    events: Vec<Vec<u8>>,
    /// Closed runs whose own hand-out rows go.
    closing: Vec<String>,
    started: StartedRows,
}

/// Hand-out rows, a column each (see `schema::PUT_STARTED`).
#[derive(Default)]
struct StartedRows {
    index: HashMap<(String, i64), usize>,
    /// The runs with a row here.
    runs: HashSet<String>,
    run_ids: Vec<String>,
    scheduled_event_ids: Vec<i64>,
    attempts: Vec<i32>,
    dispatches: Vec<i64>,
    started_ms: Vec<i64>,
    workers: Vec<String>,
    instances: Vec<String>,
    session_ids: Vec<String>,
    session_activities_run: Vec<i64>,
}

impl StartedRows {
    /// Gathers a [`Write::Started`] (and nothing else).
    fn put(&mut self, write: &Write) {
        let Write::Started {
            run_id,
            scheduled_event_id,
            attempt,
            dispatch,
            started_ms,
            worker,
            instance,
            session_id,
            session_activities_run,
        } = write
        else {
            return;
        };
        let key = (run_id.to_string(), *scheduled_event_id as i64);
        let at = match self.index.get(&key) {
            Some(&at) => at,
            None => {
                self.index.insert(key, self.run_ids.len());
                if !self.runs.contains(run_id.as_str()) {
                    self.runs.insert(run_id.to_string());
                }
                self.run_ids.push(run_id.to_string());
                self.scheduled_event_ids.push(*scheduled_event_id as i64);
                self.attempts.push(0);
                self.dispatches.push(0);
                self.started_ms.push(0);
                self.workers.push(String::new());
                self.instances.push(String::new());
                self.session_ids.push(String::new());
                self.session_activities_run.push(0);
                self.run_ids.len() - 1
            }
        };
        self.attempts[at] = *attempt as i32;
        self.dispatches[at] = *dispatch as i64;
        self.started_ms[at] = *started_ms;
        self.workers[at] = worker.clone();
        self.instances[at] = instance.clone();
        self.session_ids[at] = session_id.as_ref().map_or("", |s| s.as_str()).to_string();
        self.session_activities_run[at] = *session_activities_run as i64;
    }

    fn into_values(self) -> Values {
        vec![
            Box::new(self.run_ids),
            Box::new(self.scheduled_event_ids),
            Box::new(self.attempts),
            Box::new(self.dispatches),
            Box::new(self.started_ms),
            Box::new(self.workers),
            Box::new(self.instances),
            Box::new(self.session_ids),
            Box::new(self.session_activities_run),
        ]
    }
}

/// One statement's values.
type Values = Vec<Box<dyn ToSql + Sync + Send>>;

impl Rows {
    /// Gathers a run's row; returns whether its own hand-out rows go with it (it closed, and
    /// may own some).
    fn run_write(&mut self, state: &RunState, may_own_started: bool) -> bool {
        let open = state.status == ExecutionStatus::Running as i32;
        self.run(state, if open { 0 } else { state.close_ms.max(1) });
        may_own_started && !open
    }

    fn events(&mut self, run_id: &str, events: &[HistoryEvent]) {
        for event in events {
            self.event(run_id, event);
        }
    }

    fn run(&mut self, state: &RunState, close_ms: i64) {
        let encoded = state.encode_to_vec();
        if let Some(&i) = self.run_index.get(&state.run_id) {
            self.statuses[i] = state.status;
            self.states[i] = encoded;
            self.close_ms[i] = close_ms;
            return;
        }
        self.run_index
            .insert(state.run_id.clone(), self.run_ids.len());
        self.run_ids.push(state.run_id.clone());
        self.namespaces.push(state.namespace.clone());
        self.standalone.push(state.standalone_activity);
        self.workflow_ids.push(state.workflow_id.clone());
        self.statuses.push(state.status);
        self.start_ms.push(state.start_ms);
        self.states.push(encoded);
        self.close_ms.push(close_ms);
    }

    fn event(&mut self, run_id: &str, event: &HistoryEvent) {
        let key = (run_id.to_string(), event.event_id as i64);
        let encoded = event.encode_to_vec();
        if let Some(&i) = self.event_index.get(&key) {
            self.events[i] = encoded;
            return;
        }
        self.event_index.insert(key, self.event_ids.len());
        self.event_runs.push(run_id.to_string());
        self.event_ids.push(event.event_id as i64);
        self.events.push(encoded);
    }

    /// A closed run's own hand-out rows go. After the hand-out rows gathered so far: if one of
    /// them is this run's, everything gathered is written first.
    fn close(&mut self, run_id: &str, statements: &Statements, plan: &mut Vec<Planned>) {
        if self.started.runs.contains(run_id) {
            self.flush(statements, plan);
        }
        self.closing.push(run_id.to_string());
    }

    /// The statements for what is gathered so far, appended to the plan (and gathering starts
    /// again): before any write whose effect depends on those rows, and at the end.
    fn flush(&mut self, statements: &Statements, plan: &mut Vec<Planned>) {
        let mut rows = std::mem::take(self);
        let (no_runs, no_events) = (rows.run_ids.is_empty(), rows.event_ids.is_empty());
        let closing = std::mem::take(&mut rows.closing);
        let started = std::mem::take(&mut rows.started);
        let (runs, events) = rows.into_values();
        if !no_runs {
            plan.push((statements.put_runs.clone(), runs));
        }
        if !no_events {
            plan.push((statements.put_events.clone(), events));
        }
        if !closing.is_empty() {
            plan.push((
                statements.delete_own_started_of_runs.clone(),
                vec![Box::new(closing)],
            ));
        }
        if !started.run_ids.is_empty() {
            plan.push((statements.put_started.clone(), started.into_values()));
        }
    }

    /// The values of `schema::PUT_RUNS` and of `schema::PUT_EVENTS`.
    fn into_values(self) -> (Values, Values) {
        let runs: Values = vec![
            Box::new(self.run_ids),
            Box::new(self.namespaces),
            Box::new(self.standalone),
            Box::new(self.workflow_ids),
            Box::new(self.statuses),
            Box::new(self.start_ms),
            Box::new(self.states),
            Box::new(self.close_ms),
        ];
        let events: Values = vec![
            Box::new(self.event_runs),
            Box::new(self.event_ids),
            Box::new(self.events),
        ];
        (runs, events)
    }
}

impl Statements {
    async fn prepare(client: &tokio_postgres::Client) -> Result<Statements, StoreError> {
        Ok(Statements {
            one_statement_fenced: client.prepare(&schema::one_statement_write(true)).await?,
            one_statement: client.prepare(&schema::one_statement_write(false)).await?,
            fence_lock: client.prepare(schema::FENCE_LOCK).await?,
            fence_check: client.prepare(schema::FENCE_CHECK).await?,
            put_namespace: client.prepare(schema::PUT_NAMESPACE).await?,
            put_runs: client.prepare(schema::PUT_RUNS).await?,
            put_session: client.prepare(schema::PUT_SESSION).await?,
            delete_own_started_of_runs: client.prepare(schema::DELETE_OWN_STARTED_OF_RUNS).await?,
            keep_session_started: client.prepare(schema::KEEP_SESSION_STARTED).await?,
            delete_session_started: client.prepare(schema::DELETE_SESSION_STARTED).await?,
            delete_session: client.prepare(schema::DELETE_SESSION).await?,
            delete_run_events: client.prepare(schema::DELETE_RUN_EVENTS).await?,
            delete_run_started: client.prepare(schema::DELETE_RUN_STARTED).await?,
            delete_run: client.prepare(schema::DELETE_RUN).await?,
            put_started: client.prepare(schema::PUT_STARTED).await?,
            put_events: client.prepare(schema::PUT_EVENTS).await?,
        })
    }

    /// The whole group as one statement, when it writes only runs, events and hand-out rows
    /// (as starts, dispatches, hand-outs and completions do) and no run closes in the group
    /// that is handed out in it too: a commit then costs one round trip to the database, not one
    /// answer per statement (W2 on PostgreSQL, two commits a round trip: p50 2.62–2.74 ms
    /// before, 2.36–2.43 ms after, runs of one morning). The parts of one statement all see the
    /// database as it was before it, so a group whose writes build on one another (a close
    /// after a hand-out of the same run; sessions' rows; deletes) is written statement by
    /// statement.
    fn one_statement(&self, jobs: &[Job]) -> Option<Planned> {
        let fits = jobs.iter().all(|job| {
            job.batch.writes.iter().all(|w| {
                matches!(
                    w,
                    Write::Run { .. } | Write::Events { .. } | Write::Started { .. }
                )
            })
        });
        if !fits {
            return None;
        }
        let mut rows = Rows::default();
        for job in jobs {
            for write in &job.batch.writes {
                match write {
                    Write::Run {
                        state,
                        may_own_started,
                    } => {
                        if rows.run_write(state, *may_own_started) {
                            rows.closing.push(state.run_id.clone());
                        }
                    }
                    Write::Events { run_id, events } => rows.events(run_id, events),
                    Write::Started { .. } => rows.started.put(write),
                    _ => unreachable!("checked above"),
                }
            }
        }
        if rows
            .closing
            .iter()
            .any(|run| rows.started.runs.contains(run))
        {
            return None;
        }
        let mut values: Values = Vec::with_capacity(24);
        let statement = match fence_values(jobs) {
            Some((owner, names, epochs)) => {
                values.push(Box::new(owner));
                values.push(Box::new(names));
                values.push(Box::new(epochs));
                self.one_statement_fenced.clone()
            }
            None => self.one_statement.clone(),
        };
        values.push(Box::new(std::mem::take(&mut rows.closing)));
        let started = std::mem::take(&mut rows.started);
        let (runs, events) = rows.into_values();
        values.extend(runs);
        values.extend(events);
        values.extend(started.into_values());
        Some((statement, values))
    }

    /// The statements one write takes, appended in order.
    fn plan(&self, write: &Write, plan: &mut Vec<Planned>, rows: &mut Rows) {
        let text = |s: &str| -> Box<dyn ToSql + Sync + Send> { Box::new(s.to_string()) };
        match write {
            Write::Namespace(info) => plan.push((
                self.put_namespace.clone(),
                vec![text(&info.name), Box::new(info.encode_to_vec())],
            )),
            Write::Run {
                state,
                may_own_started,
            } => {
                if rows.run_write(state, *may_own_started) {
                    rows.close(&state.run_id, self, plan);
                }
            }
            Write::Session { state } => {
                let info = state.info.clone().unwrap_or_default();
                let open = crate::sessions::is_live(&info);
                let closed_ms = if open { 0 } else { info.closed_ms.max(1) };
                plan.push((
                    self.put_session.clone(),
                    vec![
                        text(&info.session_id),
                        text(&info.namespace),
                        Box::new(open),
                        Box::new(info.created_ms),
                        Box::new(state.encode_to_vec()),
                        Box::new(closed_ms),
                    ],
                ));
            }
            Write::ReleaseSessionRows {
                session_id,
                runs_still_open,
                runs_closed,
            } => {
                // These look at hand-out rows: what is gathered goes first.
                rows.flush(self, plan);
                for run_id in runs_still_open {
                    plan.push((
                        self.keep_session_started.clone(),
                        vec![text(run_id), text(session_id)],
                    ));
                }
                for run_id in runs_closed {
                    plan.push((
                        self.delete_session_started.clone(),
                        vec![text(run_id), text(session_id)],
                    ));
                }
            }
            Write::DeleteSessions { session_ids } => {
                for session_id in session_ids {
                    plan.push((self.delete_session.clone(), vec![text(session_id)]));
                }
            }
            Write::DeleteRuns { run_ids } => {
                // These deletes look at the runs' rows: what is gathered goes first.
                rows.flush(self, plan);
                // Events and hand-out rows first: their deletes look for the closed run.
                for run_id in run_ids {
                    plan.push((self.delete_run_events.clone(), vec![text(run_id)]));
                    plan.push((self.delete_run_started.clone(), vec![text(run_id)]));
                    plan.push((self.delete_run.clone(), vec![text(run_id)]));
                }
            }
            Write::Started { .. } => rows.started.put(write),
            Write::Events { run_id, events } => rows.events(run_id, events),
        }
    }
}
