//! Sessions benchmark: creation latency, and workload W3 of shared/BENCHMARKS.md (2 workers;
//! 500 concurrent chains of 5 sequential tasks, each chain pinned to one worker by a session;
//! every step must report the session's worker).
//!
//!   cargo bench --bench sessions
//!   TETHER_BENCH_W3=100 cargo bench --bench sessions     # a quick run

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{ActivityOptions, Client, SessionOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::worker::{Worker, WorkerOptions};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let chains = env_usize("TETHER_BENCH_W3", 500);
    let creations = env_usize("TETHER_BENCH_SESSIONS", 500);
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start("127.0.0.1:0", dir.path(), ServerConfig::default()).await?;
    let mut handles = Vec::new();
    for id in ["host-a", "host-b"] {
        let wc = Client::connect(server.url()).await?;
        let mut w = Worker::new(
            wc,
            WorkerOptions::new("w3")
                .identity(id)
                .max_concurrent_activities(8)
                .max_concurrent_sessions(chains as u32),
        );
        w.register_activity("step", |ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(json!({ "input": v, "worker": ctx.info().worker_identity }))
        });
        handles.push(w.start()?);
    }
    let client = Client::connect(server.url()).await?;
    loop {
        let alive = client
            .list_workers()
            .await?
            .iter()
            .filter(|w| w.state == "alive")
            .count();
        if alive == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("tether sessions benchmark (embedded SQLite, synchronous=FULL; server, 2 workers and the client in one process)");

    // Creation latency: sequential create (placed at once) then complete.
    let mut latencies = Vec::with_capacity(creations);
    for _ in 0..creations {
        let t = Instant::now();
        let s = client.create_session(SessionOptions::new("w3")).await?;
        latencies.push(t.elapsed());
        s.complete().await?;
    }
    latencies.sort();
    println!(
        "session creation: {creations} sequential: p50 {:.3} ms, p99 {:.3} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );

    // W3.
    let started = Instant::now();
    let mut joins = Vec::with_capacity(chains);
    for c in 0..chains {
        let client = client.clone();
        joins.push(tokio::spawn(async move {
            let options = SessionOptions {
                packing: "spread".into(),
                ..SessionOptions::new("w3")
            };
            let session = client.create_session(options).await.expect("session");
            for step in 0..5 {
                let out: Value = session
                    .execute_activity(
                        "step",
                        &json!({"chain": c, "step": step}),
                        ActivityOptions::default(),
                    )
                    .await
                    .expect("step");
                assert_eq!(
                    out["worker"].as_str(),
                    Some(session.info.worker_identity.as_str()),
                    "a step left its session's worker"
                );
            }
            session.complete().await.expect("complete");
            session.info.worker_identity.clone()
        }));
    }
    let mut per_worker = std::collections::BTreeMap::new();
    for j in joins {
        *per_worker.entry(j.await?).or_insert(0) += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "W3  {chains} chains × 5 pinned steps: {:.0} chains/s ({:.0} steps/s); every step on its session's worker; chains per worker {per_worker:?}",
        chains as f64 / secs,
        chains as f64 * 5.0 / secs
    );
    println!(
        "rerun: cargo bench --bench sessions   (sizes: TETHER_BENCH_W3, TETHER_BENCH_SESSIONS)"
    );
    for h in handles {
        h.shutdown().await;
    }
    server.stop().await?;
    Ok(())
}
