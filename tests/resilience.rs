//! Durability and failure handling: server restarts, lost workers, non-determinism, long polls,
//! standalone activities, duplicate ids and bad input.

mod common;

use common::{assert_no_task_failures, event_kinds, eventually, within, TestEnv};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb;
use tether::client::{
    ActivityOptions, ClientError, RetryPolicy, StandaloneActivityOptions, WorkflowOptions,
};
use tether::workflow::WorkflowContext;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_survives_server_restart() {
    let mut env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("step", |_ctx: ActivityContext, n: u32| async move {
        Ok::<_, ActivityError>(n + 1)
    });
    w.register_workflow("pipeline", |ctx: WorkflowContext, _: ()| async move {
        let a: u32 = ctx
            .execute_activity("step", &1u32, ActivityOptions::default())
            .await?;
        // The timer and the signal wait span the restart.
        ctx.sleep(Duration::from_millis(800)).await;
        let extra: u32 = ctx.signal_channel("go").recv().await?;
        let b: u32 = ctx
            .execute_activity("step", &(a + extra), ActivityOptions::default())
            .await?;
        Ok(b)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("pipeline", &(), WorkflowOptions::new("restart-me", "q"))
        .await
        .unwrap();
    eventually(T, "first activity done and timer armed", || async {
        let h = handle.history().await.ok()?;
        event_kinds(&h).contains(&"TimerStarted").then_some(())
    })
    .await;
    env.restart().await;
    // The signal is acknowledged by the new server process; the timer fires after the restart.
    eventually(T, "signal accepted after restart", || async {
        handle.signal("go", &10u32).await.ok()
    })
    .await;
    let out: u32 = within(T, "result after restart", handle.result())
        .await
        .unwrap();
    assert_eq!(out, 13);
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert!(kinds.contains(&"TimerFired"), "{kinds:?}");
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_of_a_dead_worker_is_retried_on_another() {
    let env = TestEnv::start().await;
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let mut w1 = env.worker("q", "doomed");
    w1.register_activity("work", move |_ctx: ActivityContext, _: ()| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            // Never finishes: the worker dies first.
            std::future::pending::<()>().await;
            Ok::<String, ActivityError>("unreachable".into())
        }
    });
    let mut w2 = env.worker("q", "survivor");
    w2.register_activity("work", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    let mut wf = env.worker("q", "wf-worker");
    wf.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default()
            .start_to_close(Duration::from_millis(700))
            .retry(RetryPolicy {
                initial_interval: Duration::from_millis(50),
                ..Default::default()
            });
        let who: String = ctx.execute_activity("work", &(), options).await?;
        Ok(who)
    });
    let doomed = w1.start().unwrap();
    let wf_worker = wf.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("dead-worker", "q"))
        .await
        .unwrap();
    eventually(T, "doomed worker started the activity", || async {
        (started.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    doomed.kill();
    let survivor = w2.start().unwrap();
    let who: String = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(who, "survivor");
    survivor.shutdown().await;
    wf_worker.shutdown().await;
}

fn register_v1(w: &mut tether::worker::Worker) {
    w.register_activity("a", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(1u32)
    });
    w.register_activity("b", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(2u32)
    });
    w.register_workflow("evolving", |ctx: WorkflowContext, _: ()| async move {
        let a: u32 = ctx
            .execute_activity("a", &(), ActivityOptions::default())
            .await?;
        let _: () = ctx.signal_channel("go").recv().await?;
        Ok(a)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_determinism_is_detected_and_a_fixed_worker_continues() {
    let env = TestEnv::start().await;
    let mut v1 = env.worker("q", "v1");
    register_v1(&mut v1);
    let v1 = v1.start().unwrap();
    let handle = env
        .client
        .start_workflow("evolving", &(), WorkflowOptions::new("evolving-1", "q"))
        .await
        .unwrap();
    eventually(T, "activity a completed", || async {
        let h = handle.history().await.ok()?;
        event_kinds(&h)
            .contains(&"ActivityTaskCompleted")
            .then_some(())
    })
    .await;
    v1.kill();

    // v2 changed the code: it now calls "b" first. Replaying v1's history must fail loudly.
    let mut v2 = env.worker("q", "v2");
    v2.register_activity("b", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(2u32)
    });
    v2.register_workflow("evolving", |ctx: WorkflowContext, _: ()| async move {
        let b: u32 = ctx
            .execute_activity("b", &(), ActivityOptions::default())
            .await?;
        let _: () = ctx.signal_channel("go").recv().await?;
        Ok(b)
    });
    let v2 = v2.start().unwrap();
    handle.signal("go", &()).await.unwrap();
    let failure = eventually(T, "non-determinism reported", || async {
        let d = handle.describe().await.ok()?;
        d.last_workflow_task_failure
            .filter(|f| f.cause == "nondeterminism")
    })
    .await;
    assert!(
        failure.message.contains("\"a\"") && failure.message.contains("\"b\""),
        "{}",
        failure.message
    );
    assert_eq!(failure.identity, "v2");
    let d = handle.describe().await.unwrap();
    assert_eq!(
        d.info.unwrap().status,
        pb::ExecutionStatus::Running as i32,
        "the run is not failed"
    );
    v2.kill();

    // The fixed worker (v1 code again) picks it up and finishes.
    let mut fixed = env.worker("q", "v1-fixed");
    register_v1(&mut fixed);
    let fixed = fixed.start().unwrap();
    let out: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(out, 1);
    fixed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_long_poll_returns_after_its_timeout() {
    let env = TestEnv::start().await;
    let started = Instant::now();
    let resp = env
        .client
        .raw()
        .poll_activity_task(pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "idle".into(),
            identity: "poller".into(),
            poll_timeout_ms: 300,
            additional_task_queues: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let waited = started.elapsed();
    assert!(resp.task_token.is_empty(), "nothing to do");
    assert!(
        waited >= Duration::from_millis(290),
        "returned early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "held too long: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_added_while_polling_is_handed_over_at_once() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let poll = tokio::spawn(async move {
        rpc.poll_activity_task(pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "sync".into(),
            identity: "poller".into(),
            poll_timeout_ms: 20_000,
            additional_task_queues: vec![],
            ..Default::default()
        })
        .await
    });
    eventually(T, "poller registered", || async {
        let q = env.client.describe_task_queue("sync").await.ok()?;
        (!q.pollers.is_empty()).then_some(())
    })
    .await;
    let started = Instant::now();
    env.client
        .start_activity(
            "echo",
            "hi",
            StandaloneActivityOptions::new("sync-1", "sync"),
        )
        .await
        .unwrap();
    let task = within(T, "poll", poll).await.unwrap().unwrap().into_inner();
    assert_eq!(task.activity_type, "echo");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_activity_runs_with_retries() {
    let env = TestEnv::start().await;
    let mut w = env.worker("jobs", "w1");
    w.register_activity("resize", |ctx: ActivityContext, px: u32| async move {
        if ctx.info().attempt == 1 {
            return Err(ActivityError::retryable("disk busy"));
        }
        Ok::<_, ActivityError>(format!(
            "resized to {px}px on attempt {}",
            ctx.info().attempt
        ))
    });
    let worker = w.start().unwrap();
    let mut options = StandaloneActivityOptions::new("resize-1", "jobs");
    options.options = ActivityOptions::default().retry(RetryPolicy {
        initial_interval: Duration::from_millis(50),
        ..Default::default()
    });
    let out: String = within(
        T,
        "standalone",
        env.client.execute_activity("resize", &640u32, options),
    )
    .await
    .unwrap();
    assert_eq!(out, "resized to 640px on attempt 2");
    let listed = env.client.list_workflows(None, 10, true).await.unwrap();
    assert!(listed
        .iter()
        .any(|e| e.workflow_id == "resize-1" && e.kind == "activity"));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_workflow_id_is_refused_with_the_running_run() {
    let env = TestEnv::start().await;
    let first = env
        .client
        .start_workflow("any", &(), WorkflowOptions::new("dup", "q"))
        .await
        .unwrap();
    let err = env
        .client
        .start_workflow("any", &(), WorkflowOptions::new("dup", "q"))
        .await
        .err()
        .unwrap();
    match err {
        ClientError::AlreadyStarted {
            what,
            workflow_id,
            run_id,
        } => {
            assert_eq!(what, "workflow");
            assert_eq!(workflow_id, "dup");
            assert_eq!(run_id, first.run_id);
        }
        other => panic!("expected AlreadyStarted, got {other}"),
    }
    let listed = env.client.list_workflows(None, 10, false).await.unwrap();
    assert_eq!(
        listed.iter().filter(|e| e.workflow_id == "dup").count(),
        1,
        "nothing was added"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    let start = |ns: &str, id: &str, ty: &str, q: &str, data: Vec<u8>| pb::StartWorkflowRequest {
        namespace: ns.into(),
        workflow_id: id.into(),
        workflow_type: ty.into(),
        task_queue: q.into(),
        input: Some(tether::codec::json_payload(data)),
        ..Default::default()
    };
    let cases = vec![
        (
            start("nope", "w", "t", "q", b"1".to_vec()),
            tonic::Code::NotFound,
            "namespace \"nope\" does not exist",
        ),
        (
            start("default", "", "t", "q", b"1".to_vec()),
            tonic::Code::InvalidArgument,
            "workflow id must not be empty",
        ),
        (
            start("default", "w", "", "q", b"1".to_vec()),
            tonic::Code::InvalidArgument,
            "workflow type must not be empty",
        ),
        (
            start("default", &"x".repeat(300), "t", "q", b"1".to_vec()),
            tonic::Code::InvalidArgument,
            "300 bytes long; the limit is 255",
        ),
        (
            start("default", "w", "t", &"q".repeat(256), b"1".to_vec()),
            tonic::Code::InvalidArgument,
            "task queue is 256 bytes long",
        ),
        (
            start("default", "w", "t", "q", vec![b'7'; 2 * 1024 * 1024 + 1]),
            tonic::Code::InvalidArgument,
            "the limit is 2097152 bytes",
        ),
    ];
    for (req, code, text) in cases {
        let err = rpc.start_workflow(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(text),
            "message {:?} should contain {text:?}",
            err.message()
        );
    }
    // Unknown workflow: describe, signal, result.
    let err = env
        .client
        .workflow_handle("ghost", "")
        .describe()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(err.to_string().contains("\"ghost\" was not found"), "{err}");
    let err = env
        .client
        .workflow_handle("ghost", "")
        .signal("s", &1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    // A malformed task token.
    let err = rpc
        .complete_activity_task(pb::CompleteActivityTaskRequest {
            task_token: vec![0xff, 0xff],
            result: None,
            identity: "x".into(),
            next_task: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // An activity with an attempt timeout past the longest allowed.
    let err = rpc
        .start_activity(pb::StartActivityRequest {
            namespace: "default".into(),
            activity_id: "a".into(),
            activity_type: "t".into(),
            task_queue: "q".into(),
            options: Some(pb::ActivityOptions {
                start_to_close_timeout_ms: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("start_to_close_timeout"),
        "{}",
        err.message()
    );
    // Nothing was created by any of the refused calls.
    assert!(env
        .client
        .list_workflows(None, 100, false)
        .await
        .unwrap()
        .is_empty());
    assert!(env
        .client
        .list_workflows(None, 100, true)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_completion_from_an_old_attempt_is_rejected() {
    let env = TestEnv::start().await;
    let mut options = StandaloneActivityOptions::new("stale-1", "raw");
    options.options = ActivityOptions::default()
        .start_to_close(Duration::from_millis(200))
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(10),
            ..Default::default()
        });
    env.client.start_activity("t", &(), options).await.unwrap();
    let mut rpc = env.client.raw();
    let poll = |rpc: &mut tether::api::pb::tether_service_client::TetherServiceClient<_>| {
        let req = pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "raw".into(),
            identity: "p".into(),
            poll_timeout_ms: 10_000,
            additional_task_queues: vec![],
            ..Default::default()
        };
        let mut rpc = rpc.clone();
        async move { rpc.poll_activity_task(req).await.unwrap().into_inner() }
    };
    let first = poll(&mut rpc).await;
    assert_eq!(first.attempt, 1);
    // Attempt 1 times out; attempt 2 is handed out.
    let second = within(T, "second attempt", poll(&mut rpc)).await;
    assert_eq!(second.attempt, 2);
    let err = rpc
        .complete_activity_task(pb::CompleteActivityTaskRequest {
            task_token: first.task_token,
            result: Some(tether::codec::to_payload("late").unwrap()),
            identity: "p".into(),
            next_task: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("attempt 1"), "{}", err.message());
    rpc.complete_activity_task(pb::CompleteActivityTaskRequest {
        task_token: second.task_token,
        result: Some(tether::codec::to_payload("current").unwrap()),
        identity: "p".into(),
        next_task: None,
    })
    .await
    .unwrap();
    let out = env
        .client
        .raw()
        .get_activity_result(pb::GetActivityResultRequest {
            namespace: "default".into(),
            activity_id: "stale-1".into(),
            run_id: String::new(),
            wait_ms: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tether::codec::display_payload(out.result.as_ref()),
        "\"current\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_work_finish_then_fails_the_rest_for_retry() {
    let env = TestEnv::start().await;
    let fast_retry = RetryPolicy {
        initial_interval: Duration::from_millis(50),
        ..Default::default()
    };
    // Worker A: its running activity finishes within the grace period.
    let mut a = tether::worker::Worker::new(
        env.client.clone(),
        tether::worker::WorkerOptions::new("grace")
            .identity("A")
            .graceful_shutdown(Duration::from_secs(10)),
    );
    let running = Arc::new(AtomicU32::new(0));
    let r = running.clone();
    a.register_activity("short", move |ctx: ActivityContext, _: ()| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
        }
    });
    let a = a.start().unwrap();
    let mut options = StandaloneActivityOptions::new("short-1", "grace");
    options.options = ActivityOptions::default().retry(fast_retry.clone());
    let short = env
        .client
        .start_activity("short", &(), options)
        .await
        .unwrap();
    eventually(T, "short activity running", || async {
        (running.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    within(T, "shutdown A", a.shutdown()).await;
    let who: String = within(T, "short result", short.result()).await.unwrap();
    assert_eq!(who, "A", "finished on A during the grace period");

    // Worker B: its activity outlives the grace period, is failed, and retries on C.
    let mut b = tether::worker::Worker::new(
        env.client.clone(),
        tether::worker::WorkerOptions::new("grace")
            .identity("B")
            .graceful_shutdown(Duration::from_millis(200)),
    );
    let r = running.clone();
    b.register_activity("long", move |_ctx: ActivityContext, _: ()| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, ActivityError>("B".to_string())
        }
    });
    let b = b.start().unwrap();
    let mut options = StandaloneActivityOptions::new("long-1", "grace");
    options.options = ActivityOptions::default().retry(fast_retry);
    let long = env
        .client
        .start_activity("long", &(), options)
        .await
        .unwrap();
    eventually(T, "long activity running", || async {
        (running.load(Ordering::SeqCst) > 1).then_some(())
    })
    .await;
    within(T, "shutdown B", b.shutdown()).await;
    let d = env
        .client
        .workflow_handle("long-1", "")
        .describe()
        .await
        .unwrap();
    let pending = &d.pending_activities[0];
    assert_eq!(pending.attempt, 2, "attempt 1 was failed by the shutdown");
    assert!(
        pending
            .last_failure
            .as_ref()
            .unwrap()
            .message
            .contains("worker B shut down"),
        "{:?}",
        pending.last_failure
    );
    let mut c = env.worker("grace", "C");
    c.register_activity("long", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    let c = c.start().unwrap();
    let who: String = within(T, "long result", long.result()).await.unwrap();
    assert_eq!(who, "C");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_timeout_fires_after_a_restart() {
    let mut env = TestEnv::start().await;
    let mut options = StandaloneActivityOptions::new("orphan", "nobody-polls");
    options.options = ActivityOptions::default().schedule_to_close(Duration::from_millis(1500));
    let handle = env.client.start_activity("t", &(), options).await.unwrap();
    env.restart().await;
    let err = within(T, "timeout", handle.result::<()>())
        .await
        .unwrap_err();
    match err {
        ClientError::Failed {
            status, failure, ..
        } => {
            assert_eq!(status, pb::ExecutionStatus::TimedOut);
            assert_eq!(failure.timeout_type, "schedule_to_close");
        }
        other => panic!("expected a timeout, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_run_timeout_closes_the_run() {
    let env = TestEnv::start().await;
    let mut options = WorkflowOptions::new("short-lived", "no-workers");
    options.run_timeout = Some(Duration::from_millis(300));
    let handle = env.client.start_workflow("t", &(), options).await.unwrap();
    let outcome = within(T, "timeout", handle.outcome()).await.unwrap();
    assert_eq!(outcome.status, pb::ExecutionStatus::TimedOut as i32);
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert_eq!(kinds.last(), Some(&"WorkflowExecutionTimedOut"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_workflow_is_replayed_from_full_history() {
    let env = TestEnv::start().await;
    // A cache of one: running two workflows side by side evicts each in turn.
    let mut w = tether::worker::Worker::new(
        env.client.clone(),
        tether::worker::WorkerOptions::new("q")
            .identity("tiny-cache")
            .max_cached_workflows(1),
    );
    w.register_activity("inc", |_ctx: ActivityContext, n: u32| async move {
        Ok::<_, ActivityError>(n + 1)
    });
    w.register_workflow("count", |ctx: WorkflowContext, n: u32| async move {
        let mut v = 0u32;
        for _ in 0..n {
            v = ctx
                .execute_activity("inc", &v, ActivityOptions::default())
                .await?;
        }
        Ok(v)
    });
    let worker = w.start().unwrap();
    let h1 = env
        .client
        .start_workflow("count", &5u32, WorkflowOptions::new("c1", "q"))
        .await
        .unwrap();
    let h2 = env
        .client
        .start_workflow("count", &5u32, WorkflowOptions::new("c2", "q"))
        .await
        .unwrap();
    let (a, b): (u32, u32) = within(T, "both", async {
        (h1.result().await.unwrap(), h2.result().await.unwrap())
    })
    .await;
    assert_eq!((a, b), (5, 5));
    assert_no_task_failures(&h1).await;
    assert_no_task_failures(&h2).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_to_start_timeout_is_not_retried() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "wf-only");
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default()
            .task_queue("nobody-polls-this")
            .schedule_to_start(Duration::from_millis(300));
        let r: Result<(), _> = ctx.execute_activity("t", &(), options).await;
        match r {
            Err(tether::workflow::WorkflowError::Activity(f)) => Ok((f.timeout_type, f.attempt)),
            other => Err(tether::workflow::WorkflowError::failed(format!(
                "unexpected {other:?}"
            ))),
        }
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("s2s", "q"))
        .await
        .unwrap();
    let (timeout_type, attempt): (String, u32) =
        within(T, "result", handle.result()).await.unwrap();
    assert_eq!(timeout_type, "schedule_to_start");
    assert_eq!(attempt, 1);
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_the_limit_and_the_value() {
    let config = tether::server::ServerConfig {
        max_history_events: 4,
        max_pending_activities: 2,
        max_requests_per_second: 0,
        ..common::test_config()
    };
    let env = TestEnv::start_with(config).await;
    // History length: a run with 1 event takes 3 signals, the 4th is refused.
    let handle = env
        .client
        .start_workflow(
            "nobody-runs-this",
            &(),
            WorkflowOptions::new("full", "nowhere"),
        )
        .await
        .unwrap();
    for i in 0..3 {
        handle.signal("s", &i).await.unwrap();
    }
    let err = handle.signal("s", &4).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string()
            .contains("has 4 history events; the limit is 4"),
        "{err}"
    );
    // Pending activities: a completion scheduling 3 at once is refused; nothing changes.
    let env2 = TestEnv::start_with(tether::server::ServerConfig {
        max_pending_activities: 2,
        ..common::test_config()
    })
    .await;
    env2.client
        .start_workflow("w", &(), WorkflowOptions::new("wide", "q"))
        .await
        .unwrap();
    let mut rpc = env2.client.raw();
    let task = rpc
        .poll_workflow_task(pb::PollWorkflowTaskRequest {
            namespace: "default".into(),
            task_queue: "q".into(),
            identity: "raw".into(),
            poll_timeout_ms: 5_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let schedule = |seq: u32| pb::Command {
        kind: Some(pb::command::Kind::ScheduleActivity(
            pb::ScheduleActivityCommand {
                seq,
                activity_type: "a".into(),
                options: Some(pb::ActivityOptions {
                    start_to_close_timeout_ms: 1_000,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    };
    let err = rpc
        .complete_workflow_task(pb::CompleteWorkflowTaskRequest {
            task_token: task.task_token.clone(),
            commands: vec![schedule(1), schedule(2), schedule(3)],
            identity: "raw".into(),
            sticky_queue: String::new(),
            next_task: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("3 pending activities; the limit is 2"),
        "{}",
        err.message()
    );
    let history = env2
        .client
        .workflow_handle("wide", "")
        .history()
        .await
        .unwrap();
    assert_eq!(history.len(), 1, "nothing was recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_per_caller_is_limited() {
    let env = TestEnv::start_with(tether::server::ServerConfig {
        max_requests_per_second: 20,
        ..common::test_config()
    })
    .await;
    let mut refused = None;
    for _ in 0..200 {
        if let Err(e) = env.client.list_namespaces().await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("the 20/s bucket runs dry within 200 back-to-back calls");
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string().contains("exceeded 20 requests per second"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_leave_the_server_up() {
    let env = TestEnv::start().await;
    let mut rpc = env.client.raw();
    // Garbage tokens, empty fields, unknown enum values, huge payloads.
    let _ = rpc
        .complete_workflow_task(pb::CompleteWorkflowTaskRequest {
            task_token: vec![0xde, 0xad, 0xbe, 0xef, 0x01],
            commands: vec![pb::Command { kind: None }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let _ = rpc
        .list_workflows(pb::ListWorkflowsRequest {
            namespace: "default".into(),
            status: 999,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let big = vec![b'x'; 8 * 1024 * 1024];
    let err = rpc
        .signal_workflow(pb::SignalWorkflowRequest {
            namespace: "default".into(),
            workflow_id: "w".into(),
            signal_name: "s".into(),
            input: Some(tether::codec::json_payload(big)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let huge = vec![b'x'; 80 * 1024 * 1024];
    let err = rpc
        .start_workflow(pb::StartWorkflowRequest {
            namespace: "default".into(),
            workflow_id: "w".into(),
            workflow_type: "t".into(),
            task_queue: "q".into(),
            input: Some(tether::codec::json_payload(huge)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange
                | tonic::Code::ResourceExhausted
                | tonic::Code::InvalidArgument
                | tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::Unavailable
        ),
        "{err:?}"
    );
    // Still serving.
    let ns = env.client.list_namespaces().await.unwrap();
    assert_eq!(ns[0].name, "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_outcomes_are_judged_one_by_one_and_refill_slots() {
    let config = tether::server::ServerConfig {
        max_payload_bytes: 1024,
        ..common::test_config()
    };
    let env = TestEnv::start_with(config).await;
    for id in ["b-ok", "b-big", "b-fail", "b-waiting"] {
        let mut options = StandaloneActivityOptions::new(id, "batch");
        options.options = ActivityOptions::default().retry(RetryPolicy {
            maximum_attempts: 1,
            ..Default::default()
        });
        env.client.start_activity("t", &(), options).await.unwrap();
    }
    let mut rpc = env.client.raw();
    let mut tasks = std::collections::HashMap::new();
    for _ in 0..3 {
        let task = rpc
            .poll_activity_task(pb::PollActivityTaskRequest {
                namespace: "default".into(),
                task_queue: "batch".into(),
                identity: "p".into(),
                poll_timeout_ms: 10_000,
                additional_task_queues: vec![],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tasks.insert(task.activity_id.clone(), task.task_token);
    }
    assert!(
        !tasks.contains_key("b-waiting"),
        "tasks are handed out in order"
    );
    let completed = |token: &Vec<u8>, result: &str| pb::ActivityOutcome {
        task_token: token.clone(),
        outcome: Some(pb::activity_outcome::Outcome::Completed(
            pb::ActivityCompleted {
                result: Some(tether::codec::to_payload(result).unwrap()),
            },
        )),
    };
    let status_of = |id: &'static str| {
        let mut rpc = env.client.raw();
        async move {
            rpc.get_activity_result(pb::GetActivityResultRequest {
                namespace: "default".into(),
                activity_id: id.into(),
                run_id: String::new(),
                wait_ms: 0,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let next = pb::NextTaskRequest {
        namespace: "default".into(),
        task_queue: "batch".into(),
        ..Default::default()
    };

    // A batch over the size limit is refused whole and changes nothing.
    let too_many = pb::RespondActivityTasksRequest {
        identity: "p".into(),
        outcomes: vec![completed(&tasks["b-ok"], "early"); 1001],
        next_task: Some(next.clone()),
        max_next_tasks: 1,
    };
    let err = rpc.respond_activity_tasks(too_many).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    assert_eq!(
        status_of("b-ok").await.status,
        pb::ExecutionStatus::Running as i32
    );

    // One good result, one oversized, one failure, one malformed token: each judged alone.
    let failure = pb::Failure {
        message: "no luck".into(),
        non_retryable: true,
        kind: pb::FailureKind::Application as i32,
        ..Default::default()
    };
    let reply = rpc
        .respond_activity_tasks(pb::RespondActivityTasksRequest {
            identity: "p".into(),
            outcomes: vec![
                completed(&tasks["b-ok"], "fine"),
                completed(&tasks["b-big"], &"x".repeat(4096)),
                pb::ActivityOutcome {
                    task_token: tasks["b-fail"].clone(),
                    outcome: Some(pb::activity_outcome::Outcome::Failed(failure)),
                },
                completed(&b"not a token".to_vec(), "lost"),
            ],
            next_task: Some(next.clone()),
            max_next_tasks: 5,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = reply.acks.iter().map(|a| a.code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            tonic::Code::InvalidArgument as i32,
            0,
            tonic::Code::InvalidArgument as i32
        ],
        "{:?}",
        reply.acks
    );
    assert!(reply.acks[1].error.contains("1024"), "{:?}", reply.acks[1]);
    // Only one task was waiting, though five were asked for.
    let refill: Vec<&str> = reply
        .next_tasks
        .iter()
        .map(|t| t.activity_id.as_str())
        .collect();
    assert_eq!(refill, vec!["b-waiting"]);

    let ok = status_of("b-ok").await;
    assert_eq!(ok.status, pb::ExecutionStatus::Completed as i32);
    assert_eq!(
        tether::codec::display_payload(ok.result.as_ref()),
        "\"fine\""
    );
    assert_eq!(
        status_of("b-fail").await.status,
        pb::ExecutionStatus::Failed as i32
    );
    assert_eq!(
        status_of("b-big").await.status,
        pb::ExecutionStatus::Running as i32,
        "the refused outcome left its activity running"
    );

    // Taking from another worker's host queue is refused, as for a single completion.
    let mut foreign = next.clone();
    foreign.additional_task_queues =
        vec![tether::server::matching::host_queue_name("someone-else")];
    let err = rpc
        .respond_activity_tasks(pb::RespondActivityTasksRequest {
            identity: "p".into(),
            outcomes: vec![completed(&tasks["b-big"], "small")],
            next_task: Some(foreign),
            max_next_tasks: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status_of("b-big").await.status,
        pb::ExecutionStatus::Running as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_runs_past_retention_are_deleted_and_nothing_else() {
    let env = TestEnv::start_with(tether::server::ServerConfig {
        retention_sweep_interval: Duration::from_millis(100),
        ..common::test_config()
    })
    .await;
    // Bad retention values are refused and change nothing.
    let err = env
        .client
        .register_namespace_with_retention("short", "", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("at least 1 s"), "{err}");
    let err = env
        .client
        .update_namespace("nowhere", None, Some(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    env.client
        .register_namespace_with_retention("short", "", Duration::from_secs(1))
        .await
        .unwrap();
    let short = env.client.with_namespace("short");
    let done = short
        .start_workflow("t", &(), WorkflowOptions::new("w-done", "q"))
        .await
        .unwrap();
    done.terminate("finished").await.unwrap();
    let open = short
        .start_workflow("t", &(), WorkflowOptions::new("w-open", "q"))
        .await
        .unwrap();
    let kept = env
        .client
        .start_workflow("t", &(), WorkflowOptions::new("w-kept", "q"))
        .await
        .unwrap();
    kept.terminate("finished").await.unwrap();
    // A completed session goes the same way as a closed run.
    let mut w = tether::worker::Worker::new(
        short.clone(),
        tether::worker::WorkerOptions::new("q").identity("w-short"),
    );
    w.register_activity("noop", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(())
    });
    let worker = w.start().unwrap();
    let session = within(
        T,
        "session placed",
        short.create_session(tether::client::SessionOptions::new("q")),
    )
    .await
    .unwrap();
    let session_id = session.info.session_id.clone();
    session.complete().await.unwrap();
    // Readable once closed (retention is a second; it just closed).
    let closed = short.describe_session(&session_id).await.unwrap();
    assert_eq!(closed.state, "completed");

    eventually(
        T,
        "the closed run in the short namespace is deleted",
        || {
            let done = done.clone();
            async move {
                match done.describe().await {
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    let err = done.history().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    eventually(T, "the completed session is deleted", || {
        let (short, session_id) = (short.clone(), session_id.clone());
        async move {
            match short.describe_session(&session_id).await {
                Err(e) if e.code() == Some(tonic::Code::NotFound) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    worker.shutdown().await;
    // The open run outlives the retention period; the other namespace keeps everything.
    let open_status = open
        .describe()
        .await
        .unwrap()
        .info
        .map(|i| i.status)
        .unwrap();
    assert_eq!(open_status, pb::ExecutionStatus::Running as i32);
    assert!(kept.describe().await.is_ok());
    assert!(!kept.history().await.unwrap().is_empty());

    // Retention can be turned off again.
    let info = env
        .client
        .update_namespace("short", Some("kept now"), Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        (info.retention_ms, info.description.as_str()),
        (0, "kept now")
    );
}

/// A TCP forwarder that can be cut (open connections dropped, new ones reset) and restored: a
/// network blip between a worker and the server.
struct CutProxy {
    addr: std::net::SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<AtomicU32>,
    open: Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CutProxy {
    async fn start(target: String) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = CutProxy {
            addr: listener.local_addr().unwrap(),
            cut: Arc::default(),
            refused: Arc::default(),
            open: Arc::default(),
        };
        let (cut, refused, open) = (proxy.cut.clone(), proxy.refused.clone(), proxy.open.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: the caller sees the connection reset
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                open.lock().push(task.abort_handle());
            }
        });
        proxy
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.open.lock().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_activity_survives_a_network_blip_without_running_again() {
    let env = TestEnv::start().await;
    let proxy = CutProxy::start(env.listen.clone()).await;
    let runs = Arc::new(AtomicU32::new(0));
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let worker_client = tether::client::Client::connect(format!("http://{}", proxy.addr))
        .await
        .unwrap();
    let mut w = tether::worker::Worker::new(
        worker_client,
        tether::worker::WorkerOptions::new("gate-q").identity("behind-proxy"),
    );
    {
        let (runs, returned, release) = (runs.clone(), returned.clone(), release.clone());
        w.register_activity("gate", move |_ctx: ActivityContext, _: ()| {
            let (runs, returned, release) = (runs.clone(), returned.clone(), release.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                returned.store(true, Ordering::SeqCst);
                Ok::<_, ActivityError>("done".to_string())
            }
        });
    }
    let worker = w.start().unwrap();
    let mut options = StandaloneActivityOptions::new("gated", "gate-q");
    // Long enough that a lost result would only come back through a re-run after the timeout.
    options.options = ActivityOptions::default().start_to_close(Duration::from_secs(120));
    let handle = env
        .client
        .start_activity("gate", &(), options)
        .await
        .unwrap();
    eventually(T, "the activity runs", || {
        let runs = runs.clone();
        async move { (runs.load(Ordering::SeqCst) == 1).then_some(()) }
    })
    .await;

    proxy.cut();
    release.notify_one();
    eventually(T, "the activity returns while the network is cut", || {
        let returned = returned.clone();
        async move { returned.load(Ordering::SeqCst).then_some(()) }
    })
    .await;
    // Its report goes out at once; wait until the cut has turned away a connection after that.
    let seen = proxy.refused.load(Ordering::SeqCst);
    eventually(
        T,
        "a connection is refused after the activity returned",
        || {
            let refused = proxy.refused.clone();
            async move { (refused.load(Ordering::SeqCst) > seen).then_some(()) }
        },
    )
    .await;
    proxy.restore();

    let out: String = within(Duration::from_secs(20), "the result", handle.result())
        .await
        .unwrap();
    assert_eq!(out, "done");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the activity ran again");
    worker.shutdown().await;
}

#[tokio::test]
async fn worker_options_that_could_never_run_anything_are_refused_at_start() {
    use tether::worker::{Worker, WorkerOptions};
    let env = TestEnv::start().await;
    let activity_worker = |options: WorkerOptions| {
        let mut w = Worker::new(env.client.clone(), options);
        w.register_activity("noop", |_ctx: ActivityContext, v: u32| async move {
            Ok::<_, ActivityError>(v)
        });
        w
    };
    let base = || WorkerOptions::new("opts-q").identity("opts-w");
    // Struct literals skip `build`: `start` applies the same rules.
    match activity_worker(WorkerOptions {
        max_concurrent_activities: 0,
        ..base()
    })
    .start()
    {
        Err(e) => assert!(e.to_string().contains("max_concurrent_activities"), "{e}"),
        Ok(handle) => {
            handle.shutdown().await;
            panic!("a worker with no activity slots started: it would never take an activity");
        }
    }
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions {
            max_concurrent_workflow_tasks: 0,
            ..base()
        },
    );
    w.register_workflow("wf", |_ctx: WorkflowContext, v: u32| async move {
        Ok::<_, tether::workflow::WorkflowError>(v)
    });
    match w.start() {
        Err(e) => assert!(
            e.to_string().contains("max_concurrent_workflow_tasks"),
            "{e}"
        ),
        Ok(handle) => {
            handle.shutdown().await;
            panic!("a workflow worker with no workflow task slots started");
        }
    }
    // Zero slots of a kind it has nothing registered for is fine.
    let handle = activity_worker(WorkerOptions {
        max_concurrent_workflow_tasks: 0,
        ..base()
    })
    .start()
    .expect("an activity-only worker needs no workflow task slots");
    handle.shutdown().await;
}
