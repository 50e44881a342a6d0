//! Worker identity and shutdown: two live processes never share an identity, a restarted
//! process gets its own back, and a worker that shuts down says so at once.

mod common;

use common::{eventually, within, TestEnv};
use std::time::{Duration, Instant};
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb;
use tether::caps::{CapabilitySource, Inventory};
use tether::client::{ActivityOptions, SessionOptions};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};

const T: Duration = Duration::from_secs(30);

fn inventory(host: &str, model: &str, gpus: u32) -> CapabilitySource {
    let text = format!(
        "hostname = \"{host}\"\n[[gpu]]\nname = \"{model}\"\nmemory = \"40GiB\"\ncount = {gpus}\n"
    );
    CapabilitySource::detect().with_inventory(Inventory::parse(&text, "test").unwrap())
}

/// A worker with default identity options (no identity given), keeping its identity files in
/// `state` (one directory per simulated host).
fn default_worker(env: &TestEnv, state: &std::path::Path, caps: CapabilitySource) -> Worker {
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("id-q")
            .capabilities(caps)
            .state_dir(Some(state.to_path_buf()))
            .graceful_shutdown(Duration::from_secs(1)),
    );
    w.register_activity("where", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    w.register_activity("hold", |ctx: ActivityContext, ms: u64| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => return Err(ActivityError::Cancelled),
        }
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    w
}

