//! The PostgreSQL tables: the same rows as the SQLite store's, with PostgreSQL's types. Ids
//! compare bytewise (`COLLATE "C"`), as they do in SQLite and in memory, so that listings page
//! the same way whatever the database's locale.

/// Creates what is missing; safe to run at every start, by several replicas at once (the
/// advisory lock makes them take turns: concurrent `CREATE ... IF NOT EXISTS` can collide).
pub(super) const SCHEMA: &str = r#"
BEGIN;
SELECT pg_advisory_xact_lock(7233001);
-- "already exists, skipping" at every start is noise in the server's log.
SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT COLLATE "C" PRIMARY KEY,
    info BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT COLLATE "C" PRIMARY KEY,
    -- Order of first insertion: the tie-break of runs that started in the same millisecond.
    row_order BIGSERIAL NOT NULL,
    namespace TEXT COLLATE "C" NOT NULL,
    standalone BOOLEAN NOT NULL,
    workflow_id TEXT COLLATE "C" NOT NULL,
    status INTEGER NOT NULL,
    start_ms BIGINT NOT NULL,
    state BYTEA NOT NULL,
    close_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_id ON runs (namespace, standalone, workflow_id, start_ms);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (namespace, standalone, start_ms, run_id);
CREATE INDEX IF NOT EXISTS runs_open ON runs (row_order) WHERE close_ms = 0;
CREATE INDEX IF NOT EXISTS runs_closed ON runs (namespace, close_ms) WHERE close_ms > 0;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    row_order BIGSERIAL NOT NULL,
    namespace TEXT COLLATE "C" NOT NULL,
    open BOOLEAN NOT NULL,
    created_ms BIGINT NOT NULL,
    state BYTEA NOT NULL,
    closed_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_ns ON sessions (namespace, created_ms, session_id);
CREATE INDEX IF NOT EXISTS sessions_closed ON sessions (namespace, closed_ms) WHERE closed_ms > 0;
CREATE TABLE IF NOT EXISTS started (
    run_id TEXT COLLATE "C" NOT NULL,
    scheduled_event_id BIGINT NOT NULL,
    attempt INTEGER NOT NULL,
    dispatch BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    worker TEXT NOT NULL,
    instance TEXT NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL DEFAULT '',
    session_activities_run BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, scheduled_event_id)
);
CREATE INDEX IF NOT EXISTS started_in_sessions ON started (session_id) WHERE session_id <> '';
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT COLLATE "C" NOT NULL,
    event_id BIGINT NOT NULL,
    event BYTEA NOT NULL,
    PRIMARY KEY (run_id, event_id)
);
-- Server replicas, and where clients reach them.
CREATE TABLE IF NOT EXISTS replicas (
    replica_id TEXT COLLATE "C" PRIMARY KEY,
    address TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One row per namespace: which replica owns it, under which epoch, until when (by the
-- database's clock, so replicas' clocks need not agree). A takeover bumps the epoch.
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    renewed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
-- Raises the error of a fenced transaction whose leases are no longer its writer's (see
-- FENCE_CHECK): called only then, so a commit that passes pays nothing for PL/pgSQL.
CREATE OR REPLACE FUNCTION tether_fence_lost(holder TEXT, lost TEXT)
RETURNS VOID LANGUAGE plpgsql AS $fence$
BEGIN
    RAISE EXCEPTION 'replica % no longer holds the lease of namespace %', holder, lost
        USING ERRCODE = 'TL001';
END
$fence$;
COMMIT;
"#;

pub(super) const PUT_NAMESPACE: &str = "INSERT INTO namespaces (name, info) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET info = EXCLUDED.info";
/// Many runs in one statement, one array per column.
pub(super) const PUT_RUNS: &str =
    "INSERT INTO runs (run_id, namespace, standalone, workflow_id, status, start_ms, state, close_ms)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::int[],
                          $6::bigint[], $7::bytea[], $8::bigint[])
     ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, state = EXCLUDED.state,
                                        close_ms = EXCLUDED.close_ms";
