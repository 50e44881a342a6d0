//! End-to-end benchmark on the embedded store: workloads W1 and W2 of shared/BENCHMARKS.md.
//!
//!   cargo bench --bench end_to_end                  # full size
//!   TETHER_BENCH_W1=2000 cargo bench --bench end_to_end   # quick
//!
//! W1: a client submits N no-op tasks (~100-byte JSON in, returned unchanged) to one queue;
//!     one worker with 8 concurrent executions; tasks/s from first submit to last result.
//!     Run twice: as standalone activities and as one-activity workflows.
//! W2: 1,000 sequential submit-and-wait round trips against an idle worker: p50 / p99.
//!
//! Server, worker and client run in this process (separate gRPC connections over loopback);
//! the store is SQLite with synchronous=FULL (an fsync per group commit) unless
//! TETHER_BENCH_SYNC=normal.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{ActivityOptions, Client, StandaloneActivityOptions, WorkflowOptions};
use tether::server::{LocalServer, ServerConfig, StoreLocation};
use tether::store::{SyncMode, TestCluster};
use tether::worker::{Worker, WorkerOptions};
use tether::workflow::{WorkflowContext, WorkflowError};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn input(i: usize) -> Value {
    // About 100 bytes of JSON, like the peers' workload.
    json!({ "task": i, "kind": "noop", "payload": "x".repeat(60) })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn w1_activities(client: &Client, n: usize, in_flight: usize, tag: &str) -> f64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let started = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        let id = format!("{tag}-{i}");
        joins.push(tokio::spawn(async move {
            let options = StandaloneActivityOptions::new(id, "bench");
            let out: Value = client
                .execute_activity("noop", &input(i), options)
                .await
                .expect("activity result");
            assert_eq!(out["task"], i);
            drop(permit);
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn w1_workflows(client: &Client, n: usize, in_flight: usize, tag: &str) -> f64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let started = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        let id = format!("{tag}-{i}");
        joins.push(tokio::spawn(async move {
            let handle = client
                .start_workflow("one", &input(i), WorkflowOptions::new(id, "bench"))
                .await
                .expect("start");
            let out: Value = handle.result().await.expect("workflow result");
            assert_eq!(out["task"], i);
            drop(permit);
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn w2(client: &Client, n: usize) -> (Duration, Duration) {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let _: Value = client
            .execute_activity(
                "noop",
                &input(i),
                StandaloneActivityOptions::new(format!("w2-{i}"), "bench"),
            )
            .await
            .expect("w2 result");
        latencies.push(t.elapsed());
    }
    latencies.sort();
    (percentile(&latencies, 0.50), percentile(&latencies, 0.99))
}

// The same allocator as the `tether` binary.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let n_w1 = env_usize("TETHER_BENCH_W1", 20_000);
    let n_w1_wf = env_usize("TETHER_BENCH_W1_WF", n_w1 / 4);
    let n_w2 = env_usize("TETHER_BENCH_W2", 1_000);
    let in_flight = env_usize("TETHER_BENCH_IN_FLIGHT", 256);
    let sync = match std::env::var("TETHER_BENCH_SYNC").as_deref() {
        Ok("normal") => SyncMode::Normal,
        _ => SyncMode::Full,
    };
    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        sync_mode: sync,
        ..Default::default()
    };
    // TETHER_BENCH_STORE=postgres: the same workloads on PostgreSQL, on a cluster this bench
    // starts itself (PostgreSQL's default durability: fsync and synchronous_commit on).
    let on_postgres = std::env::var("TETHER_BENCH_STORE").as_deref() == Ok("postgres");
    let cluster = if on_postgres {
        Some(TestCluster::start_durable().map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let location = match &cluster {
        Some(cluster) => StoreLocation::Postgres(
            cluster
                .create_database("bench")
                .await
                .map_err(anyhow::Error::msg)?,
        ),
        None => StoreLocation::Sqlite(dir.path().to_path_buf()),
    };
    let server = LocalServer::start_on("127.0.0.1:0", location, config).await?;
    let worker_client = Client::connect(server.url()).await?;
    let client = Client::connect(server.url()).await?;
    let mut options = WorkerOptions::new("bench").identity("bench-worker");
    // The worker's default activity slots unless asked otherwise.
    if let Some(slots) = std::env::var("TETHER_BENCH_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options = options.max_concurrent_activities(slots);
    }
    let slots = options.max_concurrent_activities;
    let mut worker = Worker::new(worker_client, options);
    worker.register_activity("noop", |_ctx: ActivityContext, v: Value| async move {
        Ok::<_, ActivityError>(v)
    });
    worker.register_workflow("one", |ctx: WorkflowContext, v: Value| async move {
        let out: Value = ctx
            .execute_activity("noop", &v, ActivityOptions::default())
            .await?;
        Ok::<_, WorkflowError>(out)
    });
    let worker = worker.start()?;

    eprintln!("warming up...");
    w1_activities(&client, 200.min(n_w1), in_flight, "warm").await;

    let store_name = match (on_postgres, sync) {
        (true, _) => "PostgreSQL, synchronous_commit=on",
        (false, SyncMode::Full) => "embedded SQLite, synchronous=FULL (fsync per group commit)",
        (false, SyncMode::Normal) => "embedded SQLite, synchronous=NORMAL",
    };
    println!("tether end-to-end benchmark ({store_name}; server, 1 worker with {slots} activity slots, client in one process)");
    let w1a = w1_activities(&client, n_w1, in_flight, "w1").await;
    println!("W1  standalone activities: {n_w1} tasks, {in_flight} in flight: {w1a:.0} tasks/s");
    let w1w = w1_workflows(&client, n_w1_wf, in_flight, "w1wf").await;
    println!("W1  one-activity workflows: {n_w1_wf} workflows, {in_flight} in flight: {w1w:.0} workflows/s");
    let (p50, p99) = w2(&client, n_w2).await;
    println!(
        "W2  sequential round trips: {n_w2}: p50 {:.3} ms, p99 {:.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    println!("rerun: cargo bench --bench end_to_end   (sizes: TETHER_BENCH_W1, TETHER_BENCH_W1_WF, TETHER_BENCH_W2, TETHER_BENCH_SLOTS; TETHER_BENCH_SYNC=normal; TETHER_BENCH_STORE=postgres)");
    worker.shutdown().await;
    server.stop().await?;
    Ok(())
}
