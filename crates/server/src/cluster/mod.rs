//! Several server replicas on one PostgreSQL database.
//!
//! The unit of ownership is the namespace: each has a lease row (owner, epoch, expiry by the
//! database's clock), and the replica holding it runs that namespace's [`Engine`] over a
//! [`NamespaceStore`], whose every transaction first checks the lease (the fence). A
//! replica that lost its lease (it was paused, or cut off) commits nothing more: its engine
//! fails on its next write and is dropped. Why namespaces rather than hash shards is in
//! ARCHITECTURE.md ("Replicas").
//!
//! Each replica runs one loop, every [`ReplicaConfig::tick`]: renew its leases and heartbeat,
//! drop the engines whose lease it no longer holds, read the cluster, take over lapsed leases
//! up to its fair share (namespaces / live replicas, rounded up), and give one away when it
//! holds more than that. A call for a namespace held elsewhere is answered UNAVAILABLE with
//! the holder's address in [`tether_wire::OWNER_METADATA`]; the SDK resends it there.

pub use crate::config::ReplicaConfig;
use crate::config::ServerConfig;
use crate::engine::{Engine, ForeignSignals};
use crate::error::EngineError;
use crate::history::OutgoingSignal;
use crate::store::{ClusterView, Fence, LeaseRow, NamespaceStore, PostgresStore, StoreError};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tether_core::types::Namespace;
use tether_wire::pb;
use tokio::task::JoinHandle;

/// A namespace this replica serves.
struct Held {
    engine: Arc<Engine>,
    epoch: i64,
    /// Its timers, liveness and retention loops (they end with the engine's shutdown).
    loops: Vec<JoinHandle<()>>,
    /// Waits for the engine's first failed write (it may never come: aborted at stop).
    failure_watch: JoinHandle<()>,
}

/// One server replica of a cluster: the namespaces it holds, and the cluster as last read.
pub struct Replica {
    me: Weak<Replica>,
    id: Arc<str>,
    address: String,
    lease: Duration,
    store: Arc<PostgresStore>,
    config: ServerConfig,
    held: Mutex<HashMap<Namespace, Held>>,
    /// Namespaces whose lease this replica took and whose engine is still recovering.
    opening: Mutex<HashSet<Namespace>>,
    view: RwLock<ClusterView>,
    /// When the last renewal that succeeded was sent: the leases are good until at least one
    /// lease timeout after it.
    renewed_at: Mutex<Option<Instant>>,
    access: RwLock<Option<Arc<crate::auth::Access>>>,
    stopping: tokio::sync::watch::Sender<bool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    /// Channels to other replicas, for signals to the namespaces they serve.
    peers: Mutex<HashMap<String, tonic::transport::Channel>>,
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Postgres(format!("a store call panicked: {e}")))?
}

/// A replica id made at start: the host's name and the port it listens on. No two live
/// processes on a host share a port, and a server restarted on its port is the same replica
/// again, so it takes its namespaces back at once instead of waiting for their leases to
/// lapse.
fn made_up_id(listen_address: &str) -> String {
    let host = host_name().unwrap_or_else(|| "replica".into());
    let port = listen_address.rsplit(':').next().unwrap_or("0");
    format!("{host}:{port}")
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
}

