//! The web UI and `tether status` from the outside: `tether dev` serves the UI and its JSON,
//! `tether status` summarises the fleet (once, as JSON, and watching), and with mTLS and an
//! access file the UI reads without a certificate on loopback only.

mod common;

use common::{
    http_get, http_request, ok_json, output_within, spawn_server, stderr, tether, KillOnDrop, BIN,
};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

#[test]
fn with_access_on_the_ui_reads_without_a_certificate_on_loopback_only() {
    let certs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let c = |f: &str| certs.path().join(f).to_str().unwrap().to_string();
    let made = Command::new(BIN)
        .args(["certs", "dev", "--out", &c("")])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let access = certs.path().join("access.toml");
    std::fs::write(
        &access,
        "[[grant]]\nidentity = \"admin\"\nnamespace = \"*\"\nroles = [\"admin\"]\n",
    )
    .unwrap();
    let store = data.path().join("store");
    let secured = |ui_listen: &str| {
        vec![
            "server".to_string(),
            "--data-dir".into(),
            store.to_str().unwrap().into(),
            "--tls-cert".into(),
            c("server.pem"),
            "--tls-key".into(),
            c("server.key"),
            "--client-ca".into(),
            c("ca.pem"),
            "--access".into(),
            access.to_str().unwrap().into(),
            "--ui-listen".into(),
            ui_listen.into(),
        ]
    };

    // On every interface it is refused, before the server opens its store.
    let refused = output_within(
        Command::new(BIN)
            .args(secured("0.0.0.0:0"))
            .args(["--listen", "127.0.0.1:0"]),
        Duration::from_secs(30),
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--ui-allow-remote"),
        "the refusal says what to do: {}",
        stderr(&refused)
    );
    assert!(!store.exists(), "a refused start changes nothing");

    // On loopback it reads what a certificate holder without a grant cannot.
    let args = secured("127.0.0.1:0");
    let server = spawn_server(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ui = server.ui_url();
    let with_cert = |who: &str, args: &[&str]| {
        let (cert, key) = (c(&format!("{who}.pem")), c(&format!("{who}.key")));
        let tls = [
            "--tls-ca",
            &c("ca.pem"),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        tether(&server.addr, &[&tls[..], args].concat())
    };
    let started = with_cert(
        "admin",
        &[
            "workflow",
            "start",
            "--type",
            "t",
            "--task-queue",
            "q",
            "--id",
            "secured-1",
        ],
    );
    assert!(started.status.success(), "{}", stderr(&started));
    let denied = with_cert("client", &["workflow", "list"]);
    assert!(
        !denied.status.success() && stderr(&denied).contains("no grant"),
        "the client has no grant: {}",
        stderr(&denied)
    );
    let listed = http_get(&format!("{ui}/api/ns/default/workflows"));
    assert!(listed.starts_with("HTTP/1.1 200"), "{listed}");
    assert!(listed.contains("\"workflow_id\":\"secured-1\""), "{listed}");
    // Read-only: the API answers GET and nothing else.
    for method in ["POST", "PUT", "DELETE"] {
        let reply = http_request(method, &format!("{ui}/api/ns/default/workflows"));
        assert!(reply.starts_with("HTTP/1.1 405"), "{method}: {reply}");
    }
}

#[test]
fn dev_serves_the_web_ui_and_status_summarises_the_fleet() {
    let server = spawn_server(&["dev", "--ui-listen", "127.0.0.1:0"]);
    let ui = server.ui_url();
    let page = http_get(&format!("{ui}/ns/default/fleet"));
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("/assets/app.js"), "{page}");
    assert!(
        page.contains("content-security-policy: default-src 'self'"),
        "{page}"
    );
    // Work waiting on a queue nobody polls.
    let start = [
        "workflow",
        "start",
        "--type",
        "t",
        "--task-queue",
        "orders",
        "--id",
        "w-1",
    ];
    assert!(tether(&server.addr, &start).status.success());
    let fleet = http_get(&format!("{ui}/api/ns/default/queues"));
    assert!(fleet.contains("\"task_queue\":\"orders\""), "{fleet}");
    let missing = http_get(&format!("{ui}/api/ns/nowhere/fleet"));
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    let listed = ok_json(
        &server.addr,
        &["workflow", "list", "--type", "t", "--id-prefix", "w-"],
    );
    assert_eq!(listed[0]["workflow_id"], "w-1");
    let none = ok_json(
        &server.addr,
        &["workflow", "list", "--task-queue", "elsewhere"],
    );
    assert_eq!(none, serde_json::json!([]));

    let summary = ok_json(&server.addr, &["status"]);
    assert_eq!(summary["queues"][0]["task_queue"], "orders");
    assert_eq!(summary["queues"][0]["workflow_backlog"], 1);
    assert_eq!(summary["workers_by_state"], serde_json::json!({}));
    let text = tether(&server.addr, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("workers:   none"), "{text}");
    assert!(
        text.contains("orders: 1 workflow tasks, 0 activity tasks waiting"),
        "{text}"
    );

    // --watch --json: a summary per line that follows the server; the text form redraws in
    // place.
    let watch = |json: bool| {
        let mut command = Command::new(BIN);
        command.args(["--address", &server.addr, "status", "--watch", "100ms"]);
        if json {
            command.arg("--json");
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = read_lines(child.stdout.take().unwrap());
        let errors = read_lines(child.stderr.take().unwrap());
        (KillOnDrop(child), lines, errors)
    };
    let next_line = |lines: &std::sync::mpsc::Receiver<String>, what: &str| {
        lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no line with {what}: {e}"))
    };
    let (mut watcher, lines, errors) = watch(true);
    let backlog = |line: &str| -> i64 {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        v["queues"][0]["workflow_backlog"].as_i64().unwrap()
    };
    assert_eq!(backlog(&next_line(&lines, "a first summary")), 1);
    let mut second = start.to_vec();
    let last = second.len() - 1;
    second[last] = "w-2";
    assert!(tether(&server.addr, &second).status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while backlog(&next_line(&lines, "the new backlog")) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the watch never showed the second workflow"
        );
    }

    let (_text_watcher, text_lines, _) = watch(false);
    // Two redraws, each starting from the top of a cleared screen, the first one whole.
    let mut redraws = 0;
    let mut first_drawing = Vec::new();
    while redraws < 2 {
        let line = next_line(&text_lines, "a redraw");
        if line.starts_with("\x1b[H\x1b[2Jtether status: namespace default") {
            redraws += 1;
        } else if redraws == 1 {
            first_drawing.push(line);
        }
    }
    assert!(
        first_drawing
            .iter()
            .any(|l| l.contains("orders: 2 workflow tasks, 0 activity tasks waiting")),
        "{first_drawing:?}"
    );

    // The server goes away: the watch says so on stderr, and goes on trying (it says so
    // again, and has not exited).
    drop(server);
    for attempt in ["the server being gone", "a second try"] {
        let said = next_line(&errors, attempt);
        assert!(said.contains("trying again"), "{said}");
    }
    assert!(
        watcher.0.try_wait().unwrap().is_none(),
        "the watch is still running"
    );
}

/// Sends each line `from` writes down a channel, from a thread of its own.
fn read_lines(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}
