//! The one harness every integration test uses: an in-process server on an ephemeral loopback
//! port, plus helpers to build clients and workers.
//!
//! The server's store depends on the test target: a target whose name ends in `_on_postgres`
//! (the same test file built a second time, declared in Cargo.toml) runs every server on
//! PostgreSQL, one throwaway cluster per test binary and a fresh database per [`TestEnv`];
//! every other target runs on SQLite in a temporary directory.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tether::client::{Client, ClientOptions};
use tether::server::{LocalServer, ServerConfig, StoreLocation};
use tether::store::{SyncMode, TestCluster};
use tether::worker::{Worker, WorkerOptions};

pub struct TestEnv {
    pub server: Option<LocalServer>,
    /// The SQLite data directory (unused, but kept, on PostgreSQL).
    pub dir: tempfile::TempDir,
    pub location: StoreLocation,
    pub client: Client,
    pub listen: String,
    pub config: ServerConfig,
}

/// Whether this test binary runs its servers on PostgreSQL.
pub fn on_postgres() -> bool {
    env!("CARGO_CRATE_NAME").ends_with("_on_postgres")
}

/// Where a new test server keeps its state: a fresh SQLite directory, or a fresh database on
/// this binary's cluster.
async fn new_location(dir: &std::path::Path) -> StoreLocation {
    if !on_postgres() {
        return StoreLocation::Sqlite(dir.to_path_buf());
    }
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    static DATABASES: AtomicUsize = AtomicUsize::new(0);
    let cluster = CLUSTER.get_or_init(|| {
        let cluster =
            TestCluster::start().unwrap_or_else(|e| panic!("these tests need PostgreSQL: {e}"));
        cluster
            .stop_when_this_process_exits()
            .unwrap_or_else(|e| panic!("{e}"));
        cluster
    });
    let name = format!("test_{}", DATABASES.fetch_add(1, Ordering::Relaxed));
    let url = cluster
        .create_database(&name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    StoreLocation::Postgres(url)
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        long_poll_timeout: Duration::from_secs(10),
        sync_mode: SyncMode::Normal,
        ..Default::default()
    }
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: ServerConfig) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = new_location(dir.path()).await;
        let server = LocalServer::start_on("127.0.0.1:0", location.clone(), config.clone())
            .await
            .expect("server starts");
        let listen = server.addr().to_string();
        let client = Client::connect_with(
            server.url(),
            ClientOptions {
                identity: "test-client".into(),
                ..Default::default()
            },
        )
        .await
        .expect("client connects");
        TestEnv {
            server: Some(server),
            dir,
            location,
            client,
            listen,
            config,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Stops the server (everything acknowledged is durable) and starts a new one on the same
    /// store and address.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("server stops cleanly");
        }
        let server =
            LocalServer::start_on(&self.listen, self.location.clone(), self.config.clone())
                .await
                .expect("server restarts on the same store");
        self.server = Some(server);
    }

    pub fn worker(&self, queue: &str, identity: &str) -> Worker {
        Worker::new(
            self.client.clone(),
            WorkerOptions::new(queue)
                .identity(identity)
                .graceful_shutdown(Duration::from_secs(2)),
        )
    }
}

/// Waits until `check` returns Some, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a future with a deadline so a bug makes the test fail instead of hang.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

pub fn event_kinds(events: &[tether::api::pb::HistoryEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind_name()).collect()
}

/// Fails the test if any workflow task of the run failed (a replay bug would show up here even
/// when a retry later hides it).
pub async fn assert_no_task_failures(handle: &tether::client::WorkflowHandle) {
    let d = handle.describe().await.expect("describe");
    assert_eq!(
        d.workflow_task_failures, 0,
        "workflow task failures: last was {:?}",
        d.last_workflow_task_failure
    );
}

/// The `tether` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A `tether server` (or `tether dev`) child process, killed when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: String,
    /// The server's stderr lines after the "listening" one.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Waits for a stderr line containing `text`; returns it.
    pub fn wait_for_line(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => continue,
                Err(e) => panic!("the server printed no line with {text:?}: {e}"),
            }
        }
    }

    /// The web UI's base URL (no trailing slash), from the server's "web UI at" line.
    pub fn ui_url(&self) -> String {
        let line = self.wait_for_line("web UI at http://");
        line.split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("a URL on the line")
            .trim_end_matches('/')
            .to_string()
    }

    /// SIGKILL: no shutdown, no flush, exactly what a crash leaves behind.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tether ARGS` (with `--listen 127.0.0.1:0` unless ARGS name a listen address) and