pub(super) const PUT_SESSION: &str =
    "INSERT INTO sessions (session_id, namespace, open, created_ms, state, closed_ms)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (session_id) DO UPDATE SET open = EXCLUDED.open, state = EXCLUDED.state,
                                            closed_ms = EXCLUDED.closed_ms";
/// A closed run's own hand-out rows (not those that keep a session's count).
pub(super) const KEEP_SESSION_STARTED: &str =
    "UPDATE started SET session_id = '' WHERE run_id = $1 AND session_id = $2";
pub(super) const DELETE_SESSION_STARTED: &str =
    "DELETE FROM started WHERE run_id = $1 AND session_id = $2";
/// Only closed sessions and runs are ever deleted, whatever asked for it; a run's history and
/// hand-out rows go only with the run.
pub(super) const DELETE_SESSION: &str =
    "DELETE FROM sessions WHERE session_id = $1 AND closed_ms > 0";
pub(super) const DELETE_RUN_EVENTS: &str = "DELETE FROM events WHERE run_id = $1
     AND EXISTS (SELECT 1 FROM runs WHERE run_id = $1 AND close_ms > 0)";
pub(super) const DELETE_RUN_STARTED: &str = "DELETE FROM started WHERE run_id = $1
     AND EXISTS (SELECT 1 FROM runs WHERE run_id = $1 AND close_ms > 0)";
pub(super) const DELETE_RUN: &str = "DELETE FROM runs WHERE run_id = $1 AND close_ms > 0";
/// Hand-out rows, many in one statement (no key twice: see the writer's `Rows`).
pub(super) const PUT_STARTED: &str =
    "INSERT INTO started (run_id, scheduled_event_id, attempt, dispatch, started_ms, worker,
                          instance, session_id, session_activities_run)
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::bigint[], $5::bigint[],
                          $6::text[], $7::text[], $8::text[], $9::bigint[])
     ON CONFLICT (run_id, scheduled_event_id) DO UPDATE SET
         attempt = EXCLUDED.attempt, dispatch = EXCLUDED.dispatch,
         started_ms = EXCLUDED.started_ms, worker = EXCLUDED.worker,
         instance = EXCLUDED.instance, session_id = EXCLUDED.session_id,
         session_activities_run = EXCLUDED.session_activities_run";
pub(super) const PUT_EVENTS: &str = "INSERT INTO events (run_id, event_id, event)
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])
     ON CONFLICT (run_id, event_id) DO UPDATE SET event = EXCLUDED.event";

/// The two statements every fenced transaction begins with: the leases it writes under must
/// still be the writer's, at the epochs it took them, with time left.
///
/// The first takes each namespace's advisory lock, shared, until the transaction ends; a
/// takeover takes the same lock exclusively to change the lease, so it waits for every
/// transaction that passed the check, and every later one sees the new epoch. (Advisory locks
/// live in memory: unlike a row lock, they write nothing to the table or the WAL.)
pub(super) const FENCE_LOCK: &str =
    "SELECT pg_advisory_xact_lock_shared(7233, hashtext(name)) FROM unnest($1::text[]) AS name";
/// The check, a statement of its own: under READ COMMITTED a statement reads from a snapshot
/// taken when it starts, and this one must start after the locks are held, or it could read a
/// lease that a takeover committed a new epoch over while it waited for them.
pub(super) const FENCE_CHECK: &str =
    "SELECT tether_fence_lost($1, string_agg(format('%s (epoch %s)', f.name, f.epoch), ', '))
     FROM unnest($2::text[], $3::bigint[]) AS f(name, epoch)
     WHERE NOT EXISTS (
         SELECT 1 FROM leases l
         WHERE l.namespace = f.name AND l.owner = $1 AND l.epoch = f.epoch
           AND l.expires_at > clock_timestamp())
     HAVING count(*) > 0";

