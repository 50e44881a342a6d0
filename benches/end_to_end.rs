//! End-to-end benchmark: workloads W1 and W2 of shared/BENCHMARKS.md, on SQLite, PostgreSQL or
//! both back to back (with their ratios), and W1 over several PostgreSQL replicas.
//!
//!   cargo bench --bench end_to_end                  # full size, SQLite
//!   TETHER_BENCH_W1=2000 cargo bench --bench end_to_end   # quick
//!   TETHER_BENCH_STORE=both cargo bench --bench end_to_end   # SQLite, then PostgreSQL
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

/// p50 of `n` sequential one-row transactions, each `BEGIN`, `INSERT`, `COMMIT` sent before the
/// first answer is read.
async fn commit_floor(url: &str, n: usize) -> anyhow::Result<Duration> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE floor (id BIGINT PRIMARY KEY, body BYTEA NOT NULL)")
        .await?;
    let insert = client
        .prepare("INSERT INTO floor (id, body) VALUES ($1, $2)")
        .await?;
    let body = vec![7u8; 200];
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n as i64 {
        let values: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&i, &body];
        let t = Instant::now();
        futures::try_join!(
            client.batch_execute("BEGIN"),
            client.execute(&insert, &values),
            client.batch_execute("COMMIT")
        )?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    Ok(percentile(&latencies, 0.50))
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

/// What one store's run measured.
struct Figures {
    w1_activities: f64,
    w1_workflows: f64,
    w2_p50: Duration,
    w2_p99: Duration,
}

/// A worker on `client`'s namespace with the no-op activity and the one-activity workflow.
fn bench_worker(
    client: Client,
    identity: &str,
) -> anyhow::Result<(tether::worker::WorkerHandle, usize)> {
    let mut options = WorkerOptions::new("bench").identity(identity);
    // The worker's default activity slots unless asked otherwise.
    if let Some(slots) = std::env::var("TETHER_BENCH_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options = options.max_concurrent_activities(slots);
    }
    let slots = options.max_concurrent_activities;
    let mut worker = Worker::new(client, options);
    worker.register_activity("noop", |_ctx: ActivityContext, v: Value| async move {
        Ok::<_, ActivityError>(v)
    });
    worker.register_workflow("one", |ctx: WorkflowContext, v: Value| async move {
        let out: Value = ctx
            .execute_activity("noop", &v, ActivityOptions::default())
            .await?;
        Ok::<_, WorkflowError>(out)
    });
    Ok((worker.start()?, slots))
}

struct Sizes {
    w1: usize,
    w1_wf: usize,
    w2: usize,
    in_flight: usize,
}

/// W1 (both kinds) and W2 on one server over `location`.
async fn run_on(
    location: StoreLocation,
    config: ServerConfig,
    sizes: &Sizes,
    store_name: &str,
) -> anyhow::Result<Figures> {
    let server = LocalServer::start_on("127.0.0.1:0", location, config).await?;
    let worker_client = Client::connect(server.url()).await?;
    let client = Client::connect(server.url()).await?;
    let (worker, slots) = bench_worker(worker_client, "bench-worker")?;
    eprintln!("warming up...");
    w1_activities(&client, 200.min(sizes.w1), sizes.in_flight, "warm").await;
    println!("tether end-to-end benchmark ({store_name}; server, 1 worker with {slots} activity slots, client in one process)");
    let in_flight = sizes.in_flight;
    let (n_w1, n_w1_wf, n_w2) = (sizes.w1, sizes.w1_wf, sizes.w2);
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
    worker.shutdown().await;
    server.stop().await?;
    Ok(Figures {
        w1_activities: w1a,
        w1_workflows: w1w,
        w2_p50: p50,
        w2_p99: p99,
    })
}

