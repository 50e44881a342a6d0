//! Serving the API: the listener, TLS, the request layers (rate limit, metrics), and
//! [`LocalServer`], a server in this process over a data directory.

use crate::cluster::Replica;
use crate::config::ServerConfig;
use crate::engine::{Engine, EngineStats, StorageFailure};
use crate::error::EngineError;
use crate::frontend::Frontend;
use crate::store::{PostgresStore, SqliteStore, Store};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tether_wire::pb::tether_service_server::TetherServiceServer;
use tether_wire::MAX_GRPC_MESSAGE;

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
    let engine = Engine::open(store, config.clone()).await?;
    serve(listener, Served::One(engine), config, shutdown).await
}

/// Where a server keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded SQLite store in this directory (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL (`postgres://USER@HOST:PORT/DATABASE`).
    Postgres(String),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(dir) => write!(f, "SQLite in {}", dir.display()),
            StoreLocation::Postgres(url) => {
                write!(
                    f,
                    "PostgreSQL at {}",
                    crate::store::redact_database_url(url)
                )
            }
        }
    }
}

/// A server started in this process (for `tether dev`, `tether server`, examples and tests).
pub struct LocalServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
    store: Arc<dyn Store>,
    location: StoreLocation,
    serving: Served,
}

/// What a server serves: one engine for every namespace, or (on PostgreSQL) a cluster replica's
/// engines of the namespaces it holds.
#[derive(Clone)]
enum Served {
    One(Arc<Engine>),
    Replica(Arc<Replica>),
}

impl LocalServer {
    /// Opens the SQLite store in `data_dir` and serves on `listen` (use port 0 for any).
    pub async fn start(
        listen: &str,
        data_dir: &Path,
        config: ServerConfig,
    ) -> Result<LocalServer, ServeError> {
        Self::start_on(
            listen,
            StoreLocation::Sqlite(data_dir.to_path_buf()),
            config,
        )
        .await
    }

    /// Opens the store at `location` and serves on `listen` (use port 0 for any).
    pub async fn start_on(
        listen: &str,
        location: StoreLocation,
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
        let mut postgres = None;
        let store: Arc<dyn Store> = match &location {
            StoreLocation::Sqlite(dir) => Arc::new(SqliteStore::open_with(
                dir,
                config.sync_mode,
                config.store_busy_timeout,
            )?),
            StoreLocation::Postgres(url) => {
                // Connecting blocks until the database answers (or fails to).
                let url = url.clone();
                let connected = tokio::task::spawn_blocking(move || PostgresStore::connect(&url))
                    .await
                    .map_err(|e| ServeError::Engine(EngineError::Internal(e.to_string())))?;
                let connected = Arc::new(connected?);
                postgres = Some(connected.clone());
                connected
            }
        };
        // Recover before accepting so that start-up errors surface here, not in the task.
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // On PostgreSQL every server is a cluster replica, a lone one included: the leases
        // are what keeps two servers on one database from both writing a namespace.
        let serving = match postgres {
            None => Served::One(Engine::open(store.clone(), config.clone()).await?),
            Some(shared) => Served::Replica(
                Replica::start(shared, config.clone(), &format!("{scheme}://{addr}")).await?,
            ),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, serving.clone(), config, async move {
            let _ = stop_rx.await;
        }));
        Ok(LocalServer {
            serving,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
            store,
            location,
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

    /// Where it keeps its state.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// What the engine holds in memory now (runs, sessions, timers, waiters).
    pub fn stats(&self) -> EngineStats {
        match &self.serving {
            Served::One(engine) => engine.stats(),
            Served::Replica(replica) => replica.stats(),
        }
    }

    /// Read-only calls on this server from inside its process (the web UI's).
    pub fn reader(&self) -> crate::frontend::Reader {
        crate::frontend::Reader::new(match &self.serving {
            Served::One(engine) => Frontend::new(engine.clone()),
            Served::Replica(replica) => Frontend::for_replica(replica.clone()),
        })
    }

    /// The cluster replica this server is, when it runs on PostgreSQL.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        match &self.serving {
            Served::One(_) => None,
            Served::Replica(replica) => Some(replica),
        }
    }

    /// Resolves when the store failed a write: from then on every request is refused, and the
    /// server should be restarted (`tether server` exits). Never, for a cluster replica: a
    /// namespace whose write failed is reopened from the database, by this replica or another.
    pub async fn storage_failed(&self) -> StorageFailure {
        match &self.serving {
            Served::One(engine) => engine.storage_failed().await,
            Served::Replica(_) => std::future::pending().await,
        }
    }

    /// Puts new access rules in force (e.g. after the access file changed). Refused when the
    /// server runs without authorization.
    pub fn replace_access(&self, access: crate::auth::Access) -> Result<(), EngineError> {
        match &self.serving {
            Served::One(engine) => engine.replace_access(access),
            Served::Replica(replica) => replica.replace_access(access),
        }
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

/// Serves the API (and a lone engine's loops) until `shutdown` resolves.
async fn serve(
    listener: tokio::net::TcpListener,
    serving: Served,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = config.tls.clone();
    let (frontend, engine_loops) = match &serving {
        Served::One(engine) => (
            Frontend::new(engine.clone()),
            vec![
                tokio::spawn(engine.clone().run_timers()),
                tokio::spawn(engine.clone().run_liveness()),
                tokio::spawn(engine.clone().run_retention()),
            ],
        ),
        // A replica runs each namespace's loops with its engine.
        Served::Replica(replica) => (Frontend::for_replica(replica.clone()), Vec::new()),
    };
    let limiter = Arc::new(RateLimiter::new(config.max_requests_per_second));
    let service = TetherServiceServer::new(frontend)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |req| {
        limiter.admit(req)
    });
    let service = RequestMetrics {
        inner: service,
        enabled: config.metrics,
    };
    let serving_for_shutdown = serving.clone();
    let shutdown = async move {
        shutdown.await;
        match &serving_for_shutdown {
            Served::One(engine) => engine.begin_shutdown(),
            // Parked calls end as each engine stops, after the listener stops taking calls.
            Served::Replica(replica) => replica.begin_stop(),
        }
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
    match &serving {
        Served::One(engine) => {
            engine.begin_shutdown();
            for task in engine_loops {
                let _ = task.await;
            }
            engine.take_back_remaining().await;
        }
        Served::Replica(replica) => replica.stop().await,
    }
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
        let ids = crate::auth::attach_identities(&mut req);
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
