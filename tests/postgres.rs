//! `tether server --database-url`: the server on PostgreSQL (a cluster the test starts, never
//! a mock), with work surviving a kill -9 of the server as it does on SQLite.

mod common;

use common::{spawn_server, within};
use std::time::Duration;
use tether::client::{Client, WorkflowOptions};
use tether::store::TestCluster;

const T: Duration = Duration::from_secs(60);

fn worker(client: &Client) -> tether::worker::Worker {
    common::doubling_worker(client, "pg-q", "pg-w")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_on_postgres_survives_a_kill_9_of_its_server() {
    let cluster =
        TestCluster::start().unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"));
    let url = cluster.create_database("tether").await.unwrap();
    let first = spawn_server(&["server", "--database-url", &url]);
    assert!(
        first.addr.starts_with("127.0.0.1:"),
        "listening on {}",
        first.addr
    );
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let running = worker(&client).start().unwrap();
    let handle = client
        .start_workflow(
            "doubled_after_signal",
            &21u64,
            WorkflowOptions::new("pg-1", "pg-q"),
        )
        .await
        .unwrap();
    // Once the activity's result is in the history, the run waits for its signal.
    common::eventually(T, "the activity completed", || async {
        let history = handle.history().await.ok()?;
        common::event_kinds(&history)
            .contains(&"TimerFired")
            .then_some(())
    })
    .await;
    first.kill_9();
    let _second = spawn_server(&["server", "--database-url", &url, "--listen", &addr]);
    within(T, "the signal after the restart", async {
        loop {
            if handle.signal("add", &0u64).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let result: u64 = within(T, "the result", handle.result()).await.unwrap();
    assert_eq!(result, 42);
    let kinds = common::event_kinds(&handle.history().await.unwrap());
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "ActivityTaskCompleted")
            .count(),
        1,
        "the activity ran once: {kinds:?}"
    );
    running.shutdown().await;
}

#[test]
fn a_server_given_no_store_says_what_to_give() {
    let out = std::process::Command::new(common::BIN)
        .args(["server", "--listen", "127.0.0.1:0"])
        .env_remove("TETHER_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--data-dir") && stderr.contains("--database-url"),
        "{stderr}"
    );
}

#[test]
fn a_database_url_that_is_no_url_is_refused_before_anything_starts() {
    let out = std::process::Command::new(common::BIN)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "not a url",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a PostgreSQL URL"), "{stderr}");
}
