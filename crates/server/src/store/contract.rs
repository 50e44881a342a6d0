//! The contract every [`Store`] keeps, checked against each of them: what the engine relies on
//! (recovery, hand-out rows, deletes, paging) must not depend on which store it runs on.

use super::api::{OnDurable, Store, Write, WriteBatch};
use super::{MemoryStore, PostgresStore, SqliteStore, SyncMode, TestCluster};
use crate::state::{RunState, SessionState};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use tether_wire::pb::{ExecutionStatus, HistoryEvent, SessionInfo};

/// Each check runs on SQLite (in a fresh directory), on the in-memory store, and on PostgreSQL
/// (a cluster the test starts, a fresh database per check).
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::SqliteStore::open(dir.path(), super::SyncMode::Normal)
                        .unwrap();
                    super::$check(&store).await;
                }
            )*
        }
        mod in_memory {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(&super::MemoryStore::new()).await;
                }
            )*
        }
        mod on_postgres {
            /// One cluster for every check (starting one costs a second or two); it stops when
            /// the test ends, passed or failed.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_check() {
                let cluster = super::TestCluster::start()
                    .unwrap_or_else(|e| panic!("these tests need PostgreSQL: {e}"));
                $(
                    let url = cluster
                        .create_database(stringify!($check))
                        .await
                        .unwrap_or_else(|e| panic!("{}: {e}", stringify!($check)));
                    let store = super::PostgresStore::connect(&url)
                        .unwrap_or_else(|e| panic!("{}: {e}", stringify!($check)));
                    super::$check(&store).await;
                )*
            }
        }
    };
}

contract!(
    recovery_reads_back_open_runs_with_their_history_and_no_closed_one,
    recovery_folds_the_newest_hand_out_of_each_current_attempt_into_its_run,
    in_one_group_a_close_removes_the_hand_outs_before_it_and_keeps_those_after,
    a_closed_sessions_rows_are_released_and_the_open_runs_keep_theirs,
    a_delete_never_removes_an_open_run_its_history_or_an_open_session,
    runs_and_sessions_page_newest_first_with_exact_boundaries,
    expired_rows_come_oldest_first_and_only_closed_ones,
    what_follows_a_commit_runs_once_it_is_durable_in_order_and_before_its_submitter_hears,
);

async fn commit(store: &dyn Store, writes: Vec<Write>) {
    store
        .submit(WriteBatch { writes })
        .done
        .await
        .unwrap()
        .unwrap();
}

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

fn put_run(state: RunState) -> Write {
    Write::Run {
        state: Box::new(state),
        may_own_started: true,
    }
}

fn closed(id: &str, close_ms: i64) -> RunState {
    RunState {
        close_ms,
        ..run(id, ExecutionStatus::Completed)
    }
}

/// A running run with activity 1 on its first attempt.
fn with_activity(id: &str) -> RunState {
    let mut state = run(id, ExecutionStatus::Running);
    state.activities.insert(
        1,
        crate::state::ActivityState {
            scheduled_event_id: 1,
            attempt: 1,
            ..Default::default()
        },
    );
    state
}

/// Hand-out `dispatch` of activity 1 of `run_id`, to worker w, in `session` if any (whose count
/// of hand-outs is then `dispatch`).
fn handed_out(run_id: &str, dispatch: u64, session: Option<&str>) -> Write {
    Write::Started {
        run_id: run_id.into(),
        scheduled_event_id: 1,
        attempt: 1,
        dispatch,
        started_ms: 10 * dispatch as i64,
        worker: "w".into(),
        instance: "w-process".into(),
        session_id: session.map(Into::into),
        session_activities_run: if session.is_some() { dispatch } else { 0 },
    }
}

fn event(event_id: u64) -> HistoryEvent {
    HistoryEvent {
        event_id,
        time_ms: event_id as i64,
        attributes: None,
    }
}

