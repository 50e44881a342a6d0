//! The tether server: a gRPC frontend (validation, limits, error mapping) over the [`Engine`]
//! (history state machine, matching, timers) over a [`Store`](crate::store::Store).
#![warn(missing_docs)]

pub mod auth;
mod engine;
mod frontend;
pub mod history;
pub mod matching;
pub mod sessions;
pub mod store;
pub mod timers;

/// The server's persisted state of runs and sessions (`proto/tether/internal/state.proto`).
/// Internal: kept in protobuf so stored state stays readable across versions, but no part of
/// the public API.
#[allow(clippy::all, missing_docs)]
pub mod state {
    tonic::include_proto!("tether.internal");
}

pub use engine::{Engine, EngineStats, NextTasks, StartedActivity, StorageFailure};
pub use frontend::Frontend;

use crate::store::{SqliteStore, Store, SyncMode};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb::tether_service_server::TetherServiceServer;

/// Why an engine operation was refused or failed. Each variant maps to one gRPC code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request was malformed (NOT retryable as is).
    #[error("{0}")]
    InvalidArgument(String),
    /// The namespace does not exist.
    #[error("namespace {0:?} does not exist; create it with `tether namespace create {0}`")]
    NamespaceNotFound(String),
    /// The workflow, run or activity does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The target exists but is no longer running.
    #[error("{0}")]
    NotRunning(String),
    /// A run with this id is already running.
    #[error("{} id {workflow_id:?} is already running as run {run_id}", if *.standalone { "activity" } else { "workflow" })]
    WorkflowAlreadyStarted {
        /// The id.
        workflow_id: String,
        /// The running run.
        run_id: String,
        /// The id is a standalone activity's.
        standalone: bool,
    },
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A task token names an attempt or dispatch that is no longer current.
    #[error("stale task: {0}")]
    StaleTask(String),
    /// A payload is over the size limit.
    #[error("{what} is {size} bytes; the limit is {limit} bytes")]
    PayloadTooLarge {
        /// Which payload.
        what: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A limit would be exceeded (history length, pending activities, request rate).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server cannot serve now (storage failed, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The request lost a race with other changes and was not applied; retrying with fresh
    /// state succeeds (a workflow task that would close the run while new events arrived).
    #[error("{0}")]
    Aborted(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Longest message an error carries: whatever produced it, the caller's input never comes
/// back in full (a client library may not even be able to read a huge `grpc-message`).
const MAX_ERROR_MESSAGE: usize = 1_000;

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        let msg = tether_core::types::quote_prefix(&e.to_string(), MAX_ERROR_MESSAGE);
        match e {
            EngineError::InvalidArgument(_) | EngineError::PayloadTooLarge { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            EngineError::NamespaceNotFound(_) | EngineError::NotFound(_) => {
                tonic::Status::not_found(msg)
            }
            EngineError::NotRunning(_) | EngineError::StaleTask(_) => {
                tonic::Status::failed_precondition(msg)
            }
            EngineError::WorkflowAlreadyStarted { ref run_id, .. } => {
                let mut status = tonic::Status::already_exists(msg);
                if let Ok(v) = run_id.parse() {
                    status.metadata_mut().insert(RUN_ID_METADATA, v);
                }
                status
            }
            EngineError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            EngineError::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            EngineError::Unavailable(_) => tonic::Status::unavailable(msg),
            EngineError::Aborted(_) => tonic::Status::aborted(msg),
            EngineError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

pub use tether_wire::RUN_ID_METADATA;

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
    pub access: Option<std::sync::Arc<auth::Access>>,
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
        Ok(())
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The engine could not recover.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The settings do not fit together.
    #[error("invalid server settings: {0}")]
    Config(String),
    /// Binding the listener failed.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
}

pub use tether_wire::MAX_GRPC_MESSAGE;

/// The server's TLS files as tonic's configuration (mTLS when a client CA is set).
fn server_tls_config(tls: &tether_core::tls::ServerTls) -> tonic::transport::ServerTlsConfig {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    if let Some(ca) = &tls.client_ca_pem {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    config
}

/// Serves the API on `listener` over `store` until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let tls = config.tls.clone();
    let engine = Engine::open(store, config).await?;
    serve_engine(listener, engine, tls, shutdown).await
}

/// A server started in this process (for `tether dev`, examples and tests).
pub struct LocalServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
    store: Arc<SqliteStore>,
    data_dir: PathBuf,
    engine: Arc<Engine>,
}

impl LocalServer {
    /// Opens the SQLite store in `data_dir` and serves on `listen` (use port 0 for any).
    pub async fn start(
        listen: &str,
        data_dir: &Path,
        config: ServerConfig,
    ) -> Result<LocalServer, ServeError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        config.validate().map_err(ServeError::Config)?;
        let store = Arc::new(SqliteStore::open_with(
            data_dir,
            config.sync_mode,
            config.store_busy_timeout,
        )?);
        // Recover before accepting so that start-up errors surface here, not in the task.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) =
            tokio::sync::oneshot::channel::<Result<Arc<Engine>, ServeError>>();
        let store_dyn: Arc<dyn Store> = store.clone();
        let task = tokio::spawn(async move {
            let engine = match Engine::open(store_dyn, config.clone()).await {
                Ok(e) => {
                    let _ = ready_tx.send(Ok(e.clone()));
                    e
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(ServeError::Engine(e.clone())));
                    return Err(ServeError::Engine(e));
                }
            };
            serve_engine(listener, engine, config.tls.clone(), async move {
                let _ = stop_rx.await;
            })
            .await
        });
        let engine = match ready_rx.await {
            Ok(Ok(engine)) => engine,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(ServeError::Engine(EngineError::Internal(
                    "server task ended during start-up".into(),
                )))
            }
        };
        Ok(LocalServer {
            engine,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
            store,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for clients and workers.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What the engine holds in memory now (runs, sessions, timers, waiters).
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    /// Resolves when the store failed a write: from then on every request is refused, and the
    /// server should be restarted (`tether server` exits).
    pub async fn storage_failed(&self) -> StorageFailure {
        self.engine.storage_failed().await
    }

    /// Puts new access rules in force (e.g. after the access file changed). Refused when the
    /// server runs without authorization.
    pub fn replace_access(&self, access: auth::Access) -> Result<(), EngineError> {
        self.engine.replace_access(access)
    }

    /// Stops serving and closes the store (everything acknowledged is already durable).
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        result
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve_engine(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    tls: Option<tether_core::tls::ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let timers = tokio::spawn(engine.clone().run_timers());
    let liveness = tokio::spawn(engine.clone().run_liveness());
    let retention = tokio::spawn(engine.clone().run_retention());
    let limiter = Arc::new(RateLimiter::new(engine.max_requests_per_second()));
    let service = TetherServiceServer::new(Frontend::new(engine.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req| {
        limiter.admit(req)
    });
    let service = RequestMetrics {
        inner: service,
        enabled: engine.metrics_enabled(),
    };
    let engine_for_shutdown = engine.clone();
    let shutdown = async move {
        shutdown.await;
        engine_for_shutdown.begin_shutdown();
    };
    // With our own listener the builder's nodelay setting does not apply: set it per connection,
    // or Nagle's algorithm adds ~40 ms to every small reply.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.and_then(|stream| {
                stream.set_nodelay(true)?;
                Ok(stream)
            })
        },
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        tether_core::tls::install_crypto_provider();
        builder = builder.tls_config(server_tls_config(tls))?;
    }
    let result = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    engine.begin_shutdown();
    let _ = timers.await;
    let _ = liveness.await;
    let _ = retention.await;
    engine.take_back_remaining().await;
    result.map_err(ServeError::from)
}

/// Counts requests per gRPC method and status code and times them (when metrics are on).
#[derive(Clone)]
struct RequestMetrics<S> {
    inner: S,
    enabled: bool,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for RequestMetrics<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, ResBody> tonic::codegen::Service<tonic::codegen::http::Request<B>> for RequestMetrics<S>
where
    S: tonic::codegen::Service<
        tonic::codegen::http::Request<B>,
        Response = tonic::codegen::http::Response<ResBody>,
    >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // Unboxed when metrics are off: no allocation per request for nothing.
    type Future = futures::future::Either<
        S::Future,
        futures::future::BoxFuture<'static, Result<S::Response, S::Error>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if !self.enabled {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let started = std::time::Instant::now();
        let reply = self.inner.call(req);
        futures::future::Either::Right(Box::pin(async move {
            let reply = reply.await;
            // Unary replies carry an error's status in the headers (trailers-only response);
            // a success has it in the trailers, so no header means OK.
            let code = match &reply {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            // Unknown methods share one label: a caller must not be able to mint series.
            let method = if code == tonic::Code::Unimplemented {
                "unknown".to_string()
            } else {
                method
            };
            metrics::counter!(
                "tether_requests_total",
                "method" => method.clone(),
                "code" => format!("{code:?}")
            )
            .increment(1);
            metrics::histogram!("tether_request_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            reply
        }))
    }
}

/// A token bucket per caller (certificate identity, else remote address).
struct RateLimiter {
    per_second: u32,
    buckets: parking_lot::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl RateLimiter {
    fn new(per_second: u32) -> Self {
        RateLimiter {
            per_second,
            buckets: Default::default(),
        }
    }

    fn admit(&self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        // Parsed once here for both the rate limit and authorization.
        let ids = auth::attach_identities(&mut req);
        if self.per_second == 0 {
            return Ok(req);
        }
        let who = ids
            .and_then(|ids| ids.first().cloned())
            .or_else(|| req.remote_addr().map(|a| a.ip().to_string()))
            .unwrap_or_else(|| "unknown".into());
        let now = std::time::Instant::now();
        let rate = self.per_second as f64;
        let mut buckets = self.buckets.lock();
        if buckets.len() > 100_000 {
            // Forget idle callers so the map cannot grow without bound.
            buckets.retain(|_, (_, t)| now.duration_since(*t).as_secs() < 60);
        }
        let (tokens, last) = buckets.entry(who.clone()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens < 1.0 {
            return Err(tonic::Status::resource_exhausted(format!(
                "caller {who:?} exceeded {} requests per second; slow down and retry",
                self.per_second
            )));
        }
        *tokens -= 1.0;
        Ok(req)
    }
}