impl Replica {
    /// Joins the cluster on `store`: registers this replica at `listen_address` (unless
    /// [`ReplicaConfig::advertise_address`] says otherwise), takes the leases it may, opens
    /// their engines, and starts the loop that keeps them.
    pub async fn start(
        store: Arc<PostgresStore>,
        config: ServerConfig,
        listen_address: &str,
    ) -> Result<Arc<Replica>, EngineError> {
        let settings = config.replica.clone();
        let id: Arc<str> = if settings.id.is_empty() {
            made_up_id(listen_address).into()
        } else {
            settings.id.clone().into()
        };
        let address = if settings.advertise_address.is_empty() {
            listen_address.to_string()
        } else {
            settings.advertise_address.clone()
        };
        let (stopping, _) = tokio::sync::watch::channel(false);
        let replica = Arc::new_cyclic(|me| Replica {
            me: me.clone(),
            id: id.clone(),
            address: address.clone(),
            lease: settings.lease_timeout,
            store,
            access: RwLock::new(config.access.clone()),
            config,
            held: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashSet::new()),
            view: RwLock::new(ClusterView::default()),
            renewed_at: Mutex::new(None),
            stopping,
            ticker: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
        });
        let store = replica.store.clone();
        let (rid, raddr) = (id.to_string(), address.clone());
        blocking(move || store.register_replica(&rid, &raddr))
            .await
            .map_err(unavailable)?;
        // The first round before serving: a lone replica serves every namespace from its
        // first call.
        replica.tick().await;
        let looping = replica.clone();
        *replica.ticker.lock() = Some(tokio::spawn(async move { looping.run().await }));
        tracing::info!(replica = %id, address, lease_timeout = ?settings.lease_timeout, "joined the cluster");
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where clients reach it, as recorded for the other replicas.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// What its engines hold in memory, summed.
    pub fn stats(&self) -> crate::engine::EngineStats {
        let mut sum = crate::engine::EngineStats::default();
        for held in self.held.lock().values() {
            let s = held.engine.stats();
            sum.runs += s.runs;
            sum.sessions += s.sessions;
            sum.timers += s.timers;
            sum.result_waiters += s.result_waiters;
            sum.session_waiters += s.session_waiters;
        }
        sum
    }

    /// Ends the parked calls of every engine (the listener is stopping); [`Replica::stop`]
    /// then stops them and gives their leases back.
    pub fn begin_stop(&self) {
        let _ = self.stopping.send(true);
        for held in self.held.lock().values() {
            held.engine.begin_shutdown();
        }
    }

    /// The settings its engines run with (payload limit, rate limit, metrics).
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The namespaces this replica serves now, with their lease epochs.
    pub fn held(&self) -> Vec<(Namespace, i64)> {
        let mut held: Vec<_> = self
            .held
            .lock()
            .iter()
            .map(|(ns, h)| (ns.clone(), h.epoch))
            .collect();
        held.sort();
        held
    }

    /// The engine of `namespace` if this replica serves it; otherwise the status to answer:
    /// where its holder is, or that nobody holds it this moment (a takeover is due), or that it
    /// does not exist.
    pub async fn engine_for(&self, namespace: &str) -> Result<Arc<Engine>, tonic::Status> {
        if let Some(engine) = self.local_engine(namespace)? {
            return Ok(engine);
        }
        let lease = self.lease_of(namespace);
        let lease = match lease {
            Some(lease) => lease,
            None => {
                // It may have been created a moment ago elsewhere: look once more.
                self.refresh_view().await;
                if let Some(engine) = self.local_engine(namespace)? {
                    return Ok(engine);
                }
                self.lease_of(namespace).ok_or_else(|| {
                    tonic::Status::from(EngineError::NamespaceNotFound(namespace.to_string()))
                })?
            }
        };
        Err(self.elsewhere(&lease))
    }

    /// The engine for a namespace being created: a new one is claimed by this replica, an
    /// existing one is wherever it is served.
    pub async fn engine_for_new_namespace(
        &self,
        namespace: &str,
    ) -> Result<Arc<Engine>, tonic::Status> {
        if let Some(engine) = self.local_engine(namespace)? {
            return Ok(engine);
        }
        self.refresh_view().await;
        if self.lease_of(namespace).is_some() {
            return self.engine_for(namespace).await;
        }
        let namespace = Namespace::from(namespace);
        // Marked as opening before the claim: the loop, seeing a lease of this replica's
        // without an engine, must not claim it again meanwhile.
        if !self.opening.lock().insert(namespace.clone()) {
            return Err(self.local_engine(&namespace).err().unwrap_or_else(|| {
                tonic::Status::unavailable(format!(
                    "namespace {namespace:?} is being opened; retry in a moment"
                ))
            }));
        }
        let (store, id, ns, lease_ms) = (
            self.store.clone(),
            self.id.to_string(),
            namespace.clone(),
            self.lease.as_millis() as u64,
        );
        let claimed = blocking(move || store.claim_lease(&id, &ns, lease_ms)).await;
        if !matches!(claimed, Ok(Some(_))) {
            self.opening.lock().remove(&namespace);
        }
        let claimed = claimed.map_err(|e| tonic::Status::from(unavailable(e)))?;
        match claimed {
            Some(epoch) => {
                self.open(namespace.clone(), epoch)
                    .await
                    .map_err(tonic::Status::from)?;
                self.local_engine(&namespace)?.ok_or_else(|| {
                    tonic::Status::unavailable(format!(
                        "namespace {namespace:?} was taken over by another replica while it \
                         was being created; retry"
                    ))
                })
            }
            None => {
                self.refresh_view().await;
                self.engine_for(&namespace).await
            }
        }
    }

