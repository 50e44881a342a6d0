//! The server's settings.

use crate::clock::Clock;
use crate::store::SyncMode;
use std::time::Duration;
use tether_wire::MAX_GRPC_MESSAGE;

/// Server settings. Defaults are written on each field.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest a poll (or a result wait) is held open. Default 60 s.
    pub long_poll_timeout: Duration,
    /// Largest payload accepted. Default 2 MiB.
    pub max_payload_bytes: usize,
    /// Durability of each commit. Default [`SyncMode::Full`].
    pub sync_mode: SyncMode,
    /// A worker that sends no heartbeat or poll for this long is dead. Default 15 s.
    pub worker_liveness_timeout: Duration,
    /// TLS (and, with a client CA, mTLS). Default: plaintext (loopback development only).
    pub tls: Option<tether_core::tls::ServerTls>,
    /// Who may do what where (needs mTLS: identities come from client certificates). Default:
    /// everything is allowed. These are the rules at start; `LocalServer::replace_access`
    /// swaps them while running.
    pub access: Option<std::sync::Arc<crate::auth::Access>>,
    /// Most events one workflow run's history may hold. Default 50,000.
    pub max_history_events: u64,
    /// Most activities one workflow run may have pending at once. Default 2,000.
    pub max_pending_activities: usize,
    /// Most requests per second from one caller (certificate identity, else address); 0 turns
    /// the limit off. Default 100,000 (all plaintext callers on one address share a bucket).
    pub max_requests_per_second: u32,
    /// How often closed runs past their namespace's retention are deleted. Default 60 s.
    pub retention_sweep_interval: Duration,
    /// Record metrics (requests, commits, open runs, sessions, workers, backlogs) through the
    /// `metrics` facade; whoever installs a recorder (`tether server --metrics-listen`) serves
    /// them. Default off.
    pub metrics: bool,
    /// Largest encoded size of one run's history (signals and other appends past it are
    /// refused with RESOURCE_EXHAUSTED), kept well below the largest message the server sends
    /// so that whatever was accepted can always be delivered. Default 40 MiB.
    pub max_history_bytes: u64,
    /// How long a commit waits for another process's lock on the database file before it
    /// fails (and the server stops taking writes). Default 10 s.
    pub store_busy_timeout: Duration,
    /// Where the engine reads the time. Default the system's wall clock; tests of the engine
    /// run it on tokio's paused time with [`Clock::following_tokio`].
    pub clock: Clock,
    /// How this server takes part in a cluster of replicas (on PostgreSQL only; SQLite is one
    /// server's alone).
    pub replica: ReplicaConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            long_poll_timeout: Duration::from_secs(60),
            max_payload_bytes: tether_core::types::DEFAULT_MAX_PAYLOAD_BYTES,
            sync_mode: SyncMode::Full,
            worker_liveness_timeout: Duration::from_secs(15),
            tls: None,
            access: None,
            max_history_events: 50_000,
            max_pending_activities: 2_000,
            max_requests_per_second: 100_000,
            retention_sweep_interval: Duration::from_secs(60),
            metrics: false,
            max_history_bytes: DEFAULT_MAX_HISTORY_BYTES,
            store_busy_timeout: crate::store::DEFAULT_BUSY_TIMEOUT,
            clock: Clock::system(),
            replica: ReplicaConfig::default(),
        }
    }
}

/// Default `ServerConfig::max_history_bytes`.
pub const DEFAULT_MAX_HISTORY_BYTES: u64 = 40 * 1024 * 1024;

impl ServerConfig {
    /// Checks that the settings fit together: a history at its limit, plus one more payload,
    /// must fit in the largest message the server sends and clients accept.
    pub fn validate(&self) -> Result<(), String> {
        let room = MAX_GRPC_MESSAGE as u64;
        let needed = self
            .max_history_bytes
            .saturating_add(2 * self.max_payload_bytes as u64)
            .saturating_add(1024 * 1024);
        if needed > room {
            return Err(format!(
                "max history bytes ({}) plus room for two payloads of max payload bytes ({}) \
                 do not fit in the largest message ({room} bytes); lower one of them",
                self.max_history_bytes, self.max_payload_bytes
            ));
        }
        if self.max_history_bytes < 64 * 1024 {
            return Err(format!(
                "max history bytes of {} is too small to hold a run; give at least 65536",
                self.max_history_bytes
            ));
        }
        self.replica.validate()
    }
}

/// How a server takes part in a cluster (used with PostgreSQL).
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id, unique in the cluster. Default (empty): `HOST:PORT`, the host's name
    /// and the port it listens on (a restart on the same port is the same replica).
    pub id: String,
    /// Where clients and workers reach this replica (`http://HOST:PORT`), recorded for the
    /// other replicas to redirect to. Default (empty): the address it listens on.
    pub advertise_address: String,
    /// A replica that has not renewed its leases for this long loses them, and another
    /// replica takes its namespaces over. Default 8 s.
    pub lease_timeout: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            id: String::new(),
            advertise_address: String::new(),
            lease_timeout: Duration::from_secs(8),
        }
    }
}

impl ReplicaConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.lease_timeout < Duration::from_secs(1)
            || self.lease_timeout > Duration::from_secs(600)
        {
            return Err(format!(
                "a lease timeout of {:?} is out of range; give between 1 s and 10 min (default 8 s)",
                self.lease_timeout
            ));
        }
        if self.id.len() > 200 || self.id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "replica id {:?} must be at most 200 characters, without spaces",
                self.id
            ));
        }
        Ok(())
    }

    /// How often leases are renewed and the cluster read: often enough that a lease is
    /// renewed several times within its timeout, and a lapsed one taken over soon after.
    pub fn tick(&self) -> Duration {
        (self.lease_timeout / 8).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}