/// reads the bound address from its stderr.
pub fn spawn_server(args: &[&str]) -> ServerProcess {
    try_spawn_server(args).unwrap_or_else(|why| panic!("{why}"))
}

/// [`spawn_server`], answering why when the server did not start.
pub fn try_spawn_server(args: &[&str]) -> Result<ServerProcess, String> {
    use std::io::{BufRead, BufReader};
    let mut command = std::process::Command::new(BIN);
    command.args(args);
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("tether server listening on ") {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(addr);
            } else {
                let _ = lines_tx.send(line);
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(e) => {
            // What it printed says why it did not start.
            let printed: Vec<String> = lines.try_iter().collect();
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!(
                "the server printed no address ({e}; it exited: {status}); it printed:\n{}",
                printed.join("\n")
            ));
        }
    };
    Ok(ServerProcess { child, addr, lines })
}

/// Holds SQLite's write lock on the server's database from another connection, as a second
/// process (a backup tool, an operator's sqlite3 shell) would: commits wait behind it.
pub struct WriteLock(rusqlite::Connection);

impl WriteLock {
    pub fn take(dir: &std::path::Path) -> WriteLock {
        let conn = rusqlite::Connection::open(dir.join("tether.db")).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(conn)
    }

    pub fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

/// A `tether server` replica on the PostgreSQL database `url`, as replica `id` with lease
/// timeout `lease`, listening on `listen` (port 0 for any).
pub fn spawn_replica(url: &str, id: &str, lease: &str, listen: &str) -> ServerProcess {
    try_spawn_replica(url, id, lease, listen).unwrap_or_else(|why| panic!("{why}"))
}

/// [`spawn_replica`], answering why when the replica did not start.
pub fn try_spawn_replica(
    url: &str,
    id: &str,
    lease: &str,
    listen: &str,
) -> Result<ServerProcess, String> {
    try_spawn_replica_with(url, id, lease, listen, &[])
}

/// [`try_spawn_replica`] with more flags.
pub fn try_spawn_replica_with(
    url: &str,
    id: &str,
    lease: &str,
    listen: &str,
    more: &[&str],
) -> Result<ServerProcess, String> {
    let args = [
        "server",
        "--database-url",
        url,
        "--replica-id",
        id,
        "--lease-timeout",
        lease,
        "--listen",
        listen,
    ];
    try_spawn_server(&[&args[..], more].concat())
}

/// A worker on `queue` as `identity` with workflow `doubled_after_signal`: it doubles its input
/// in an activity (`double`), sleeps 100 ms, waits for signal `add` and returns the sum.
pub fn doubling_worker(
    client: &tether::client::Client,
    queue: &str,
    identity: &str,
) -> tether::worker::Worker {
    use tether::activity::{ActivityContext, ActivityError};
    use tether::client::ActivityOptions;
    use tether::workflow::{WorkflowContext, WorkflowError};
    let mut w = tether::worker::Worker::new(
        client.clone(),
        tether::worker::WorkerOptions::new(queue)
            .identity(identity)
            .state_dir(None)
            .build()
            .unwrap(),
    );
    w.register_activity("double", |_ctx: ActivityContext, n: u64| async move {
        Ok::<_, ActivityError>(n * 2)
    });
    w.register_workflow(
        "doubled_after_signal",
        |ctx: WorkflowContext, n: u64| async move {
            let doubled: u64 = ctx
                .execute_activity("double", &n, ActivityOptions::default())
                .await?;
            ctx.sleep(Duration::from_millis(100)).await;
            let add: u64 = ctx.signal_channel("add").recv().await?;
            Ok::<_, WorkflowError>(doubled + add)
        },
    );
    w
}

/// GET over plain HTTP/1.1, returning the whole response (headers and body).
pub fn http_get(url: &str) -> String {
    http_request("GET", url)
}

/// A body-less request over plain HTTP/1.1, returning the whole response.
pub fn http_request(method: &str, url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// url");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut conn = std::net::TcpStream::connect(host).expect("connect");
    write!(
        conn,
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    out
}

/// Kills a child process when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tether --address ADDR ARGS...`, run to its end.
pub fn tether(addr: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["--address", addr])
        .args(args)
        .output()
        .expect("run tether")
}

/// `tether ... --json` that must succeed, and its stdout as JSON.
pub fn ok_json(addr: &str, args: &[&str]) -> serde_json::Value {
    let out = tether(addr, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "tether {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What a finished command wrote on stderr.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must end by itself, killing it (and failing the test) after `limit`.
pub fn output_within(command: &mut std::process::Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{command:?} was still running after {limit:?}; it printed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}