    /// Every namespace, from the database (this replica holds only its own in memory).
    pub async fn list_namespaces(&self) -> Result<Vec<pb::NamespaceInfo>, tonic::Status> {
        let store = self.store.clone();
        blocking(move || store.namespaces())
            .await
            .map_err(|e| tonic::Status::from(unavailable(e)))
    }

    /// The cluster as the database shows it now.
    pub async fn describe(&self) -> Result<pb::DescribeClusterResponse, tonic::Status> {
        let store = self.store.clone();
        let view = blocking(move || store.cluster_view())
            .await
            .map_err(|e| tonic::Status::from(unavailable(e)))?;
        let lease_ms = self.lease.as_millis() as i64;
        Ok(pb::DescribeClusterResponse {
            store: "postgres".into(),
            replicas: view
                .replicas
                .iter()
                .map(|r| pb::ReplicaInfo {
                    replica_id: r.replica_id.clone(),
                    address: r.address.clone(),
                    seen_ms_ago: r.seen_ms_ago,
                    up_ms: r.up_ms,
                    live: r.seen_ms_ago < lease_ms,
                })
                .collect(),
            leases: view
                .leases
                .iter()
                .map(|l| pb::LeaseInfo {
                    namespace: l.namespace.clone(),
                    owner: if l.is_held() {
                        l.owner.clone()
                    } else {
                        String::new()
                    },
                    epoch: l.epoch,
                    held_ms: l.held_ms,
                    renewed_ms_ago: l.renewed_ms_ago,
                    expires_in_ms: l.expires_in_ms,
                })
                .collect(),
            lease_timeout_ms: lease_ms as u64,
            answered_by: self.id.to_string(),
        })
    }

    /// The access rules in force.
    pub fn access(&self) -> Option<Arc<crate::auth::Access>> {
        self.access.read().clone()
    }

    /// Puts new access rules in force here and in every engine this replica runs.
    pub fn replace_access(&self, access: crate::auth::Access) -> Result<(), EngineError> {
        let access = Arc::new(access);
        {
            let mut current = self.access.write();
            if current.is_none() {
                return Err(EngineError::InvalidArgument(
                    "authorization is off (the server started without an access file); \
                     restart it with --access to turn it on"
                        .into(),
                ));
            }
            *current = Some(access.clone());
        }
        for held in self.held.lock().values() {
            held.engine.replace_access((*access).clone())?;
        }
        Ok(())
    }

    /// Stops serving: every engine stops, its writes are let finish, and its lease is given
    /// back so another replica takes the namespace over without waiting for it to lapse.
    pub async fn stop(&self) {
        let _ = self.stopping.send(true);
        let ticker = self.ticker.lock().take();
        if let Some(ticker) = ticker {
            let _ = ticker.await;
        }
        let all: Vec<(Namespace, Held)> = self.held.lock().drain().collect();
        for (namespace, held) in all {
            self.hand_back(namespace, held).await;
        }
    }

    /// The engine serving `namespace` here, unless this replica can no longer be sure it
    /// holds the lease (no renewal for a lease timeout): then it answers nothing.
    fn local_engine(&self, namespace: &str) -> Result<Option<Arc<Engine>>, tonic::Status> {
        let engine = self.held.lock().get(namespace).map(|h| h.engine.clone());
        if engine.is_some() && !self.leases_are_fresh() {
            return Err(tonic::Status::unavailable(format!(
                "replica {} has not reached the database for a lease timeout and may have lost \
                 namespace {namespace:?}; retry (another replica takes it over if this one is \
                 cut off)",
                self.id
            )));
        }
        if engine.is_none() && self.opening.lock().contains(namespace) {
            return Err(tonic::Status::unavailable(format!(
                "replica {} is taking namespace {namespace:?} over (reloading its runs); retry \
                 in a moment",
                self.id
            )));
        }
        Ok(engine)
    }

