//! Several `tether server` processes on one PostgreSQL database (a cluster the test starts):
//! namespaces spread over the replicas, calls reaching the replica that holds their namespace
//! whatever address they were sent to, a killed replica's namespaces taken over with their
//! work, and a replica paused past its lease stepping down.

mod common;

use common::{within, ServerProcess};
use std::time::{Duration, Instant};
use tether::api::pb;
use tether::client::{Client, WorkflowOptions};
use tether::store::TestCluster;

const T: Duration = Duration::from_secs(60);
/// Short, so takeovers happen within the test's patience; the default is 8 s.
const LEASE: &str = "2s";

async fn database(name: &str) -> (TestCluster, String) {
    let cluster =
        TestCluster::start().unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"));
    let url = cluster.create_database(name).await.unwrap();
    (cluster, url)
}

fn replica(url: &str, id: &str) -> ServerProcess {
    common::spawn_replica(url, id, LEASE, "127.0.0.1:0")
}

async fn cluster_status(client: &Client) -> pb::DescribeClusterResponse {
    client
        .raw()
        .describe_cluster(pb::DescribeClusterRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The replica holding `namespace` now, if one does.
fn holder(status: &pb::DescribeClusterResponse, namespace: &str) -> Option<(String, i64)> {
    status
        .leases
        .iter()
        .find(|l| l.namespace == namespace && !l.owner.is_empty())
        .map(|l| (l.owner.clone(), l.epoch))
}

fn worker(client: &Client, queue: &str, identity: &str) -> tether::worker::Worker {
    common::doubling_worker(client, queue, identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_spread_over_replicas_and_any_address_reaches_their_holder() {
    let (_pg, url) = database("spread").await;
    let with_ui = |id: &str| {
        common::try_spawn_replica_with(
            &url,
            id,
            LEASE,
            "127.0.0.1:0",
            &["--ui-listen", "127.0.0.1:0"],
        )
        .unwrap_or_else(|why| panic!("{why}"))
    };
    let a = with_ui("replica-a");
    let b = with_ui("replica-b");
    let ui_of_a = a.ui_url();
    let via_a = Client::connect(a.addr.clone()).await.unwrap();
    for ns in ["ns-1", "ns-2", "ns-3"] {
        via_a.register_namespace(ns, "spread").await.unwrap();
    }
    // Four namespaces over two live replicas: two each, once the first has handed some over.
    let status = common::eventually(T, "two namespaces on each replica", || async {
        let status = cluster_status(&via_a).await;
        let count = |id: &str| status.leases.iter().filter(|l| l.owner == id).count();
        (count("replica-a") == 2 && count("replica-b") == 2).then_some(status)
    })
    .await;
    assert_eq!(status.replicas.len(), 2, "{status:?}");
    assert!(status.replicas.iter().all(|r| r.live), "{status:?}");
    // A client that knows only replica B, and a worker that knows only replica A, work in
    // every namespace: each call lands on the namespace's holder.
    let via_b = Client::connect(b.addr.clone()).await.unwrap();
    for ns in ["default", "ns-1", "ns-2", "ns-3"] {
        let running = worker(&via_a.with_namespace(ns), "q", &format!("w-{ns}"))
            .start()
            .unwrap();
        let client = via_b.with_namespace(ns);
        let handle = client
            .start_workflow(
                "doubled_after_signal",
                &21u64,
                WorkflowOptions::new(format!("wf-{ns}"), "q"),
            )
            .await
            .unwrap();
        within(T, "the signal", async {
            while handle.signal("add", &0u64).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let result: u64 = within(T, "the result", handle.result()).await.unwrap();
        assert_eq!(result, 42, "namespace {ns}");
        running.shutdown().await;
    }
    // Every namespace is listed by either replica.
    let listed: Vec<String> = via_b
        .list_namespaces()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(listed, ["default", "ns-1", "ns-2", "ns-3"]);
    // Replica A's web UI lists every namespace, shows the ones A holds, and for the others
    // shows the server's answer, which names the replica that holds them.
    let namespaces = common::http_get(&format!("{ui_of_a}/api/namespaces"));
    for ns in ["default", "ns-1", "ns-2", "ns-3"] {
        assert!(
            namespaces.contains(&format!("\"name\":\"{ns}\"")),
            "{namespaces}"
        );
    }
    let status = cluster_status(&via_a).await;
    for ns in ["default", "ns-1", "ns-2", "ns-3"] {
        let (owner, _) = holder(&status, ns).expect("held");
        let fleet = common::http_get(&format!("{ui_of_a}/api/ns/{ns}/fleet"));
        if owner == "replica-a" {
            assert!(fleet.starts_with("HTTP/1.1 200"), "{ns}: {fleet}");
            assert!(fleet.contains(&format!("\"w-{ns}\"")), "{ns}: {fleet}");
        } else {
            assert!(fleet.starts_with("HTTP/1.1 503"), "{ns}: {fleet}");
            assert!(
                fleet.contains(&format!("served by replica {owner} at http://{};", b.addr)),
                "{ns}: {fleet}"
            );
        }
    }
    // `tether cluster status` shows both replicas and who holds what.
    let out = std::process::Command::new(common::BIN)
        .args(["cluster", "status", "--address", &b.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for expected in ["replica-a", "replica-b", "ns-1", "ns-3", "EPOCH"] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_namespace_is_taken_over_with_its_work() {
    let (_pg, url) = database("takeover").await;
    let a = replica(&url, "replica-a");
    // A serves everything before B exists: B then waits for A to hand some over, or die.
    let first = Client::connect(a.addr.clone()).await.unwrap();
    common::eventually(T, "replica-a holds default", || async {
        (holder(&cluster_status(&first).await, "default")?.0 == "replica-a").then_some(())
    })
    .await;
    let b = replica(&url, "replica-b");
    let both = format!("{},{}", a.addr, b.addr);
    let client = Client::connect(both.clone()).await.unwrap();
    let running = worker(&client, "q", "w-takeover").start().unwrap();
    let status = cluster_status(&client).await;
    let (owner, epoch) = holder(&status, "default").expect("default is held");
    let handle = client
        .start_workflow(
            "doubled_after_signal",
            &21u64,
            WorkflowOptions::new("wf-takeover", "q"),
        )
        .await
        .unwrap();
    common::eventually(T, "the activity completed", || async {
        let history = handle.history().await.ok()?;
        common::event_kinds(&history)
            .contains(&"TimerFired")
            .then_some(())
    })
    .await;
    // Kill the holder of default; the other replica takes it over within the lease.
    let (killed, survivor) = if owner == "replica-a" { (a, b) } else { (b, a) };
    let killed_at = Instant::now();
    killed.kill_9();
    let via_survivor = Client::connect(survivor.addr.clone()).await.unwrap();
    let (new_owner, new_epoch) = common::eventually(T, "a takeover", || async {
        holder(&cluster_status(&via_survivor).await, "default").filter(|(o, _)| *o != owner)
    })
    .await;
    assert!(new_epoch > epoch, "a takeover bumps the epoch");
    assert_ne!(new_owner, owner);
    // The run goes on where it was: the signal lands, and the activity is not run again.
    within(T, "the signal after the takeover", async {
        while handle.signal("add", &0u64).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let took = killed_at.elapsed();
    eprintln!("takeover: kill -9 to the first call served by the new holder took {took:?}");
    let result: u64 = within(T, "the result", handle.result()).await.unwrap();
    assert_eq!(result, 42);
    let kinds = common::event_kinds(&handle.history().await.unwrap());
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "ActivityTaskCompleted")
            .count(),
        1,
        "{kinds:?}"
    );
    // New work is served too, by the worker that reconnected on its own.
    let again = client
        .start_workflow(
            "doubled_after_signal",
            &1u64,
            WorkflowOptions::new("wf-after", "q"),
        )
        .await
        .unwrap();
    within(T, "a signal to new work", async {
        while again.signal("add", &1u64).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let result: u64 = within(T, "new work's result", again.result())
        .await
        .unwrap();
    assert_eq!(result, 3);
    running.shutdown().await;
}

fn signal_process(process: &ServerProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_steps_down_and_its_calls_go_to_the_new_holder() {
    let (_pg, url) = database("paused").await;
    let a = replica(&url, "replica-a");
    let via_a = Client::connect(a.addr.clone()).await.unwrap();
    common::eventually(T, "replica-a holds default", || async {
        (holder(&cluster_status(&via_a).await, "default")?.0 == "replica-a").then_some(())
    })
    .await;
    let b = replica(&url, "replica-b");
    let via_b = Client::connect(b.addr.clone()).await.unwrap();
    let handle = via_a
        .start_workflow(
            "doubled_after_signal",
            &5u64,
            WorkflowOptions::new("wf-paused", "q"),
        )
        .await
        .unwrap();
    signal_process(&a, "-STOP");
    let (owner, _) = common::eventually(T, "replica-b takes default over", || async {
        holder(&cluster_status(&via_b).await, "default").filter(|(o, _)| o == "replica-b")
    })
    .await;
    assert_eq!(owner, "replica-b");
    signal_process(&a, "-CONT");
    a.wait_for_line("stepping down");
    // A client that knows only the paused replica is sent on to the new holder.
    handle.signal("add", &1u64).await.unwrap();
    let running = worker(&via_a, "q", "w-paused").start().unwrap();
    let result: u64 = within(T, "the result", handle.result()).await.unwrap();
    assert_eq!(result, 11);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_several_addresses_skips_those_where_nothing_listens() {
    let env = common::TestEnv::start().await;
    // A port nothing listens on: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = Client::connect(format!("{dead},{}", env.url()))
        .await
        .unwrap();
    let running = worker(&client, "q", "w-skip").start().unwrap();
    let handle = client
        .start_workflow(
            "doubled_after_signal",
            &2u64,
            WorkflowOptions::new("wf-skip", "q"),
        )
        .await
        .unwrap();
    within(T, "the signal", async {
        while handle.signal("add", &1u64).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let result: u64 = within(T, "the result", handle.result()).await.unwrap();
    assert_eq!(result, 5);
    running.shutdown().await;
    // Every address dead: the error names one and says what to do.
    let err = match Client::connect_with(
        format!("{dead},{dead}"),
        tether::client::ClientOptions {
            retry_for: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&dead.to_string()) && err.contains("is the server running"),
        "{err}"
    );
}