fn session(id: &str, state: &str, created_ms: i64, closed_ms: i64) -> Write {
    Write::Session {
        state: Box::new(SessionState {
            info: Some(SessionInfo {
                session_id: id.into(),
                namespace: "default".into(),
                state: state.into(),
                created_ms,
                closed_ms,
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn session_ids(sessions: Vec<SessionState>) -> Vec<String> {
    sessions
        .into_iter()
        .filter_map(|s| s.info.map(|i| i.session_id))
        .collect()
}

async fn recovery_reads_back_open_runs_with_their_history_and_no_closed_one(store: &dyn Store) {
    commit(
        store,
        vec![
            put_run(run("r1", ExecutionStatus::Running)),
            // Out of order and written twice: history comes back by event id, once each.
            Write::Events {
                run_id: "r1".into(),
                events: vec![event(2), event(1)],
            },
            Write::Events {
                run_id: "r1".into(),
                events: vec![event(2)],
            },
            put_run(closed("r2", 9)),
        ],
    )
    .await;
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.open_runs.len(), 1, "only the running run is open");
    let (state, history) = &recovered.open_runs[0];
    assert_eq!(state.run_id, "r1");
    let ids: Vec<u64> = history.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(store.history(&"r1".into()).unwrap().len(), 2);
    assert_eq!(store.load_run(&"r2".into()).unwrap().unwrap().close_ms, 9);
    assert!(store.load_run(&"nope".into()).unwrap().is_none());
    // The latest run of an id: by start time, then by which was written first.
    let mut later = run("r3", ExecutionStatus::Running);
    later.start_ms = 1;
    commit(store, vec![put_run(later)]).await;
    let latest = store
        .latest_run(&"default".into(), false, "wf")
        .unwrap()
        .unwrap();
    assert_eq!(latest.run_id, "r3");
    assert!(store
        .latest_run(&"default".into(), true, "wf")
        .unwrap()
        .is_none());
}

async fn recovery_folds_the_newest_hand_out_of_each_current_attempt_into_its_run(
    store: &dyn Store,
) {
    use crate::state::ActivityState;
    let mut state = run("r", ExecutionStatus::Running);
    // Activity 3 is on attempt 2; activity 4 was handed out (dispatch 7) when the run was
    // last written whole; activity 5 waits in its queue.
    for (sched, attempt, dispatch) in [(3u64, 2u32, 0u64), (4, 1, 7), (5, 1, 0)] {
        state.activities.insert(
            sched,
            ActivityState {
                scheduled_event_id: sched,
                attempt,
                started_dispatch: dispatch,
                started_ms: if dispatch > 0 { 100 } else { 0 },
                started_worker: if dispatch > 0 {
                    "old".into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
        );
    }
    let started = |sched: u64, attempt: u32, dispatch: u64, ms: i64, worker: &str| Write::Started {
        run_id: "r".into(),
        scheduled_event_id: sched,
        attempt,
        dispatch,
        started_ms: ms,
        worker: worker.into(),
        instance: format!("{worker}-process"),
        session_id: None,
        session_activities_run: 0,
    };
    let writes = vec![
        Write::Run {
            state: Box::new(state),
            may_own_started: true,
        },
        // Attempt 2 of activity 3 is running on w2 (attempt 1's row is long replaced).
        started(3, 2, 9, 200, "w2"),
        // An older hand-out of activity 4 than the state knows: the state's wins.
        started(4, 1, 6, 90, "stale"),
        // Activity 5 was handed out and taken back (its poll ended first).
        started(5, 1, 8, 150, "w3"),
    ];
    commit(store, writes).await;
    commit(store, vec![started(5, 1, 8, 0, "")]).await;
    let recovered = store.recover().unwrap();
    let (state, _) = &recovered.open_runs[0];
    let a3 = &state.activities[&3];
    assert_eq!((a3.started_dispatch, a3.started_worker.as_str()), (9, "w2"));
    let a4 = &state.activities[&4];
    assert_eq!(
        (a4.started_dispatch, a4.started_worker.as_str()),
        (7, "old")
    );
    let a5 = &state.activities[&5];
    assert_eq!(
        (a5.started_dispatch, a5.started_ms),
        (0, 0),
        "taken back: waiting"
    );
}

/// A group is written as if its writes ran one by one, however a store gathers them: a run's
/// close removes the hand-out rows written before it in the same group, not those after, and a
/// row written twice is as written last.
async fn in_one_group_a_close_removes_the_hand_outs_before_it_and_keeps_those_after(
    store: &dyn Store,
) {
    let handed_out = |run_id: &str, dispatch: u64| handed_out(run_id, dispatch, None);
    let mut writes: Vec<Write> = ["before", "after", "twice"]
        .into_iter()
        .map(|id| put_run(with_activity(id)))
        .collect();
    writes.extend([
        handed_out("before", 1),
        handed_out("twice", 1),
        handed_out("twice", 2),
        put_run(closed("before", 5)),
        put_run(closed("after", 5)),
        handed_out("after", 3),
    ]);
    commit(store, writes).await;
    // Opened again (as no engine would), they show which rows are left to fold into them.
    commit(
        store,
        ["before", "after", "twice"]
            .into_iter()
            .map(|id| Write::Run {
                state: Box::new(with_activity(id)),
                may_own_started: false,
            })
            .collect(),
    )
    .await;
    // Hand-outs alone (the group a store may write in one go), one of them twice.
    commit(store, vec![handed_out("twice", 4), handed_out("twice", 5)]).await;
    let recovered = store.recover().unwrap();
    let mut dispatches: Vec<(String, u64)> = recovered
        .open_runs
        .iter()
        .map(|(state, _)| (state.run_id.clone(), state.activities[&1].started_dispatch))
        .collect();
    dispatches.sort();
    assert_eq!(
        dispatches,
        vec![
            ("after".into(), 3),
            ("before".into(), 0),
            ("twice".into(), 5)
        ]
    );
}

async fn a_closed_sessions_rows_are_released_and_the_open_runs_keep_theirs(store: &dyn Store) {
    let with_activity = |id: &str| Write::Run {
        state: Box::new(with_activity(id)),
        may_own_started: false,
    };
    let handed_out = |run_id: &str, count: u64| handed_out(run_id, count, Some("s"));
    commit(
        store,
        vec![
            session("s", "open", 1, 0),
            with_activity("r-running"),
            with_activity("r-done"),
            handed_out("r-running", 1),
            handed_out("r-done", 2),
        ],
    )
    .await;
    // r-done closes while the session is open: its row keeps the session's count.
    commit(
        store,
        vec![Write::Run {
            state: Box::new(closed("r-done", 5)),
            may_own_started: true,
        }],
    )
    .await;
    let recovered = store.recover().unwrap();
    let mut rows = recovered.session_rows.clone();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("s".into(), "r-done".into()),
            ("s".into(), "r-running".into())
        ],
        "a closed run's rows are found for its session too"
    );
    let info = recovered.open_sessions[0].info.clone().unwrap();
    assert_eq!(
        (info.activities_run, info.last_used_ms),
        (2, 20),
        "the session's count and last use come from its rows"
    );
    commit(
        store,
        vec![
            session("s", "completed", 1, 5),
            Write::ReleaseSessionRows {
                session_id: "s".into(),
                runs_still_open: vec!["r-running".into()],
                runs_closed: vec!["r-done".into()],
            },
        ],
    )
    .await;
    let recovered = store.recover().unwrap();
    assert!(
        recovered.session_rows.is_empty(),
        "{:?}",
        recovered.session_rows
    );
    assert!(recovered.open_sessions.is_empty());
    let (running, _) = &recovered.open_runs[0];
    assert_eq!(
        running.activities[&1].started_dispatch, 1,
        "the row of the run still open is its own now, and still says who runs its attempt"
    );
    // Its row goes when it closes.
    commit(store, vec![put_run(closed("r-running", 6))]).await;
    let mut reopened = run("r-running", ExecutionStatus::Running);
    reopened.activities = running.activities.clone();
    reopened.activities.get_mut(&1).unwrap().started_dispatch = 0;
    commit(
        store,
        vec![Write::Run {
            state: Box::new(reopened),
            may_own_started: false,
        }],
    )
    .await;
    let recovered = store.recover().unwrap();
    assert_eq!(
        recovered.open_runs[0].0.activities[&1].started_dispatch, 0,
        "no row of it was left to fold"
    );
}

async fn a_delete_never_removes_an_open_run_its_history_or_an_open_session(store: &dyn Store) {
    let mut open = run("open", ExecutionStatus::Running);
    open.activities.insert(
        1,
        crate::state::ActivityState {
            scheduled_event_id: 1,
            attempt: 1,
            ..Default::default()
        },
    );
    commit(
        store,
        vec![
            put_run(open),
            Write::Events {
                run_id: "open".into(),
                events: vec![event(1)],
            },
            // Who runs its activity: a row of its own.
            Write::Started {
                run_id: "open".into(),
                scheduled_event_id: 1,
                attempt: 1,
                dispatch: 3,
                started_ms: 10,
                worker: "w".into(),
                instance: "w-process".into(),
                session_id: None,
                session_activities_run: 0,
            },
            put_run(closed("old", 5)),
            Write::Events {
                run_id: "old".into(),
                events: vec![event(1)],
            },
            session("s-open", "open", 1, 0),
            session("s-old", "completed", 1, 7),
        ],
    )
    .await;
    commit(
        store,
        vec![
            Write::DeleteRuns {
                run_ids: vec!["old".into(), "open".into()],
            },
            Write::DeleteSessions {
                session_ids: vec!["s-old".into(), "s-open".into()],
            },
        ],
    )
    .await;
    assert!(store.load_run(&"old".into()).unwrap().is_none());
    assert!(store.history(&"old".into()).unwrap().is_empty());
    assert!(store.load_run(&"open".into()).unwrap().is_some());
    assert_eq!(
        store.history(&"open".into()).unwrap().len(),
        1,
        "an open run keeps its history"
    );
    assert!(store.load_session(&"s-old".into()).unwrap().is_none());
    assert!(store.load_session(&"s-open".into()).unwrap().is_some());
    let recovered = store.recover().unwrap();
    let (state, history) = &recovered.open_runs[0];
    assert_eq!(history.len(), 1);
    assert_eq!(
        (
            state.activities[&1].started_dispatch,
            state.activities[&1].started_worker.as_str()
        ),
        (3, "w"),
        "an open run keeps its hand-out rows"
    );
}

async fn runs_and_sessions_page_newest_first_with_exact_boundaries(store: &dyn Store) {
    use super::api::RunFilter;
    let mut writes = Vec::new();
    // Two runs in each millisecond: the page boundary falls between runs of the same time.
    for i in 0..6 {
        let mut state = run(&format!("r{i}"), ExecutionStatus::Running);
        state.start_ms = 100 + i / 2;
        if i == 3 {
            state.status = ExecutionStatus::Failed as i32;
            state.close_ms = 200;
        }
        writes.push(put_run(state));
        writes.push(session(&format!("s{i}"), "open", 100 + i / 2, 0));
    }
    let mut elsewhere = run("other-ns", ExecutionStatus::Running);
    elsewhere.namespace = "other".into();
    writes.push(put_run(elsewhere));
    commit(store, writes).await;
    let page = |after: Option<(i64, String)>, status: Option<i32>| {
        let runs = store
            .list_runs(&RunFilter {
                namespace: "default".into(),
                standalone_activity: false,
                status,
                limit: 3,
                after: after.map(|(ms, id)| (ms, id.into())),
            })
            .unwrap();
        runs.into_iter()
            .map(|r| (r.start_ms, r.run_id))
            .collect::<Vec<_>>()
    };
    let first = page(None, None);
    let ids = |p: &[(i64, String)]| p.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), vec!["r5", "r4", "r3"]);
    let second = page(first.last().cloned(), None);
    assert_eq!(ids(&second), vec!["r2", "r1", "r0"]);
    assert!(page(second.last().cloned(), None).is_empty());
    assert_eq!(
        ids(&page(None, Some(ExecutionStatus::Failed as i32))),
        vec!["r3"]
    );
    let sessions = session_ids(store.list_sessions(&"default".into(), None, 4).unwrap());
    assert_eq!(sessions, vec!["s5", "s4", "s3", "s2"]);
    let rest = store
        .list_sessions(&"default".into(), Some((101, "s2".into())), 4)
        .unwrap();
    assert_eq!(session_ids(rest), vec!["s1", "s0"]);
    assert!(store
        .list_sessions(&"other".into(), None, 4)
        .unwrap()
        .is_empty());
}

async fn expired_rows_come_oldest_first_and_only_closed_ones(store: &dyn Store) {
    commit(
        store,
        vec![
            put_run(closed("late", 300)),
            put_run(closed("early", 100)),
            put_run(closed("middle", 200)),
            put_run(run("open", ExecutionStatus::Running)),
            session("s-late", "completed", 1, 300),
            session("s-early", "failed", 1, 100),
            session("s-open", "open", 1, 0),
        ],
    )
    .await;
    assert_eq!(
        store.expired_runs(&"default".into(), 300, 10).unwrap(),
        vec!["early", "middle"]
    );
    assert_eq!(
        store.expired_runs(&"default".into(), 1_000, 1).unwrap(),
        vec!["early"]
    );
    assert!(store
        .expired_runs(&"other".into(), 1_000, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .expired_sessions(&"default".into(), 1_000, 10)
            .unwrap(),
        vec!["s-early", "s-late"]
    );
    assert!(store
        .expired_sessions(&"default".into(), 100, 10)
        .unwrap()
        .is_empty());
}

/// The engine hands tasks over and answers waiters from [`OnDurable`]: never before the batch
/// is durable, in the order of the commits, and done by the time `done` resolves (the request
/// that made the batch may look at what it did).
async fn what_follows_a_commit_runs_once_it_is_durable_in_order_and_before_its_submitter_hears(
    store: &dyn Store,
) {
    // (which submission, how far the store said commits had got when it ran)
    let ran: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let mut numbers = Vec::new();
    let mut commits = Vec::new();
    for i in 0..40 {
        let (ran_, durability) = (ran.clone(), store.durability());
        let on_durable: OnDurable = Box::new(move || {
            let reached = durability.borrow().seq;
            ran_.lock().push((i, reached));
        });
        let commit = store.submit_then(
            WriteBatch {
                writes: vec![put_run(run(&format!("r{i}"), ExecutionStatus::Running))],
            },
            Some(on_durable),
        );
        numbers.push(commit.seq);
        commits.push((i, commit));
        if i % 3 == 0 {
            // Some one by one, the rest queued behind each other (groups, on the writers).
            for (i, commit) in commits.drain(..) {
                commit.done.await.unwrap().unwrap();
                assert!(
                    ran.lock().iter().any(|(ran, _)| *ran == i),
                    "batch {} was answered before what follows it ran",
                    commit.seq
                );
            }
        }
    }
    for (i, commit) in commits {
        commit.done.await.unwrap().unwrap();
        assert!(
            ran.lock().iter().any(|(ran, _)| *ran == i),
            "batch {} was answered before what follows it ran",
            commit.seq
        );
    }
    let ran = ran.lock().clone();
    assert_eq!(ran.len(), 40, "{ran:?}");
    for (i, reached) in &ran {
        assert!(
            *reached >= numbers[*i],
            "batch {} ran when the store had made durable only up to {reached}",
            numbers[*i]
        );
    }
    assert!(
        ran.windows(2).all(|w| w[0].0 < w[1].0),
        "out of commit order: {ran:?}"
    );
}

#[tokio::test]
async fn once_the_in_memory_store_fails_no_later_batch_is_written() {
    let store = MemoryStore::new();
    commit(
        &store,
        vec![put_run(run("before", ExecutionStatus::Running))],
    )
    .await;
    store.fail_from_now("the disk is full");
    let followed = Arc::new(AtomicU64::new(0));
    let on_durable: OnDurable = {
        let followed = followed.clone();
        Box::new(move || {
            followed.fetch_add(1, SeqCst);
        })
    };
    let failed = store.submit_then(
        WriteBatch {
            writes: vec![put_run(run("after", ExecutionStatus::Running))],
        },
        Some(on_durable),
    );
    let why = failed.done.await.unwrap().unwrap_err();
    assert_eq!(followed.load(SeqCst), 0, "what follows a failed commit ran");
    assert!(why.contains("the disk is full"), "{why}");
    let durability = store.durability().borrow().clone();
    assert_eq!(durability.seq, 1, "only the first batch is durable");
    assert!(durability.failed.is_some());
    assert!(store.load_run(&"after".into()).unwrap().is_none());
}
