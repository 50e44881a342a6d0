//! The writer thread: every batch submitted while it is busy joins the next transaction, so one
//! fsync serves many callers.

use crate::store::api::{Durability, StoreError, Write, WriteBatch};
use prost::Message;
use rusqlite::{params, Connection};
use std::sync::mpsc;
use tether_wire::pb::ExecutionStatus;

/// A batch with its number and where its outcome goes.
pub(super) type Job = (
    u64,
    WriteBatch,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Counters of the writer, to see group commit at work.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: std::sync::atomic::AtomicU64,
    /// Batches made durable by them.
    pub batches: std::sync::atomic::AtomicU64,
}

pub(super) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    stats: &WriterStats,
    durable: tokio::sync::watch::Sender<Durability>,
) {
    // Bounded so one transaction never grows without limit under a flood of requests.
    const MAX_JOBS_PER_COMMIT: usize = 2048;
    let mut failed: Option<std::sync::Arc<str>> = None;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Some(why) = &failed {
            // Every batch after a failed one builds on state that was never written: none of
            // them may land, or a restart would find a history with holes.
            for (_, _, reply) in jobs {
                let _ = reply.send(Err(format!(
                    "not written: an earlier commit failed ({why})"
                )));
            }
            continue;
        }
        let started = std::time::Instant::now();
        let outcome = commit_jobs(&mut conn, &jobs).map_err(|e| e.to_string());
        let last_seq = jobs.last().map(|(seq, _, _)| *seq).unwrap_or(0);
        if outcome.is_ok() {
            durable.send_modify(|d| d.seq = last_seq);
            use std::sync::atomic::Ordering::Relaxed;
            stats.transactions.fetch_add(1, Relaxed);
            stats.batches.fetch_add(jobs.len() as u64, Relaxed);
            // No-ops unless a metrics recorder is installed.
            metrics::counter!("tether_store_commits_total").increment(1);
            metrics::counter!("tether_store_batches_total").increment(jobs.len() as u64);
            metrics::histogram!("tether_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
        } else {
            metrics::counter!("tether_store_commit_failures_total").increment(1);
        }
        if let Err(e) = &outcome {
            tracing::error!(error = %e, batches = jobs.len(), "commit failed; the store accepts no more writes");
            let why: std::sync::Arc<str> = e.as_str().into();
            durable.send_modify(|d| d.failed = Some(why.clone()));
            failed = Some(why);
        }
        for (_, _, reply) in jobs {
            let _ = reply.send(outcome.clone());
        }
    }
}

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
        for (_, batch, _) in jobs {
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
