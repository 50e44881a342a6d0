//! The engine alone: no gRPC, no data directory. Each test runs it over the in-memory store
//! on tokio's paused time (the engine reads the time from [`Clock::following_tokio`]), so a
//! timeout of a day passes at once and nothing waits on real time.

use super::*;
use crate::clock::Clock;
use crate::store::MemoryStore;

/// Longest a test waits for something that must happen, in virtual time.
const VIRTUAL_DAYS: Duration = Duration::from_secs(3 * 24 * 3600);

async fn engine_over(store: Arc<MemoryStore>) -> Arc<Engine> {
    let config = ServerConfig {
        clock: Clock::following_tokio(),
        ..ServerConfig::default()
    };
    let engine = Engine::open(store, config).await.unwrap();
    tokio::spawn(engine.clone().run_timers());
    engine
}

fn start_request(workflow_id: &str, run_timeout_ms: u64) -> pb::StartWorkflowRequest {
    pb::StartWorkflowRequest {
        namespace: "default".into(),
        workflow_id: workflow_id.into(),
        workflow_type: "wf".into(),
        task_queue: "q".into(),
        run_timeout_ms,
        request_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    }
}

/// Polls until a workflow task comes (each poll ends empty at the long-poll timeout), for at
/// most [`VIRTUAL_DAYS`] of virtual time.
async fn next_workflow_task(engine: &Engine) -> pb::PollWorkflowTaskResponse {
    let deadline = Instant::now() + VIRTUAL_DAYS;
    while Instant::now() < deadline {
        let task = engine
            .poll_workflow_task(pb::PollWorkflowTaskRequest {
                namespace: "default".into(),
                task_queue: "q".into(),
                identity: "w".into(),
                poll_timeout_ms: 60_000,
                ..Default::default()
            })
            .await
            .unwrap();
        if !task.task_token.is_empty() {
            return task;
        }
    }
    panic!("no workflow task in {VIRTUAL_DAYS:?} of virtual time");
}

/// The outcome of a workflow's current run once it closed (each wait ends at the long-poll
/// timeout), or RUNNING after [`VIRTUAL_DAYS`] of virtual time.
async fn outcome_once_closed(engine: &Engine, workflow_id: &str) -> pb::GetWorkflowResultResponse {
    let deadline = Instant::now() + VIRTUAL_DAYS;
    loop {
        let outcome = engine
            .result(
                &RunSelector::workflow("default", workflow_id, ""),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        if outcome.status != ExecutionStatus::Running as i32 || Instant::now() >= deadline {
            return outcome;
        }
    }
}

fn command(kind: pb::command::Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

#[tokio::test(start_paused = true)]
async fn a_durable_timer_of_a_day_fires_a_day_later_by_the_engines_clock() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    let run_id = engine
        .start_workflow(start_request("sleeper", 0))
        .await
        .unwrap();
    let first = next_workflow_task(&engine).await;
    assert_eq!(first.run_id, run_id);
    let day_ms = 24 * 3_600_000;
    engine
        .complete_workflow_task(pb::CompleteWorkflowTaskRequest {
            task_token: first.task_token,
            identity: "w".into(),
            commands: vec![command(pb::command::Kind::StartTimer(
                pb::StartTimerCommand {
                    seq: 1,
                    duration_ms: day_ms,
                },
            ))],
            ..Default::default()
        })
        .await
        .unwrap();
    let started_at = engine.now_ms();
    let second = next_workflow_task(&engine).await;
    let fired = second
        .events
        .iter()
        .find(|e| {
            matches!(
                e.attributes,
                Some(pb::history_event::Attributes::TimerFired(_))
            )
        })
        .expect("the timer fired");
    let waited = fired.time_ms - started_at;
    assert!(
        (day_ms as i64..day_ms as i64 + 60_000).contains(&waited),
        "fired {waited} ms after it was started, by the engine's clock"
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_past_its_run_timeout_times_out_without_any_worker() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    engine
        .start_workflow(start_request("slow", 3_600_000))
        .await
        .unwrap();
    let outcome = outcome_once_closed(&engine, "slow").await;
    assert_eq!(outcome.status, ExecutionStatus::TimedOut as i32);
    assert_eq!(engine.stats().runs, 0, "the closed run left memory");
}

#[tokio::test(start_paused = true)]
async fn a_session_no_worker_can_host_fails_at_its_creation_timeout() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    let create = |wait_ms| pb::CreateSessionRequest {
        namespace: "default".into(),
        session_id: "nowhere".into(),
        owner: "test".into(),
        wait_ms,
        options: Some(pb::SessionOptions {
            task_queue: "no-workers".into(),
            creation_timeout_ms: 600_000,
            ..Default::default()
        }),
    };
    let created = engine.create_session(create(0)).await.unwrap();
    assert_eq!(created.state, "creating");
    let deadline = Instant::now() + VIRTUAL_DAYS;
    let mut info = created.clone();
    while info.state == "creating" && Instant::now() < deadline {
        info = engine.create_session(create(60_000)).await.unwrap();
    }
    assert_eq!(info.state, "failed", "{info:?}");
    assert!(info.reason.contains("creation timeout"), "{}", info.reason);
    let waited = info.closed_ms - created.created_ms;
    assert!(
        (600_000..660_000).contains(&waited),
        "failed {waited} ms after its creation"
    );
    assert_eq!(engine.stats().sessions, 0);
}

#[tokio::test(start_paused = true)]
async fn an_engine_reopened_over_the_same_store_takes_up_the_open_runs() {
    let store = Arc::new(MemoryStore::new());
    let first = engine_over(store.clone()).await;
    let run_id = first
        .start_workflow(start_request("survivor", 0))
        .await
        .unwrap();
    first.begin_shutdown();
    drop(first);
    let second = engine_over(store).await;
    assert_eq!(second.stats().runs, 1);
    let task = next_workflow_task(&second).await;
    assert_eq!(task.run_id, run_id, "its workflow task was offered again");
}

#[tokio::test(start_paused = true)]
async fn once_a_commit_fails_every_request_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let engine = engine_over(store.clone()).await;
    engine
        .start_workflow(start_request("before", 0))
        .await
        .unwrap();
    store.fail_from_now("disk full (injected)");
    let refused = engine
        .start_workflow(start_request("after", 0))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, EngineError::Unavailable(why) if why.contains("disk full")),
        "{refused:?}"
    );
    let failure = engine.storage_failed().await;
    assert!(failure.reason.contains("disk full"), "{}", failure.reason);
    let later = engine
        .start_workflow(start_request("later", 0))
        .await
        .unwrap_err();
    assert!(matches!(later, EngineError::Unavailable(_)), "{later:?}");
}

