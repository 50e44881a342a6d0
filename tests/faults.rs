//! The core promises under faults and bad input (issue 9): no double runs after a crash, no
//! reservations left behind, nothing built on a failed write, bounded input with clear errors.
//! Each test is named for the promise it checks.

mod common;

use common::{eventually, within, TestEnv};
use std::time::{Duration, Instant};
use tether::api::pb;
use tether::client::WorkflowOptions;

const T: Duration = Duration::from_secs(30);

type Rpc = pb::tether_service_client::TetherServiceClient<tonic::transport::Channel>;

async fn poll_workflow_task(rpc: &mut Rpc, queue: &str) -> pb::PollWorkflowTaskResponse {
    rpc.poll_workflow_task(pb::PollWorkflowTaskRequest {
        namespace: "default".into(),
        task_queue: queue.into(),
        identity: "raw".into(),
        poll_timeout_ms: 10_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn complete_request(
    token: Vec<u8>,
    commands: Vec<pb::command::Kind>,
) -> pb::CompleteWorkflowTaskRequest {
    pb::CompleteWorkflowTaskRequest {
        task_token: token,
        commands: commands
            .into_iter()
            .map(|kind| pb::Command { kind: Some(kind) })
            .collect(),
        identity: "raw".into(),
        ..Default::default()
    }
}

fn schedule(seq: u32, activity_type: &str) -> pb::command::Kind {
    pb::command::Kind::ScheduleActivity(pb::ScheduleActivityCommand {
        seq,
        activity_type: activity_type.into(),
        options: Some(pb::ActivityOptions {
            start_to_close_timeout_ms: 10_000,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn complete_workflow() -> pb::command::Kind {
    pb::command::Kind::CompleteWorkflow(pb::CompleteWorkflowCommand::default())
}

/// Holds SQLite's write lock on the server's database from another connection, as a second
/// process (a backup tool, an operator's sqlite3 shell) would: commits wait behind it.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(dir: &std::path::Path) -> WriteLock {
        let conn = rusqlite::Connection::open(dir.join("tether.db")).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(conn)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

// ------------------------------------------------------------------------------------------------
// Storage and acknowledgements
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_long_poll_waits_until_the_close_is_durable() {
    let env = TestEnv::start().await;
    env.client
        .start_workflow("t", &(), WorkflowOptions::new("durable-close", "dc-q"))
        .await
        .unwrap();
    let mut rpc = env.client.raw();
    let task = poll_workflow_task(&mut rpc, "dc-q").await;
    // The close is applied in memory, but its commit waits behind another writer.
    let lock = WriteLock::take(env.dir.path());
    let mut completer = rpc.clone();
    let completion = tokio::spawn(async move {
        completer
            .complete_workflow_task(complete_request(task.task_token, vec![complete_workflow()]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let mut waiter = rpc.clone();
    let result = tokio::spawn(async move {
        waiter
            .get_workflow_result(pb::GetWorkflowResultRequest {
                namespace: "default".into(),
                workflow_id: "durable-close".into(),
                wait_ms: 5_000,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.release();
    let outcome = within(T, "result", result)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(
        outcome.status,
        pb::ExecutionStatus::Completed as i32,
        "a wait of 5 s answered {:?} after {:?}, before the run's close was durable",
        outcome.status,
        asked.elapsed()
    );
    within(T, "completion", completion).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_event_is_the_last_one_even_when_a_run_signals_itself() {
    let env = TestEnv::start().await;
    env.client
        .start_workflow("t", &(), WorkflowOptions::new("self-signal", "ss-q"))
        .await
        .unwrap();
    let mut rpc = env.client.raw();
    let task = poll_workflow_task(&mut rpc, "ss-q").await;
    rpc.complete_workflow_task(complete_request(
        task.task_token,
        vec![
            pb::command::Kind::SignalExternal(pb::SignalExternalCommand {
                seq: 1,
                workflow_id: "self-signal".into(),
                signal_name: "note".into(),
                ..Default::default()
            }),
            complete_workflow(),
        ],
    ))
    .await
    .unwrap();
    let events = env
        .client
        .workflow_handle("self-signal", "")
        .history()
        .await
        .unwrap();
    let kinds = common::event_kinds(&events);
    assert_eq!(
        kinds.last().copied(),
        Some("WorkflowExecutionCompleted"),
        "nothing may follow the terminal event: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_finds_a_closed_session_at_any_age() {
    let mut env = TestEnv::start().await;
    env.server.take().unwrap().stop().await.unwrap();
    // More closed sessions than any scan would read, the one asked for the oldest.
    {
        let mut conn = rusqlite::Connection::open(env.dir.path().join("tether.db")).unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut put = tx
                .prepare(
                    "INSERT INTO sessions(session_id, namespace, open, created_ms, state, closed_ms)
                     VALUES (?1, 'default', 0, ?2, ?3, ?4)",
                )
                .unwrap();
            for i in 0..100_050i64 {
                let id = format!("old-{i:06}");
                let state = tether::api::internal::SessionState {
                    info: Some(pb::SessionInfo {
                        session_id: id.clone(),
                        namespace: "default".into(),
                        state: "completed".into(),
                        created_ms: 1_000 + i,
                        closed_ms: 2_000 + i,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                put.execute(rusqlite::params![
                    id,
                    1_000 + i,
                    prost::Message::encode_to_vec(&state),
                    2_000 + i
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    env.restart().await;
    let found = env.client.describe_session("old-000000").await.unwrap();
    assert_eq!(found.state, "completed");
    let missing = env.client.describe_session("never-was").await.unwrap_err();
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
}

// ------------------------------------------------------------------------------------------------
// Bounds
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_never_grows_past_what_can_be_delivered() {
    let env = TestEnv::start().await;
    let handle = env
        .client
        .start_workflow("t", &(), WorkflowOptions::new("big-history", "bh-q"))
        .await
        .unwrap();
    let mut rpc = env.client.raw();
    let big = pb::Payload {
        metadata: Default::default(),
        data: vec![b'x'; 2 * 1024 * 1024 - 1024],
    };
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..40 {
        let sent = rpc
            .signal_workflow(pb::SignalWorkflowRequest {
                namespace: "default".into(),
                workflow_id: "big-history".into(),
                signal_name: "blob".into(),
                input: Some(big.clone()),
                ..Default::default()
            })
            .await;
        match sent {
            Ok(_) => accepted += 1,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("some signal is refused before the history is undeliverable");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    assert!(refused.message().contains("bytes"), "{}", refused.message());
    // Everything accepted is delivered to a worker in one piece.
    let task = poll_workflow_task(&mut rpc, "bh-q").await;
    let signals = common::event_kinds(&task.events)
        .iter()
        .filter(|k| **k == "WorkflowSignaled")
        .count();
    assert_eq!(signals, accepted);
    let history = handle.history().await.unwrap();
    assert!(history.len() > accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_only_a_short_prefix_of_oversized_input() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let huge = format!("gpu.count>=1, {}", "x".repeat(100_000));
    let err = rpc
        .start_activity(pb::StartActivityRequest {
            namespace: "default".into(),
            activity_id: "huge-reqs".into(),
            activity_type: "a".into(),
            task_queue: "q".into(),
            options: Some(pb::ActivityOptions {
                start_to_close_timeout_ms: 1_000,
                requirements: huge.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().len() < 1_024,
        "the error echoes {} bytes of input",
        err.message().len()
    );
    assert!(err.message().contains("requirements"), "{}", err.message());
    // The same for a name with a control character deep inside a long value.
    let name = format!("{}\u{7}", "n".repeat(200));
    let err = rpc
        .start_workflow(pb::StartWorkflowRequest {
            namespace: "default".into(),
            workflow_id: name,
            workflow_type: "t".into(),
            task_queue: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().len() < 1_024, "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commands_with_one_seq_are_refused() {
    let env = TestEnv::start().await;
    env.client
        .start_workflow("t", &(), WorkflowOptions::new("dup-seq", "dup-q"))
        .await
        .unwrap();
    let mut rpc = env.client.raw();
    let task = poll_workflow_task(&mut rpc, "dup-q").await;
    let err = rpc
        .complete_workflow_task(complete_request(
            task.task_token.clone(),
            vec![schedule(1, "a"), schedule(1, "b")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("seq 1"), "{}", err.message());
    let timers = vec![
        pb::command::Kind::StartTimer(pb::StartTimerCommand {
            seq: 2,
            duration_ms: 1_000,
        }),
        pb::command::Kind::StartTimer(pb::StartTimerCommand {
            seq: 2,
            duration_ms: 2_000,
        }),
    ];
    let err = rpc
        .complete_workflow_task(complete_request(task.task_token, timers))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Nothing of either was recorded.
    let events = env
        .client
        .workflow_handle("dup-seq", "")
        .history()
        .await
        .unwrap();
    assert_eq!(
        common::event_kinds(&events),
        vec!["WorkflowExecutionStarted"]
    );
}

// ------------------------------------------------------------------------------------------------
// Sessions
// ------------------------------------------------------------------------------------------------

fn gpus_caps(host: &str, n: u32) -> pb::Capabilities {
    pb::Capabilities {
        host: Some(pb::HostInfo {
            hostname: host.into(),
            ..Default::default()
        }),
        gpus: (0..n)
            .map(|i| pb::GpuDevice {
                index: i,
                uuid: format!("GPU-{host}-{i}"),
                name: "NVIDIA A100".into(),
                memory_total_bytes: 80 << 30,
                source: "declared".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn register(identity: &str, caps: pb::Capabilities) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: identity.into(),
        task_queues: vec!["shrink-q".into()],
        capabilities: Some(caps),
        instance_id: "shrinking-process".into(),
        ..Default::default()
    }
}

fn session_request(id: &str, gpus: u32, wait_ms: u64) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        namespace: "default".into(),
        options: Some(pb::SessionOptions {
            task_queue: "shrink-q".into(),
            gpus,
            ..Default::default()
        }),
        owner: "test".into(),
        session_id: id.into(),
        wait_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_gpus_that_vanished_fail_and_nothing_panics() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    rpc.register_worker(register("shrinking", gpus_caps("shrinking", 4)))
        .await
        .unwrap();
    let held = rpc
        .create_session(session_request("holds-4", 4, 5_000))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(held.state, "open");
    // A second request waits: every GPU is taken.
    let waiting = rpc
        .create_session(session_request("wants-1", 1, 0))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(waiting.state, "creating");
    // The worker comes back with two GPUs fewer (a card failed, a driver lost it).
    rpc.register_worker(register("shrinking", gpus_caps("shrinking", 2)))
        .await
        .unwrap();
    let failed = eventually(T, "the session on vanished GPUs fails", || async {
        let s = env.client.describe_session("holds-4").await.ok()?;
        (s.state == "failed").then_some(s)
    })
    .await;
    assert!(failed.reason.contains("GPU"), "{}", failed.reason);
    // The freed GPUs that still exist go to the waiting request; the server keeps working.
    let placed = eventually(T, "the waiting session is placed", || async {
        let s = env.client.describe_session("wants-1").await.ok()?;
        (s.state == "open").then_some(s)
    })
    .await;
    assert!(placed.gpus.iter().all(|g| g.index < 2), "{:?}", placed.gpus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_create_session_waits_on_the_server() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    // Nobody can host it: both calls should wait their full wait_ms, not spin.
    for round in 0..2 {
        let started = Instant::now();
        let info = rpc
            .create_session(session_request("nowhere", 0, 600))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(info.state, "creating");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "call {round} answered after {:?} instead of waiting",
            started.elapsed()
        );
    }
}
