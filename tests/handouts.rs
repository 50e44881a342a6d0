//! Every attempt the server hands out reaches the one process that holds the worker identity,
//! or comes back to its queue: through refused completions, processes that replace each other,
//! one identity in two namespaces, requests that go away mid-commit, and shutdown. Driven at
//! the wire (and, where the timing must be exact, at the engine) to control each step.

mod common;

use common::{eventually, within, TestEnv, WriteLock};
use std::sync::Arc;
use std::time::Duration;
use tether::api::pb;
use tether::server::{Engine, ServerConfig};
use tether::store::{SqliteStore, SyncMode};

type Rpc = tether_sdk::client::Rpc;

const T: Duration = Duration::from_secs(20);

fn start_request(
    namespace: &str,
    id: &str,
    start_to_close_ms: u64,
    attempts: u32,
) -> pb::StartActivityRequest {
    pb::StartActivityRequest {
        namespace: namespace.into(),
        activity_id: id.into(),
        activity_type: "work".into(),
        task_queue: "h-q".into(),
        options: Some(pb::ActivityOptions {
            start_to_close_timeout_ms: start_to_close_ms,
            retry_policy: Some(pb::RetryPolicy {
                maximum_attempts: attempts,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn start(rpc: &mut Rpc, namespace: &str, id: &str) {
    rpc.start_activity(start_request(namespace, id, 60_000, 0))
        .await
        .unwrap();
}

fn poll_request(
    namespace: &str,
    identity: &str,
    instance: &str,
    timeout_ms: u64,
) -> pb::PollActivityTaskRequest {
    pb::PollActivityTaskRequest {
        namespace: namespace.into(),
        task_queue: "h-q".into(),
        identity: identity.into(),
        instance_id: instance.into(),
        poll_timeout_ms: timeout_ms,
        ..Default::default()
    }
}

async fn poll(
    rpc: &mut Rpc,
    namespace: &str,
    identity: &str,
    instance: &str,
    timeout_ms: u64,
) -> pb::PollActivityTaskResponse {
    rpc.poll_activity_task(poll_request(namespace, identity, instance, timeout_ms))
        .await
        .unwrap()
        .into_inner()
}

async fn register(rpc: &mut Rpc, namespace: &str, identity: &str, instance: &str, previous: &str) {
    rpc.register_worker(pb::RegisterWorkerRequest {
        namespace: namespace.into(),
        identity: identity.into(),
        task_queues: vec!["h-q".into()],
        instance_id: instance.into(),
        previous_instance_id: previous.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn complete(
    token: &[u8],
    identity: &str,
    next: Option<pb::NextTaskRequest>,
) -> pb::CompleteActivityTaskRequest {
    pb::CompleteActivityTaskRequest {
        task_token: token.to_vec(),
        identity: identity.into(),
        next_task: next,
        ..Default::default()
    }
}

/// The one pending attempt of standalone activity `id`: (state, attempt).
async fn pending(rpc: &mut Rpc, namespace: &str, id: &str) -> Option<(String, u32)> {
    let described = rpc
        .describe_activity(pb::DescribeActivityRequest {
            namespace: namespace.into(),
            activity_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    described
        .pending_activities
        .first()
        .map(|p| (p.state.clone(), p.attempt))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_completion_takes_no_next_task() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    // One attempt only, timing out while its worker still holds it.
    rpc.start_activity(start_request("default", "late", 300, 1))
        .await
        .unwrap();
    let first = poll(&mut rpc, "default", "w-late", "", 5_000).await;
    assert_eq!(first.activity_id, "late");
    eventually(T, "the attempt times out", || {
        let mut rpc = rpc.clone();
        async move {
            pending(&mut rpc, "default", "late")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await;
    start(&mut rpc, "default", "waiting").await;
    // The late completion is refused; the task waiting in the queue must not go with it.
    let next = pb::NextTaskRequest {
        namespace: "default".into(),
        task_queue: "h-q".into(),
        ..Default::default()
    };
    let err = rpc
        .complete_activity_task(complete(&first.task_token, "w-late", Some(next)))
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert_eq!(
        pending(&mut rpc, "default", "waiting").await,
        Some(("scheduled".to_string(), 1)),
        "the waiting task was handed to a completion that was refused"
    );
    let got = poll(&mut rpc, "default", "w-other", "", 2_000).await;
    assert_eq!(got.activity_id, "waiting");
    assert_eq!(got.attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_tasks_taken_before_registering_stay_with_the_process_that_took_them() {
    // As after a server restart: the worker completes and refills before its heartbeat has
    // registered it again.
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    start(&mut rpc, "default", "a").await;
    let a = poll(&mut rpc, "default", "w3", "i-1", 5_000).await;
    assert_eq!(a.activity_id, "a");
    start(&mut rpc, "default", "b").await;
    let next = pb::NextTaskRequest {
        namespace: "default".into(),
        task_queue: "h-q".into(),
        instance_id: "i-1".into(),
        ..Default::default()
    };
    let b = rpc
        .complete_activity_task(complete(&a.task_token, "w3", Some(next)))
        .await
        .unwrap()
        .into_inner()
        .next_task
        .expect("b is handed over with the completion");
    assert_eq!(b.activity_id, "b");
    // The same process registers: what it runs is still its own.
    register(&mut rpc, "default", "w3", "i-1", "").await;
    assert_eq!(
        pending(&mut rpc, "default", "b").await,
        Some(("started".to_string(), 1)),
        "the attempt its own process runs was failed as lost"
    );
    rpc.complete_activity_task(complete(&b.task_token, "w3", None))
        .await
        .unwrap();
    // Another process of it asking for next tasks is given none.
    start(&mut rpc, "default", "c").await;
    let c = poll(&mut rpc, "default", "w3", "i-1", 5_000).await;
    let stranger = pb::NextTaskRequest {
        namespace: "default".into(),
        task_queue: "h-q".into(),
        instance_id: "i-other".into(),
        ..Default::default()
    };
    start(&mut rpc, "default", "d").await;
    let refill = rpc
        .complete_activity_task(complete(&c.task_token, "w3", Some(stranger)))
        .await
        .unwrap()
        .into_inner();
    assert!(refill.next_task.is_none(), "{:?}", refill.next_task);
    assert_eq!(
        pending(&mut rpc, "default", "d").await,
        Some(("scheduled".to_string(), 1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_in_two_namespaces_is_two_workers() {
    let env = TestEnv::start().await;
    env.client
        .register_namespace("staging", "second namespace")
        .await
        .unwrap();
    let mut rpc = env.client.raw();
    register(&mut rpc, "default", "gpu-7", "prod-process", "").await;
    start(&mut rpc, "default", "prod-job").await;
    let job = poll(&mut rpc, "default", "gpu-7", "prod-process", 5_000).await;
    assert_eq!(job.activity_id, "prod-job");
    // Another process serves the staging namespace under the same name.
    register(&mut rpc, "staging", "gpu-7", "staging-process", "").await;
    assert_eq!(
        pending(&mut rpc, "default", "prod-job").await,
        Some(("started".to_string(), 1)),
        "a registration in another namespace failed this namespace's running attempt"
    );
    rpc.complete_activity_task(complete(&job.task_token, "gpu-7", None))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_shut_down_finishes_its_attempts_after_another_takes_its_identity() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    register(&mut rpc, "default", "w5", "old", "").await;
    start(&mut rpc, "default", "draining").await;
    let job = poll(&mut rpc, "default", "w5", "old", 5_000).await;
    assert_eq!(job.activity_id, "draining");
    // It shuts down gracefully, still finishing the attempt; a new process takes the name
    // without saying the old one is gone.
    rpc.deregister_worker(pb::DeregisterWorkerRequest {
        namespace: "default".into(),
        identity: "w5".into(),
        instance_id: "old".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    register(&mut rpc, "default", "w5", "new", "").await;
    assert_eq!(
        pending(&mut rpc, "default", "draining").await,
        Some(("started".to_string(), 1)),
        "the draining process's attempt was retried next to it"
    );
    rpc.complete_activity_task(complete(&job.task_token, "w5", None))
        .await
        .unwrap();
    // A process that says it replaces the holder proves the holder gone: what the holder ran
    // is retried at once.
    start(&mut rpc, "default", "lost").await;
    let lost = poll(&mut rpc, "default", "w5", "new", 5_000).await;
    assert_eq!(lost.activity_id, "lost");
    register(&mut rpc, "default", "w5", "newer", "new").await;
    let retried = poll(&mut rpc, "default", "w5", "newer", 5_000).await;
    assert_eq!((retried.activity_id.as_str(), retried.attempt), ("lost", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_process_gets_no_more_work() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    register(&mut rpc, "default", "w6", "old", "").await;
    let parked = {
        let mut rpc = rpc.clone();
        tokio::spawn(async move { poll(&mut rpc, "default", "w6", "old", 15_000).await })
    };
    eventually(T, "the old process's poll is parked", || async {
        let queue = env.client.describe_task_queue("h-q").await.ok()?;
        queue
            .pollers
            .iter()
            .any(|p| p.identity == "w6")
            .then_some(())
    })
    .await;
    register(&mut rpc, "default", "w6", "new", "old").await;
    // The old process's parked poll ends empty at once...
    let ended = within(
        Duration::from_secs(5),
        "the replaced process's poll",
        parked,
    )
    .await
    .unwrap();
    assert!(ended.task_token.is_empty(), "{}", ended.activity_id);
    // ...so new work goes to the process that holds the name now, and the old one is refused.
    start(&mut rpc, "default", "after").await;
    let err = rpc
        .poll_activity_task(poll_request("default", "w6", "old", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let got = poll(&mut rpc, "default", "w6", "new", 5_000).await;
    assert_eq!((got.activity_id.as_str(), got.attempt), ("after", 1));
}

async fn open_engine(dir: &std::path::Path) -> (Arc<Engine>, Arc<SqliteStore>) {
    let store = Arc::new(SqliteStore::open(dir, SyncMode::Normal).unwrap());
    let engine = Engine::open(store.clone(), ServerConfig::default())
        .await
        .unwrap();
    (engine, store)
}

async fn wait_parked(engine: &Engine, identity: &str) {
    eventually(T, "the poll is parked", || async {
        let queue = engine
            .describe_queue(&"default".into(), &"h-q".into())
            .ok()?;
        queue
            .pollers
            .iter()
            .any(|p| p.identity == identity)
            .then_some(())
    })
    .await;
}

// One thread, so the test decides what runs when.
#[tokio::test(flavor = "current_thread")]
async fn a_commit_whose_request_went_away_still_hands_its_task_over() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _store) = open_engine(dir.path()).await;
    let parked = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .poll_activity_task(poll_request("default", "w2", "", 15_000))
                .await
        })
    };
    wait_parked(&engine, "w2").await;
    // The start is dispatched to the parked poll inside its own transaction; its caller goes
    // away while the commit is under way (a disconnect, a deadline). Another connection's write
    // lock keeps the commit under way for as long as the test needs.
    let lock = WriteLock::take(dir.path());
    let mut starting =
        Box::pin(engine.start_activity(start_request("default", "orphan", 60_000, 0)));
    assert!(futures::poll!(&mut starting).is_pending());
    drop(starting);
    lock.release();
    let got = within(Duration::from_secs(5), "the parked poll", parked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.activity_id.as_str(), got.attempt),
        ("orphan", 1),
        "the durable hand-out never reached the poll it was made for"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn attempts_given_back_while_the_server_shuts_down_wait_in_their_queue_after_it() {
    // Shutdown wakes a parked poll that was handed an attempt a moment before: which of the two
    // it sees first is up to the poll. Either way the attempt is not left "started" on nobody.
    let mut given_back = 0;
    for round in 0..24 {
        let dir = tempfile::tempdir().unwrap();
        let (engine, store) = open_engine(dir.path()).await;
        let parked = {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .poll_activity_task(poll_request("default", "w8", "", 15_000))
                    .await
            })
        };
        wait_parked(&engine, "w8").await;
        let started = engine
            .start_activity(start_request("default", "at-shutdown", 60_000, 0))
            .await
            .unwrap();
        assert!(started.handed_over, "round {round}");
        engine.begin_shutdown();
        let got = parked.await.unwrap().unwrap();
        engine.take_back_remaining().await;
        drop(engine);
        store.close();
        if !got.task_token.is_empty() {
            continue;
        }
        given_back += 1;
        let (engine, _store) = open_engine(dir.path()).await;
        let again = engine
            .poll_activity_task(poll_request("default", "w8", "", 2_000))
            .await
            .unwrap();
        assert_eq!(
            (again.activity_id.as_str(), again.attempt),
            ("at-shutdown", 1),
            "round {round}: the attempt given back at shutdown stayed started on nobody"
        );
    }
    println!("{given_back} of 24 rounds gave the attempt back at shutdown");
}

/// The hand-out rows left in a SQLite data directory.
fn hand_out_rows(dir: &std::path::Path) -> Vec<(String, i64)> {
    let db = rusqlite::Connection::open(dir.join("tether.db")).unwrap();
    let mut rows = db.prepare("SELECT run_id, dispatch FROM started").unwrap();
    rows.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A hand-out's row (who runs the attempt, for recovery) goes when its run closes; it once
/// stayed for good, because closing a run forgot that it had any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_standalone_activity_leaves_no_hand_out_row() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    // Handed out from its queue to a poll, then completed.
    start(&mut rpc, "default", "polled").await;
    let got = poll(&mut rpc, "default", "w", "", 5_000).await;
    assert_eq!(got.activity_id, "polled");
    // Two waiting, the second taken by the first one's completion.
    start(&mut rpc, "default", "first").await;
    start(&mut rpc, "default", "second").await;
    rpc.complete_activity_task(complete(&got.task_token, "w", None))
        .await
        .unwrap();
    let first = poll(&mut rpc, "default", "w", "", 5_000).await;
    let next = pb::NextTaskRequest {
        namespace: "default".into(),
        task_queue: "h-q".into(),
        ..Default::default()
    };
    let second = rpc
        .complete_activity_task(complete(&first.task_token, "w", Some(next)))
        .await
        .unwrap()
        .into_inner()
        .next_task
        .expect("the completion took the waiting task");
    rpc.complete_activity_task(complete(&second.task_token, "w", None))
        .await
        .unwrap();
    assert_eq!(
        hand_out_rows(env.dir.path()),
        Vec::<(String, i64)>::new(),
        "hand-out rows of closed runs"
    );
}