/// The hand-out rows of many closing runs, in one statement.
pub(super) const DELETE_OWN_STARTED_OF_RUNS: &str =
    "DELETE FROM started WHERE run_id = ANY($1::text[]) AND session_id = ''";

/// The fence of a one-statement write (see [`one_statement_write`]): the leases are locked by
/// row, `FOR SHARE`, in namespace order. A takeover's `UPDATE` of a lease waits for every
/// transaction holding its row so (as for the advisory lock of [`FENCE_LOCK`]); and a lock
/// that had to wait for a takeover reads the lease as that committed it (READ COMMITTED
/// re-checks a row it locks after waiting), so one statement both locks and checks. Renewals
/// lock the rows they update in the same order (`RENEW_LEASES`), so they cannot deadlock
/// with it.
const FENCE_BY_ROW_LOCK: &str = "held AS (
         SELECT namespace, epoch FROM leases
         WHERE namespace = ANY($2::text[]) AND owner = $1 AND expires_at > clock_timestamp()
         ORDER BY namespace FOR SHARE),
     lost AS (
         SELECT tether_fence_lost($1, string_agg(format('%s (epoch %s)', f.name, f.epoch), ', '))
         FROM unnest($2::text[], $3::bigint[]) AS f(name, epoch)
         WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.namespace = f.name AND h.epoch = f.epoch)
         HAVING count(*) > 0)";

/// A group of runs and events written in one statement, its own transaction: no `BEGIN`, no
/// `COMMIT`, one round trip to the database (the writer's common case: see its
/// `one_statement`). Its values, in order: with a fence, the owner, the namespaces and their
/// epochs; then the closing runs whose hand-out rows go; then [`PUT_RUNS`]', [`PUT_EVENTS`]'
/// and [`PUT_STARTED`]'s arrays. The statements are the same text as when written one by one.
pub(super) fn one_statement_write(fenced: bool) -> String {
    let first = if fenced { 4 } else { 1 };
    let writes = format!(
        "own_started AS ({}), runs_put AS ({}), events_put AS ({}), started_put AS ({})",
        renumber(DELETE_OWN_STARTED_OF_RUNS, first - 1),
        renumber(PUT_RUNS, first),
        renumber(PUT_EVENTS, first + 8),
        renumber(PUT_STARTED, first + 11),
    );
    if fenced {
        // Every lease row is locked before the check reads them, and the check runs (and
        // raises) whatever the order in which the writes are carried out: an error anywhere
        // undoes the whole statement.
        format!(
            "WITH {FENCE_BY_ROW_LOCK}, {writes}
             SELECT (SELECT count(*) FROM held), (SELECT count(*) FROM lost)"
        )
    } else {
        format!("WITH {writes} SELECT 1")
    }
}

/// `sql` with each parameter `$n` made `$(n + by)`.
fn renumber(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        match rest[at + 1..at + 1 + digits].parse::<usize>() {
            Ok(n) => out.push_str(&format!("${}", n + by)),
            // A `$` that starts no parameter (none in these statements), kept as it is.
            Err(_) => out.push('$'),
        }
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_and_nothing_else_changes() {
        assert_eq!(
            renumber("SELECT $1, $2::text[], '$x', $10 FROM t", 3),
            "SELECT $4, $5::text[], '$x', $13 FROM t"
        );
        let unfenced = one_statement_write(false);
        assert!(
            unfenced.contains("unnest($2::text[], $3::text[]"),
            "{unfenced}"
        );
        assert!(unfenced.contains("$12::bytea[]"), "{unfenced}");
        assert!(unfenced.contains("$21::bigint[]"), "{unfenced}");
        assert!(!unfenced.contains("$22"), "{unfenced}");
        let fenced = one_statement_write(true);
        assert!(fenced.contains("run_id = ANY($4::text[])"), "{fenced}");
        assert!(fenced.contains("$15::bytea[]"), "{fenced}");
        assert!(fenced.contains("$24::bigint[]"), "{fenced}");
        assert!(!fenced.contains("$25"), "{fenced}");
    }
}
