//! Capability routing end to end: requirements, credentials, host queues, unplaceable work,
//! dead workers and labels changed at run time.

mod common;

use common::{eventually, within, TestEnv};
use std::collections::HashSet;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb;
use tether::caps::{CapabilitySource, Inventory, Requirements};
use tether::client::{ActivityOptions, ClientError, StandaloneActivityOptions, WorkflowOptions};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};
use tether::workflow::WorkflowContext;

const T: Duration = Duration::from_secs(30);

fn caps(toml: &str) -> CapabilitySource {
    CapabilitySource::detect().with_inventory(Inventory::parse(toml, "test").unwrap())
}

fn worker(env: &TestEnv, identity: &str, source: CapabilitySource) -> Worker {
    Worker::new(
        env.client.clone(),
        WorkerOptions::new("q")
            .identity(identity)
            .capabilities(source)
            .graceful_shutdown(Duration::from_secs(2)),
    )
}

fn who_am_i(w: &mut Worker) {
    w.register_activity("whoami", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
}

async fn wait_registered(env: &TestEnv, identities: &[&str]) {
    eventually(T, "workers registered", || async {
        let workers = env.client.list_workers().await.ok()?;
        identities
            .iter()
            .all(|id| {
                workers
                    .iter()
                    .any(|w| w.identity == *id && w.state == "alive")
            })
            .then_some(())
    })
    .await;
}

fn with_requirements(id: String, reqs: &str) -> StandaloneActivityOptions {
    let mut o = StandaloneActivityOptions::new(id, "q");
    o.options = ActivityOptions::default().requirements(Requirements::parse(reqs).unwrap());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_work_only_runs_where_the_credential_is() {
    let env = TestEnv::start().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("s3");
    std::fs::write(&secret, "top-secret-value").unwrap();
    let with_cred = format!(
        "[[credential]]\nname = \"s3-prod\"\nfile = \"{}\"\n",
        secret.display()
    );
    let mut a = worker(&env, "has-cred", caps(&with_cred));
    let mut b = worker(&env, "no-cred", caps(""));
    for w in [&mut a, &mut b] {
        who_am_i(w);
        w.register_activity("upload", |ctx: ActivityContext, _: ()| async move {
            let key = ctx.credential("s3-prod")?;
            Ok::<_, ActivityError>((ctx.info().worker_identity.clone(), key.len()))
        });
    }
    let (a, b) = (a.start().unwrap(), b.start().unwrap());
    wait_registered(&env, &["has-cred", "no-cred"]).await;
    let mut handles = Vec::new();
    for i in 0..20 {
        handles.push(
            env.client
                .start_activity(
                    "upload",
                    &(),
                    with_requirements(format!("up-{i}"), "credential=s3-prod"),
                )
                .await
                .unwrap(),
        );
        handles.push(
            env.client
                .start_activity(
                    "whoami",
                    &(),
                    StandaloneActivityOptions::new(format!("any-{i}"), "q"),
                )
                .await
                .unwrap(),
        );
    }
    let mut unconstrained = HashSet::new();
    for h in handles {
        if h.activity_id.starts_with("up-") {
            let (who, len): (String, usize) = within(T, "upload", h.result()).await.unwrap();
            assert_eq!(who, "has-cred", "a credential task ran on {who}");
            assert_eq!(
                len,
                "top-secret-value".len(),
                "the secret was read on the worker"
            );
        } else {
            let who: String = within(T, "whoami", h.result()).await.unwrap();
            unconstrained.insert(who);
        }
    }
    assert!(!unconstrained.is_empty());
    // The secret never reached the server: its name is advertised, the value is not.
    let listed = env.client.list_workers().await.unwrap();
    let adv = listed.iter().find(|w| w.identity == "has-cred").unwrap();
    assert_eq!(
        adv.capabilities.as_ref().unwrap().credentials,
        vec!["s3-prod".to_string()]
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_queue_pins_the_next_step_to_the_same_worker() {
    let env = TestEnv::start().await;
    let mut handles: Vec<WorkerHandle> = Vec::new();
    for id in ["h1", "h2", "h3"] {
        let mut w = worker(&env, id, caps(""));
        who_am_i(&mut w);
        w.register_workflow("pinned", |ctx: WorkflowContext, _: ()| async move {
            let first: String = ctx
                .execute_activity("whoami", &(), ActivityOptions::default())
                .await?;
            let mut seen = vec![first.clone()];
            for _ in 0..3 {
                let next: String = ctx
                    .execute_activity(
                        "whoami",
                        &(),
                        ActivityOptions::default().on_worker(first.clone()),
                    )
                    .await?;
                seen.push(next);
            }
            Ok(seen)
        });
        handles.push(w.start().unwrap());
    }
    wait_registered(&env, &["h1", "h2", "h3"]).await;
    let mut runs = Vec::new();
    for i in 0..6 {
        runs.push(
            env.client
                .start_workflow("pinned", &(), WorkflowOptions::new(format!("pin-{i}"), "q"))
                .await
                .unwrap(),
        );
    }
    for run in runs {
        let seen: Vec<String> = within(T, "pinned", run.result()).await.unwrap();
        assert_eq!(seen.len(), 4);
        assert!(seen.iter().all(|w| *w == seen[0]), "steps ran on {seen:?}");
    }
    for h in handles {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplaceable_work_is_explained_and_times_out_with_the_reason() {
    let env = TestEnv::start().await;
    let inventory = "hostname = \"gpu-3\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-40GB\"\nmemory = \"40GiB\"\ncompute = \"8.0\"\ncount = 2\n";
    let mut w = worker(&env, "gpu-3", caps(inventory));
    who_am_i(&mut w);
    let w = w.start().unwrap();
    wait_registered(&env, &["gpu-3"]).await;
    let mut options = with_requirements("big-model".into(), "gpu.memory>=80GiB");
    options.options = options
        .options
        .schedule_to_start(Duration::from_millis(1500));
    let handle = env
        .client
        .start_activity("whoami", &(), options)
        .await
        .unwrap();
    let expected = "needs gpu.memory>=80GiB; best is worker gpu-3 with 2×NVIDIA A100-SXM4-40GB 40GiB (0 matching)";
    let q = env.client.describe_task_queue("q").await.unwrap();
    let backlog = q
        .requirement_backlogs
        .iter()
        .find(|b| b.requirements == "gpu.memory>=80GiB")
        .expect("the class is listed");
    assert!(backlog.unplaceable);
    assert_eq!(backlog.explanation, expected);
    let err = within(T, "timeout", handle.result::<String>())
        .await
        .unwrap_err();
    match err {
        ClientError::Failed {
            status, failure, ..
        } => {
            assert_eq!(status, pb::ExecutionStatus::TimedOut);
            assert!(failure.message.contains(expected), "{}", failure.message);
        }
        other => panic!("expected a timeout, got {other}"),
    }
    // Work it can do still runs there.
    let ok: String = within(
        T,
        "placeable",
        env.client.execute_activity(
            "whoami",
            &(),
            with_requirements("fits".into(), "gpu.count>=2, gpu.memory>=40GiB"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok, "gpu-3");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_gets_nothing() {
    let config = tether::server::ServerConfig {
        worker_liveness_timeout: Duration::from_millis(600),
        ..common::test_config()
    };
    let env = TestEnv::start_with(config).await;
    let mut rpc = env.client.raw();
    let mut labels = std::collections::HashMap::new();
    labels.insert("only".to_string(), "ghost".to_string());
    rpc.register_worker(pb::RegisterWorkerRequest {
        namespace: "default".into(),
        identity: "ghost".into(),
        task_queues: vec!["q".into()],
        capabilities: Some(pb::Capabilities {
            labels: labels.into_iter().collect(),
            ..Default::default()
        }),
        max_concurrent_sessions: 0,
        instance_id: "ghost-process".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The ghost parks a long poll and then never heartbeats again (a partitioned host).
    let mut ghost_rpc = env.client.raw();
    let parked = tokio::spawn(async move {
        ghost_rpc
            .poll_activity_task(pb::PollActivityTaskRequest {
                namespace: "default".into(),
                task_queue: "q".into(),
                identity: "ghost".into(),
                instance_id: "ghost-process".into(),
                poll_timeout_ms: 4_000,
                additional_task_queues: vec![],
            })
            .await
            .unwrap()
            .into_inner()
    });
    eventually(T, "ghost marked dead", || async {
        let workers = env.client.list_workers().await.ok()?;
        workers
            .iter()
            .any(|w| w.identity == "ghost" && w.state == "dead")
            .then_some(())
    })
    .await;
    env.client
        .start_activity(
            "t",
            &(),
            with_requirements("for-ghost".into(), "label.only=ghost"),
        )
        .await
        .unwrap();
    let got = within(T, "ghost poll", parked).await.unwrap();
    assert!(
        got.task_token.is_empty(),
        "the dead worker's parked poll was handed a task"
    );
    let q = env.client.describe_task_queue("q").await.unwrap();
    let b = &q.requirement_backlogs[0];
    assert!(b.unplaceable, "{b:?}");
    assert!(
        b.explanation.contains("no live worker"),
        "{}",
        b.explanation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_set_at_run_time_changes_routing() {
    let env = TestEnv::start().await;
    let mut w = worker(&env, "loader", caps(""));
    w.register_activity(
        "load_model",
        |ctx: ActivityContext, name: String| async move {
            ctx.set_label("model_loaded", name);
            Ok::<_, ActivityError>(())
        },
    );
    w.register_activity("infer", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    let w = w.start().unwrap();
    wait_registered(&env, &["loader"]).await;
    let infer = env
        .client
        .start_activity(
            "infer",
            &(),
            with_requirements("infer-1".into(), "label.model_loaded=llama-70b"),
        )
        .await
        .unwrap();
    let q = env.client.describe_task_queue("q").await.unwrap();
    assert!(
        q.requirement_backlogs.iter().any(|b| b.unplaceable),
        "waits for a worker with the model"
    );
    let _: () = env
        .client
        .execute_activity(
            "load_model",
            "llama-70b",
            StandaloneActivityOptions::new("load-1", "q"),
        )
        .await
        .unwrap();
    let who: String = within(T, "infer after the label", infer.result())
        .await
        .unwrap();
    assert_eq!(who, "loader");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requirements_are_refused_with_the_position() {
    let env = TestEnv::start().await;
    let err = env
        .client
        .raw()
        .start_activity(pb::StartActivityRequest {
            namespace: "default".into(),
            activity_id: "x".into(),
            activity_type: "t".into(),
            task_queue: "q".into(),
            options: Some(pb::ActivityOptions {
                start_to_close_timeout_ms: 1000,
                requirements: "gpu.count>=2, gpu.speed>fast".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown key \"gpu.speed\""),
        "{}",
        err.message()
    );
    assert!(err.message().contains("column 15"), "{}", err.message());
    assert!(env
        .client
        .list_workflows(None, 10, true)
        .await
        .unwrap()
        .is_empty());
}
