//! The `tether` binary from the outside: the server as a child process (killed with SIGKILL to
//! prove durability) and the operator commands with their output and errors.

mod common;

use common::{http_get, ok_json, spawn_server, stderr, tether, BIN};

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{Client, StandaloneActivityOptions, WorkflowOptions};
use tether::workflow::WorkflowContext;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut server = spawn_server(&["server", "--data-dir", data, "--sync", "full"]);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    let wf = client
        .start_workflow(
            "echo_signal",
            &(),
            WorkflowOptions::new("survivor", "crash-q"),
        )
        .await
        .unwrap();
    wf.signal("value", "acknowledged before the crash")
        .await
        .unwrap();
    let act = client
        .start_activity(
            "double",
            &21u32,
            StandaloneActivityOptions::new("act-1", "crash-q"),
        )
        .await
        .unwrap();
    // SIGKILL: no shutdown path runs.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = spawn_server(&["server", "--data-dir", data, "--sync", "full"]);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    let mut worker = tether::worker::Worker::new(
        client.clone(),
        tether::worker::WorkerOptions::new("crash-q").identity("after-crash"),
    );
    worker.register_workflow("echo_signal", |ctx: WorkflowContext, _: ()| async move {
        let v: String = ctx.signal_channel("value").recv().await?;
        Ok(v)
    });
    worker.register_activity("double", |_ctx: ActivityContext, n: u32| async move {
        Ok::<_, ActivityError>(n * 2)
    });
    let worker = worker.start().unwrap();
    let wf = client.workflow_handle("survivor", &wf.run_id);
    let out: String = common::within(Duration::from_secs(30), "workflow", wf.result())
        .await
        .unwrap();
    assert_eq!(out, "acknowledged before the crash");
    let doubled: u32 = common::within(
        Duration::from_secs(30),
        "activity",
        client.activity_handle("act-1", &act.run_id).result(),
    )
    .await
    .unwrap();
    assert_eq!(doubled, 42);
    worker.shutdown().await;
}

