//! Sessions from a client: placement and reservations, pinning, release, failure detection,
//! restart survival, and a stress test that reservations never overlap.

mod common;

use common::{eventually, within, TestEnv};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::caps::{CapabilitySource, Inventory, Requirements};
use tether::client::{ActivityOptions, ClientError, SessionOptions};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};

const T: Duration = Duration::from_secs(30);

fn gpu_box(host: &str, gpus: u32) -> CapabilitySource {
    let text = format!(
        "hostname = \"{host}\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-80GB\"\nmemory = \"80GiB\"\ncompute = \"8.0\"\ncount = {gpus}\n"
    );
    CapabilitySource::detect().with_inventory(Inventory::parse(&text, "test").unwrap())
}

fn start_worker(
    env: &TestEnv,
    identity: &str,
    caps: CapabilitySource,
    sessions: u32,
) -> WorkerHandle {
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("gpu")
            .identity(identity)
            .capabilities(caps)
            .max_concurrent_sessions(sessions)
            .graceful_shutdown(Duration::from_secs(1)),
    );
    w.register_activity("where", |ctx: ActivityContext, _: ()| async move {
        let out = ctx
            .command("sh")
            .arg("-c")
            .arg("printf %s \"$CUDA_VISIBLE_DEVICES\"")
            .output()
            .map_err(|e| ActivityError::non_retryable(e.to_string()))?;
        Ok::<_, ActivityError>((
            ctx.info().worker_identity.clone(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    });
    w.register_activity("hang", |_ctx: ActivityContext, _: ()| async move {
        std::future::pending::<()>().await;
        Ok::<_, ActivityError>(())
    });
    w.start().unwrap()
}

async fn wait_alive(env: &TestEnv, ids: &[&str]) {
    eventually(T, "workers alive", || async {
        let w = env.client.list_workers().await.ok()?;
        ids.iter()
            .all(|id| w.iter().any(|x| x.identity == *id && x.state == "alive"))
            .then_some(())
    })
    .await;
}

fn gpus(n: u32) -> SessionOptions {
    SessionOptions {
        gpus: n,
        requirements: Requirements::parse("gpu.memory>=40GiB").unwrap(),
        creation_timeout: Some(Duration::from_secs(10)),
        ..SessionOptions::new("gpu")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pins_activities_and_exposes_its_reservation() {
    let env = TestEnv::start().await;
    let w1 = start_worker(&env, "box-a", gpu_box("box-a", 4), 10);
    let w2 = start_worker(&env, "box-b", gpu_box("box-b", 4), 10);
    wait_alive(&env, &["box-a", "box-b"]).await;
    let session = within(T, "create", env.client.create_session(gpus(2)))
        .await
        .unwrap();
    assert_eq!(session.info.state, "open");
    assert_eq!(session.info.gpus.len(), 2);
    let host = session.info.worker_identity.clone();
    let expected: Vec<String> = session
        .info
        .gpus
        .iter()
        .map(|g| g.index.to_string())
        .collect();
    for _ in 0..5 {
        let (who, visible): (String, String) = within(
            T,
            "session activity",
            session.execute_activity("where", &(), ActivityOptions::default()),
        )
        .await
        .unwrap();
        assert_eq!(
            who, host,
            "every session activity runs on the session's worker"
        );
        assert_eq!(
            visible,
            expected.join(","),
            "the child process sees only the reserved GPUs"
        );
    }
    let described = env.client.describe_session(session.id()).await.unwrap();
    assert_eq!(described.activities_run, 5);
    // Both boxes have 4 GPUs; a second 2-GPU session packs onto the same box (tightest fit).
    let second = within(T, "second", env.client.create_session(gpus(2)))
        .await
        .unwrap();
    assert_eq!(second.info.worker_identity, host);
    let used: Vec<u32> = session
        .info
        .gpus
        .iter()
        .chain(&second.info.gpus)
        .map(|g| g.index)
        .collect();
    let mut dedup = used.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 4, "no GPU reserved twice: {used:?}");
    let closed = session.complete().await.unwrap();
    assert_eq!(closed.state, "completed");
    // Completing again is refused and changes nothing.
    let err = session.complete().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    // Activities on a completed session are refused at once.
    let err = session
        .execute_activity::<_, (String, String)>("where", &(), ActivityOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("completed"), "{err}");
    second.complete().await.unwrap();
    w1.shutdown().await;
    w2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_session_waits_with_a_reason_then_fails() {
    let env = TestEnv::start().await;
    let w = start_worker(&env, "small", gpu_box("small", 2), 10);
    wait_alive(&env, &["small"]).await;
    let mut options = gpus(8);
    options.creation_timeout = Some(Duration::from_millis(1500));
    let err = within(T, "create", env.client.create_session(options))
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(text.contains("failed"), "{text}");
    assert!(
        text.contains("worker small needs 8 free GPU(s) but has 2"),
        "{text}"
    );
    w.shutdown().await;
}

/// Waits until `count` sessions are creating (waiting for GPUs).
async fn wait_creating(env: &TestEnv, count: usize) {
    eventually(T, "sessions waiting", || async {
        let all = env.client.list_sessions(false).await.ok()?;
        (all.iter().filter(|s| s.state == "creating").count() == count).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_sessions_are_placed_oldest_first_as_gpus_free() {
    let env = TestEnv::start().await;
    let w = start_worker(&env, "box", gpu_box("box", 2), 10);
    wait_alive(&env, &["box"]).await;
    let both = within(T, "first", env.client.create_session(gpus(2)))
        .await
        .unwrap();
    // Three wait, in this order: two GPUs, one GPU, two GPUs (the first and last ask the same).
    let mut waiting = Vec::new();
    for (i, n) in [2u32, 1, 2].into_iter().enumerate() {
        let client = env.client.clone();
        let mut options = gpus(n);
        options.creation_timeout = Some(Duration::from_secs(30));
        waiting.push(tokio::spawn(
            async move { client.create_session(options).await },
        ));
        wait_creating(&env, i + 1).await;
    }
    let all = env.client.list_sessions(false).await.unwrap();
    for s in all.iter().filter(|s| s.state == "creating") {
        assert!(
            s.reason.contains("box"),
            "a waiting session says why: {s:?}"
        );
    }
    let mut waiting = waiting.into_iter();
    let (first, second, third) = (
        waiting.next().unwrap(),
        waiting.next().unwrap(),
        waiting.next().unwrap(),
    );

    // Both GPUs free: the oldest (two GPUs) goes first, though the one-GPU request would fit too.
    both.complete().await.unwrap();
    let first = within(T, "oldest placed", first).await.unwrap().unwrap();
    assert_eq!(first.info.gpus.len(), 2);
    wait_creating(&env, 2).await;

    // Two free again: the one-GPU request is older than the two-GPU one, so it goes, and the
    // two-GPU one waits with one free.
    first.complete().await.unwrap();
    let second = within(T, "one-GPU placed", second).await.unwrap().unwrap();
    assert_eq!(second.info.gpus.len(), 1);
    wait_creating(&env, 1).await;
    assert!(
        !third.is_finished(),
        "two GPUs were placed with only one free"
    );

    second.complete().await.unwrap();
    let third = within(T, "last placed", third).await.unwrap().unwrap();
    assert_eq!(third.info.gpus.len(), 2);
    third.complete().await.unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_worker_fails_its_sessions_and_their_activities() {
    let config = tether::server::ServerConfig {
        worker_liveness_timeout: Duration::from_millis(800),
        ..common::test_config()
    };
    let env = TestEnv::start_with(config).await;
    let w = start_worker(&env, "doomed", gpu_box("doomed", 2), 10);
    wait_alive(&env, &["doomed"]).await;
    let session = within(T, "create", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    let s2 = session.clone();
    let pending = tokio::spawn(async move {
        s2.execute_activity::<_, ()>(
            "hang",
            &(),
            ActivityOptions::default().start_to_close(Duration::from_secs(60)),
        )
        .await
    });
    eventually(T, "activity running", || async {
        let d = env.client.describe_session(session.id()).await.ok()?;
        (d.activities_run > 0).then_some(())
    })
    .await;
    w.kill();
    let failed = eventually(T, "session failed", || async {
        let d = env.client.describe_session(session.id()).await.ok()?;
        (d.state == "failed").then_some(d)
    })
    .await;
    assert!(
        failed.reason.contains("worker doomed stopped heartbeating"),
        "{}",
        failed.reason
    );
    let err = within(T, "pending activity", pending)
        .await
        .unwrap()
        .unwrap_err();
    match err {
        ClientError::Failed { failure, .. } => {
            assert_eq!(failure.error_type, "SessionFailed", "{failure:?}");
        }
        other => panic!("expected SessionFailed, got {other}"),
    }
    let err = session
        .execute_activity::<_, ()>("where", &(), ActivityOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
}

/// Asks for a session of `n` GPUs on the test workers' queue and returns at once, placed or
/// waiting (the client SDK's own call waits for the placement).
async fn request_session(
    env: &TestEnv,
    id: &str,
    n: u32,
    creation_timeout_ms: u64,
) -> tether::api::pb::SessionInfo {
    env.client
        .raw()
        .create_session(tether::api::pb::CreateSessionRequest {
            namespace: "default".into(),
            options: Some(tether::api::pb::SessionOptions {
                task_queue: "gpu".into(),
                gpus: n,
                creation_timeout_ms,
                ..Default::default()
            }),
            owner: "test".into(),
            session_id: id.into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

/// Waits until the session is in `state`.
async fn wait_state(env: &TestEnv, id: &str, state: &str) -> tether::api::pb::SessionInfo {
    eventually(T, &format!("session {id} {state}"), || async {
        let s = env.client.describe_session(id).await.ok()?;
        (s.state == state).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_stop_waiting_are_skipped_and_the_rest_keep_their_reasons_current() {
    let env = TestEnv::start().await;
    let w = start_worker(&env, "box", gpu_box("box", 2), 10);
    wait_alive(&env, &["box"]).await;
    let one = within(T, "first holder", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    let other = within(T, "second holder", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    // In this order: one that gives up soon, one that an operator ends, and two that wait.
    let gives_up = request_session(&env, "gives-up", 2, 300).await;
    assert_eq!(gives_up.state, "creating");
    request_session(&env, "ended", 2, 60_000).await;
    let first = request_session(&env, "waits-1", 2, 60_000).await;
    let second = request_session(&env, "waits-2", 2, 60_000).await;
    assert!(first.reason.contains("has 0"), "{}", first.reason);
    assert!(second.reason.contains("has 0"), "{}", second.reason);
    wait_state(&env, "gives-up", "failed").await;
    env.client
        .terminate_session("ended", "not needed")
        .await
        .unwrap();

    // One GPU frees: nobody fits, and every waiting session says how many are free now, the
    // ones behind the first of their kind too.
    one.complete().await.unwrap();
    let first = wait_state(&env, "waits-1", "creating").await;
    let second = eventually(T, "the reason of the second follows", || async {
        let s = env.client.describe_session("waits-2").await.ok()?;
        s.reason.contains("has 1").then_some(s)
    })
    .await;
    assert!(first.reason.contains("has 1"), "{}", first.reason);
    assert_eq!(second.state, "creating");

    // Both free: the oldest that still waits gets them, not the ones that stopped waiting.
    other.complete().await.unwrap();
    let placed = wait_state(&env, "waits-1", "open").await;
    assert_eq!(placed.gpus.len(), 2);
    assert_eq!(
        env.client.describe_session("gives-up").await.unwrap().state,
        "failed"
    );
    assert_eq!(
        env.client.describe_session("ended").await.unwrap().state,
        "terminated"
    );
    assert_eq!(
        env.client.describe_session("waits-2").await.unwrap().state,
        "creating"
    );
    env.client
        .terminate_session("waits-1", "done")
        .await
        .unwrap();
    wait_state(&env, "waits-2", "open").await;
    env.client
        .terminate_session("waits-2", "done")
        .await
        .unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_across_a_server_restart_is_placed_when_gpus_free() {
    let mut env = TestEnv::start().await;
    let w = start_worker(&env, "box", gpu_box("box", 2), 10);
    wait_alive(&env, &["box"]).await;
    let holder = within(T, "holder", env.client.create_session(gpus(2)))
        .await
        .unwrap();
    assert_eq!(
        request_session(&env, "waits", 2, 60_000).await.state,
        "creating"
    );
    env.restart().await;
    wait_alive(&env, &["box"]).await;
    assert_eq!(
        env.client.describe_session("waits").await.unwrap().state,
        "creating"
    );
    holder.complete().await.unwrap();
    let placed = wait_state(&env, "waits", "open").await;
    assert_eq!(placed.gpus.len(), 2);
    env.client.terminate_session("waits", "done").await.unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_reservation_survive_a_server_restart() {
    let mut env = TestEnv::start().await;
    let w = start_worker(&env, "steady", gpu_box("steady", 4), 10);
    wait_alive(&env, &["steady"]).await;
    let session = within(T, "create", env.client.create_session(gpus(3)))
        .await
        .unwrap();
    env.restart().await;
    let after = env.client.describe_session(session.id()).await.unwrap();
    assert_eq!(after.state, "open");
    assert_eq!(
        after.gpus, session.info.gpus,
        "the same GPUs are still reserved"
    );
    // The worker re-registers; the reservation still counts: only one GPU is free.
    wait_alive(&env, &["steady"]).await;
    let mut two = gpus(2);
    two.creation_timeout = Some(Duration::from_millis(800));
    assert!(
        env.client.create_session(two).await.is_err(),
        "3 of 4 GPUs are still reserved"
    );
    let (who, _): (String, String) = within(
        T,
        "activity after restart",
        session.execute_activity("where", &(), ActivityOptions::default()),
    )
    .await
    .unwrap();
    assert_eq!(who, "steady");
    session.complete().await.unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_never_overlap_under_concurrent_churn() {
    let env = TestEnv::start().await;
    let workers: Vec<WorkerHandle> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| start_worker(&env, id, gpu_box(id, 4), 4))
        .collect();
    wait_alive(&env, &["s1", "s2", "s3"]).await;
    // (worker, gpu index) -> session currently holding it, as the clients see it.
    let ledger: Arc<parking_lot::Mutex<HashMap<(String, u32), String>>> = Default::default();
    let mut tasks = Vec::new();
    for t in 0..12u32 {
        let client = env.client.clone();
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut created = 0;
            for i in 0..20u32 {
                let want = 1 + (t * 7 + i * 3) % 4;
                let mut options = gpus(want);
                options.creation_timeout = Some(Duration::from_secs(20));
                let session = client
                    .create_session(options)
                    .await
                    .expect("placed eventually");
                {
                    let mut l = ledger.lock();
                    for g in &session.info.gpus {
                        let key = (session.info.worker_identity.clone(), g.index);
                        if let Some(other) = l.insert(key.clone(), session.id().to_string()) {
                            panic!(
                                "GPU {key:?} reserved by {other} and {} at once",
                                session.id()
                            );
                        }
                    }
                }
                assert_eq!(session.info.gpus.len() as u32, want);
                tokio::task::yield_now().await;
                {
                    let mut l = ledger.lock();
                    for g in &session.info.gpus {
                        l.remove(&(session.info.worker_identity.clone(), g.index));
                    }
                }
                session.complete().await.expect("complete");
                created += 1;
            }
            created
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += within(Duration::from_secs(120), "churn", t).await.unwrap();
    }
    assert_eq!(total, 240);
    let open = env
        .client
        .raw()
        .list_sessions(tether::api::pb::ListSessionsRequest {
            namespace: "default".into(),
            include_closed: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(open.is_empty(), "every session was released: {open:?}");
    for w in workers {
        w.shutdown().await;
    }
}

fn pipeline_worker(env: &TestEnv, identity: &str, gpu_count: u32) -> WorkerHandle {
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("gpu")
            .identity(identity)
            .capabilities(gpu_box(identity, gpu_count))
            .graceful_shutdown(Duration::from_secs(1)),
    );
    w.register_activity("step", |ctx: ActivityContext, hang: bool| async move {
        if hang {
            std::future::pending::<()>().await;
        }
        Ok::<_, ActivityError>((
            ctx.info().worker_identity.clone(),
            ctx.cuda_visible_devices().unwrap_or_default(),
        ))
    });
    w.register_workflow(
        "pinned_pipeline",
        |ctx: tether::workflow::WorkflowContext, hang_on_first: bool| async move {
            let session = ctx.create_session(gpus(2)).await?;
            let mut seen: Vec<(String, String)> = Vec::new();
            let mut current = session.clone();
            let mut failovers = 0u32;
            let mut step = 0;
            while step < 3 {
                let hang = hang_on_first && failovers == 0 && step == 1;
                let r: Result<(String, String), _> = current
                    .execute_activity("step", &hang, ActivityOptions::default())
                    .await;
                match r {
                    Ok(v) => {
                        seen.push(v);
                        step += 1;
                    }
                    Err(tether::workflow::WorkflowError::Activity(f))
                        if f.error_type == "SessionFailed" && failovers == 0 =>
                    {
                        // The session's end and its activities' failures arrive together.
                        let (state, reason) = current.state();
                        if state != "failed" || !reason.contains("stopped heartbeating") {
                            return Err(tether::workflow::WorkflowError::failed(format!(
                                "session state is {state:?} ({reason}) after SessionFailed"
                            )));
                        }
                        failovers += 1;
                        current = ctx
                            .recreate_session(
                                &current,
                                tether::workflow::RecreatePolicy::SameHostOrFailover,
                            )
                            .await?;
                        seen.clear();
                        step = 0;
                    }
                    Err(e) => return Err(e),
                }
            }
            current.complete();
            Ok((seen, failovers, session.info.worker_identity.clone()))
        },
    );
    w.start().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_session_pins_steps_and_fails_over() {
    let config = tether::server::ServerConfig {
        worker_liveness_timeout: Duration::from_millis(900),
        ..common::test_config()
    };
    let env = TestEnv::start_with(config).await;
    let a = pipeline_worker(&env, "wa", 2);
    let b = pipeline_worker(&env, "wb", 4);
    wait_alive(&env, &["wa", "wb"]).await;

    // Without failure: every step on the session's worker, seeing its two GPUs.
    let run = env
        .client
        .start_workflow(
            "pinned_pipeline",
            &false,
            tether::client::WorkflowOptions::new("p-ok", "gpu"),
        )
        .await
        .unwrap();
    let (seen, failovers, first_host): (Vec<(String, String)>, u32, String) =
        within(T, "pipeline", run.result()).await.unwrap();
    assert_eq!(failovers, 0);
    assert_eq!(first_host, "wa", "tightest fit: the 2-GPU box");
    assert!(
        seen.iter().all(|(w, d)| w == "wa" && d == "0,1"),
        "{seen:?}"
    );
    common::assert_no_task_failures(&run).await;

    // The session's worker dies mid-pipeline: the workflow recreates the session elsewhere.
    let run = env
        .client
        .start_workflow(
            "pinned_pipeline",
            &true,
            tether::client::WorkflowOptions::new("p-failover", "gpu"),
        )
        .await
        .unwrap();
    eventually(T, "second step running on wa", || async {
        let d = run.describe().await.ok()?;
        d.pending_activities
            .iter()
            .any(|p| p.state == "started" && p.last_worker == "wa")
            .then_some(())
    })
    .await;
    a.kill();
    let (seen, failovers, first_host): (Vec<(String, String)>, u32, String) =
        within(T, "failover", run.result()).await.unwrap();
    assert_eq!(first_host, "wa");
    assert_eq!(failovers, 1);
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|(w, _)| w == "wb"),
        "after failover every step ran on wb: {seen:?}"
    );
    let kinds = common::event_kinds(&run.history().await.unwrap());
    assert_eq!(
        kinds.iter().filter(|k| **k == "SessionCreated").count(),
        2,
        "{kinds:?}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_worker_resumes_its_session_and_retries_the_interrupted_attempt() {
    let env = TestEnv::start().await;
    let first = start_worker(&env, "phoenix", gpu_box("phoenix", 2), 10);
    wait_alive(&env, &["phoenix"]).await;
    let session = within(T, "create", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    let s2 = session.clone();
    // "hang" never finishes on the first process; the restarted one runs "where" instead.
    let run = tokio::spawn(async move {
        s2.execute_activity::<_, ()>(
            "hang",
            &(),
            ActivityOptions::default().start_to_close(Duration::from_secs(60)),
        )
        .await
    });
    eventually(T, "attempt running", || async {
        let d = env.client.describe_session(session.id()).await.ok()?;
        (d.activities_run > 0).then_some(())
    })
    .await;
    first.kill();
    // The same identity comes back well within the liveness timeout, with "hang" now finishing.
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("gpu")
            .identity("phoenix")
            .capabilities(gpu_box("phoenix", 2)),
    );
    w.register_activity("hang", |ctx: ActivityContext, _: ()| async move {
        assert!(ctx.info().attempt >= 2, "this is the retried attempt");
        Ok::<_, ActivityError>(())
    });
    let second = w.start().unwrap();
    within(T, "retried attempt", run)
        .await
        .unwrap()
        .expect("retried on the restarted worker");
    let d = env.client.describe_session(session.id()).await.unwrap();
    assert_eq!(d.state, "open", "the session survived the worker restart");
    assert_eq!(d.worker_identity, "phoenix");
    session.complete().await.unwrap();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_ends_the_session_and_frees_its_gpus() {
    let env = TestEnv::start().await;
    let w = start_worker(&env, "short", gpu_box("short", 2), 10);
    wait_alive(&env, &["short"]).await;
    let mut options = gpus(2);
    options.execution_timeout = Some(Duration::from_millis(500));
    let session = within(T, "create", env.client.create_session(options))
        .await
        .unwrap();
    let ended = eventually(T, "session timed out", || async {
        let d = env.client.describe_session(session.id()).await.ok()?;
        (d.state == "timed_out").then_some(d)
    })
    .await;
    assert!(
        ended.reason.contains("execution timeout"),
        "{}",
        ended.reason
    );
    // Its two GPUs are free again.
    let again = within(T, "create again", env.client.create_session(gpus(2)))
        .await
        .unwrap();
    assert_eq!(again.info.gpus.len(), 2);
    again.complete().await.unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_worker_cannot_poll_a_host_queue() {
    let env = TestEnv::start().await;
    let err = env
        .client
        .raw()
        .poll_activity_task(tether::api::pb::PollActivityTaskRequest {
            namespace: "default".into(),
            task_queue: "gpu".into(),
            identity: "intruder".into(),
            poll_timeout_ms: 100,
            additional_task_queues: vec!["host/victim".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("host queue of another worker"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_recreation_stays_on_that_worker() {
    let env = TestEnv::start().await;
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("gpu")
            .identity("home")
            .capabilities(gpu_box("home", 2)),
    );
    w.register_workflow(
        "sticky_home",
        |ctx: tether::workflow::WorkflowContext, _: ()| async move {
            let options = SessionOptions {
                packing: "spread".into(),
                ..gpus(2)
            };
            let first = ctx.create_session(options.clone()).await?;
            // Wait until the test has started a roomier worker that spread packing would prefer.
            let _: () = ctx.signal_channel("go").recv().await?;
            first.complete();
            let pinned = ctx
                .recreate_session(&first, tether::workflow::RecreatePolicy::SameHost)
                .await?;
            pinned.complete();
            let free = ctx
                .recreate_session(&first, tether::workflow::RecreatePolicy::SameHostOrFailover)
                .await?;
            free.complete();
            Ok((
                first.info.worker_identity.clone(),
                pinned.info.worker_identity.clone(),
                free.info.worker_identity.clone(),
            ))
        },
    );
    let home = w.start().unwrap();
    wait_alive(&env, &["home"]).await;
    let run = env
        .client
        .start_workflow(
            "sticky_home",
            &(),
            tether::client::WorkflowOptions::new("home-1", "gpu"),
        )
        .await
        .unwrap();
    eventually(T, "first session placed", || async {
        let h = run.history().await.ok()?;
        h.iter()
            .any(|e| e.kind_name() == "SessionCreated")
            .then_some(())
    })
    .await;
    let other = start_worker(&env, "elsewhere", gpu_box("elsewhere", 8), 10);
    wait_alive(&env, &["elsewhere"]).await;
    run.signal("go", &()).await.unwrap();
    let (first, pinned, free): (String, String, String) =
        within(T, "same host", run.result()).await.unwrap();
    assert_eq!(first, "home");
    assert_eq!(pinned, "home", "SameHost keeps the session on its worker");
    assert_eq!(
        free, "elsewhere",
        "without the pin, spread packing picks the roomier worker"
    );
    home.shutdown().await;
    other.shutdown().await;
}

/// The ids a session makes up for its activities sort in the order the activities start,
/// whichever session they are in: the store indexes runs by id, and ids that began with their
/// session's id put the inserts of concurrent sessions all over that index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_activity_ids_sort_in_the_order_the_activities_start() {
    let env = TestEnv::start().await;
    let _w = start_worker(&env, "box-a", gpu_box("box-a", 4), 10);
    wait_alive(&env, &["box-a"]).await;
    let first = within(T, "create first", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    let second = within(T, "create second", env.client.create_session(gpus(1)))
        .await
        .unwrap();
    // The later session's activity first, then the earlier one's, then the later one's again.
    for session in [&second, &first, &second] {
        let _: (String, String) = within(
            T,
            "session activity",
            session.execute_activity("where", &(), ActivityOptions::default()),
        )
        .await
        .unwrap();
    }
    let newest_first = env.client.list_workflows(None, 10, true).await.unwrap();
    let in_start_order: Vec<String> = newest_first
        .iter()
        .rev()
        .map(|run| run.workflow_id.clone())
        .collect();
    assert_eq!(in_start_order.len(), 3, "{in_start_order:?}");
    let mut sorted = in_start_order.clone();
    sorted.sort();
    assert_eq!(
        sorted, in_start_order,
        "session activity ids sort in the order the activities started"
    );
}