    fn leases_are_fresh(&self) -> bool {
        self.renewed_at
            .lock()
            .is_some_and(|at| at.elapsed() < self.lease)
    }

    fn lease_of(&self, namespace: &str) -> Option<LeaseRow> {
        self.view
            .read()
            .leases
            .iter()
            .find(|l| l.namespace == namespace)
            .cloned()
    }

    /// The answer for a namespace this replica does not serve.
    fn elsewhere(&self, lease: &LeaseRow) -> tonic::Status {
        let namespace = &lease.namespace;
        if lease.is_held() && lease.owner != *self.id {
            let address = self
                .view
                .read()
                .owner_address(namespace)
                .map(str::to_string);
            if let Some(address) = address {
                let mut status = tonic::Status::unavailable(format!(
                    "namespace {namespace:?} is served by replica {} at {address}; send the \
                     call there (the tether SDK and CLI do so by themselves)",
                    lease.owner
                ));
                if let Ok(value) = address.parse() {
                    status
                        .metadata_mut()
                        .insert(tether_wire::OWNER_METADATA, value);
                }
                return status;
            }
        }
        tonic::Status::unavailable(format!(
            "no replica serves namespace {namespace:?} this moment (its replica stopped renewing \
             its lease, or is reopening it); another replica takes it over within {:?}; retry",
            self.lease
        ))
    }

    async fn refresh_view(&self) {
        let store = self.store.clone();
        match blocking(move || store.cluster_view()).await {
            Ok(view) => *self.view.write() = view,
            Err(e) => tracing::warn!(error = %e, "could not read the cluster's leases"),
        }
    }