#[test]
fn cli_commands_print_data_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--sync",
        "normal",
    ]);
    let addr = server.addr.as_str();

    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help_text = String::from_utf8_lossy(&help.stdout);
    for cmd in [
        "server",
        "dev",
        "workflow",
        "activity",
        "namespace",
        "queue",
        "workers",
    ] {
        assert!(help_text.contains(cmd), "--help lists {cmd}");
    }

    let created = tether(
        addr,
        &[
            "namespace",
            "create",
            "billing",
            "--description",
            "invoices",
            "--retention",
            "30d",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    assert_eq!(
        String::from_utf8_lossy(&created.stdout).trim(),
        "namespace billing created (closed runs kept 30d)"
    );
    let bad = tether(
        addr,
        &["namespace", "update", "billing", "--retention", "30 days"],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("unknown unit"), "{}", stderr(&bad));
    let nothing = tether(addr, &["namespace", "update", "billing"]);
    assert!(
        stderr(&nothing).contains("nothing to change"),
        "{}",
        stderr(&nothing)
    );
    let updated = ok_json(
        addr,
        &["namespace", "update", "billing", "--retention", "12h"],
    );
    assert_eq!(updated["retention"], "12h");
    assert_eq!(updated["description"], "invoices");
    let again = tether(addr, &["namespace", "create", "billing"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("namespace \"billing\" already exists"),
        "{}",
        stderr(&again)
    );
    let namespaces = ok_json(addr, &["namespace", "list"]);
    let names: Vec<&str> = namespaces
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["billing", "default"]);
    let retentions: Vec<&str> = namespaces
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["retention"].as_str().unwrap())
        .collect();
    assert_eq!(retentions, vec!["12h", "forever"]);

    let started = ok_json(
        addr,
        &[
            "workflow",
            "start",
            "--type",
            "order",
            "--task-queue",
            "orders",
            "--id",
            "o-1",
            "--input",
            r#"{"item":"book"}"#,
        ],
    );
    assert_eq!(started["workflow_id"], "o-1");
    let run_id = started["run_id"].as_str().unwrap().to_string();
    assert_eq!(run_id.len(), 36);

    let bad = tether(
        addr,
        &[
            "workflow",
            "start",
            "--type",
            "order",
            "--task-queue",
            "orders",
            "--input",
            "not json",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("--input is not valid JSON"),
        "{}",
        stderr(&bad)
    );

    let dup = tether(
        addr,
        &[
            "workflow",
            "start",
            "--type",
            "order",
            "--task-queue",
            "orders",
            "--id",
            "o-1",
        ],
    );
    assert_eq!(dup.status.code(), Some(1));
    assert!(
        stderr(&dup).contains(&format!("already running as run {run_id}")),
        "{}",
        stderr(&dup)
    );

    let described = ok_json(addr, &["workflow", "describe", "--id", "o-1"]);
    assert_eq!(described["status"], "running");
    assert_eq!(described["run_id"], run_id.as_str());

    let queue = ok_json(addr, &["queue", "describe", "--task-queue", "orders"]);
    assert_eq!(
        queue["workflow_backlog"], 1,
        "the first workflow task waits for a worker"
    );

    let signaled = tether(
        addr,
        &[
            "workflow",
            "signal",
            "--id",
            "o-1",
            "--name",
            "approve",
            "--input",
            r#""alice""#,
        ],
    );
    assert!(signaled.status.success(), "{}", stderr(&signaled));
    let history = ok_json(addr, &["workflow", "history", "--id", "o-1"]);
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["WorkflowExecutionStarted", "WorkflowSignaled"]);
    assert_eq!(history[1]["details"]["input"], "alice");

    let listed = ok_json(addr, &["workflow", "list", "--status", "running"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let bad_status = tether(addr, &["workflow", "list", "--status", "sleeping"]);
    assert_eq!(bad_status.status.code(), Some(1));
    assert!(stderr(&bad_status).contains("--status \"sleeping\" is not known"));

    let terminated = tether(
        addr,
        &["workflow", "terminate", "--id", "o-1", "--reason", "test"],
    );
    assert!(terminated.status.success(), "{}", stderr(&terminated));
    let result = tether(addr, &["workflow", "result", "--id", "o-1"]);
    assert_eq!(
        result.status.code(),
        Some(2),
        "a terminated run is not a success"
    );
    assert!(
        stderr(&result).contains("terminated"),
        "{}",
        stderr(&result)
    );

    let unknown_ns = tether(addr, &["--namespace", "nope", "workflow", "list"]);
    assert_eq!(unknown_ns.status.code(), Some(1));
    assert!(
        stderr(&unknown_ns).contains("namespace \"nope\" does not exist"),
        "{}",
        stderr(&unknown_ns)
    );

    let missing = tether(addr, &["workflow", "describe", "--id", "ghost"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("NotFound") || stderr(&missing).contains("not found"),
        "{}",
        stderr(&missing)
    );

    let act = ok_json(
        addr,
        &[
            "activity",
            "execute",
            "--type",
            "resize",
            "--task-queue",
            "jobs",
            "--id",
            "a-1",
            "--input",
            "640",
            "--no-wait",
        ],
    );
    assert_eq!(act["activity_id"], "a-1");
    let queue = ok_json(addr, &["queue", "describe", "--task-queue", "jobs"]);
    assert_eq!(queue["activity_backlog"], 1);
    assert_eq!(ok_json(addr, &["workers", "list"]), Value::Array(vec![]));

    let unreachable = tether("127.0.0.1:1", &["--retry-for", "1s", "workflow", "list"]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("could not connect to 127.0.0.1:1"),
        "{}",
        stderr(&unreachable)
    );
}

#[test]
fn dev_server_starts_on_a_temporary_store() {
    let server = spawn_server(&["dev"]);
    let namespaces = ok_json(&server.addr, &["namespace", "list"]);
    assert_eq!(namespaces[0]["name"], "default");
}

#[test]
fn bad_server_flags_are_refused() {
    let out = Command::new(BIN)
        .args(["server", "--data-dir", "/tmp/x", "--sync", "sometimes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown sync mode"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .args([
            "server",
            "--data-dir",
            "/tmp/x",
            "--long-poll-timeout",
            "ten",
        ])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("is not a duration"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_show_waiting_sessions_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--sync",
        "normal",
    ]);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    // Nobody polls "gpu": the session waits for a placement.
    let reply = client
        .raw()
        .create_session(tether::api::pb::CreateSessionRequest {
            namespace: "default".into(),
            options: Some(tether::api::pb::SessionOptions {
                task_queue: "gpu".into(),
                gpus: 2,
                creation_timeout_ms: 60_000,
                ..Default::default()
            }),
            owner: "cli-test".into(),
            session_id: "s-1".into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.session.unwrap().state, "creating");
    let addr = server.addr.clone();
    let listed = tokio::task::spawn_blocking(move || ok_json(&addr, &["session", "list"]))
        .await
        .unwrap();
    assert_eq!(listed[0]["session_id"], "s-1");
    assert_eq!(listed[0]["state"], "creating");
    let addr = server.addr.clone();
    let described =
        tokio::task::spawn_blocking(move || tether(&addr, &["session", "describe", "s-1"]))
            .await
            .unwrap();
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(
        text.contains("waiting because: no live worker polls this task queue"),
        "{text}"
    );
    let addr = server.addr.clone();
    let missing =
        tokio::task::spawn_blocking(move || tether(&addr, &["session", "describe", "nope"]))
            .await
            .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("session \"nope\" was not found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn access_rules_reload_on_sighup_and_a_bad_file_changes_nothing() {
    let certs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let c = |f: &str| certs.path().join(f).to_str().unwrap().to_string();
    let made = Command::new(BIN)
        .args(["certs", "dev", "--out", &c("")])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let access = certs.path().join("access.toml");
    let admin_only = "[[grant]]\nidentity = \"admin\"\nnamespace = \"*\"\nroles = [\"admin\"]\n";
    std::fs::write(&access, admin_only).unwrap();
    let server = spawn_server(&[
        "server",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--tls-cert",
        &c("server.pem"),
        "--tls-key",
        &c("server.key"),
        "--client-ca",
        &c("ca.pem"),
        "--access",
        access.to_str().unwrap(),
    ]);
    let as_client = || {
        tether(
            &server.addr,
            &[
                "--tls-ca",
                &c("ca.pem"),
                "--tls-cert",
                &c("client.pem"),
                "--tls-key",
                &c("client.key"),
                "workflow",
                "list",
            ],
        )
    };
    let hangup = || {
        let sent = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let denied = as_client();
    assert!(!denied.status.success());
    assert!(stderr(&denied).contains("no grant"), "{}", stderr(&denied));

    std::fs::write(
        &access,
        format!("{admin_only}[[grant]]\nidentity = \"client\"\nnamespace = \"default\"\nroles = [\"client\"]\n"),
    )
    .unwrap();
    hangup();
    let line = server.wait_for_line("access rules reloaded");
    assert!(line.contains("2 grants"), "{line}");
    let allowed = as_client();
    assert!(allowed.status.success(), "{}", stderr(&allowed));

    // A broken file is reported and the rules in force stay.
    std::fs::write(&access, "[[grant]\nidentity = ").unwrap();
    hangup();
    let line = server.wait_for_line("access file not reloaded");
    assert!(line.contains("is invalid"), "{line}");
    let still = as_client();
    assert!(still.status.success(), "{}", stderr(&still));
}

#[test]
fn metrics_endpoint_counts_requests_and_shows_open_runs() {
    let server = spawn_server(&["dev", "--metrics-listen", "127.0.0.1:0"]);
    let line = server.wait_for_line("metrics on http://");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let start = &[
        "workflow",
        "start",
        "--type",
        "t",
        "--task-queue",
        "q",
        "--id",
        "m-1",
    ];
    assert!(tether(&server.addr, start).status.success());
    let again = tether(&server.addr, start);
    assert!(!again.status.success());
    // A call to a method that does not exist is counted under "unknown", so callers cannot
    // mint new series.
    let status = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let codec: tonic_prost::ProstCodec<
            tether::api::pb::ListNamespacesRequest,
            tether::api::pb::ListNamespacesResponse,
        > = tonic_prost::ProstCodec::default();
        grpc.unary(
            tonic::Request::new(tether::api::pb::ListNamespacesRequest {}),
            "/tether.v1.TetherService/NoSuchMethod".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = http_get(&url);
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        // Gauges are refreshed about once a second; counters at once.
        if page.contains("tether_runs_open{namespace=\"default\",kind=\"workflow\"} 1") {
            for expected in [
                "tether_requests_total{method=\"StartWorkflow\",code=\"Ok\"} 1",
                "tether_requests_total{method=\"StartWorkflow\",code=\"AlreadyExists\"} 1",
                "tether_task_queue_backlog{namespace=\"default\",queue=\"q\",kind=\"workflow\"} 1",
                "tether_store_commits_total",
                "tether_requests_total{method=\"unknown\",code=\"Unimplemented\"} 1",
            ] {
                assert!(page.contains(expected), "no {expected} in:\n{page}");
            }
            assert!(!page.contains("NoSuchMethod"), "{page}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the open-runs gauge never showed the run:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