async fn registered(env: &TestEnv, identity: &str) -> pb::WorkerInfo {
    eventually(T, "the worker is registered", || async {
        env.client
            .list_workers()
            .await
            .ok()?
            .into_iter()
            .find(|w| w.identity == identity && w.state == "alive")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_default_workers_on_one_host_never_share_an_identity_and_a_restart_keeps_it() {
    let env = TestEnv::start().await;
    let host = tempfile::tempdir().unwrap();
    let a100 = default_worker(&env, host.path(), inventory("gpu-box", "NVIDIA A100", 4))
        .start()
        .unwrap();
    let a10g = default_worker(&env, host.path(), inventory("gpu-box", "NVIDIA A10G", 2))
        .start()
        .unwrap();
    assert_ne!(a100.identity(), a10g.identity());
    // The declared inventory's host name is in the default identity.
    assert!(
        a100.identity().starts_with("gpu-box-"),
        "{}",
        a100.identity()
    );
    let a100_info = registered(&env, a100.identity()).await;
    let a10g_info = registered(&env, a10g.identity()).await;
    // Each keeps its own capabilities: nothing was merged.
    assert_eq!(a100_info.capabilities.unwrap().gpus.len(), 4);
    assert_eq!(a10g_info.capabilities.unwrap().gpus.len(), 2);
    // A session on the A100s runs every activity in the A100 process.
    let session = within(
        T,
        "session",
        env.client.create_session(SessionOptions {
            gpus: 4,
            ..SessionOptions::new("id-q")
        }),
    )
    .await
    .unwrap();
    assert_eq!(session.info.worker_identity, a100.identity());
    for _ in 0..6 {
        let ran_on: String = session
            .execute_activity("where", &(), ActivityOptions::default())
            .await
            .unwrap();
        assert_eq!(ran_on, a100.identity());
    }
    session.complete().await.unwrap();
    // The A100 process restarts: it gets its identity back.
    let identity = a100.identity().to_string();
    a100.shutdown().await;
    let again = default_worker(&env, host.path(), inventory("gpu-box", "NVIDIA A100", 4))
        .start()
        .unwrap();
    assert_eq!(again.identity(), identity);
    registered(&env, &identity).await;
    again.shutdown().await;
    a10g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_live_identity_is_refused_naming_the_holder() {
    let env = TestEnv::start().await;
    let (host_a, host_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let explicit = |state: &std::path::Path, gpus: u32| {
        let mut w = Worker::new(
            env.client.clone(),
            WorkerOptions::new("id-q")
                .identity("gpu-7")
                .capabilities(inventory("gpu-7", "NVIDIA A100", gpus))
                .state_dir(Some(state.to_path_buf()))
                .graceful_shutdown(Duration::from_secs(1)),
        );
        w.register_activity("where", |ctx: ActivityContext, _: ()| async move {
            Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
        });
        w
    };
    let first = explicit(host_a.path(), 4).start().unwrap();
    let holder = registered(&env, "gpu-7").await;
    assert_eq!(holder.instance_id, first.instance_id());
    // On the same host the lock file refuses a second process at once.
    let err = explicit(host_a.path(), 2).start().err().unwrap();
    assert!(
        err.to_string()
            .contains("in use by another live worker process"),
        "{err}"
    );
    // On another host the server refuses it: it keeps trying, and is never merged in.
    let second = explicit(host_b.path(), 2).start().unwrap();
    let mut rpc = env.client.raw();
    let refused = rpc
        .register_worker(pb::RegisterWorkerRequest {
            namespace: "default".into(),
            identity: "gpu-7".into(),
            instance_id: "a-third-process".into(),
            task_queues: vec!["id-q".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    assert!(
        refused.message().contains(first.instance_id())
            && refused
                .message()
                .contains(&format!("pid {}", std::process::id())),
        "the refusal names the holder: {}",
        refused.message()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = env.client.list_workers().await.unwrap();
    let gpu7: Vec<&pb::WorkerInfo> = now.iter().filter(|w| w.identity == "gpu-7").collect();
    assert_eq!(gpu7.len(), 1);
    assert_eq!(gpu7[0].instance_id, first.instance_id());
    assert_eq!(gpu7[0].capabilities.as_ref().unwrap().gpus.len(), 4);
    // Once the holder stops, the waiting process takes the identity over.
    first.shutdown().await;
    eventually(T, "the second process holds the identity", || async {
        let w = env.client.list_workers().await.ok()?;
        w.into_iter()
            .find(|w| w.identity == "gpu-7" && w.instance_id == second.instance_id())
            .filter(|w| w.state == "alive")
    })
    .await;
    second.shutdown().await;
}

async fn start_holding_worker(env: &TestEnv, identity: &str) -> WorkerHandle {
    let mut w = Worker::new(
        env.client.clone(),
        WorkerOptions::new("id-q")
            .identity(identity)
            .capabilities(inventory(identity, "NVIDIA A100", 2))
            .state_dir(None)
            .graceful_shutdown(Duration::from_secs(5)),
    );
    w.register_activity("hold", |ctx: ActivityContext, ms: u64| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => return Err(ActivityError::Cancelled),
        }
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    let handle = w.start().unwrap();
    registered(env, identity).await;
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_deregisters_at_once_and_ends_its_sessions() {
    // A liveness timeout long enough that waiting it out would show.
    let env = TestEnv::start_with(tether::server::ServerConfig {
        worker_liveness_timeout: Duration::from_secs(20),
        ..common::test_config()
    })
    .await;
    let worker = start_holding_worker(&env, "leaving").await;
    let session = within(
        T,
        "session",
        env.client.create_session(SessionOptions {
            gpus: 2,
            ..SessionOptions::new("id-q")
        }),
    )
    .await
    .unwrap();
    // A plain activity is running when shutdown begins: it gets its grace period.
    let plain = env
        .client
        .start_activity(
            "hold",
            &1_500u64,
            tether::client::StandaloneActivityOptions::new("plain-1", "id-q"),
        )
        .await
        .unwrap();
    eventually(T, "the plain activity runs", || async {
        let d = plain.describe().await.ok()?;
        d.pending_activities
            .iter()
            .any(|a| a.state == "started")
            .then_some(())
    })
    .await;
    let began = Instant::now();
    let shutdown = tokio::spawn(worker.shutdown());
    let stopped = eventually(T, "workers list says stopped", || async {
        env.client
            .list_workers()
            .await
            .ok()?
            .into_iter()
            .find(|w| w.identity == "leaving" && w.state == "stopped")
    })
    .await;
    assert!(stopped.stop_reason.contains("shut down"), "{stopped:?}");
    let ended = eventually(T, "the session ends", || async {
        let s = env.client.describe_session(session.id()).await.ok()?;
        (s.state != "open").then_some(s)
    })
    .await;
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}: as long as a liveness timeout",
        began.elapsed()
    );
    assert_eq!(ended.state, "failed");
    assert!(
        ended.reason.contains("worker leaving shut down"),
        "{}",
        ended.reason
    );
    // Nothing new is placed on it: a new session waits, saying why.
    let mut rpc = env.client.raw();
    let waiting = rpc
        .create_session(pb::CreateSessionRequest {
            namespace: "default".into(),
            options: Some(pb::SessionOptions {
                task_queue: "id-q".into(),
                gpus: 1,
                ..Default::default()
            }),
            owner: "test".into(),
            session_id: "after-shutdown".into(),
            wait_ms: 300,
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(waiting.state, "creating");
    // The running activity finished within the grace period and its result counted.
    let ran_on: String = within(T, "plain activity", plain.result()).await.unwrap();
    assert_eq!(ran_on, "leaving");
    within(T, "shutdown", shutdown).await.unwrap();
}