    async fn run(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let tick = self.config.replica.tick();
        loop {
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(tick) => {}
            }
            self.tick().await;
        }
    }

    /// One round: renew, drop what was lost, read the cluster, take over and give away.
    async fn tick(&self) {
        let lease_ms = self.lease.as_millis() as u64;
        let sent = Instant::now();
        let (store, id) = (self.store.clone(), self.id.to_string());
        match blocking(move || store.renew_leases(&id, lease_ms)).await {
            Ok(renewed) => {
                *self.renewed_at.lock() = Some(sent);
                let renewed: HashMap<Namespace, i64> = renewed.into_iter().collect();
                let lost: Vec<(Namespace, Held)> = {
                    let mut held = self.held.lock();
                    let gone: Vec<Namespace> = held
                        .iter()
                        .filter(|(ns, h)| renewed.get(*ns) != Some(&h.epoch))
                        .map(|(ns, _)| ns.clone())
                        .collect();
                    gone.into_iter()
                        .filter_map(|ns| held.remove(&ns).map(|h| (ns, h)))
                        .collect()
                };
                for (namespace, held) in lost {
                    tracing::warn!(replica = %self.id, %namespace, epoch = held.epoch, "lost the lease (another replica holds it, or it lapsed): stepping down");
                    stop_engine(held).await;
                }
            }
            Err(e) => {
                tracing::warn!(replica = %self.id, error = %e, "could not renew leases");
                if !self.leases_are_fresh() {
                    let all: Vec<(Namespace, Held)> = self.held.lock().drain().collect();
                    for (namespace, held) in all {
                        tracing::warn!(replica = %self.id, %namespace, "no renewal for a lease timeout: stepping down");
                        stop_engine(held).await;
                    }
                }
                return;
            }
        }
        self.refresh_view().await;
        if *self.stopping.borrow() {
            return;
        }
        let view = self.view.read().clone();
        let live = view
            .replicas
            .iter()
            .filter(|r| r.seen_ms_ago < lease_ms as i64 || r.replica_id == *self.id)
            .count()
            .max(1);
        let fair = view.leases.len().div_ceil(live);
        let mut mine = self.held.lock().len() + self.opening.lock().len();
        for lease in &view.leases {
            let namespace = Namespace::from(lease.namespace.as_str());
            if self.held.lock().contains_key(&namespace) || self.opening.lock().contains(&namespace)
            {
                continue;
            }
            // Its own lease without an engine is one whose engine failed: reopened at once.
            let own = lease.is_held() && lease.owner == *self.id;
            if !(own || (!lease.is_held() && mine < fair)) {
                continue;
            }
            let (store, id, ns) = (self.store.clone(), self.id.to_string(), namespace.clone());
            match blocking(move || store.claim_lease(&id, &ns, lease_ms)).await {
                Ok(Some(epoch)) => {
                    mine += 1;
                    if let Err(e) = self.open(namespace.clone(), epoch).await {
                        tracing::warn!(replica = %self.id, %namespace, error = %e, "could not open the namespace it took over; its lease lapses for another replica");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(replica = %self.id, %namespace, error = %e, "could not claim a lease")
                }
            }
        }
        // More than its share while another live replica could take some: give one away a
        // round (the newest replica claims it on its next round).
        if live > 1 && mine > fair {
            let surplus = {
                let held = self.held.lock();
                held.keys().max().cloned()
            };
            if let Some(namespace) = surplus {
                let held = self.held.lock().remove(&namespace);
                if let Some(held) = held {
                    tracing::info!(replica = %self.id, %namespace, share = fair, "handing a namespace to a replica with fewer");
                    self.hand_back(namespace, held).await;
                }
            }
        }
    }

    /// Opens the engine of a namespace whose lease this replica just took at `epoch`.
    async fn open(&self, namespace: Namespace, epoch: i64) -> Result<(), EngineError> {
        self.opening.lock().insert(namespace.clone());
        let began = Instant::now();
        let fence = Fence {
            owner: self.id.clone(),
            namespace: namespace.clone(),
            epoch,
        };
        let store = Arc::new(NamespaceStore::new(self.store.clone(), fence));
        let mut config = self.config.clone();
        config.access = self.access.read().clone();
        let foreign: Arc<dyn ForeignSignals> = Arc::new(SignalRelay(self.me.clone()));
        let opened = Engine::open_namespace(store, config, &namespace, foreign).await;
        let engine = match opened {
            Ok(engine) => engine,
            Err(e) => {
                self.opening.lock().remove(&namespace);
                return Err(e);
            }
        };
        let stats = engine.stats();
        let loops = vec![
            tokio::spawn(engine.clone().run_timers()),
            tokio::spawn(engine.clone().run_liveness()),
            tokio::spawn(engine.clone().run_retention()),
        ];
        // A failed write (the lease was lost, or the database refused) ends this engine; the
        // next round reopens the namespace from what is durable if the lease is still ours.
        let (watched, me, ns) = (engine.clone(), self.me.clone(), namespace.clone());
        let failure_watch = tokio::spawn(async move {
            let failure = watched.storage_failed().await;
            if let Some(replica) = me.upgrade() {
                replica.forget_failed(&ns, epoch, &failure.reason);
            }
        });
        self.held.lock().insert(
            namespace.clone(),
            Held {
                engine,
                epoch,
                loops,
                failure_watch,
            },
        );
        self.opening.lock().remove(&namespace);
        tracing::info!(
            replica = %self.id,
            %namespace,
            epoch,
            runs = stats.runs,
            sessions = stats.sessions,
            took_ms = began.elapsed().as_millis() as u64,
            "serving namespace"
        );
        Ok(())
    }

    fn forget_failed(&self, namespace: &Namespace, epoch: i64, reason: &str) {
        let held = {
            let mut held = self.held.lock();
            match held.get(namespace) {
                Some(h) if h.epoch == epoch => held.remove(namespace),
                _ => None,
            }
        };
        if let Some(held) = held {
            tracing::warn!(replica = %self.id, %namespace, epoch, reason, "a write under the namespace's lease failed: stepping down; the namespace is reopened from the database, here if this replica still holds the lease");
            // The watcher that called this is one of the loops: not awaited.
            held.engine.begin_shutdown();
        }
    }

    /// Stops an engine that is handed on (or stopping) cleanly and gives its lease back.
    async fn hand_back(&self, namespace: Namespace, held: Held) {
        let epoch = held.epoch;
        let engine = held.engine.clone();
        stop_engine(held).await;
        let _ = engine.quiesce().await;
        let (store, id) = (self.store.clone(), self.id.to_string());
        let ns = namespace.clone();
        match blocking(move || store.release_lease(&id, &ns, epoch)).await {
            Ok(_) => tracing::info!(replica = %self.id, %namespace, epoch, "gave the lease back"),
            Err(e) => {
                tracing::warn!(replica = %self.id, %namespace, error = %e, "could not give the lease back; it lapses instead")
            }
        }
    }
}

