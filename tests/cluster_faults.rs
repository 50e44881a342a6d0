//! The cluster under load and under faults: 3 replicas on one PostgreSQL, 4 worker processes,
//! workflows with activities, timers, signals and GPU sessions, while a replica is killed with
//! SIGKILL and restarted every few seconds, and once one is paused past its lease. Afterwards:
//! no workflow lost, no completion applied twice, no two sessions holding one GPU at once, and
//! every session activity run on its session's worker. Takeover times are printed.
//!
//! `TETHER_FAULT_WORKFLOWS` (default 2,000) sets the number of workflows.

mod common;

use common::ServerProcess;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::activity::{ActivityContext, ActivityError};
use tether::api::pb;
use tether::caps::{CapabilitySource, Inventory};
use tether::client::{ActivityOptions, Client, SessionOptions, WorkflowOptions};
use tether::store::TestCluster;
use tether::worker::{Worker, WorkerOptions};
use tether::workflow::{WorkflowContext, WorkflowError};

const NAMESPACES: [&str; 3] = ["default", "fault-1", "fault-2"];
const QUEUE: &str = "fault-q";
const LEASE: &str = "2s";
/// Set in a worker process: the replicas' addresses, its number, and where it logs.
const WORKER_ENV: &str = "TETHER_FAULT_WORKER";

async fn pipeline(ctx: WorkflowContext, n: u64) -> Result<u64, WorkflowError> {
    let options = ActivityOptions::default().start_to_close(Duration::from_secs(30));
    let doubled: u64 = ctx.execute_activity("double", &n, options.clone()).await?;
    ctx.sleep(Duration::from_millis(100)).await;
    let add: u64 = ctx.signal_channel("go").recv().await?;
    let session = ctx
        .create_session(SessionOptions {
            gpus: 1,
            creation_timeout: Some(Duration::from_secs(300)),
            ..SessionOptions::new(QUEUE)
        })
        .await?;
    let once: u64 = session
        .execute_activity("gpu_step", &doubled, options.clone())
        .await?;
    let twice: u64 = session.execute_activity("gpu_step", &once, options).await?;
    session.complete();
    Ok(twice + add)
}

/// One line per session activity run: session, its worker, the worker that ran it, its GPUs,
/// and when it ran (µs since the epoch, this host's clock).
fn record(log: &std::sync::Mutex<std::fs::File>, ctx: &ActivityContext, start: u128, end: u128) {
    let session = ctx.session().cloned().unwrap_or_default();
    let gpus: Vec<String> = session.gpus.iter().map(|g| g.index.to_string()).collect();
    let line = format!(
        "{} {} {} {} {} {} {}\n",
        session.namespace,
        session.session_id,
        session.worker_identity,
        ctx.info().worker_identity,
        if gpus.is_empty() {
            "-".into()
        } else {
            gpus.join(",")
        },
        start,
        end
    );
    let _ = log.lock().unwrap().write_all(line.as_bytes());
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// A worker process: one worker per namespace, each declaring a host with 2 GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by cluster_faults_under_load as a worker process"]
async fn worker_process() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let mut parts = spec.split(';');
    let (addresses, number, log_path) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
    );
    let log = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap(),
    ));
    let client = Client::connect(addresses).await.unwrap();
    let mut running = Vec::new();
    for ns in NAMESPACES {
        let identity = format!("p{number}-{ns}");
        let inventory = format!(
            "hostname = \"{identity}\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-80GB\"\nmemory = \"80GiB\"\ncompute = \"8.0\"\ncount = 2\n"
        );
        let caps = CapabilitySource::detect()
            .with_inventory(Inventory::parse(&inventory, &identity).unwrap());
        let mut w = Worker::new(
            client.with_namespace(ns),
            WorkerOptions::new(QUEUE)
                .identity(&identity)
                .capabilities(caps)
                .state_dir(None)
                .build()
                .unwrap(),
        );
        w.register_workflow("pipeline", pipeline);
        w.register_activity("double", |_ctx: ActivityContext, n: u64| async move {
            Ok::<_, ActivityError>(n * 2)
        });
        let log = log.clone();
        w.register_activity("gpu_step", move |ctx: ActivityContext, n: u64| {
            let log = log.clone();
            async move {
                let start = now_us();
                tokio::time::sleep(Duration::from_millis(20)).await;
                record(&log, &ctx, start, now_us());
                Ok::<_, ActivityError>(n + 1)
            }
        });
        running.push(w.start().unwrap());
    }
    eprintln!("worker process {number} ready");
    // Until the test kills it.
    std::future::pending::<()>().await;
}

/// The worker processes, killed however the test ends (a failed assertion included).
struct Workers(Vec<std::process::Child>);

