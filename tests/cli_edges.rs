//! The edges of the `tether` command a user meets first: pipes, inputs from files and stdin,
//! one clear error (JSON under --json), servers that restart while a command waits, key files
//! from keygen, standalone activities end to end, and what `queue describe` shows.

mod common;

use common::{spawn_server, stderr, tether, within, ServerProcess, BIN};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::client::Client;
use tether::worker::{Worker, WorkerOptions};

const T: Duration = Duration::from_secs(60);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn server() -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--sync",
        "normal",
    ]);
    (dir, server)
}

fn echo_worker(client: &Client, queue: &str, identity: &str) -> Worker {
    let mut w = Worker::new(
        client.clone(),
        WorkerOptions::new(queue)
            .identity(identity)
            .state_dir(None)
            .graceful_shutdown(Duration::from_secs(1)),
    );
    w.register_activity("echo", |_ctx: ActivityContext, v: Value| async move {
        Ok::<_, ActivityError>(v)
    });
    w.register_activity("slow", |_ctx: ActivityContext, ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, ActivityError>(ms)
    });
    w.register_activity("hang", |ctx: ActivityContext, _: ()| async move {
        ctx.cancelled().await;
        Err::<(), _>(ActivityError::Cancelled)
    });
    w
}

#[test]
fn piping_into_head_ends_quietly() {
    let (_dir, server) = server();
    // Enough output that writing it outlives the reader.
    let mut child = Command::new(BIN)
        .args(["--address", &server.addr, "caps", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(101), "panicked: {}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn dev_with_address_says_to_use_listen_instead_of_listening_elsewhere() {
    let out = Command::new(BIN)
        .args(["dev", "--address", "127.0.0.1:7999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--listen 127.0.0.1:7999"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_error_is_reported_once_and_as_json_under_json() {
    let (_dir, server) = server();
    let out = tether(&server.addr, &["workflow", "describe", "--id", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert_eq!(
        text.matches("was not found").count(),
        1,
        "the message appears once: {text}"
    );
    assert!(text.contains("NOT_FOUND"), "{text}");
    let out = tether(
        &server.addr,
        &["--json", "workflow", "describe", "--id", "nope"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no data on stdout: {}", stdout(&out));
    let err: Value = serde_json::from_str(stderr(&out).trim()).expect("a JSON error");
    assert_eq!(err["error"]["code"], "NOT_FOUND");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("was not found"));
}

#[test]
fn a_plaintext_client_against_a_tls_server_is_told_to_use_tls() {
    let certs = tempfile::tempdir().unwrap();
    tether::tls::write_dev_certs(certs.path(), &["client"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = |f: &str| certs.path().join(f).display().to_string();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--tls-cert",
        &c("server.pem"),
        "--tls-key",
        &c("server.key"),
    ]);
    let out = tether(&server.addr, &["--retry-for", "0s", "namespace", "list"]);
    assert_eq!(out.status.code(), Some(1));
    // What to do comes first; the protocol error behind it only as the detail.
    let text = stderr(&out);
    let hint = text.find("requires TLS (pass --tls-ca").expect(&text);
    if let Some(detail) = text.find("h2 protocol error") {
        assert!(hint < detail, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_come_from_files_and_stdin() {
    let (_dir, server) = server();
    let client = Client::connect(server.addr.clone()).await.unwrap();
    let worker = echo_worker(&client, "files", "files-w").start().unwrap();
    let big = serde_json::json!({ "rows": (0..20_000).collect::<Vec<u32>>() });
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), big.to_string()).unwrap();
    let out = tether(
        &server.addr,
        &[
            "--json",
            "activity",
            "execute",
            "--type",
            "echo",
            "--task-queue",
            "files",
            "--input-file",
            file.path().to_str().unwrap(),
        ],
    );
    assert_eq!(json_of(&out)["result"], big);
    let mut child = Command::new(BIN)
        .args(["--address", &server.addr, "--json"])
        .args([
            "activity",
            "execute",
            "--type",
            "echo",
            "--task-queue",
            "files",
        ])
        .args(["--input-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"from":"stdin"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(json_of(&out)["result"]["from"], "stdin");
    let bad = tether(
        &server.addr,
        &[
            "activity",
            "execute",
            "--type",
            "echo",
            "--task-queue",
            "files",
            "--input-file",
            "/nonexistent/x.json",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("/nonexistent/x.json"),
        "{}",
        stderr(&bad)
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_execute_waits_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let first = spawn_server(&["server", "--data-dir", &data, "--sync", "full"]);
    let addr = first.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let worker = echo_worker(&client, "restart-q", "restart-w")
        .start()
        .unwrap();
    let cli = Command::new(BIN)
        .args(["--address", &addr, "--retry-for", "30s", "--json"])
        .args([
            "activity",
            "execute",
            "--type",
            "slow",
            "--task-queue",
            "restart-q",
        ])
        .args(["--input", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    first.kill_9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _second = spawn_server(&["server", "--data-dir", &data, "--listen", &addr]);
    let out = within(
        T,
        "the command",
        tokio::task::spawn_blocking(move || cli.wait_with_output()),
    )
    .await
    .unwrap()
    .unwrap();
    let v = json_of(&out);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["result"], 3000);
    worker.shutdown().await;
}

#[test]
fn keygen_output_loads_alone_and_appended() {
    let one = Command::new(BIN)
        .args(["keygen", "--id", "k1"])
        .output()
        .unwrap();
    assert!(one.status.success());
    let first = stdout(&one);
    let codec = tether::codec::AesGcmCodec::parse(&first).expect("keygen's own output loads");
    assert_eq!(codec.active_key_id(), "k1");
    let two = Command::new(BIN)
        .args(["keygen", "--id", "k2"])
        .output()
        .unwrap();
    let both = format!("{first}{}", stdout(&two));
    let codec = tether::codec::AesGcmCodec::parse(&both).expect("appended output loads");
    assert_eq!(codec.active_key_id(), "k1", "the first key stays active");
    assert!(codec.key_ids().contains(&"k2".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_activities_are_whole_in_the_cli() {
    let (_dir, server) = server();
    let addr = server.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    let worker = echo_worker(&client, "acts", "acts-w").start().unwrap();
    let run = |args: &[&str]| tether(&addr, args);
    let done = json_of(&run(&[
        "--json",
        "activity",
        "execute",
        "--type",
        "echo",
        "--task-queue",
        "acts",
        "--id",
        "act-1",
        "--input",
        "42",
    ]));
    assert_eq!(done["result"], 42);
    // result, describe, list
    assert_eq!(
        json_of(&run(&["--json", "activity", "result", "--id", "act-1"]))["result"],
        42
    );
    let described = json_of(&run(&["--json", "activity", "describe", "--id", "act-1"]));
    assert_eq!(described["status"], "completed", "{described}");
    let listed = json_of(&run(&["--json", "activity", "list"]));
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["workflow_id"] == "act-1"));
    // `workflow result` of an activity id finds the activity.
    let via_workflow = run(&["workflow", "result", "--id", "act-1"]);
    assert!(via_workflow.status.success(), "{}", stderr(&via_workflow));
    assert_eq!(stdout(&via_workflow).trim(), "42");
    // cancel (of one still waiting for a worker: at once) and terminate (of a running one)
    let started = json_of(&run(&[
        "--json",
        "activity",
        "execute",
        "--type",
        "hang",
        "--task-queue",
        "nobody-here",
        "--id",
        "act-2",
        "--no-wait",
    ]));
    assert_eq!(started["activity_id"], "act-2");
    // A second start under the running id says it is an activity's.
    let dup = run(&[
        "activity",
        "execute",
        "--type",
        "hang",
        "--task-queue",
        "nobody-here",
        "--id",
        "act-2",
        "--no-wait",
    ]);
    assert!(
        stderr(&dup).contains("activity id \"act-2\" is already running"),
        "{}",
        stderr(&dup)
    );
    let cancel = run(&["activity", "cancel", "--id", "act-2", "--reason", "enough"]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let outcome = run(&["--json", "activity", "result", "--id", "act-2"]);
    assert_eq!(outcome.status.code(), Some(2));
    assert_eq!(
        serde_json::from_slice::<Value>(&outcome.stdout).unwrap()["status"],
        "canceled"
    );
    json_of(&run(&[
        "--json",
        "activity",
        "execute",
        "--type",
        "hang",
        "--task-queue",
        "acts",
        "--id",
        "act-3",
        "--no-wait",
    ]));
    let term = run(&["activity", "terminate", "--id", "act-3", "--reason", "stop"]);
    assert!(term.status.success(), "{}", stderr(&term));
    let described = json_of(&run(&["--json", "activity", "describe", "--id", "act-3"]));
    assert_eq!(described["status"], "terminated");
    // Work nobody can take says so at once, and --schedule-to-start bounds the wait.
    let unplaceable = run(&[
        "activity",
        "execute",
        "--type",
        "echo",
        "--task-queue",
        "nobody-polls",
        "--input",
        "1",
        "--schedule-to-start",
        "1s",
    ]);
    assert_eq!(
        unplaceable.status.code(),
        Some(2),
        "{}",
        stderr(&unplaceable)
    );
    let text = stderr(&unplaceable);
    assert!(
        text.contains("waiting: no live worker polls task queue \"nobody-polls\""),
        "{text}"
    );
    assert!(text.contains("schedule_to_start"), "{text}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_describe_explains_unplaceable_work_and_marks_dead_pollers() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--worker-liveness-timeout",
        "1s",
    ]);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    let worker = echo_worker(&client, "dq", "short-lived").start().unwrap();
    common::eventually(T, "the worker polls", || async {
        let q = client.describe_task_queue("dq").await.ok()?;
        (!q.pollers.is_empty()).then_some(())
    })
    .await;
    worker.kill();
    client
        .start_activity(
            "echo",
            &1,
            tether::client::StandaloneActivityOptions {
                options: tether::client::ActivityOptions::default()
                    .requirements(tether::caps::Requirements::parse("gpu.count>=8").unwrap()),
                ..tether::client::StandaloneActivityOptions::new("needs-8", "dq")
            },
        )
        .await
        .unwrap();
    let text = common::eventually(T, "the poller is shown dead", || async {
        let out = tether(&server.addr, &["queue", "describe", "--task-queue", "dq"]);
        let text = stdout(&out);
        text.contains(" dead ").then_some(text)
    })
    .await;
    assert!(text.contains("short-lived"), "{text}");
    assert!(text.contains("gpu.count>=8"), "{text}");
    assert!(text.contains("unplaceable:"), "{text}");
}
