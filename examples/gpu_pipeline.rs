//! The main job: a GPU pipeline pinned to one machine by a session, and its failover.
//!
//! An in-process server on a temporary SQLite store and three workers with declared inventories
//! (no GPU needed: declared GPUs are always shown as such). A workflow creates a session that
//! reserves 2 GPUs with at least 40 GiB each, then runs prepare → train → evaluate on that worker;
//! each step prints its host and `CUDA_VISIBLE_DEVICES`. The worker hosting the session is then
//! stopped in the middle of training: the session fails within its liveness timeout, the step
//! fails with `SessionFailed`, and the workflow recreates the session on another matching host
//! and finishes there. Run it with `cargo run --example gpu_pipeline`.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::caps::{CapabilitySource, Inventory, Requirements};
use tether::client::{ActivityOptions, Client, SessionOptions, WorkflowOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};
use tether::workflow::{RecreatePolicy, SessionHandle, WorkflowContext, WorkflowError};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StepReport {
    step: String,
    host: String,
    cuda_visible_devices: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PipelineReport {
    steps: Vec<StepReport>,
    failovers: u32,
}

/// Runs a step as a child process that sees only the session's GPUs.
async fn step(ctx: ActivityContext, name: String) -> Result<StepReport, ActivityError> {
    let out = ctx
        .command("sh")
        .arg("-c")
        .arg("printf %s \"$CUDA_VISIBLE_DEVICES\"")
        .output()
        .map_err(|e| ActivityError::retryable(format!("could not start the step: {e}")))?;
    let report = StepReport {
        step: name,
        host: ctx
            .session()
            .map(|s| s.hostname.clone())
            .unwrap_or_default(),
        cuda_visible_devices: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    println!(
        "  [{}] {:<9} on {:<7} CUDA_VISIBLE_DEVICES={}",
        ctx.info().worker_identity,
        report.step,
        report.host,
        report.cuda_visible_devices
    );
    Ok(report)
}

async fn run_steps(session: &SessionHandle) -> Result<Vec<StepReport>, WorkflowError> {
    let mut reports = Vec::new();
    for name in ["prepare", "train", "evaluate"] {
        let options = ActivityOptions::default().start_to_close(Duration::from_secs(60));
        let activity = if name == "train" { "train" } else { "step" };
        reports.push(session.execute_activity(activity, name, options).await?);
    }
    Ok(reports)
}

async fn pipeline(ctx: WorkflowContext, _: ()) -> Result<PipelineReport, WorkflowError> {
    let options = SessionOptions {
        gpus: 2,
        requirements: Requirements::parse("gpu.memory>=40GiB").expect("valid"),
        creation_timeout: Some(Duration::from_secs(30)),
        ..SessionOptions::new("gpu-pipeline")
    };
    let mut session = ctx.create_session(options).await?;
    let mut failovers = 0;
    loop {
        match run_steps(&session).await {
            Ok(steps) => {
                session.complete();
                return Ok(PipelineReport { steps, failovers });
            }
            Err(e) if e.is_session_failure() && failovers < 2 => {
                failovers += 1;
                session = ctx
                    .recreate_session(&session, RecreatePolicy::SameHostOrFailover)
                    .await?;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn start_worker(
    client: &Client,
    identity: &str,
    inventory: &str,
    train_started: Arc<tokio::sync::Notify>,
) -> Result<WorkerHandle> {
    let caps = CapabilitySource::detect().with_inventory(Inventory::parse(inventory, identity)?);
    let mut worker = Worker::new(
        client.clone(),
        WorkerOptions::new("gpu-pipeline")
            .identity(identity)
            .capabilities(caps)
            .build()?,
    );
    worker.register_workflow("gpu_pipeline", pipeline);
    worker.register_activity("step", step);
    worker.register_activity("train", move |ctx: ActivityContext, name: String| {
        let started = train_started.clone();
        async move {
            let report = step(ctx, name).await?;
            // Training takes a while; the demo stops this worker meanwhile.
            started.notify_one();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(report)
        }
    });
    Ok(worker.start()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let data = tempfile::Builder::new()
        .prefix("tether-gpu-pipeline-")
        .tempdir()?;
    // A short liveness timeout so the failover shows within seconds.
    let config = ServerConfig {
        worker_liveness_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let server = LocalServer::start("127.0.0.1:0", data.path(), config).await?;
    let client = Client::connect(server.url()).await?;
    println!(
        "server {} (SQLite store in {})",
        server.url(),
        data.path().display()
    );
    let train_started = Arc::new(tokio::sync::Notify::new());
    let gpu = |host: &str, n: u32, gib: u32| {
        format!("hostname = \"{host}\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-{gib}GB\"\nmemory = \"{gib}GiB\"\ncompute = \"8.0\"\ncount = {n}\n")
    };
    let mut workers = vec![
        (
            "gpu-a",
            start_worker(
                &client,
                "gpu-a",
                &gpu("gpu-a", 2, 40),
                train_started.clone(),
            )
            .await?,
        ),
        (
            "gpu-b",
            start_worker(
                &client,
                "gpu-b",
                &gpu("gpu-b", 4, 80),
                train_started.clone(),
            )
            .await?,
        ),
        (
            "cpu-c",
            start_worker(
                &client,
                "cpu-c",
                "hostname = \"cpu-c\"\n",
                train_started.clone(),
            )
            .await?,
        ),
    ];
    println!(
        "workers: gpu-a (2×A100 40GiB), gpu-b (4×A100 80GiB), cpu-c (no GPU); GPUs are declared"
    );
    loop {
        let alive = client
            .list_workers()
            .await?
            .iter()
            .filter(|w| w.state == "alive")
            .count();
        if alive == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let handle = client
        .start_workflow(
            "gpu_pipeline",
            &(),
            WorkflowOptions::new("pipeline-1", "gpu-pipeline"),
        )
        .await?;
    println!("workflow pipeline-1 started: session of 2 GPUs with gpu.memory>=40GiB");

    // Stop the worker that hosts the session while it trains.
    train_started.notified().await;
    let sessions = client
        .raw()
        .list_sessions(tether::api::pb::ListSessionsRequest {
            namespace: "default".into(),
            include_closed: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sessions;
    let host = sessions
        .first()
        .map(|s| s.worker_identity.clone())
        .unwrap_or_default();
    println!("stopping worker {host} mid-training (as if the machine died)");
    if let Some(i) = workers.iter().position(|(id, _)| *id == host) {
        workers.remove(i).1.kill();
    }

    let report: PipelineReport = handle.result().await?;
    println!("pipeline finished after {} failover(s):", report.failovers);
    for s in &report.steps {
        println!(
            "  {:<9} on {:<6} CUDA_VISIBLE_DEVICES={}",
            s.step, s.host, s.cuda_visible_devices
        );
    }
    let hosts: std::collections::BTreeSet<&str> =
        report.steps.iter().map(|s| s.host.as_str()).collect();
    println!(
        "every step of the final session ran on the same host: {}",
        hosts.len() == 1
    );
    println!("sessions:");
    for s in client
        .raw()
        .list_sessions(tether::api::pb::ListSessionsRequest {
            namespace: "default".into(),
            include_closed: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sessions
    {
        let gpus: Vec<String> = s.gpus.iter().map(|g| g.index.to_string()).collect();
        println!(
            "  {} {:<9} worker {:<6} gpus [{}] activities {}{}",
            s.session_id,
            s.state,
            s.worker_identity,
            gpus.join(","),
            s.activities_run,
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.reason)
            }
        );
    }
    for (_, w) in workers {
        w.shutdown().await;
    }
    server.stop().await?;
    Ok(())
}
