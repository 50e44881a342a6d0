//! kill -9 of the server while work runs: an attempt that a live worker still runs is never
//! handed out again, inside a session or not, and what was really lost is retried as a new
//! attempt.

mod common;

use common::{eventually, spawn_server, within, ServerProcess};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::caps::{CapabilitySource, Inventory};
use tether::client::{ActivityOptions, Client, SessionOptions, StandaloneActivityOptions};
use tether::worker::{Worker, WorkerOptions};

const T: Duration = Duration::from_secs(60);

/// Every execution an activity saw: (attempt, how many copies ran at that moment).
#[derive(Default)]
struct Executions {
    running: AtomicUsize,
    seen: Mutex<Vec<(u32, usize)>>,
}

fn server(dir: &std::path::Path, listen: &str) -> ServerProcess {
    spawn_server(&[
        "server",
        "--data-dir",
        dir.to_str().unwrap(),
        "--sync",
        "full",
        "--listen",
        listen,
    ])
}

fn worker(client: &Client, identity: &str, executions: Arc<Executions>) -> Worker {
    worker_in(client, identity, executions, None)
}

/// A worker keeping its identity lock files in `state` (None: nowhere).
fn worker_in(
    client: &Client,
    identity: &str,
    executions: Arc<Executions>,
    state: Option<&std::path::Path>,
) -> Worker {
    let inventory = Inventory::parse(
        "hostname = \"crash-box\"\n[[gpu]]\nname = \"NVIDIA A100\"\nmemory = \"80GiB\"\ncount = 2\n",
        "test",
    )
    .unwrap();
    let mut w = Worker::new(
        client.clone(),
        WorkerOptions::new("crash-q")
            .identity(identity)
            .capabilities(CapabilitySource::detect().with_inventory(inventory))
            .state_dir(state.map(|s| s.to_path_buf()))
            .graceful_shutdown(Duration::from_secs(1)),
    );
    w.register_activity("slow", move |ctx: ActivityContext, ms: u64| {
        let executions = executions.clone();
        async move {
            let copies = executions.running.fetch_add(1, Ordering::SeqCst) + 1;
            executions.seen.lock().push((ctx.info().attempt, copies));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            executions.running.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, ActivityError>(ctx.info().attempt)
        }
    });
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_attempt_is_not_handed_out_again_after_a_server_crash() {
    let dir = tempfile::tempdir().unwrap();
    let first = server(dir.path(), "127.0.0.1:0");
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let executions = Arc::new(Executions::default());
    let handle = worker(&client, "crash-w", executions.clone())
        .start()
        .unwrap();
    let activity = client
        .start_activity(
            "slow",
            &4_000u64,
            StandaloneActivityOptions {
                options: ActivityOptions::default().start_to_close(Duration::from_secs(60)),
                ..StandaloneActivityOptions::new("crash-1", "crash-q")
            },
        )
        .await
        .unwrap();
    eventually(T, "the attempt runs", || async {
        (executions.running.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    first.kill_9();
    let _second = server(dir.path(), &addr);
    let attempt: u32 = within(T, "the activity's result", activity.result())
        .await
        .unwrap();
    let seen = executions.seen.lock().clone();
    assert_eq!(
        seen,
        vec![(1, 1)],
        "the attempt that kept running was started again: {seen:?}"
    );
    assert_eq!(attempt, 1);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_attempt_runs_once_across_a_crash_and_keeps_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let first = server(dir.path(), "127.0.0.1:0");
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let executions = Arc::new(Executions::default());
    let handle = worker(&client, "crash-s", executions.clone())
        .start()
        .unwrap();
    let session = within(
        T,
        "session",
        client.create_session(SessionOptions {
            gpus: 2,
            ..SessionOptions::new("crash-q")
        }),
    )
    .await
    .unwrap();
    let in_session = {
        let session = session.clone();
        tokio::spawn(async move {
            session
                .execute_activity::<_, u32>("slow", &4_000u64, ActivityOptions::default())
                .await
        })
    };
    eventually(T, "the session attempt runs", || async {
        (executions.running.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    first.kill_9();
    let _second = server(dir.path(), &addr);
    let attempt = within(T, "session activity", in_session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(attempt, 1);
    let seen = executions.seen.lock().clone();
    assert_eq!(seen, vec![(1, 1)], "two copies on the same GPUs: {seen:?}");
    let info = client.describe_session(session.id()).await.unwrap();
    assert_eq!(info.activities_run, 1, "{info:?}");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_lost_with_its_worker_is_retried_as_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let first = server(dir.path(), "127.0.0.1:0");
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let executions = Arc::new(Executions::default());
    // Both processes of "lost-w" share the host's state directory, as a restart would.
    let make =
        |executions: Arc<Executions>| worker_in(&client, "lost-w", executions, Some(state.path()));
    let handle = make(executions.clone()).start().unwrap();
    let activity = client
        .start_activity(
            "slow",
            &1_500u64,
            StandaloneActivityOptions {
                options: ActivityOptions::default().start_to_close(Duration::from_secs(60)),
                ..StandaloneActivityOptions::new("lost-1", "crash-q")
            },
        )
        .await
        .unwrap();
    eventually(T, "the attempt runs", || async {
        (executions.running.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The machine goes down: server and worker both die.
    handle.kill();
    first.kill_9();
    executions.running.store(0, Ordering::SeqCst);
    let _second = server(dir.path(), &addr);
    // The worker's process starts again: the attempt its old process ran is lost, and retried
    // at once as attempt 2 (not after the 60 s start-to-close timeout).
    let restarted = make(executions.clone()).start().unwrap();
    let attempt: u32 = within(
        Duration::from_secs(20),
        "the retried activity",
        activity.result(),
    )
    .await
    .unwrap();
    assert_eq!(attempt, 2);
    let seen = executions.seen.lock().clone();
    assert_eq!(seen.first(), Some(&(1, 1)));
    assert_eq!(seen.last(), Some(&(2, 1)), "{seen:?}");
    restarted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_running_when_its_session_completes_finishes_across_a_crash() {
    use tether::api::pb;
    let dir = tempfile::tempdir().unwrap();
    let first = server(dir.path(), "127.0.0.1:0");
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    // A worker driven by hand, so the attempt is taken from the queue by a poll of its own
    // (its hand-out then lives in a hand-out row only, not in a whole write of its run).
    let mut rpc = client.raw();
    let host_queue = rpc
        .register_worker(pb::RegisterWorkerRequest {
            namespace: "default".into(),
            identity: "crash-c".into(),
            task_queues: vec!["crash-q".into()],
            instance_id: "crash-c-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .host_queue;
    let session = within(
        T,
        "session",
        client.create_session(SessionOptions::new("crash-q")),
    )
    .await
    .unwrap();
    let in_session = {
        let session = session.clone();
        tokio::spawn(async move {
            session
                .execute_activity::<_, u32>("slow", &0u64, ActivityOptions::default())
                .await
        })
    };
    eventually(T, "the session attempt waits in the host queue", || async {
        let queue = client.describe_task_queue(&host_queue).await.ok()?;
        (queue.activity_backlog == 1).then_some(())
    })
    .await;
    let task = eventually(T, "the session attempt is handed out", || {
        let mut rpc = rpc.clone();
        let host_queue = host_queue.clone();
        async move {
            let task = rpc
                .poll_activity_task(pb::PollActivityTaskRequest {
                    namespace: "default".into(),
                    task_queue: host_queue,
                    identity: "crash-c".into(),
                    instance_id: "crash-c-1".into(),
                    poll_timeout_ms: 1_000,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (!task.task_token.is_empty()).then_some(task)
        }
    })
    .await;
    // Its owner is done with the session, but lets the running attempt finish; then the
    // server dies before it does.
    let closed = session.complete().await.unwrap();
    assert_eq!(closed.state, "completed");
    first.kill_9();
    let _second = server(dir.path(), &addr);
    let result = client.data_converter().to_payload(&1u32).unwrap();
    eventually(T, "the attempt's completion is accepted", || {
        let mut rpc = rpc.clone();
        let req = pb::CompleteActivityTaskRequest {
            task_token: task.task_token.clone(),
            result: Some(result.clone()),
            identity: "crash-c".into(),
            ..Default::default()
        };
        async move {
            match rpc.complete_activity_task(req).await {
                Ok(_) => Some(Ok(())),
                Err(e) if e.code() == tonic::Code::Unavailable => None,
                Err(e) => Some(Err(e)),
            }
        }
    })
    .await
    .expect("the attempt that ran through the close and the crash may report");
    let attempt = within(T, "the session activity's result", in_session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_hand_out_records_go_when_it_closes_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let first = server(dir.path(), "127.0.0.1:0");
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let executions = Arc::new(Executions::default());
    let handle = worker(&client, "rows-w", executions.clone())
        .start()
        .unwrap();
    let session = within(
        T,
        "session",
        client.create_session(SessionOptions::new("crash-q")),
    )
    .await
    .unwrap();
    // Finished before the crash: their runs are closed, and only their hand-out records
    // still say which runs the session has records in.
    for _ in 0..2 {
        let attempt = within(
            T,
            "session activity",
            session.execute_activity::<_, u32>("slow", &0u64, ActivityOptions::default()),
        )
        .await
        .unwrap();
        assert_eq!(attempt, 1);
    }
    first.kill_9();
    let _second = server(dir.path(), &addr);
    let info = within(T, "the session after the restart", session.complete())
        .await
        .unwrap();
    assert_eq!(
        (info.state.as_str(), info.activities_run),
        ("completed", 2),
        "{info:?}"
    );
    // Read the server's database directly (WAL: a second reader sees what was committed).
    let db = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
    let left: Vec<(String, String)> = db
        .prepare("SELECT run_id, session_id FROM started")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        left,
        Vec::<(String, String)>::new(),
        "hand-out records outlived their closed runs and their closed session"
    );
    handle.shutdown().await;
}
