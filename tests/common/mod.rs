//! The one harness every integration test uses: an in-process server on an ephemeral loopback
//! port over a temporary data directory, plus helpers to build clients and workers.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};
use tether::client::{Client, ClientOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::store::SyncMode;
use tether::worker::{Worker, WorkerOptions};

pub struct TestEnv {
    pub server: Option<LocalServer>,
    pub dir: tempfile::TempDir,
    pub client: Client,
    pub listen: String,
    pub config: ServerConfig,
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
        let server = LocalServer::start("127.0.0.1:0", dir.path(), config.clone())
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
            client,
            listen,
            config,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Stops the server (everything acknowledged is durable) and starts a new one on the same
    /// data directory and address.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("server stops cleanly");
        }
        let server = LocalServer::start(&self.listen, self.dir.path(), self.config.clone())
            .await
            .expect("server restarts on the same data dir");
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
