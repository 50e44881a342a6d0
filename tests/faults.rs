//! The core promises under faults and bad input (issue 9): no double runs after a crash, no
//! reservations left behind, nothing built on a failed write, bounded input with clear errors.
//! Each test is named for the promise it checks.

mod common;

use common::{eventually, within, TestEnv, WriteLock};
use std::time::{Duration, Instant};
use tether::api::pb;
use tether::client::WorkflowOptions;

const T: Duration = Duration::from_secs(30);

type Rpc = tether_sdk::client::Rpc;

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
                let state = tether::server::state::SessionState {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_stops_every_later_acknowledgement_and_a_restart_continues() {
    let mut env = TestEnv::start_with(tether::server::ServerConfig {
        store_busy_timeout: Duration::from_millis(300),
        ..common::test_config()
    })
    .await;
    let handle = env
        .client
        .start_workflow("t", &(), WorkflowOptions::new("failing-disk", "fd-q"))
        .await
        .unwrap();
    handle.signal("before", &1).await.unwrap();
    let mut rpc = env.client.raw();
    let signal = |name: &'static str| {
        let mut rpc = rpc.clone();
        async move {
            rpc.signal_workflow(pb::SignalWorkflowRequest {
                namespace: "default".into(),
                workflow_id: "failing-disk".into(),
                signal_name: name.into(),
                ..Default::default()
            })
            .await
        }
    };
    // Another process holds the database longer than the busy timeout: this commit fails...
    let lock = WriteLock::take(env.dir.path());
    let failing = tokio::spawn(signal("during"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...and one queued behind it must not land on top of it once the lock is gone.
    let behind = tokio::spawn(signal("behind"));
    let failed = within(T, "failing signal", failing).await.unwrap();
    lock.release();
    let behind = within(T, "queued signal", behind).await.unwrap();
    for (what, outcome) in [("failed", failed), ("queued", behind)] {
        let status = outcome.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{what}: {}",
            status.message()
        );
    }
    // Everything is refused now, reads too, saying why.
    let later = signal("later").await.unwrap_err();
    assert_eq!(later.code(), tonic::Code::Unavailable);
    assert!(
        later.message().contains("storage failed"),
        "{}",
        later.message()
    );
    let read = rpc
        .describe_workflow(pb::DescribeWorkflowRequest {
            namespace: "default".into(),
            workflow_id: "failing-disk".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), tonic::Code::Unavailable);
    // After a restart the state is the durable one, without holes, and the run goes on.
    env.restart().await;
    let events = handle.history().await.unwrap();
    let ids: Vec<u64> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "no holes");
    let signals: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.attributes {
            Some(pb::history_event::Attributes::WorkflowSignaled(s)) => Some(s.signal_name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(signals, vec!["before"], "only what was acknowledged");
    let mut rpc = env.client.raw();
    let task = poll_workflow_task(&mut rpc, "fd-q").await;
    rpc.complete_workflow_task(complete_request(task.task_token, vec![complete_workflow()]))
        .await
        .unwrap();
    let done = handle.outcome().await.unwrap();
    assert_eq!(done.status, pb::ExecutionStatus::Completed as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_past_the_maximum_are_refused_naming_the_field() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    for (field, ms) in [
        ("run_timeout_ms", u64::MAX),
        ("task_timeout_ms", 1u64 << 63),
    ] {
        let mut req = pb::StartWorkflowRequest {
            namespace: "default".into(),
            workflow_id: format!("long-{field}"),
            workflow_type: "t".into(),
            task_queue: "long-q".into(),
            ..Default::default()
        };
        if field == "run_timeout_ms" {
            req.run_timeout_ms = ms;
        } else {
            req.task_timeout_ms = ms;
        }
        let err = rpc.start_workflow(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let options = |set: fn(&mut pb::ActivityOptions)| {
        let mut o = pb::ActivityOptions {
            start_to_close_timeout_ms: 1_000,
            ..Default::default()
        };
        set(&mut o);
        o
    };
    type SetOption = fn(&mut pb::ActivityOptions);
    let cases: [(&str, SetOption); 5] = [
        ("start_to_close_timeout_ms", |o| {
            o.start_to_close_timeout_ms = u64::MAX
        }),
        ("schedule_to_close_timeout_ms", |o| {
            o.schedule_to_close_timeout_ms = 1 << 63
        }),
        ("schedule_to_start_timeout_ms", |o| {
            o.schedule_to_start_timeout_ms = u64::MAX
        }),
        ("heartbeat_timeout_ms", |o| {
            o.heartbeat_timeout_ms = u64::MAX
        }),
        ("initial_interval_ms", |o| {
            o.retry_policy = Some(pb::RetryPolicy {
                initial_interval_ms: u64::MAX,
                ..Default::default()
            })
        }),
    ];
    for (field, set) in cases {
        let err = rpc
            .start_activity(pb::StartActivityRequest {
                namespace: "default".into(),
                activity_id: format!("long-{field}"),
                activity_type: "a".into(),
                task_queue: "long-q".into(),
                options: Some(options(set)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    // A timer far past the maximum is refused with the completion; the run is not stuck.
    env.client
        .start_workflow("t", &(), WorkflowOptions::new("long-timer", "long-q"))
        .await
        .unwrap();
    let task = poll_workflow_task(&mut rpc, "long-q").await;
    let err = rpc
        .complete_workflow_task(complete_request(
            task.task_token.clone(),
            vec![pb::command::Kind::StartTimer(pb::StartTimerCommand {
                seq: 1,
                duration_ms: 1 << 63,
            })],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("duration_ms"), "{}", err.message());
    rpc.complete_workflow_task(complete_request(task.task_token, vec![complete_workflow()]))
        .await
        .unwrap();
    let err = rpc
        .create_session(pb::CreateSessionRequest {
            namespace: "default".into(),
            options: Some(pb::SessionOptions {
                task_queue: "long-q".into(),
                execution_timeout_ms: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("execution_timeout_ms"),
        "{}",
        err.message()
    );
    // No attempt timeout at all on the wire: the documented 60 s, as the SDKs apply.
    rpc.start_activity(pb::StartActivityRequest {
        namespace: "default".into(),
        activity_id: "no-timeouts".into(),
        activity_type: "a".into(),
        task_queue: "long-q".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let events = env
        .client
        .workflow_handle("no-timeouts", "")
        .history()
        .await
        .unwrap();
    let scheduled = events
        .iter()
        .find_map(|e| match &e.attributes {
            Some(pb::history_event::Attributes::ActivityTaskScheduled(a)) => a.options.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!(scheduled.start_to_close_timeout_ms, 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_from_the_sdk_means_no_limit_where_there_may_be_none() {
    let env = TestEnv::start().await;
    let mut w = env.worker("max-q", "max-w");
    w.register_activity(
        "echo",
        |_ctx: tether::activity::ActivityContext, x: u32| async move {
            Ok::<_, tether::activity::ActivityError>(x)
        },
    );
    let worker = w.start().unwrap();
    let options = tether::client::StandaloneActivityOptions {
        options: tether::client::ActivityOptions::default()
            .start_to_close(Duration::MAX)
            .schedule_to_close(Duration::MAX)
            .schedule_to_start(Duration::MAX)
            .heartbeat(Duration::MAX),
        ..tether::client::StandaloneActivityOptions::new("max-1", "max-q")
    };
    let out: u32 = within(
        T,
        "activity",
        env.client.execute_activity("echo", &7u32, options),
    )
    .await
    .unwrap();
    assert_eq!(out, 7, "Duration::MAX did not expire at once");
    let workflow = env
        .client
        .start_workflow(
            "never",
            &(),
            WorkflowOptions {
                run_timeout: Some(Duration::MAX),
                ..WorkflowOptions::new("max-wf", "max-q")
            },
        )
        .await
        .unwrap();
    let d = workflow.describe().await.unwrap();
    assert_eq!(d.info.unwrap().status, pb::ExecutionStatus::Running as i32);
    workflow.terminate("done").await.unwrap();
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_registrations_are_refused_and_worker_lists_page() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let register =
        |identity: String, caps: pb::Capabilities, queues: usize| pb::RegisterWorkerRequest {
            namespace: "default".into(),
            identity: identity.clone(),
            instance_id: format!("{identity}-process"),
            task_queues: (0..queues).map(|i| format!("q{i}")).collect(),
            capabilities: Some(caps),
            ..Default::default()
        };
    let huge_label = pb::Capabilities {
        labels: [("big".to_string(), "x".repeat(10 * 1024 * 1024))].into(),
        ..Default::default()
    };
    let many_gpus = pb::Capabilities {
        gpus: (0..100_000)
            .map(|i| pb::GpuDevice {
                index: i,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    for (what, caps, queues) in [
        ("1024 bytes", huge_label, 1),
        ("GPUs", many_gpus, 1),
        ("task queues", pb::Capabilities::default(), 100_000),
    ] {
        let err = rpc
            .register_worker(register("greedy".into(), caps, queues))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(err.message().contains(what), "{what}: {}", err.message());
        assert!(err.message().len() < 1_024);
    }
    assert!(
        env.client.list_workers().await.unwrap().is_empty(),
        "nothing registered"
    );
    for i in 0..250 {
        rpc.register_worker(register(format!("w{i:03}"), pb::Capabilities::default(), 1))
            .await
            .unwrap();
    }
    let first = rpc
        .list_workers(pb::ListWorkersRequest {
            namespace: "default".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.workers.len(), 100);
    assert!(!first.next_page_token.is_empty());
    let all = env.client.list_workers().await.unwrap();
    assert_eq!(all.len(), 250, "every page is followed");
    let mut ids: Vec<&str> = all.iter().map(|w| w.identity.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 250, "no worker is listed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_signal_or_start_with_its_request_id_happens_once() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let start = pb::StartWorkflowRequest {
        namespace: "default".into(),
        workflow_id: "retried".into(),
        workflow_type: "t".into(),
        task_queue: "retry-q".into(),
        request_id: "start-1".into(),
        ..Default::default()
    };
    let run = rpc
        .start_workflow(start.clone())
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let again = rpc
        .start_workflow(start.clone())
        .await
        .unwrap()
        .into_inner()
        .run_id;
    assert_eq!(run, again, "the retry gets the run its first try started");
    let other = rpc
        .start_workflow(pb::StartWorkflowRequest {
            request_id: "start-2".into(),
            ..start
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists);
    let signal = pb::SignalWorkflowRequest {
        namespace: "default".into(),
        workflow_id: "retried".into(),
        signal_name: "once".into(),
        request_id: "sig-1".into(),
        ..Default::default()
    };
    for _ in 0..3 {
        rpc.signal_workflow(signal.clone()).await.unwrap();
    }
    let events = env
        .client
        .workflow_handle("retried", "")
        .history()
        .await
        .unwrap();
    let delivered = common::event_kinds(&events)
        .iter()
        .filter(|k| **k == "WorkflowSignaled")
        .count();
    assert_eq!(delivered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_start_whose_run_already_finished_does_not_run_the_work_again() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let start = pb::StartActivityRequest {
        namespace: "default".into(),
        activity_id: "resent".into(),
        activity_type: "a".into(),
        task_queue: "resent-q".into(),
        request_id: "start-1".into(),
        options: Some(pb::ActivityOptions {
            start_to_close_timeout_ms: 10_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = rpc
        .start_activity(start.clone())
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let task = rpc
        .poll_activity_task(pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "resent-q".into(),
            identity: "w".into(),
            poll_timeout_ms: 5_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    rpc.complete_activity_task(pb::CompleteActivityTaskRequest {
        task_token: task.task_token,
        identity: "w".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.client
        .activity_handle("resent", &run)
        .outcome()
        .await
        .unwrap();
    // The first reply was lost; the client sends the same start again, saying so. It gets the
    // finished run (and its outcome), and nothing is queued to run again.
    let again = rpc
        .start_activity(pb::StartActivityRequest {
            resent: true,
            wait_ms: 1_000,
            ..start.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.run_id, run);
    assert_eq!(
        again.outcome.map(|o| o.status),
        Some(pb::ExecutionStatus::Completed as i32)
    );
    let queue = env.client.describe_task_queue("resent-q").await.unwrap();
    assert_eq!(queue.activity_backlog, 0, "the work was queued again");
    // Another request for the same id is a new start, as the id is free again.
    let other = rpc
        .start_activity(pb::StartActivityRequest {
            request_id: "start-2".into(),
            resent: true,
            ..start
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.run_id, run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_a_server_that_is_starting_and_rides_out_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let connecting = {
        let url = format!("http://{listen}");
        tokio::spawn(async move {
            tether::client::Client::connect_with(
                url,
                tether::client::ClientOptions {
                    retry_for: Duration::from_secs(20),
                    ..Default::default()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let server = tether::server::LocalServer::start(&listen, dir.path(), common::test_config())
        .await
        .unwrap();
    let client = within(T, "connect", connecting).await.unwrap().unwrap();
    let handle = client
        .start_workflow("t", &(), WorkflowOptions::new("rides-out", "ride-q"))
        .await
        .unwrap();
    // The server goes away and comes back while the client waits for the result.
    server.stop().await.unwrap();
    let waiting = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.outcome().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = tether::server::LocalServer::start(&listen, dir.path(), common::test_config())
        .await
        .unwrap();
    handle.signal("hello", &"again").await.unwrap();
    let mut rpc = client.raw();
    let task = poll_workflow_task(&mut rpc, "ride-q").await;
    rpc.complete_workflow_task(complete_request(task.task_token, vec![complete_workflow()]))
        .await
        .unwrap();
    let outcome = within(T, "outcome", waiting).await.unwrap().unwrap();
    assert_eq!(outcome.status, pb::ExecutionStatus::Completed as i32);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_and_finished_waits_leave_nothing_behind() {
    let env = TestEnv::start().await;
    let server = env.server.as_ref().unwrap();
    let before = server.stats();
    let mut rpc = env.client.raw();
    rpc.register_worker(pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: "host-1".into(),
        instance_id: "host-1-process".into(),
        task_queues: vec!["leak-q".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..200 {
        let info = rpc
            .create_session(pb::CreateSessionRequest {
                namespace: "default".into(),
                options: Some(pb::SessionOptions {
                    task_queue: "leak-q".into(),
                    ..Default::default()
                }),
                session_id: format!("leak-{i}"),
                wait_ms: 1_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(info.state, "open");
        rpc.complete_session(pb::CompleteSessionRequest {
            namespace: "default".into(),
            session_id: info.session_id,
        })
        .await
        .unwrap();
    }
    // Result waits on an open run that time out.
    env.client
        .start_workflow("t", &(), WorkflowOptions::new("waited-on", "leak-q"))
        .await
        .unwrap();
    for _ in 0..20 {
        let r = rpc
            .get_workflow_result(pb::GetWorkflowResultRequest {
                namespace: "default".into(),
                workflow_id: "waited-on".into(),
                wait_ms: 20,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, pb::ExecutionStatus::Running as i32);
    }
    let after = eventually(T, "the closed sessions are gone", || async {
        let s = server.stats();
        (s.sessions == 0).then_some(s)
    })
    .await;
    assert_eq!(after.result_waiters, 0, "{after:?}");
    assert_eq!(after.session_waiters, 0, "{after:?}");
    // The one open run holds its workflow task timeout at most; no session timers remain.
    assert!(
        after.timers <= before.timers + 1,
        "timers left armed: {before:?} -> {after:?}"
    );
}

async fn session_owned_by_a_workflow(env: &TestEnv, id: &str) -> pb::SessionInfo {
    let mut rpc = env.client.raw();
    rpc.register_worker(pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: format!("{id}-host"),
        instance_id: format!("{id}-process"),
        task_queues: vec![format!("{id}-q")],
        capabilities: Some(gpus_caps(&format!("{id}-host"), 2)),
        ..Default::default()
    })
    .await
    .unwrap();
    env.client
        .start_workflow("t", &(), WorkflowOptions::new(id, format!("{id}-q")))
        .await
        .unwrap();
    let task = poll_workflow_task(&mut rpc, &format!("{id}-q")).await;
    let session_id = format!("{id}-session");
    rpc.complete_workflow_task(complete_request(
        task.task_token,
        vec![pb::command::Kind::CreateSession(pb::CreateSessionCommand {
            seq: 1,
            session_id: session_id.clone(),
            options: Some(pb::SessionOptions {
                gpus: 2,
                ..Default::default()
            }),
        })],
    ))
    .await
    .unwrap();
    eventually(T, "the workflow's session is placed", || async {
        let s = env.client.describe_session(&session_id).await.ok()?;
        (s.state == "open").then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_outlives_its_workflow_run() {
    let env = TestEnv::start().await;
    for how in ["terminate", "complete"] {
        let id = format!("owner-{how}");
        let session = session_owned_by_a_workflow(&env, &id).await;
        assert_eq!(session.gpus.len(), 2);
        let handle = env.client.workflow_handle(&id, "");
        match how {
            "terminate" => handle.terminate("operator").await.unwrap(),
            _ => {
                // The workflow returns without completing its session.
                let mut rpc = env.client.raw();
                handle.signal("finish", &()).await.unwrap();
                let task = poll_workflow_task(&mut rpc, &format!("{id}-q")).await;
                rpc.complete_workflow_task(complete_request(
                    task.task_token,
                    vec![complete_workflow()],
                ))
                .await
                .unwrap();
            }
        }
        // Closed by the same transaction: no waiting.
        let closed = env
            .client
            .describe_session(&session.session_id)
            .await
            .unwrap();
        assert_ne!(closed.state, "open", "{how}: {closed:?}");
        assert!(closed.reason.contains("closed"), "{how}: {}", closed.reason);
        // Its GPUs are free again: a new session gets both.
        let again = within(
            T,
            "a new session",
            env.client.create_session(tether::client::SessionOptions {
                gpus: 2,
                ..tether::client::SessionOptions::new(format!("{id}-q"))
            }),
        )
        .await
        .unwrap();
        again.complete().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_end_any_session_and_idle_client_sessions_end_by_themselves() {
    let env = TestEnv::start().await;
    let session = session_owned_by_a_workflow(&env, "stuck").await;
    let ended = env
        .client
        .terminate_session(&session.session_id, "GPU needed elsewhere")
        .await
        .unwrap();
    assert_eq!(ended.state, "terminated");
    assert!(
        ended.reason.contains("GPU needed elsewhere"),
        "{}",
        ended.reason
    );
    // The owning workflow is told.
    let mut rpc = env.client.raw();
    let task = poll_workflow_task(&mut rpc, "stuck-q").await;
    assert!(
        common::event_kinds(&task.events).contains(&"SessionEnded"),
        "{:?}",
        common::event_kinds(&task.events)
    );
    // Ending it again says how it ended.
    let again = env
        .client
        .terminate_session(&session.session_id, "")
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(tonic::Code::FailedPrecondition));
    // A client's session that nobody uses ends after its idle timeout.
    let idle = within(
        T,
        "client session",
        env.client.create_session(tether::client::SessionOptions {
            gpus: 1,
            idle_timeout: Some(Duration::from_millis(1_500)),
            ..tether::client::SessionOptions::new("stuck-q")
        }),
    )
    .await
    .unwrap();
    let timed_out = eventually(T, "the idle session ends", || async {
        let s = env.client.describe_session(idle.id()).await.ok()?;
        (s.state != "open").then_some(s)
    })
    .await;
    assert_eq!(timed_out.state, "timed_out");
    assert!(timed_out.reason.contains("idle"), "{}", timed_out.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_session_lists_page_without_gaps_or_repeats() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    for i in 0..230 {
        env.client
            .start_workflow(
                "t",
                &(),
                WorkflowOptions::new(format!("paged-{i:03}"), "page-q"),
            )
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (page, next) = env
            .client
            .list_workflows_page(None, 100, false, &token)
            .await
            .unwrap();
        pages += 1;
        seen.extend(page.into_iter().map(|e| e.workflow_id));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (230, 230));
    let bad = rpc
        .list_workflows(pb::ListWorkflowsRequest {
            namespace: "default".into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // Sessions: closed ones come from the store, page by page too.
    rpc.register_worker(pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: "pager".into(),
        instance_id: "pager-process".into(),
        task_queues: vec!["page-q".into()],
        max_concurrent_sessions: 1_000,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..150 {
        let id = format!("paged-session-{i:03}");
        rpc.create_session(pb::CreateSessionRequest {
            namespace: "default".into(),
            options: Some(pb::SessionOptions {
                task_queue: "page-q".into(),
                ..Default::default()
            }),
            session_id: id.clone(),
            wait_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
        if i % 2 == 0 {
            rpc.complete_session(pb::CompleteSessionRequest {
                namespace: "default".into(),
                session_id: id,
            })
            .await
            .unwrap();
        }
    }
    let first = rpc
        .list_sessions(pb::ListSessionsRequest {
            namespace: "default".into(),
            include_closed: true,
            page_size: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.sessions.len(), 60);
    assert!(!first.next_page_token.is_empty());
    let all = env.client.list_sessions(true).await.unwrap();
    let mut ids: Vec<&str> = all.iter().map(|s| s.session_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 150, "every session once");
    assert_eq!(env.client.list_sessions(false).await.unwrap().len(), 75);
}
