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
use tether::server::{LocalServer, ServerConfig, StoreLocation};
use tether::store::TestCluster;
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
    let sync = std::env::var("TETHER_BENCH_SYNC").unwrap_or_else(|_| "full".into());
    let config = ServerConfig {
        sync_mode: sync
            .parse()
            .map_err(|e| anyhow::anyhow!("TETHER_BENCH_SYNC: {e}"))?,
        ..ServerConfig::default()
    };
    // TETHER_BENCH_STORE: sqlite (the default), postgres (a cluster this bench starts, with
    // PostgreSQL's default durability), or both, back to back with their ratios.
    let store = std::env::var("TETHER_BENCH_STORE").unwrap_or_else(|_| "sqlite".into());
    let (sqlite, postgres) = match store.as_str() {
        "sqlite" => (true, false),
        "postgres" => (false, true),
        "both" => (true, true),
        other => anyhow::bail!("TETHER_BENCH_STORE={other:?}: give sqlite, postgres or both"),
    };
    let lite = if sqlite {
        let name = format!("embedded SQLite, synchronous={}", sync.to_uppercase());
        Some(
            run_on(
                StoreLocation::Sqlite(dir.path().to_path_buf()),
                config.clone(),
                chains,
                creations,
                &name,
            )
            .await?,
        )
    } else {
        None
    };
    if postgres {
        let cluster = TestCluster::start_durable().map_err(anyhow::Error::msg)?;
        let url = cluster
            .create_database("bench_sessions")
            .await
            .map_err(anyhow::Error::msg)?;
        let pg = run_on(
            StoreLocation::Postgres(url),
            config,
            chains,
            creations,
            "PostgreSQL, synchronous_commit=on, one replica",
        )
        .await?;
        if let Some(lite) = lite {
            println!(
                "PostgreSQL / SQLite, same run: session creation p50 {:.2}, p99 {:.2}; W3 {:.2}",
                pg.0 / lite.0,
                pg.1 / lite.1,
                pg.2 / lite.2
            );
        }
    }
    println!(
        "rerun: cargo bench --bench sessions   (sizes: TETHER_BENCH_W3, TETHER_BENCH_SESSIONS, TETHER_BENCH_ROUNDS, TETHER_BENCH_SLOTS; TETHER_BENCH_SYNC=normal; TETHER_BENCH_STORE=sqlite|postgres|both)"
    );
    Ok(())
}

/// Session creation latency and W3 on one server over `location`: (creation p50 ms, p99 ms,
/// W3 median chains/s).
async fn run_on(
    location: StoreLocation,
    config: ServerConfig,
    chains: usize,
    creations: usize,
    store_name: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let server = LocalServer::start_on("127.0.0.1:0", location, config).await?;
    let mut handles = Vec::new();
    let mut worker_slots = 0;
    for id in ["host-a", "host-b"] {
        let wc = Client::connect(server.url()).await?;
        let mut options = WorkerOptions::new("w3")
            .identity(id)
            .max_concurrent_sessions(chains as u32);
        // The worker's default activity slots unless asked otherwise.
        if let Some(slots) = std::env::var("TETHER_BENCH_SLOTS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            options = options.max_concurrent_activities(slots);
        }
        let slots = options.max_concurrent_activities;
        let mut w = Worker::new(wc, options);
        w.register_activity("step", |ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(json!({ "input": v, "worker": ctx.info().worker_identity }))
        });
        handles.push(w.start()?);
        worker_slots = slots;
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
    println!(
        "tether sessions benchmark ({store_name}; server, 2 workers with {worker_slots} activity slots each, and the client in one process)"
    );

    // Creation latency: sequential create (placed at once) then complete.
    let mut latencies = Vec::with_capacity(creations);
    for _ in 0..creations {
        let t = Instant::now();
        let s = client.create_session(SessionOptions::new("w3")).await?;
        latencies.push(t.elapsed());
        s.complete().await?;
    }
    latencies.sort();
    let (p50, p99) = (
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
    println!("session creation: {creations} sequential: p50 {p50:.3} ms, p99 {p99:.3} ms");

    // W3, several rounds on the same server and workers; the median is the figure to report.
    let rounds = env_usize("TETHER_BENCH_ROUNDS", 5).max(1);
    let mut rates = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let rate = w3_round(&client, chains).await?;
        println!("W3 round {round}/{rounds}: {rate:.0} chains/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "W3  median of {rounds} rounds: {:.0} chains/s ({:.0} steps/s; min {:.0}, max {:.0})",
        rates[rates.len() / 2],
        rates[rates.len() / 2] * 5.0,
        rates[0],
        rates[rates.len() - 1]
    );
    // Twice the sessions the two workers take at once: half wait for a release to be placed.
    // What waiting costs should not grow with the queue (it once did, with every release).
    let median = rates[rates.len() / 2];
    let queued_chains = chains * 4;
    let queued = w3_round(&client, queued_chains).await?;
    println!(
        "W3  queued: {queued_chains} chains, {} of them waiting at the start: {queued:.0} chains/s, {:.2} of the median without a queue",
        queued_chains - 2 * chains,
        queued / median
    );
    for h in handles {
        h.shutdown().await;
    }
    server.stop().await?;
    Ok((p50, p99, median))
}

/// One W3 round: `chains` concurrent chains of 5 pinned steps; returns chains/s.
async fn w3_round(client: &Client, chains: usize) -> anyhow::Result<f64> {
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
    let balanced = per_worker.len() == 2;
    anyhow::ensure!(
        balanced,
        "spread packing left a worker without chains: {per_worker:?}"
    );
    println!(
        "W3  {chains} chains × 5 pinned steps in {:.3} s; every step on its session's worker; chains per worker {per_worker:?}",
        secs
    );
    Ok(chains as f64 / secs)
}
