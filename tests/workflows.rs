//! End-to-end behaviour of workflows and activities over an in-process server.

mod common;

use common::{assert_no_task_failures, event_kinds, eventually, within, TestEnv};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb;
use tether::client::{ActivityOptions, ClientError, RetryPolicy, WorkflowOptions};
use tether::workflow::{ActivityFailureKind, WorkflowContext, WorkflowError};

const T: Duration = Duration::from_secs(30);

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_with_activities_completes() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("greet", |_ctx: ActivityContext, name: String| async move {
        Ok::<_, ActivityError>(format!("hello {name}"))
    });
    w.register_activity("shout", |_ctx: ActivityContext, s: String| async move {
        Ok::<_, ActivityError>(s.to_uppercase())
    });
    w.register_workflow(
        "greeting",
        |ctx: WorkflowContext, name: String| async move {
            let hello: String = ctx
                .execute_activity("greet", &name, ActivityOptions::default())
                .await?;
            let loud: String = ctx
                .execute_activity("shout", &hello, ActivityOptions::default())
                .await?;
            Ok(loud)
        },
    );
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("greeting", "ada", WorkflowOptions::new("wf-1", "q"))
        .await
        .unwrap();
    let out: String = within(T, "workflow result", handle.result()).await.unwrap();
    assert_eq!(out, "HELLO ADA");
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert_eq!(kinds.first(), Some(&"WorkflowExecutionStarted"));
    assert_eq!(kinds.last(), Some(&"WorkflowExecutionCompleted"));
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "ActivityTaskCompleted")
            .count(),
        2
    );
    let d = handle.describe().await.unwrap();
    assert_eq!(
        d.info.unwrap().status,
        pb::ExecutionStatus::Completed as i32
    );
    assert_eq!(
        d.workflow_task_failures, 0,
        "every task completed first time (sticky path)"
    );
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_failing_twice_then_succeeding_is_retried() {
    let env = TestEnv::start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut w = env.worker("q", "w1");
    let c = calls.clone();
    w.register_activity("flaky", move |ctx: ActivityContext, _: ()| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            if ctx.info().attempt < 3 {
                Err(ActivityError::retryable(format!(
                    "attempt {} broke",
                    ctx.info().attempt
                )))
            } else {
                Ok(ctx.info().attempt)
            }
        }
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let attempt: u32 = ctx
            .execute_activity("flaky", &(), ActivityOptions::default().retry(fast_retry()))
            .await?;
        Ok(attempt)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("flaky-1", "q"))
        .await
        .unwrap();
    let attempt: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(attempt, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let history = handle.history().await.unwrap();
    let completed = history
        .iter()
        .find_map(|e| match &e.attributes {
            Some(pb::history_event::Attributes::ActivityTaskCompleted(c)) => Some(c.attempt),
            _ => None,
        })
        .unwrap();
    assert_eq!(completed, 3, "history records the attempt that succeeded");
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_to_close_timeout_leads_to_a_retry() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("slow_first", |ctx: ActivityContext, _: ()| async move {
        if ctx.info().attempt == 1 {
            // Far beyond the 300 ms start-to-close timeout: the server gives up on this attempt.
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        Ok::<_, ActivityError>(ctx.info().attempt)
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default()
            .start_to_close(Duration::from_millis(300))
            .retry(fast_retry());
        let attempt: u32 = ctx.execute_activity("slow_first", &(), options).await?;
        Ok(attempt)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("stc", "q"))
        .await
        .unwrap();
    let attempt: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(attempt, 2);
    assert_no_task_failures(&handle).await;
    worker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_retries_and_next_attempt_sees_details() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("hb", |ctx: ActivityContext, _: ()| async move {
        if ctx.info().attempt == 1 {
            ctx.heartbeat(&42u32);
            // Stop heartbeating: the 500 ms heartbeat timeout ends this attempt.
            tokio::time::sleep(Duration::from_secs(20)).await;
            return Ok(0);
        }
        Ok::<_, ActivityError>(ctx.heartbeat_details::<u32>().unwrap_or(0))
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default()
            .start_to_close(Duration::from_secs(20))
            .heartbeat(Duration::from_millis(500))
            .retry(fast_retry());
        let v: u32 = ctx.execute_activity("hb", &(), options).await?;
        Ok(v)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("hb", "q"))
        .await
        .unwrap();
    let v: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(
        v, 42,
        "the second attempt read the first attempt's heartbeat details"
    );
    assert_no_task_failures(&handle).await;
    worker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_heartbeat_before_a_failure_reaches_the_next_attempt() {
    // Heartbeats are throttled: of several in quick succession only the first is sent at once.
    // The details recorded last before the attempt failed must still reach the next attempt.
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("steps", |ctx: ActivityContext, _: ()| async move {
        let start = ctx.heartbeat_details::<u32>().unwrap_or(0);
        if ctx.info().attempt == 1 {
            for step in 1..=3u32 {
                ctx.heartbeat(&step);
            }
            return Err(ActivityError::retryable("crashed after step 3"));
        }
        Ok::<_, ActivityError>(start)
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default()
            .heartbeat(Duration::from_secs(10))
            .retry(fast_retry());
        let v: u32 = ctx.execute_activity("steps", &(), options).await?;
        Ok(v)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("last-hb", "q"))
        .await
        .unwrap();
    let v: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(
        v, 3,
        "the second attempt resumed from the last step recorded"
    );
    worker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_error_fails_without_retry() {
    let env = TestEnv::start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut w = env.worker("q", "w1");
    w.register_activity("bad", move |_ctx: ActivityContext, _: ()| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(ActivityError::non_retryable("card declined").with_type("Declined"))
        }
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let r: Result<(), WorkflowError> = ctx
            .execute_activity("bad", &(), ActivityOptions::default().retry(fast_retry()))
            .await;
        match r {
            Err(WorkflowError::Activity(f)) => {
                assert_eq!(f.kind, ActivityFailureKind::Failed);
                Err::<(), _>(WorkflowError::failed(format!(
                    "payment failed: {} ({}) after {} attempt(s)",
                    f.message, f.error_type, f.attempt
                )))
            }
            other => Err(WorkflowError::failed(format!("unexpected: {other:?}"))),
        }
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("nr", "q"))
        .await
        .unwrap();
    let err = within(T, "result", handle.result::<()>())
        .await
        .unwrap_err();
    match err {
        ClientError::Failed {
            status, failure, ..
        } => {
            assert_eq!(status, pb::ExecutionStatus::Failed);
            assert_eq!(
                failure.message,
                "payment failed: card declined (Declined) after 1 attempt(s)"
            );
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_error_type_in_policy_stops_retries() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_activity("bad", |_ctx: ActivityContext, _: ()| async move {
        Err::<(), _>(ActivityError::retryable("no such bucket").with_type("NotFound"))
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let policy = RetryPolicy {
            non_retryable_error_types: vec!["NotFound".into()],
            ..fast_retry()
        };
        let r: Result<(), _> = ctx
            .execute_activity("bad", &(), ActivityOptions::default().retry(policy))
            .await;
        match r {
            Err(WorkflowError::Activity(f)) => Ok(f.attempt),
            _ => Ok(0),
        }
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("nrt", "q"))
        .await
        .unwrap();
    let attempts: u32 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(attempts, 1);
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_reaches_workflow_and_activity() {
    let env = TestEnv::start().await;
    let cleaned = Arc::new(AtomicU32::new(0));
    let mut w = env.worker("q", "w1");
    w.register_activity("long", |ctx: ActivityContext, _: ()| async move {
        loop {
            ctx.heartbeat(&());
            tokio::select! {
                _ = ctx.cancelled() => return Err::<(), _>(ActivityError::Cancelled),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    let c = cleaned.clone();
    w.register_activity("cleanup", move |_ctx: ActivityContext, _: ()| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ActivityError>(())
        }
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let options = ActivityOptions::default().heartbeat(Duration::from_millis(200));
        let r: Result<(), _> = ctx.execute_activity("long", &(), options).await;
        match r {
            Err(WorkflowError::Activity(f)) if f.kind == ActivityFailureKind::Cancelled => {}
            other => {
                return Err(WorkflowError::failed(format!(
                    "expected cancellation, got {other:?}"
                )))
            }
        }
        assert!(ctx.is_cancelled());
        let _: () = ctx
            .execute_activity("cleanup", &(), ActivityOptions::default())
            .await?;
        Err::<(), _>(WorkflowError::Cancelled)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("wf", &(), WorkflowOptions::new("cancel-me", "q"))
        .await
        .unwrap();
    eventually(T, "activity running", || async {
        let d = handle.describe().await.ok()?;
        d.pending_activities
            .iter()
            .any(|a| a.state == "started")
            .then_some(())
    })
    .await;
    handle.cancel("user asked").await.unwrap();
    let outcome = within(T, "outcome", handle.outcome()).await.unwrap();
    assert_eq!(outcome.status, pb::ExecutionStatus::Canceled as i32);
    assert_eq!(
        cleaned.load(Ordering::SeqCst),
        1,
        "cleanup ran after cancellation"
    );
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert!(kinds.contains(&"WorkflowCancelRequested"));
    assert!(kinds.contains(&"ActivityTaskCanceled"));
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_delivered_in_order() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_workflow("sum", |ctx: WorkflowContext, n: u32| async move {
        let ch = ctx.signal_channel("add");
        let mut seen = Vec::new();
        for _ in 0..n {
            let v: i64 = ch.recv().await?;
            seen.push(v);
        }
        Ok(seen)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("sum", &3u32, WorkflowOptions::new("sig", "q"))
        .await
        .unwrap();
    for v in [5i64, 7, 11] {
        handle.signal("add", &v).await.unwrap();
    }
    let seen: Vec<i64> = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(seen, vec![5, 7, 11]);
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_timer_fires() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_workflow("nap", |ctx: WorkflowContext, ms: u64| async move {
        let before = ctx.now();
        ctx.sleep(Duration::from_millis(ms)).await;
        let slept = ctx.now().duration_since(before).unwrap_or_default();
        Ok(slept.as_millis() as u64)
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("nap", &300u64, WorkflowOptions::new("nap", "q"))
        .await
        .unwrap();
    let slept: u64 = within(T, "result", handle.result()).await.unwrap();
    assert!(
        slept >= 300,
        "workflow time advanced by the timer: {slept} ms"
    );
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert!(
        kinds.contains(&"TimerStarted") && kinds.contains(&"TimerFired"),
        "{kinds:?}"
    );
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_from_a_workflow_in_another_namespace() {
    let env = TestEnv::start().await;
    env.client.register_namespace("other", "").await.unwrap();
    let other = env.client.with_namespace("other");
    let mut receiver = tether::worker::Worker::new(
        other.clone(),
        tether::worker::WorkerOptions::new("q").identity("rx"),
    );
    receiver.register_workflow("receiver", |ctx: WorkflowContext, _: ()| async move {
        let msg: String = ctx.signal_channel("hello").recv().await?;
        Ok(msg)
    });
    let mut sender = env.worker("q", "tx");
    sender.register_workflow("sender", |ctx: WorkflowContext, _: ()| async move {
        ctx.signal_workflow(Some("other"), "rx-1", "hello", "from default")
            .await?;
        // A target that does not exist is reported, not silently dropped.
        let missing = ctx.signal_workflow(None, "nobody", "hello", "x").await;
        Ok(missing.is_err())
    });
    let rw = receiver.start().unwrap();
    let sw = sender.start().unwrap();
    let rx = other
        .start_workflow("receiver", &(), WorkflowOptions::new("rx-1", "q"))
        .await
        .unwrap();
    let tx = env
        .client
        .start_workflow("sender", &(), WorkflowOptions::new("tx-1", "q"))
        .await
        .unwrap();
    let missing_reported: bool = within(T, "sender", tx.result()).await.unwrap();
    assert!(missing_reported);
    let msg: String = within(T, "receiver", rx.result()).await.unwrap();
    assert_eq!(msg, "from default");
    rw.shutdown().await;
    sw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_ends_the_run_at_once() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_workflow("forever", |ctx: WorkflowContext, _: ()| async move {
        let _: String = ctx.signal_channel("never").recv().await?;
        Ok(())
    });
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("forever", &(), WorkflowOptions::new("term", "q"))
        .await
        .unwrap();
    handle.terminate("operator").await.unwrap();
    let outcome = within(T, "outcome", handle.outcome()).await.unwrap();
    assert_eq!(outcome.status, pb::ExecutionStatus::Terminated as i32);
    // A terminated run refuses further signals with a clear error.
    let err = handle.signal("never", "x").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("terminated"), "{err}");
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_helpers_are_stable_across_replay() {
    let env = TestEnv::start().await;
    // No sticky cache: every task replays from the full history.
    let mut w0 = tether::worker::Worker::new(
        env.client.clone(),
        tether::worker::WorkerOptions::new("q")
            .identity("nocache")
            .max_cached_workflows(0),
    );
    w0.register_activity("noop", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(())
    });
    w0.register_workflow("det", |ctx: WorkflowContext, _: ()| async move {
        let r1 = ctx.random_u64();
        let id = ctx.uuid();
        let effect: u64 = ctx.side_effect(|| 1234)?;
        let _: () = ctx
            .execute_activity("noop", &(), ActivityOptions::default())
            .await?;
        Ok((r1, id.to_string(), effect))
    });
    let worker = w0.start().unwrap();
    let handle = env
        .client
        .start_workflow("det", &(), WorkflowOptions::new("det", "q"))
        .await
        .unwrap();
    let (r1, id, effect): (u64, String, u64) = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(effect, 1234);
    assert_ne!(r1, 0);
    assert_eq!(id.len(), 36);
    let d = handle.describe().await.unwrap();
    assert_eq!(d.workflow_task_failures, 0, "replay stayed deterministic");
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert!(kinds.contains(&"MarkerRecorded"));
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_workflow_slot_still_serves_both_queues() {
    let env = TestEnv::start().await;
    // One slot: a poll parked on the sticky queue must not starve the normal queue.
    let mut w = tether::worker::Worker::new(
        env.client.clone(),
        tether::worker::WorkerOptions::new("q")
            .identity("one-slot")
            .max_concurrent_workflow_tasks(1),
    );
    w.register_activity("noop", |_ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(())
    });
    w.register_workflow("wf", |ctx: WorkflowContext, _: ()| async move {
        let _: () = ctx
            .execute_activity("noop", &(), ActivityOptions::default())
            .await?;
        Ok(())
    });
    let worker = w.start().unwrap();
    for i in 0..3 {
        let handle = env
            .client
            .start_workflow("wf", &(), WorkflowOptions::new(format!("slot-{i}"), "q"))
            .await
            .unwrap();
        let _: () = within(Duration::from_secs(8), "result", handle.result())
            .await
            .unwrap();
    }
    worker.shutdown().await;
}

/// Polls one workflow task the way a worker would, as identity "raw" (tests that play the
/// worker's side by hand).
async fn poll_workflow_task_raw(
    rpc: &mut tether_sdk::client::Rpc,
    queue: &str,
) -> pb::PollWorkflowTaskResponse {
    rpc.poll_workflow_task(pb::PollWorkflowTaskRequest {
        namespace: "default".into(),
        task_queue: queue.into(),
        identity: "raw".into(),
        sticky_queue: String::new(),
        poll_timeout_ms: 10_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_arriving_while_the_final_task_runs_is_not_lost() {
    let env = TestEnv::start().await;
    let handle = env
        .client
        .start_workflow("drain", &(), WorkflowOptions::new("late-sig", "late-q"))
        .await
        .unwrap();
    // A worker (raw calls here) holds the first task and decides to close the run...
    let mut rpc = env.client.raw();
    let task = poll_workflow_task_raw(&mut rpc, "late-q").await;
    assert!(!task.task_token.is_empty());
    // ...while a signal arrives and is acknowledged.
    handle.signal("add", &42i64).await.unwrap();
    let err = rpc
        .complete_workflow_task(pb::CompleteWorkflowTaskRequest {
            task_token: task.task_token,
            commands: vec![pb::Command {
                kind: Some(pb::command::Kind::CompleteWorkflow(
                    pb::CompleteWorkflowCommand {
                        result: Some(tether::codec::to_payload(&Vec::<i64>::new()).unwrap()),
                    },
                )),
            }],
            identity: "raw".into(),
            sticky_queue: String::new(),
            next_task: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{}", err.message());
    assert!(err.message().contains("new event"), "{}", err.message());
    // The next task goes to real workflow code, which sees the signal before it returns.
    let mut w = env.worker("late-q", "w1");
    w.register_workflow("drain", |ctx: WorkflowContext, _: ()| async move {
        let ch = ctx.signal_channel("add");
        let mut seen = Vec::new();
        while let Some(v) = ch.try_recv::<i64>() {
            seen.push(v?);
        }
        Ok(seen)
    });
    let worker = w.start().unwrap();
    let seen: Vec<i64> = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(seen, vec![42]);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_task_completion_hands_back_the_next_waiting_task() {
    let env = TestEnv::start().await;
    for id in ["hb-1", "hb-2"] {
        env.client
            .start_workflow("t", &(), WorkflowOptions::new(id, "hb-q"))
            .await
            .unwrap();
    }
    let mut rpc = env.client.raw();
    let first = poll_workflow_task_raw(&mut rpc, "hb-q").await;
    assert_eq!(first.workflow_id, "hb-1");
    let complete = |token: Vec<u8>, next: Option<pb::NextWorkflowTaskRequest>| {
        pb::CompleteWorkflowTaskRequest {
            task_token: token,
            commands: vec![pb::Command {
                kind: Some(pb::command::Kind::CompleteWorkflow(
                    pb::CompleteWorkflowCommand::default(),
                )),
            }],
            identity: "raw".into(),
            sticky_queue: String::new(),
            next_task: next,
        }
    };
    let ask = pb::NextWorkflowTaskRequest {
        namespace: "default".into(),
        task_queues: vec!["nothing-here".into(), "hb-q".into()],
    };
    let reply = rpc
        .complete_workflow_task(complete(first.task_token, Some(ask.clone())))
        .await
        .unwrap()
        .into_inner();
    let second = reply.next_task.expect("the waiting task came back");
    assert_eq!(second.workflow_id, "hb-2");
    assert!(second.full_history);
    // Nothing else waits: the reply says so instead of waiting.
    let reply = rpc
        .complete_workflow_task(complete(second.task_token, Some(ask)))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.next_task.is_none());
    for id in ["hb-1", "hb-2"] {
        let status = env
            .client
            .workflow_handle(id, "")
            .describe()
            .await
            .unwrap()
            .info
            .unwrap()
            .status;
        assert_eq!(status, pb::ExecutionStatus::Completed as i32, "{id}");
    }
}

/// Workflow code written against the activation boundary alone, with no future in it: how an
/// SDK for another language drives workflows on this worker.
struct DoubleAfterATimer {
    input: u64,
}

impl tether::workflow::WorkflowCode for DoubleAfterATimer {
    fn recorded_side_effects(
        &mut self,
        _recorded: std::collections::HashMap<u32, Option<pb::Payload>>,
    ) {
    }

    fn activate(
        &mut self,
        events: &[&pb::HistoryEvent],
    ) -> Result<Vec<pb::Command>, tether::workflow::TaskFailure> {
        use pb::command::Kind;
        use pb::history_event::Attributes;
        let mut commands = Vec::new();
        for event in events {
            match &event.attributes {
                Some(Attributes::WorkflowExecutionStarted(started)) => {
                    self.input =
                        tether::codec::from_payload(started.input.as_ref()).map_err(|e| {
                            tether::workflow::TaskFailure {
                                cause: "bad_input",
                                message: e.to_string(),
                            }
                        })?;
                    commands.push(pb::Command {
                        kind: Some(Kind::StartTimer(pb::StartTimerCommand {
                            seq: 1,
                            duration_ms: 50,
                        })),
                    });
                }
                Some(Attributes::TimerFired(_)) => {
                    let result = tether::codec::to_payload(&(self.input * 2)).unwrap();
                    commands.push(pb::Command {
                        kind: Some(Kind::CompleteWorkflow(pb::CompleteWorkflowCommand {
                            result: Some(result),
                        })),
                    });
                }
                _ => {}
            }
        }
        Ok(commands)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_code_without_futures_runs_through_the_activation_boundary() {
    let env = TestEnv::start().await;
    let mut w = env.worker("q", "w1");
    w.register_workflow_code("double", |_info| Box::new(DoubleAfterATimer { input: 0 }));
    let worker = w.start().unwrap();
    let handle = env
        .client
        .start_workflow("double", &21u64, WorkflowOptions::new("double-1", "q"))
        .await
        .unwrap();
    let doubled: u64 = within(T, "result", handle.result()).await.unwrap();
    assert_eq!(doubled, 42);
    let kinds = event_kinds(&handle.history().await.unwrap());
    assert!(
        kinds.contains(&"TimerStarted") && kinds.contains(&"TimerFired"),
        "{kinds:?}"
    );
    assert_no_task_failures(&handle).await;
    worker.shutdown().await;
}
