//! One group of batches as one SQLite transaction (the writer thread and its queue are
//! `store::group_commit`'s).

use crate::store::api::{StoreError, Write};
use crate::store::group_commit::Job;
use prost::Message;
use rusqlite::{params, Connection};
use tether_wire::pb::ExecutionStatus;

pub(super) fn commit_jobs(conn: &mut Connection, jobs: &[Job]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut put_ns =
            tx.prepare_cached("INSERT OR REPLACE INTO namespaces(name, info) VALUES (?1, ?2)")?;
        let mut put_run = tx.prepare_cached(
            // An upsert rather than INSERT OR REPLACE: replacing would delete and re-insert the
            // row in every index on each state change.
            "INSERT INTO runs(run_id, namespace, standalone, workflow_id, status, start_ms, state,
                              close_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(run_id) DO UPDATE SET status = excluded.status, state = excluded.state,
                                               close_ms = excluded.close_ms",
        )?;
        let mut put_session = tx.prepare_cached(
            "INSERT INTO sessions(session_id, namespace, open, created_ms, state, closed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(session_id) DO UPDATE SET open = excluded.open, state = excluded.state,
                                                   closed_ms = excluded.closed_ms",
        )?;
        // A run's history and hand-out rows go only with the run itself: only once it closed.
        let mut del_events = tx.prepare_cached(
            "DELETE FROM events WHERE run_id = ?1
             AND EXISTS (SELECT 1 FROM runs WHERE run_id = ?1 AND close_ms > 0)",
        )?;
        let mut del_session =
            tx.prepare_cached("DELETE FROM sessions WHERE session_id = ?1 AND closed_ms > 0")?;
        // Only closed runs: an open run is never deleted, whatever asked for it.
        let mut del_run =
            tx.prepare_cached("DELETE FROM runs WHERE run_id = ?1 AND close_ms > 0")?;
        let mut put_event = tx.prepare_cached(
            "INSERT OR REPLACE INTO events(run_id, event_id, event) VALUES (?1, ?2, ?3)",
        )?;
        let mut put_started = tx.prepare_cached(
            "INSERT OR REPLACE INTO started(run_id, scheduled_event_id, attempt, dispatch,
                                            started_ms, worker, instance, session_id,
                                            session_activities_run)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        // A closed run's hand-outs are over: its rows go with its close, but for those that
        // keep a session's count, which go when the session closes.
        let mut del_started =
            tx.prepare_cached("DELETE FROM started WHERE run_id = ?1 AND session_id = ''")?;
        let mut del_run_started = tx.prepare_cached(
            "DELETE FROM started WHERE run_id = ?1
             AND EXISTS (SELECT 1 FROM runs WHERE run_id = ?1 AND close_ms > 0)",
        )?;
        let mut del_session_started =
            tx.prepare_cached("DELETE FROM started WHERE run_id = ?1 AND session_id = ?2")?;
        let mut keep_session_started = tx.prepare_cached(
            "UPDATE started SET session_id = '' WHERE run_id = ?1 AND session_id = ?2",
        )?;
        for Job { batch, .. } in jobs {
            for write in &batch.writes {
                match write {
                    Write::Namespace(info) => {
                        put_ns.execute(params![info.name, info.encode_to_vec()])?;
                    }
                    Write::Run {
                        state,
                        may_own_started,
                    } => {
                        if *may_own_started && state.status != ExecutionStatus::Running as i32 {
                            del_started.execute(params![state.run_id])?;
                        }
                        put_run.execute(params![
                            state.run_id,
                            state.namespace,
                            state.standalone_activity as i64,
                            state.workflow_id,
                            state.status,
                            state.start_ms,
                            state.encode_to_vec(),
                            if state.status == ExecutionStatus::Running as i32 {
                                0
                            } else {
                                state.close_ms.max(1)
                            }
                        ])?;
                    }
                    Write::Session { state } => {
                        let info = state.info.clone().unwrap_or_default();
                        let open = crate::sessions::is_live(&info);
                        put_session.execute(params![
                            info.session_id,
                            info.namespace,
                            open as i64,
                            info.created_ms,
                            state.encode_to_vec(),
                            if open { 0 } else { info.closed_ms.max(1) }
                        ])?;
                    }
                    Write::ReleaseSessionRows {
                        session_id,
                        runs_still_open,
                        runs_closed,
                    } => {
                        for run_id in runs_still_open {
                            keep_session_started
                                .execute(params![run_id.as_str(), session_id.as_str()])?;
                        }
                        for run_id in runs_closed {
                            del_session_started
                                .execute(params![run_id.as_str(), session_id.as_str()])?;
                        }
                    }
                    Write::DeleteSessions { session_ids } => {
                        for session_id in session_ids {
                            del_session.execute(params![session_id.as_str()])?;
                        }
                    }
                    Write::DeleteRuns { run_ids } => {
                        for run_id in run_ids {
                            del_events.execute(params![run_id.as_str()])?;
                            del_run_started.execute(params![run_id.as_str()])?;
                            del_run.execute(params![run_id.as_str()])?;
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
                        put_started.execute(params![
                            run_id.as_str(),
                            *scheduled_event_id as i64,
                            attempt,
                            *dispatch as i64,
                            started_ms,
                            worker,
                            instance,
                            session_id.as_ref().map_or("", |s| s.as_str()),
                            *session_activities_run as i64
                        ])?;
                    }
                    Write::Events { run_id, events } => {
                        for event in events {
                            put_event.execute(params![
                                run_id.as_str(),
                                event.event_id as i64,
                                event.encode_to_vec()
                            ])?;
                        }
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}