/// A replica's engines' way to signal workflows of namespaces other engines serve.
struct SignalRelay(Weak<Replica>);

impl ForeignSignals for SignalRelay {
    fn deliver(
        &self,
        signal: OutgoingSignal,
        request_id: String,
    ) -> futures::future::BoxFuture<'static, Option<String>> {
        let replica = self.0.clone();
        Box::pin(async move {
            let request = pb::SignalWorkflowRequest {
                namespace: signal.namespace.clone(),
                workflow_id: signal.workflow_id.clone(),
                run_id: String::new(),
                signal_name: signal.signal_name.clone(),
                input: signal.input.clone(),
                identity: format!("workflow run {}", signal.from_run),
                request_id,
            };
            let not_running = || {
                Some(format!(
                    "workflow {:?} is not running in namespace {:?}",
                    signal.workflow_id, signal.namespace
                ))
            };
            let mut backoff = Duration::from_millis(50);
            loop {
                let Some(replica) = replica.upgrade() else {
                    // Stopping: the sender's namespace reopens elsewhere and sends it again.
                    return std::future::pending().await;
                };
                if *replica.stopping.borrow() {
                    return std::future::pending().await;
                }
                let outcome = match replica.engine_for(&signal.namespace).await {
                    Ok(engine) => engine
                        .signal(request.clone())
                        .await
                        .map_err(tonic::Status::from),
                    Err(status) => match status
                        .metadata()
                        .get(tether_wire::OWNER_METADATA)
                        .and_then(|v| v.to_str().ok())
                    {
                        Some(_) if replica.config.tls.is_some() => {
                            // Replica-to-replica calls have no client certificate of their own
                            // yet: refused plainly rather than retried forever.
                            return Some(format!(
                                "namespace {:?} is served by another replica, and signals \
                                 between replicas of a cluster on TLS are not supported yet",
                                signal.namespace
                            ));
                        }
                        Some(address) => replica.signal_at(address, request.clone()).await,
                        None => Err(status),
                    },
                };
                match outcome {
                    Ok(()) => return None,
                    Err(status) => match status.code() {
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                            return if status.message().contains("namespace")
                                && status.message().contains("does not exist")
                            {
                                Some(format!("namespace {:?} does not exist", signal.namespace))
                            } else {
                                not_running()
                            };
                        }
                        tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded => {}
                        _ => return Some(status.message().to_string()),
                    },
                }
                drop(replica);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        })
    }
}

impl Replica {
    /// Sends a signal to the replica at `address` (it serves the target's namespace).
    async fn signal_at(
        &self,
        address: &str,
        request: pb::SignalWorkflowRequest,
    ) -> Result<(), tonic::Status> {
        let channel = {
            let mut peers = self.peers.lock();
            match peers.get(address) {
                Some(c) => c.clone(),
                None => {
                    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
                        .map_err(|e| {
                            tonic::Status::internal(format!("replica address {address:?}: {e}"))
                        })?;
                    let c = endpoint.connect_lazy();
                    peers.insert(address.to_string(), c.clone());
                    c
                }
            }
        };
        pb::tether_service_client::TetherServiceClient::new(channel)
            .signal_workflow(request)
            .await
            .map(|_| ())
    }
}

/// Stops an engine: its parked calls are ended (their callers retry, and reach the new holder),
/// its loops finish, and undelivered attempts are taken back while its lease may still allow.
async fn stop_engine(held: Held) {
    let Held {
        engine,
        loops,
        failure_watch,
        ..
    } = held;
    failure_watch.abort();
    engine.begin_shutdown();
    for task in loops {
        let _ = task.await;
    }
    engine.take_back_remaining().await;
}

fn unavailable(e: StoreError) -> EngineError {
    EngineError::Unavailable(format!("the cluster's database: {e}"))
}