#[tokio::test(start_paused = true)]
async fn a_client_cannot_make_a_session_answer_to_a_workflow_run_it_names() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    let run_id = engine
        .start_workflow(start_request("victim", 0))
        .await
        .unwrap();
    // The text a workflow's own sessions carry as their owner: a client that writes it must
    // not tie its session to that run (the run would hear of it, and close it when it closes).
    let refused = engine
        .create_session(pb::CreateSessionRequest {
            namespace: "default".into(),
            owner: format!("run:{run_id}:1"),
            wait_ms: 0,
            options: Some(pb::SessionOptions {
                task_queue: "q".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, EngineError::InvalidArgument(why) if why.contains("owner")),
        "{refused:?}"
    );
    assert_eq!(engine.stats().sessions, 0, "nothing was created");
}

#[tokio::test(start_paused = true)]
async fn a_session_named_like_a_run_takes_none_of_the_runs_timers_when_it_closes() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    let run_id = engine
        .start_workflow(start_request("timed", 3_600_000))
        .await
        .unwrap();
    // Session ids are the caller's choice: one may well read like a run id.
    engine
        .create_session(pb::CreateSessionRequest {
            namespace: "default".into(),
            session_id: run_id.clone(),
            owner: "client".into(),
            options: Some(pb::SessionOptions {
                task_queue: "q".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    engine
        .terminate_session(
            &Namespace::from("default"),
            &SessionId::from(&run_id),
            "done with it",
            "client",
        )
        .await
        .unwrap();
    let outcome = outcome_once_closed(&engine, "timed").await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::TimedOut as i32,
        "the run's timeout still fired"
    );
}

#[tokio::test(start_paused = true)]
async fn a_filtered_listing_pages_through_every_match_and_no_other() {
    let engine = engine_over(Arc::new(MemoryStore::new())).await;
    // More runs than one scan of the store reads (500), so the filter spans several.
    for i in 0..1_100 {
        let mut req = start_request(&format!("job-{i:04}"), 0);
        if i % 7 == 0 {
            req.workflow_type = "train".into();
        }
        if i % 2 == 0 {
            req.task_queue = "gpu".into();
        }
        engine.start_workflow(req).await.unwrap();
    }
    let ns = Namespace::from("default");
    let list = |matching: RunMatch, token: String| {
        let engine = engine.clone();
        let ns = ns.clone();
        async move {
            engine
                .list(&ns, false, None, 10, &token, &matching)
                .await
                .unwrap()
        }
    };
    let train_on_gpu = RunMatch {
        workflow_type: "train".into(),
        task_queue: "gpu".into(),
        id_prefix: "job-".into(),
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = list(train_on_gpu.clone(), token).await;
        assert!(page.len() <= 10);
        for run in &page {
            assert_eq!(
                (run.workflow_type.as_str(), run.task_queue.as_str()),
                ("train", "gpu")
            );
        }
        seen.extend(page.into_iter().map(|r| r.workflow_id));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    let expected: Vec<String> = (0..1_100)
        .rev()
        .filter(|i| i % 14 == 0)
        .map(|i| format!("job-{i:04}"))
        .collect();
    assert_eq!(seen, expected, "every match once, newest first");

    let prefixed = RunMatch {
        id_prefix: "job-01".into(),
        ..Default::default()
    };
    let (page, _) = list(prefixed, String::new()).await;
    assert_eq!(page.len(), 10);
    assert!(page.iter().all(|r| r.workflow_id.starts_with("job-01")));

    let nothing = RunMatch {
        workflow_type: "no-such-type".into(),
        ..Default::default()
    };
    let (page, next) = list(nothing, String::new()).await;
    assert!(
        page.is_empty() && next.is_empty(),
        "{} runs, next {next:?}",
        page.len()
    );
}