/// W1 (standalone activities) spread over `replicas` replicas on one PostgreSQL database and
/// as many namespaces, one worker and one client per namespace, all in this process.
async fn run_spread(
    url: &str,
    replicas: usize,
    config: ServerConfig,
    sizes: &Sizes,
) -> anyhow::Result<f64> {
    let mut servers = Vec::new();
    for i in 0..replicas {
        let mut config = config.clone();
        config.replica.id = format!("bench-{i}");
        servers.push(
            LocalServer::start_on(
                "127.0.0.1:0",
                StoreLocation::Postgres(url.to_string()),
                config,
            )
            .await?,
        );
    }
    let addresses: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let admin = Client::connect(addresses.join(",")).await?;
    let namespaces: Vec<String> = std::iter::once("default".to_string())
        .chain((1..replicas).map(|i| format!("spread-{i}")))
        .collect();
    for ns in &namespaces[1..] {
        admin.register_namespace(ns, "bench").await?;
    }
    // Wait until each replica holds one namespace.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = admin
            .raw()
            .describe_cluster(tether::api::pb::DescribeClusterRequest {})
            .await?
            .into_inner();
        let spread = (0..replicas).all(|i| {
            status
                .leases
                .iter()
                .filter(|l| l.owner == format!("bench-{i}"))
                .count()
                == 1
        });
        if spread {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the namespaces did not spread over the replicas: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for ns in &namespaces {
        let worker_client = Client::connect(addresses.join(","))
            .await?
            .with_namespace(ns);
        workers.push(bench_worker(worker_client, &format!("bench-worker-{ns}"))?.0);
        let client = Client::connect(addresses.join(","))
            .await?
            .with_namespace(ns);
        w1_activities(&client, 200.min(sizes.w1), sizes.in_flight, "warm").await;
        clients.push(client);
    }
    let per = sizes.w1 / replicas;
    let started = Instant::now();
    futures::future::join_all(
        clients
            .iter()
            .map(|c| w1_activities(c, per, sizes.in_flight, "spread")),
    )
    .await;
    let rate = (per * replicas) as f64 / started.elapsed().as_secs_f64();
    println!(
        "W1  standalone activities over {replicas} replicas and {replicas} namespaces: {} tasks, {} in flight each: {rate:.0} tasks/s",
        per * replicas,
        sizes.in_flight
    );
    for w in workers {
        w.shutdown().await;
    }
    for s in servers {
        s.stop().await?;
    }
    Ok(rate)
}

async fn run() -> anyhow::Result<()> {
    let sizes = Sizes {
        w1: env_usize("TETHER_BENCH_W1", 20_000),
        w1_wf: env_usize(
            "TETHER_BENCH_W1_WF",
            env_usize("TETHER_BENCH_W1", 20_000) / 4,
        ),
        w2: env_usize("TETHER_BENCH_W2", 1_000),
        in_flight: env_usize("TETHER_BENCH_IN_FLIGHT", 256),
    };
    let sync = match std::env::var("TETHER_BENCH_SYNC").as_deref() {
        Ok("normal") => SyncMode::Normal,
        _ => SyncMode::Full,
    };
    let config = ServerConfig {
        sync_mode: sync,
        ..Default::default()
    };
    // TETHER_BENCH_STORE: sqlite (the default), postgres, or both (SQLite, then PostgreSQL on a
    // cluster this bench starts itself, with PostgreSQL's default durability: fsync and
    // synchronous_commit on; then W1 over TETHER_BENCH_REPLICAS replicas, default 3).
    let store = std::env::var("TETHER_BENCH_STORE").unwrap_or_else(|_| "sqlite".into());
    let (sqlite, postgres) = match store.as_str() {
        "sqlite" => (true, false),
        "postgres" => (false, true),
        "both" => (true, true),
        other => anyhow::bail!("TETHER_BENCH_STORE={other:?}: give sqlite, postgres or both"),
    };
    let dir = tempfile::tempdir()?;
    let on_sqlite = if sqlite {
        let name = match sync {
            SyncMode::Full => "embedded SQLite, synchronous=FULL (fsync per group commit)",
            SyncMode::Normal => "embedded SQLite, synchronous=NORMAL",
        };
        Some(
            run_on(
                StoreLocation::Sqlite(dir.path().to_path_buf()),
                config.clone(),
                &sizes,
                name,
            )
            .await?,
        )
    } else {
        None
    };
    if postgres {
        let cluster = TestCluster::start_durable().map_err(anyhow::Error::msg)?;
        let url = cluster
            .create_database("bench")
            .await
            .map_err(anyhow::Error::msg)?;
        let pg = run_on(
            StoreLocation::Postgres(url),
            config.clone(),
            &sizes,
            "PostgreSQL, synchronous_commit=on, one replica",
        )
        .await?;
        // The floor under W2: one durable commit of a one-row transaction, sent the way the
        // store's writer sends its groups (pipelined), on the same cluster right after W2.
        let floor_url = cluster
            .create_database("bench_floor")
            .await
            .map_err(anyhow::Error::msg)?;
        let floor = commit_floor(&floor_url, sizes.w2).await?;
        println!(
            "floor: one durable PostgreSQL commit (BEGIN, INSERT of one row, COMMIT, pipelined), {} sequential: p50 {:.3} ms; W2 p50 / floor p50: {:.2} (a W2 round trip waits for two commits)",
            sizes.w2,
            floor.as_secs_f64() * 1e3,
            pg.w2_p50.as_secs_f64() / floor.as_secs_f64()
        );
        if let Some(lite) = &on_sqlite {
            println!(
                "PostgreSQL / SQLite, same run: W1 activities {:.2}, W1 workflows {:.2}, W2 p50 {:.2}, W2 p99 {:.2}",
                pg.w1_activities / lite.w1_activities,
                pg.w1_workflows / lite.w1_workflows,
                pg.w2_p50.as_secs_f64() / lite.w2_p50.as_secs_f64(),
                pg.w2_p99.as_secs_f64() / lite.w2_p99.as_secs_f64(),
            );
        }
        let replicas = env_usize("TETHER_BENCH_REPLICAS", 3);
        if replicas > 1 {
            let url = cluster
                .create_database("bench_spread")
                .await
                .map_err(anyhow::Error::msg)?;
            let spread = run_spread(&url, replicas, config.clone(), &sizes).await?;
            println!(
                "W1 over {replicas} replicas / one replica, same run: {:.2} (all in this process, on this machine's cores)",
                spread / pg.w1_activities
            );
        }
    }
    println!("rerun: cargo bench --bench end_to_end   (sizes: TETHER_BENCH_W1, TETHER_BENCH_W1_WF, TETHER_BENCH_W2, TETHER_BENCH_SLOTS; TETHER_BENCH_SYNC=normal; TETHER_BENCH_STORE=sqlite|postgres|both, TETHER_BENCH_REPLICAS)");
    Ok(())
}