impl Workers {
    fn stop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_worker(addresses: &str, number: usize, log: &std::path::Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["worker_process", "--exact", "--ignored", "--nocapture"])
        .env(
            WORKER_ENV,
            format!("{addresses};{number};{}", log.display()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A free port below the range the OS hands out for outgoing connections: a replica restarted
/// on its port must find it free, and an ephemeral port could meanwhile have become the local
/// end of some client's connection.
fn listening_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let start = 10_000 + (std::process::id() % 10_000) as u16;
    (start..low)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

fn replica(url: &str, id: &str, listen: &str) -> ServerProcess {
    common::spawn_replica(url, id, LEASE, listen)
}

async fn status(client: &Client) -> Option<pb::DescribeClusterResponse> {
    client
        .raw()
        .describe_cluster(pb::DescribeClusterRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn signal_process(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal}");
}

/// Kill → the first call in `namespace` answered by its engine (on whichever replica).
async fn time_to_served(client: &Client, namespace: &str, killed_at: Instant) -> Duration {
    let client = client.with_namespace(namespace);
    loop {
        let served = client
            .raw()
            .list_workflows(pb::ListWorkflowsRequest {
                namespace: namespace.into(),
                limit: 1,
                ..Default::default()
            })
            .await;
        if served.is_ok() {
            return killed_at.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_faults_under_load() {
    let total: usize = std::env::var("TETHER_FAULT_WORKFLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let pg = TestCluster::start().unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"));
    let url = pg.create_database("faults").await.unwrap();
    let mut replicas: Vec<Option<ServerProcess>> = Vec::new();
    let mut listen = Vec::new();
    for i in 0..3 {
        let r = replica(
            &url,
            &format!("r{i}"),
            &format!("127.0.0.1:{}", listening_port()),
        );
        listen.push(r.addr.clone());
        replicas.push(Some(r));
    }
    let addresses = listen.join(",");
    let client = Client::connect(addresses.clone()).await.unwrap();
    for ns in &NAMESPACES[1..] {
        client.register_namespace(ns, "faults").await.unwrap();
    }
    common::eventually(
        Duration::from_secs(60),
        "one namespace per replica",
        || async {
            let s = status(&client).await?;
            (0..3)
                .all(|i| {
                    s.leases
                        .iter()
                        .filter(|l| l.owner == format!("r{i}"))
                        .count()
                        == 1
                })
                .then_some(())
        },
    )
    .await;
    let logs = tempfile::tempdir().unwrap();
    let mut workers = Workers(
        (0..4)
            .map(|i| spawn_worker(&addresses, i, &logs.path().join(format!("w{i}.log"))))
            .collect(),
    );

    // Chaos, while the work runs: a replica killed and restarted every few seconds, and once
    // one paused past its lease.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let (done, client, url, listen) =
            (done.clone(), client.clone(), url.clone(), listen.clone());
        tokio::spawn(async move {
            let mut takeovers: Vec<Duration> = Vec::new();
            let mut round = 0usize;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let i = round % 3;
                round += 1;
                let held: Vec<String> = match status(&client).await {
                    Some(s) => s
                        .leases
                        .iter()
                        .filter(|l| l.owner == format!("r{i}"))
                        .map(|l| l.namespace.clone())
                        .collect(),
                    None => Vec::new(),
                };
                if round == 3 {
                    // The holder of default paused past its lease, then let go on: it must
                    // step down.
                    let owner = status(&client).await.and_then(|s| {
                        s.leases
                            .iter()
                            .find(|l| l.namespace == "default" && !l.owner.is_empty())
                            .map(|l| l.owner.clone())
                    });
                    let Some(i) = owner.and_then(|o| o.strip_prefix('r')?.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let pid = replicas[i].as_ref().unwrap().child.id();
                    signal_process(pid, "-STOP");
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    signal_process(pid, "-CONT");
                    replicas[i].as_ref().unwrap().wait_for_line("stepping down");
                    eprintln!("round {round}: r{i} paused 4 s past its 2 s lease and stepped down");
                    continue;
                }
                let killed_at = Instant::now();
                replicas[i].take().unwrap().kill_9();
                let probes: Vec<_> = held
                    .iter()
                    .map(|ns| time_to_served(&client, ns, killed_at))
                    .collect();
                // Back within the lease (it takes its namespaces straight back), or after it
                // (another replica has taken them over by then).
                let away = if round.is_multiple_of(2) { 1 } else { 4 };
                let restart = async {
                    tokio::time::sleep(Duration::from_secs(away)).await;
                    // A restart that fails says why (printed), and is tried again: what the
                    // test checks is the work, across whatever the replicas go through.
                    let mut failures = Vec::new();
                    loop {
                        match common::try_spawn_replica(&url, &format!("r{i}"), LEASE, &listen[i]) {
                            Ok(r) => break r,
                            Err(why) if failures.len() < 5 => {
                                eprintln!("restart of r{i} failed, trying again: {why}");
                                failures.push(why);
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            Err(why) => {
                                panic!("r{i} would not start: {why} (before: {failures:?})")
                            }
                        }
                    }
                };
                let (times, restarted) = tokio::join!(futures::future::join_all(probes), restart);
                replicas[i] = Some(restarted);
                eprintln!(
                    "round {round}: killed r{i} holding {held:?} for {away} s; served again after {times:?}"
                );
                takeovers.extend(times);
            }
            (takeovers, replicas)
        })
    };

    // The work: every workflow started, then signalled, then awaited.
    let started_at = Instant::now();
    let handles: Vec<_> = futures::future::join_all((0..total).map(|i| {
        let client = client.with_namespace(NAMESPACES[i % 3]);
        async move {
            let id = format!("wf-{i}");
            loop {
                match client
                    .start_workflow("pipeline", &(i as u64), WorkflowOptions::new(&id, QUEUE))
                    .await
                {
                    Ok(handle) => return (i, handle),
                    Err(tether::client::ClientError::AlreadyStarted { .. }) => {
                        return (i, client.workflow_handle(&id, ""));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }))
    .await;
    let chaos_ref = &chaos;
    let results: Vec<(usize, u64)> =
        futures::future::join_all(handles.iter().map(|(i, h)| async move {
            loop {
                if h.signal("go", &1u64).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // A result wait cut by a kill is asked again; a workflow that failed fails the test.
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                match h.result::<u64>().await {
                    Ok(v) => return (*i, v),
                    Err(tether::client::ClientError::Failed { .. }) => {
                        panic!(
                            "workflow wf-{i} failed: {:?}",
                            h.history().await.map(|h| common::event_kinds(&h).join(","))
                        )
                    }
                    // The chaos ending before the work (it failed, and its replicas are gone)
                    // leaves nothing to wait for.
                    Err(e) if Instant::now() > deadline || chaos_ref.is_finished() => {
                        panic!("no result for wf-{i}: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }))
        .await;
    let elapsed = started_at.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut takeovers, _replicas) = chaos.await.unwrap();

    // No workflow lost, each with its own result.
    assert_eq!(results.len(), total);
    for (i, v) in &results {
        assert_eq!(*v, 2 * *i as u64 + 3, "wf-{i}");
    }
    // No completion applied twice: each history has each activity completed once.
    for (i, h) in &handles {
        let history = loop {
            match h.history().await {
                Ok(h) => break h,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let kinds = common::event_kinds(&history);
        let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
        assert_eq!(count("ActivityTaskCompleted"), 3, "wf-{i}: {kinds:?}");
        assert_eq!(count("WorkflowExecutionCompleted"), 1, "wf-{i}: {kinds:?}");
    }
    workers.stop();
    // Sessions: every activity on its session's worker, and no GPU used by two sessions at
    // once (per worker: each worker identity is one host).
    let mut runs = 0;
    // (worker, GPU) -> (start, end, session) of each session activity run on it.
    type Spans = Vec<(u128, u128, String)>;
    let mut by_gpu: HashMap<(String, String), Spans> = HashMap::new();
    for i in 0..4 {
        let text =
            std::fs::read_to_string(logs.path().join(format!("w{i}.log"))).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (session, placed_on, ran_on, gpus) = (f[1], f[2], f[3], f[4]);
            assert_eq!(
                placed_on, ran_on,
                "session {session} activity ran off its worker"
            );
            assert_ne!(gpus, "-", "session {session} had no GPU");
            let (start, end): (u128, u128) = (f[5].parse().unwrap(), f[6].parse().unwrap());
            for gpu in gpus.split(',') {
                by_gpu
                    .entry((ran_on.to_string(), gpu.to_string()))
                    .or_default()
                    .push((start, end, session.to_string()));
            }
            runs += 1;
        }
    }
    assert!(
        runs >= 2 * total,
        "{runs} session activity runs for {total} workflows"
    );
    for ((worker, gpu), mut spans) in by_gpu {
        spans.sort();
        for pair in spans.windows(2) {
            let ((_, end, a), (start, _, b)) = (&pair[0], &pair[1]);
            assert!(
                a == b || start >= end,
                "GPU {gpu} of {worker} held by sessions {a} and {b} at once"
            );
        }
    }
    takeovers.sort();
    let mut summary = BTreeMap::new();
    summary.insert("workflows", total.to_string());
    summary.insert("elapsed", format!("{elapsed:?}"));
    summary.insert("takeovers", takeovers.len().to_string());
    if !takeovers.is_empty() {
        summary.insert(
            "takeover p50",
            format!("{:?}", takeovers[takeovers.len() / 2]),
        );
        summary.insert(
            "takeover max",
            format!("{:?}", takeovers[takeovers.len() - 1]),
        );
    }
    eprintln!("cluster under faults: {summary:?}");
    assert!(
        !takeovers.is_empty(),
        "no replica was killed while the work ran"
    );
}
