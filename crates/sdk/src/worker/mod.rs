//! The worker: registers workflows and activities by name, long-polls a task queue (and its own
//! sticky queue), runs activities with bounded concurrency and heartbeats, keeps workflows it ran
//! in a bounded sticky cache, and shuts down gracefully.

mod identity;

pub use identity::{default_state_dir, IdentityError};

use crate::activity::{ActivityContext, ActivityError, ActivityInfo, CancelReason};
use crate::client::Client;
use crate::codec;
use crate::workflow::{
    WorkflowContext, WorkflowError, WorkflowFactory, WorkflowInfo, WorkflowInstance,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb::{self, tether_service_client::TetherServiceClient};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tonic::transport::Channel;

pub use tether_wire::STICKY_QUEUE_PREFIX;

/// Worker settings. Defaults are written on each field.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Task queue to poll. Required.
    pub task_queue: String,
    /// Identity reported to the server. Default (when empty): `HOSTNAME-ID`, where HOSTNAME is
    /// a declared inventory's host name (else the host's) and ID is kept in the state directory
    /// per configuration, so a restarted worker gets its identity (and its sessions) back and
    /// two workers on one host never share one. Whatever it is, one live process holds it at a
    /// time (see the README, "Worker identity").
    pub identity: String,
    /// Where the identity lock files live. Default: `$TETHER_STATE_DIR`, else
    /// `~/.local/state/tether`; None keeps nothing (the default identity is then new each start).
    pub state_dir: Option<std::path::PathBuf>,
    /// Most activities running at once. Default 100; `start` refuses 0 when activities are
    /// registered.
    pub max_concurrent_activities: usize,
    /// Most workflow tasks processed at once. Default 10; `start` refuses 0 when workflows
    /// are registered.
    pub max_concurrent_workflow_tasks: usize,
    /// Most workflow runs kept in the sticky cache. Default 1000.
    pub max_cached_workflows: usize,
    /// On shutdown, how long running activities may finish before they are failed so they retry
    /// elsewhere. Default 10 s.
    pub graceful_shutdown: Duration,
    /// How long each poll waits on the server (capped by the server's own limit). Default 60 s.
    pub poll_timeout: Duration,
    /// What this worker advertises. Default: detected (NVML, sysinfo), nothing declared.
    pub capabilities: crate::caps::CapabilitySource,
    /// Most sessions the server places on this worker at once. Default 10.
    pub max_concurrent_sessions: u32,
}

impl WorkerOptions {
    /// Options for a task queue with defaults for everything else.
    pub fn new(task_queue: impl Into<String>) -> Self {
        WorkerOptions {
            task_queue: task_queue.into(),
            identity: String::new(),
            state_dir: default_state_dir(),
            max_concurrent_activities: 100,
            max_concurrent_workflow_tasks: 10,
            max_cached_workflows: 1000,
            graceful_shutdown: Duration::from_secs(10),
            poll_timeout: Duration::from_secs(60),
            capabilities: crate::caps::CapabilitySource::detect(),
            max_concurrent_sessions: 10,
        }
    }

    /// Refuses settings under which the worker could never do what it was given: no slots
    /// for the kind of work it has code for (it would poll for nothing, or never poll), a
    /// malformed task queue or identity. Checked by [`Worker::start`] before anything else.
    fn check(&self, has_workflows: bool, has_activities: bool) -> Result<(), WorkerError> {
        let invalid = |what: String| Err(WorkerError::InvalidOptions(what));
        if has_activities && self.max_concurrent_activities == 0 {
            return invalid(
                "max_concurrent_activities is 0, so the worker would never take one of its \
                 activities; give it at least 1 (default 100)"
                    .into(),
            );
        }
        if has_workflows && self.max_concurrent_workflow_tasks == 0 {
            return invalid(
                "max_concurrent_workflow_tasks is 0, so the worker would never run one of its \
                 workflows; give it at least 1 (default 10)"
                    .into(),
            );
        }
        tether_core::types::validate_name("task queue", &self.task_queue)
            .or_else(|e| invalid(e.to_string()))?;
        if !self.identity.is_empty() {
            tether_core::types::validate_name("identity", &self.identity)
                .or_else(|e| invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// Sets the session slots.
    pub fn max_concurrent_sessions(mut self, n: u32) -> Self {
        self.max_concurrent_sessions = n.max(1);
        self
    }

    /// Sets what the worker advertises.
    pub fn capabilities(mut self, caps: crate::caps::CapabilitySource) -> Self {
        self.capabilities = caps;
        self
    }

    /// Sets the identity.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// Sets where the identity lock files live (None: nowhere).
    pub fn state_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.state_dir = dir;
        self
    }

    /// Sets the activity concurrency.
    pub fn max_concurrent_activities(mut self, n: usize) -> Self {
        self.max_concurrent_activities = n.max(1);
        self
    }

    /// Sets the workflow task concurrency.
    pub fn max_concurrent_workflow_tasks(mut self, n: usize) -> Self {
        self.max_concurrent_workflow_tasks = n.max(1);
        self
    }

    /// Sets the sticky cache size.
    pub fn max_cached_workflows(mut self, n: usize) -> Self {
        self.max_cached_workflows = n;
        self
    }

    /// Sets the shutdown grace period.
    pub fn graceful_shutdown(mut self, d: Duration) -> Self {
        self.graceful_shutdown = d;
        self
    }

    /// Sets the poll timeout.
    pub fn poll_timeout(mut self, d: Duration) -> Self {
        self.poll_timeout = d;
        self
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Nothing is registered.
    #[error("the worker has no workflows and no activities registered; register at least one")]
    NothingRegistered,
    /// The options are invalid.
    #[error("invalid worker options: {0}")]
    InvalidOptions(String),
    /// Another live process on this host holds the identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

type ActivityFn = Arc<
    dyn Fn(
            ActivityContext,
            Option<pb::Payload>,
        ) -> BoxFuture<'static, Result<Option<pb::Payload>, ActivityError>>
        + Send
        + Sync,
>;

/// A worker under construction: register code, then [`Worker::run`] or [`Worker::start`].
pub struct Worker {
    client: Client,
    options: WorkerOptions,
    workflows: HashMap<String, WorkflowFactory>,
    activities: HashMap<String, ActivityFn>,
}

impl Worker {
    /// A worker that talks to the server through `client` (and works in its namespace).
    pub fn new(client: Client, options: WorkerOptions) -> Self {
        Worker {
            client,
            options,
            workflows: HashMap::new(),
            activities: HashMap::new(),
        }
    }

    /// Registers a workflow function under a type name.
    pub fn register_workflow<I, O, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let factory: WorkflowFactory = Arc::new(move |ctx, input| {
            let f = f.clone();
            async move {
                let input: I = codec::from_payload(input.as_ref())?;
                let output = f(ctx, input).await?;
                Ok(Some(codec::to_payload(&output)?))
            }
            .boxed()
        });
        self.workflows.insert(name.to_string(), factory);
        self
    }

    /// Registers an activity function under a type name.
    pub fn register_activity<I, O, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let activity: ActivityFn = Arc::new(move |ctx, input| {
            let f = f.clone();
            async move {
                let input: I = codec::from_payload(input.as_ref())?;
                let output = f(ctx, input).await?;
                Ok(Some(codec::to_payload(&output).map_err(|e| {
                    ActivityError::non_retryable(e.to_string()).with_type("ConvertError")
                })?))
            }
            .boxed()
        });
        self.activities.insert(name.to_string(), activity);
        self
    }

    /// Starts the worker in the background. Fails at once when another live process on this
    /// host holds the identity.
    pub fn start(self) -> Result<WorkerHandle, WorkerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (inner, lease) = self.into_inner()?;
        let identity = inner.options.identity.clone();
        let instance_id = inner.instance_id.clone();
        let task = tokio::spawn(inner.run(stop_tx.clone(), stop_rx));
        Ok(WorkerHandle {
            stop: stop_tx,
            task: Some(task),
            identity,
            instance_id,
            _lease: Some(lease),
        })
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let mut handle = self.start()?;
        shutdown.await;
        handle.shutdown_inner().await;
        Ok(())
    }

    fn into_inner(mut self) -> Result<(Arc<Inner>, identity::IdentityLease), WorkerError> {
        if self.workflows.is_empty() && self.activities.is_empty() {
            return Err(WorkerError::NothingRegistered);
        }
        self.options
            .check(!self.workflows.is_empty(), !self.activities.is_empty())?;
        let fingerprint = self.options.capabilities.fingerprint();
        let hostname = self.options.capabilities.hostname();
        let lease = identity::acquire(&identity::IdentityRequest {
            explicit: &self.options.identity,
            state_dir: self.options.state_dir.as_deref(),
            server: self.client.address(),
            namespace: self.client.namespace(),
            task_queue: &self.options.task_queue,
            fingerprint: &fingerprint,
            hostname: &hostname,
        })?;
        self.options.identity = lease.identity.clone();
        tether_core::types::validate_name("identity", &self.options.identity)
            .map_err(|e| WorkerError::InvalidOptions(e.to_string()))?;
        let sticky_queue = format!(
            "{STICKY_QUEUE_PREFIX}{}/{}",
            self.options.identity,
            uuid::Uuid::new_v4().simple()
        );
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            instance_id: lease.instance_id.clone(),
            previous_instance_id: lease.previous_instance_id.clone(),
            outcomes,
            outcomes_rx: Mutex::new(Some(outcomes_rx)),
            rpc: self.client.raw(),
            dc: self.client.data_converter().clone(),
            namespace: self.client.namespace().to_string(),
            workflow_slots: Arc::new(Semaphore::new(self.options.max_concurrent_workflow_tasks)),
            activity_slots: Arc::new(Semaphore::new(self.options.max_concurrent_activities)),
            cache: Mutex::new(Cache::new(self.options.max_cached_workflows)),
            running: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            local: Arc::new(crate::activity::WorkerLocal {
                caps: self.options.capabilities.clone(),
                caps_changed: tokio::sync::Notify::new(),
            }),
            options: self.options,
            workflows: self.workflows,
            activities: self.activities,
            sticky_queue,
        });
        Ok((inner, lease))
    }
}

/// A running worker.
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    identity: String,
    instance_id: String,
    /// The identity's lock: held while the worker runs, released when it stops or is killed,
    /// as the kernel releases it when a process dies.
    _lease: Option<identity::IdentityLease>,
}

impl WorkerHandle {
    /// The worker's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This process's instance id (what the server knows it by, next to the identity).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Stops polling, lets running work finish within the grace period, then fails what is left
    /// so it retries elsewhere.
    pub async fn shutdown(mut self) {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self._lease.take();
    }

    /// Stops the worker at once, as if its process died: nothing is reported to the server.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self._lease.take();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct RunningActivity {
    ctx: ActivityContext,
    token: Vec<u8>,
    abort: tokio::task::AbortHandle,
}

struct Inner {
    rpc: TetherServiceClient<Channel>,
    /// This process's instance id: the server serves the identity's work to it alone.
    instance_id: String,
    /// The instance this process replaces (it held the identity's lock before).
    previous_instance_id: String,
    namespace: String,
    options: WorkerOptions,
    workflows: HashMap<String, WorkflowFactory>,
    activities: HashMap<String, ActivityFn>,
    sticky_queue: String,
    workflow_slots: Arc<Semaphore>,
    activity_slots: Arc<Semaphore>,
    cache: Mutex<Cache>,
    running: Mutex<HashMap<u64, RunningActivity>>,
    /// Set once shutdown begins: no more tasks are taken.
    stopping: std::sync::atomic::AtomicBool,
    local: Arc<crate::activity::WorkerLocal>,
    /// The client's data converter: payloads are decoded on arrival and encoded on departure.
    dc: codec::DataConverter,
    /// Finished activities queue their outcomes here; one reporter sends them in batches.
    outcomes: mpsc::UnboundedSender<PendingOutcome>,
    outcomes_rx: Mutex<Option<mpsc::UnboundedReceiver<PendingOutcome>>>,
}

/// An activity outcome waiting for the reporter, and where its slot waits for the reply.
struct PendingOutcome {
    outcome: pb::ActivityOutcome,
    activity_id: String,
    /// When the server stops waiting for this attempt (epoch ms; 0 = not said).
    deadline_ms: i64,
    /// The slot takes another task if the server has one waiting.
    wants_next: bool,
    reply: oneshot::Sender<Option<pb::PollActivityTaskResponse>>,
}

/// Most outcomes the reporter sends in one call.
const MAX_OUTCOMES_PER_REPORT: usize = 256;
/// Most report calls in flight at once.
const MAX_REPORTS_IN_FLIGHT: usize = 2;
/// How long a report is retried while the server cannot be reached, unless an attempt's own
/// deadline comes first (after it the server has given up on the attempt anyway).
const REPORT_RETRY_LIMIT: Duration = Duration::from_secs(60);

/// Aborts running activities when the worker's main task ends for any reason (including abort).
struct AbortRunning(Arc<Inner>);

impl Drop for AbortRunning {
    fn drop(&mut self) {
        for (_, r) in self.0.running.lock().drain() {
            r.abort.abort();
        }
    }
}

/// Backs off after a failed poll so a down server is not hammered.
async fn poll_backoff(failures: &mut u32) {
    *failures += 1;
    let ms = (100u64 << (*failures).min(6)).min(5_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl Inner {
    async fn run(self: Arc<Self>, stopper: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let _guard = AbortRunning(self.clone());
        let Some(registration) = self.register_until_done(&mut stop).await else {
            return;
        };
        let mut pollers = JoinSet::new();
        pollers.spawn(
            self.clone()
                .heartbeat_worker(registration.clone(), stopper, stop.clone()),
        );
        if !self.workflows.is_empty() {
            for queue in [self.options.task_queue.clone(), self.sticky_queue.clone()] {
                for _ in 0..2 {
                    pollers.spawn(self.clone().workflow_poller(queue.clone(), stop.clone()));
                }
            }
        }
        // Lives until the end of this function (after the drain below), not with the pollers:
        // activities finishing during the grace period still report through it.
        let mut reporter = JoinSet::new();
        if let Some(rx) = self.outcomes_rx.lock().take() {
            reporter.spawn(
                self.clone()
                    .report_outcomes(rx, registration.host_queue.clone()),
            );
        }
        if !self.activities.is_empty() {
            // Each poll takes from this worker's host queue (work pinned here: sessions,
            // `on_worker`) and from the task queue at once, holding one slot while it waits.
            let n = self.options.max_concurrent_activities.clamp(1, 8);
            for _ in 0..n {
                pollers.spawn(
                    self.clone()
                        .activity_poller(registration.host_queue.clone(), stop.clone()),
                );
            }
        }
        let _ = stop.wait_for(|s| *s).await;
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Pollers stop at once (their in-flight polls are abandoned; the server re-offers any
        // task it was handing over). Workflow tasks in progress are short and finish first.
        while pollers.join_next().await.is_some() {}
        // Then the server hears of it at once: nothing new is placed or dispatched here, and the
        // sessions hosted here end now rather than after the liveness timeout.
        self.deregister().await;
        let total = self.options.max_concurrent_activities as u32;
        let drained = tokio::time::timeout(
            self.options.graceful_shutdown,
            self.activity_slots.acquire_many(total),
        )
        .await;
        if drained.is_err() {
            let left: Vec<RunningActivity> = self.running.lock().drain().map(|(_, r)| r).collect();
            tracing::warn!(
                count = left.len(),
                "grace period over: failing running activities so they retry elsewhere"
            );
            for r in left {
                r.ctx.cancel(CancelReason::WorkerShutdown);
                r.abort.abort();
                let failure = pb::Failure {
                    message: format!(
                        "worker {} shut down before the activity finished",
                        self.options.identity
                    ),
                    error_type: "WorkerShutdown".into(),
                    kind: pb::FailureKind::Server as i32,
                    ..Default::default()
                };
                let _ = self
                    .rpc
                    .clone()
                    .fail_activity_task(pb::FailActivityTaskRequest {
                        task_token: r.token,
                        failure: Some(failure),
                        identity: self.options.identity.clone(),
                        next_task: None,
                    })
                    .await;
            }
        }
    }

    async fn capabilities(&self) -> pb::Capabilities {
        let source = self.local.caps.clone();
        tokio::task::spawn_blocking(move || source.snapshot())
            .await
            .unwrap_or_default()
    }

    fn registration(&self, caps: pb::Capabilities) -> pb::RegisterWorkerRequest {
        pb::RegisterWorkerRequest {
            namespace: self.namespace.clone(),
            identity: self.options.identity.clone(),
            task_queues: vec![self.options.task_queue.clone()],
            capabilities: Some(caps),
            max_concurrent_sessions: self.options.max_concurrent_sessions,
            instance_id: self.instance_id.clone(),
            previous_instance_id: self.previous_instance_id.clone(),
            pid: std::process::id(),
        }
    }

    /// Tells the server this worker stopped. Its sessions end (with their activities, which
    /// this worker then stops too: their outcomes would be refused); other running activities
    /// keep their grace period.
    async fn deregister(&self) {
        let reply = self
            .rpc
            .clone()
            .deregister_worker(pb::DeregisterWorkerRequest {
                namespace: self.namespace.clone(),
                identity: self.options.identity.clone(),
                instance_id: self.instance_id.clone(),
                reason: String::new(),
            })
            .await;
        match reply {
            Ok(r) => {
                let ended = r.into_inner().sessions_ended;
                if !ended.is_empty() {
                    tracing::info!(sessions = ?ended, "sessions ended with this worker's shutdown");
                    for r in self.running.lock().values() {
                        let in_ended = r
                            .ctx
                            .info()
                            .session
                            .as_ref()
                            .is_some_and(|s| ended.contains(&s.session_id));
                        if in_ended {
                            r.ctx.cancel(CancelReason::WorkerShutdown);
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), code = ?status.code(), "could not tell the server this worker stopped; it will be marked dead after the liveness timeout")
            }
        }
    }

    /// Registers with the server, retrying while it is unreachable. None if stopped first.
    async fn register_until_done(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<pb::RegisterWorkerResponse> {
        let mut failures = 0;
        loop {
            let request = self.registration(self.capabilities().await);
            let mut rpc = self.rpc.clone();
            let reply = tokio::select! {
                r = rpc.register_worker(request) => r,
                _ = stop.wait_for(|s| *s) => return None,
            };
            match reply {
                Ok(r) => return Some(r.into_inner()),
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    // Another live process holds this identity. Keep trying: when it stops (or
                    // the server declares it dead) the identity is free.
                    tracing::error!(error = %status.message(), "worker registration refused; retrying until the identity is free");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "worker registration failed; retrying");
                    tokio::select! {
                        _ = poll_backoff(&mut failures) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                }
            }
        }
    }

    /// Heartbeats with refreshed capabilities; at once when an activity changed a label.
    async fn heartbeat_worker(
        self: Arc<Self>,
        registration: pb::RegisterWorkerResponse,
        stopper: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let interval = Duration::from_millis(registration.heartbeat_interval_ms.max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.local.caps_changed.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let caps = self.capabilities().await;
            let reply = self
                .rpc
                .clone()
                .worker_heartbeat(pb::WorkerHeartbeatRequest {
                    namespace: self.namespace.clone(),
                    identity: self.options.identity.clone(),
                    capabilities: Some(caps.clone()),
                    instance_id: self.instance_id.clone(),
                })
                .await;
            match reply {
                Ok(r) if r.get_ref().reregister => {
                    // The server restarted and forgot us (or marked us dead).
                    let _ = self
                        .rpc
                        .clone()
                        .register_worker(self.registration(caps))
                        .await;
                }
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::AlreadyExists => {
                    // Another process took the identity over: this one must not go on.
                    tracing::error!(error = %status.message(), "this worker lost its identity to another process; stopping");
                    let _ = stopper.send(true);
                    return;
                }
                Err(status) => {
                    tracing::debug!(error = %status.message(), "worker heartbeat failed")
                }
            }
        }
    }

    async fn workflow_poller(self: Arc<Self>, queue: String, mut stop: watch::Receiver<bool>) {
        let mut failures = 0;
        loop {
            let request = pb::PollWorkflowTaskRequest {
                namespace: self.namespace.clone(),
                task_queue: queue.clone(),
                identity: self.options.identity.clone(),
                sticky_queue: self.sticky_queue.clone(),
                poll_timeout_ms: tether_core::types::duration_ms(self.options.poll_timeout),
                instance_id: self.instance_id.clone(),
            };
            let mut rpc = self.rpc.clone();
            let polled = tokio::select! {
                r = rpc.poll_workflow_task(request) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match polled {
                Ok(resp) => {
                    failures = 0;
                    let task = resp.into_inner();
                    if !task.task_token.is_empty() {
                        // The slot is taken after the poll, not before: a poll parked on the
                        // sticky queue must not hold a slot the normal queue's poller needs.
                        let _permit = self
                            .workflow_slots
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("never closed");
                        // Then the tasks handed back with each completion, under the same slot.
                        let mut next = Some(task);
                        while let Some(task) = next.take() {
                            next = self.handle_workflow_task(task).await;
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(queue, error = %status.message(), code = ?status.code(), "workflow poll failed; retrying");
                    poll_backoff(&mut failures).await;
                }
            }
        }
    }

    async fn fetch_history(
        &self,
        task: &pb::PollWorkflowTaskResponse,
    ) -> Result<Vec<pb::HistoryEvent>, tonic::Status> {
        Ok(self
            .rpc
            .clone()
            .get_workflow_history(pb::GetWorkflowHistoryRequest {
                namespace: task.namespace.clone(),
                workflow_id: task.workflow_id.clone(),
                run_id: task.run_id.clone(),
            })
            .await?
            .into_inner()
            .events)
    }

    /// Runs one workflow task; returns the next one if the server handed one back with the
    /// completion.
    async fn handle_workflow_task(
        &self,
        mut task: pb::PollWorkflowTaskResponse,
    ) -> Option<pb::PollWorkflowTaskResponse> {
        let cached = self.cache.lock().take(&task.run_id);
        let mut instance = match cached {
            Some(inst)
                if !task.full_history
                    && task.events.first().map(|e| e.event_id) == Some(inst.last_event_id + 1) =>
            {
                Some(inst)
            }
            _ => None,
        };
        if instance.is_none() && !task.full_history {
            // Our cache lost the run (evicted, or this is another process with our sticky
            // queue): replay from the full history.
            match self.fetch_history(&task).await {
                Ok(events) => task.events = events,
                Err(status) => {
                    tracing::warn!(run_id = task.run_id, error = %status.message(), "could not fetch history");
                    self.fail_workflow_task(
                        &task,
                        "cache_miss",
                        format!("could not fetch history: {}", status.message()),
                    )
                    .await;
                    return None;
                }
            }
        }
        let mut instance = match instance.take() {
            Some(i) => i,
            None => {
                let Some(factory) = self.workflows.get(&task.workflow_type) else {
                    let mut known: Vec<&str> = self.workflows.keys().map(|s| s.as_str()).collect();
                    known.sort();
                    let message = format!(
                        "worker {} has no workflow registered as {:?} (registered: {})",
                        self.options.identity,
                        task.workflow_type,
                        known.join(", ")
                    );
                    self.fail_workflow_task(&task, "unknown_workflow_type", message)
                        .await;
                    return None;
                };
                WorkflowInstance::new(
                    WorkflowInfo {
                        namespace: task.namespace.clone(),
                        workflow_id: task.workflow_id.clone(),
                        run_id: task.run_id.clone(),
                        workflow_type: task.workflow_type.clone(),
                        task_queue: self.options.task_queue.clone(),
                    },
                    factory.clone(),
                )
            }
        };
        if let Err(e) = self.dc.decode_events(&mut task.events) {
            self.fail_workflow_task(&task, "codec", e.to_string()).await;
            return None;
        }
        match instance.process(&task.events) {
            Ok(mut commands) => {
                if let Err(e) = self.dc.encode_commands(&mut commands) {
                    self.fail_workflow_task(&task, "codec", e.to_string()).await;
                    return None;
                }
                let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
                let request = pb::CompleteWorkflowTaskRequest {
                    task_token: task.task_token.clone(),
                    commands,
                    identity: self.options.identity.clone(),
                    sticky_queue: self.sticky_queue.clone(),
                    // The sticky queue first: its runs are cached here.
                    next_task: (!stopping).then(|| pb::NextWorkflowTaskRequest {
                        namespace: self.namespace.clone(),
                        task_queues: vec![
                            self.sticky_queue.clone(),
                            self.options.task_queue.clone(),
                        ],
                    }),
                };
                match self.rpc.clone().complete_workflow_task(request).await {
                    Ok(reply) => {
                        if !instance.finished() {
                            self.cache.lock().put(task.run_id.clone(), instance);
                        }
                        return reply
                            .into_inner()
                            .next_task
                            .filter(|t| !t.task_token.is_empty());
                    }
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        // New events arrived while this task closed the run; the server kept
                        // nothing of it and sends a new task, which this worker replays from the
                        // full history (the instance is not cached back: it ran ahead).
                        tracing::debug!(run_id = task.run_id, reason = %status.message(), "workflow task superseded by new events");
                    }
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        self.fail_workflow_task(&task, "bad_command", status.message().to_string())
                            .await;
                    }
                    Err(status) => {
                        tracing::warn!(run_id = task.run_id, error = %status.message(), "workflow task completion refused");
                    }
                }
            }
            Err(failure) => {
                tracing::warn!(
                    run_id = task.run_id,
                    cause = failure.cause,
                    message = failure.message,
                    "workflow task failed"
                );
                self.fail_workflow_task(&task, failure.cause, failure.message)
                    .await;
            }
        }
        None
    }

    async fn fail_workflow_task(
        &self,
        task: &pb::PollWorkflowTaskResponse,
        cause: &str,
        message: String,
    ) {
        let _ = self
            .rpc
            .clone()
            .fail_workflow_task(pb::FailWorkflowTaskRequest {
                task_token: task.task_token.clone(),
                cause: cause.into(),
                failure: Some(pb::Failure {
                    message,
                    kind: pb::FailureKind::Server as i32,
                    ..Default::default()
                }),
                identity: self.options.identity.clone(),
            })
            .await;
    }

    /// Polls the task queue and this worker's host queue for activity tasks. A slot is taken
    /// before polling, so the worker never holds a task it cannot start.
    async fn activity_poller(self: Arc<Self>, host_queue: String, mut stop: watch::Receiver<bool>) {
        let mut failures = 0;
        loop {
            let permit = tokio::select! {
                p = self.activity_slots.clone().acquire_owned() => p.expect("never closed"),
                _ = stop.wait_for(|s| *s) => return,
            };
            let request = pb::PollActivityTaskRequest {
                namespace: self.namespace.clone(),
                task_queue: self.options.task_queue.clone(),
                identity: self.options.identity.clone(),
                poll_timeout_ms: tether_core::types::duration_ms(self.options.poll_timeout),
                additional_task_queues: vec![host_queue.clone()],
                instance_id: self.instance_id.clone(),
            };
            let mut rpc = self.rpc.clone();
            let polled = tokio::select! {
                r = rpc.poll_activity_task(request) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match polled {
                Ok(resp) => {
                    failures = 0;
                    let task = resp.into_inner();
                    if task.task_token.is_empty() {
                        continue;
                    }
                    self.clone()
                        .spawn_activity(task, permit, host_queue.clone());
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "activity poll failed; retrying");
                    poll_backoff(&mut failures).await;
                }
            }
        }
    }

    fn context_for(&self, task: &pb::PollActivityTaskResponse) -> ActivityContext {
        let info = ActivityInfo {
            namespace: task.namespace.clone(),
            activity_id: task.activity_id.clone(),
            activity_type: task.activity_type.clone(),
            attempt: task.attempt,
            workflow_id: task.workflow_id.clone(),
            run_id: task.run_id.clone(),
            task_queue: self.options.task_queue.clone(),
            heartbeat_timeout: (task.heartbeat_timeout_ms > 0)
                .then(|| Duration::from_millis(task.heartbeat_timeout_ms)),
            deadline_ms: task.deadline_ms,
            worker_identity: self.options.identity.clone(),
            session: task.session.clone(),
        };
        ActivityContext::new(
            info,
            task.heartbeat_details.clone(),
            Some(self.local.clone()),
        )
    }

    /// Runs a task, then keeps running the next ones the server hands back with each completion
    /// (while not shutting down), all under the one slot.
    fn spawn_activity(
        self: Arc<Self>,
        task: pb::PollActivityTaskResponse,
        permit: tokio::sync::OwnedSemaphorePermit,
        queue: String,
    ) {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut task = task;
        let undecodable = self.dc.decode_activity_task(&mut task).err();
        let ctx = self.context_for(&task);
        let token = task.task_token.clone();
        let inner = self.clone();
        let ctx2 = ctx.clone();
        // Hold the registry lock across the spawn so the task cannot finish (and try to remove
        // itself) before it is registered.
        let mut running = self.running.lock();
        let handle = tokio::spawn(async move {
            let mut next = match undecodable {
                Some(e) => {
                    inner.fail_undecodable(task, e).await;
                    None
                }
                None => inner.execute_activity(task, ctx2, &queue).await,
            };
            while let Some(mut task) = next.take() {
                if let Err(e) = inner.dc.decode_activity_task(&mut task) {
                    inner.fail_undecodable(task, e).await;
                    break;
                }
                let ctx = inner.context_for(&task);
                if let Some(r) = inner.running.lock().get_mut(&id) {
                    r.ctx = ctx.clone();
                    r.token = task.task_token.clone();
                }
                next = inner.execute_activity(task, ctx, &queue).await;
            }
            inner.running.lock().remove(&id);
            drop(permit);
        });
        running.insert(
            id,
            RunningActivity {
                ctx,
                token,
                abort: handle.abort_handle(),
            },
        );
    }

    fn next_task_request(&self, host_queue: &str) -> Option<pb::NextTaskRequest> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        Some(pb::NextTaskRequest {
            namespace: self.namespace.clone(),
            task_queue: self.options.task_queue.clone(),
            additional_task_queues: vec![host_queue.to_string()],
            instance_id: self.instance_id.clone(),
        })
    }

    /// A task whose payloads this worker cannot decode (e.g. it lacks the encryption key): fail
    /// the attempt so it is retried, perhaps by a worker that has the key.
    async fn fail_undecodable(&self, task: pb::PollActivityTaskResponse, e: codec::CodecError) {
        tracing::warn!(activity_id = task.activity_id, error = %e, "activity payload could not be decoded");
        let failure = pb::Failure {
            message: format!(
                "worker {} could not decode the activity's input: {e}",
                self.options.identity
            ),
            error_type: "CodecError".into(),
            kind: pb::FailureKind::Application as i32,
            ..Default::default()
        };
        let _ = self
            .rpc
            .clone()
            .fail_activity_task(pb::FailActivityTaskRequest {
                task_token: task.task_token,
                failure: Some(failure),
                identity: self.options.identity.clone(),
                next_task: None,
            })
            .await;
    }

    /// Runs one activity task and reports its outcome; returns the next task if the server
    /// handed one back.
    async fn execute_activity(
        &self,
        task: pb::PollActivityTaskResponse,
        ctx: ActivityContext,
        queue: &str,
    ) -> Option<pb::PollActivityTaskResponse> {
        let identity = self.options.identity.clone();
        let mut rpc = self.rpc.clone();
        let Some(f) = self.activities.get(&task.activity_type) else {
            let mut known: Vec<&str> = self.activities.keys().map(|s| s.as_str()).collect();
            known.sort();
            let failure = pb::Failure {
                message: format!(
                    "worker {identity} has no activity registered as {:?} (registered: {})",
                    task.activity_type,
                    known.join(", ")
                ),
                error_type: "ActivityTypeNotRegistered".into(),
                kind: pb::FailureKind::Application as i32,
                ..Default::default()
            };
            let _ = rpc
                .fail_activity_task(pb::FailActivityTaskRequest {
                    task_token: task.task_token,
                    failure: Some(failure),
                    identity,
                    next_task: None,
                })
                .await;
            return None;
        };
        let heartbeater = tokio::spawn(heartbeat_loop(
            rpc.clone(),
            self.dc.clone(),
            ctx.clone(),
            task.task_token.clone(),
            identity.clone(),
            task.heartbeat_timeout_ms,
        ));
        let outcome = AssertUnwindSafe(f(ctx.clone(), task.input.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "activity panicked".into());
                Err(
                    ActivityError::retryable(format!("activity panicked: {message}"))
                        .with_type("Panic"),
                )
            });
        heartbeater.abort();
        let token = task.task_token;
        // Results and failure details leave the worker encoded; a codec failure fails the attempt.
        let outcome = match outcome {
            Ok(result) => self.dc.encode_opt(result).map_err(|e| {
                ActivityError::retryable(format!("result could not be encoded: {e}"))
                    .with_type("CodecError")
            }),
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Ok(result) => {
                pb::activity_outcome::Outcome::Completed(pb::ActivityCompleted { result })
            }
            Err(ActivityError::Cancelled)
                if ctx.cancel_reason() == Some(CancelReason::Requested) =>
            {
                pb::activity_outcome::Outcome::Canceled(pb::ActivityCanceledAfterRequest {
                    details: None,
                })
            }
            Err(e) => {
                let mut failure = e.to_failure();
                if matches!(e, ActivityError::Cancelled) {
                    // Cancelled without a request (shutdown, stale): let it retry.
                    failure.kind = pb::FailureKind::Server as i32;
                }
                let failure = self
                    .dc
                    .encode_failure(Some(failure.clone()))
                    .ok()
                    .flatten()
                    .unwrap_or(failure);
                pb::activity_outcome::Outcome::Failed(failure)
            }
        };
        let (reply, next) = oneshot::channel();
        let pending = PendingOutcome {
            outcome: pb::ActivityOutcome {
                task_token: token,
                outcome: Some(outcome),
            },
            activity_id: task.activity_id,
            deadline_ms: task.deadline_ms,
            wants_next: self.next_task_request(queue).is_some(),
            reply,
        };
        if self.outcomes.send(pending).is_err() {
            // Only after the worker's main task ended (killed): nobody is left to report to.
            return None;
        }
        next.await.ok().flatten()
    }

    /// Sends queued outcomes in batches. A few calls may be in flight at once (so slots keep
    /// cycling while the server commits); beyond that, outcomes gather and go together, so a
    /// busy worker makes one call for many activities and refills each reporting slot from the
    /// reply.
    async fn report_outcomes(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<PendingOutcome>,
        host_queue: String,
    ) {
        let in_flight = Arc::new(Semaphore::new(MAX_REPORTS_IN_FLIGHT));
        // Owned here so that aborting the reporter (a killed worker) also stops its calls.
        let mut calls = JoinSet::new();
        loop {
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            while calls.try_join_next().is_some() {}
            let mut batch = Vec::new();
            if rx.recv_many(&mut batch, MAX_OUTCOMES_PER_REPORT).await == 0 {
                break;
            }
            let inner = self.clone();
            let host_queue = host_queue.clone();
            calls.spawn(async move {
                inner.send_report(batch, &host_queue).await;
                drop(permit);
            });
        }
    }

    /// One RespondActivityTasks call: the outcomes, and as many next tasks as slots asked for.
    /// While the server cannot be reached the call is retried with backoff, so a network blip
    /// does not cost a finished activity its result (and a re-run after its timeout).
    async fn send_report(&self, batch: Vec<PendingOutcome>, host_queue: &str) {
        let wanted = batch.iter().filter(|p| p.wants_next).count();
        let next_task = if wanted > 0 {
            self.next_task_request(host_queue)
        } else {
            None
        };
        let give_up_ms = batch
            .iter()
            .map(|p| p.deadline_ms)
            .filter(|d| *d > 0)
            .min()
            .unwrap_or(i64::MAX)
            .min(tether_wire::now_ms() + REPORT_RETRY_LIMIT.as_millis() as i64);
        let mut waiting = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for p in batch {
            outcomes.push(p.outcome);
            waiting.push((p.activity_id, p.wants_next, p.reply));
        }
        let request = pb::RespondActivityTasksRequest {
            identity: self.options.identity.clone(),
            outcomes,
            max_next_tasks: if next_task.is_some() {
                wanted as u32
            } else {
                0
            },
            next_task,
        };
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0;
        let reply = loop {
            tries += 1;
            match self
                .rpc
                .clone()
                .respond_activity_tasks(request.clone())
                .await
            {
                Err(status)
                    if is_transient(&status)
                        && tether_wire::now_ms() + (backoff.as_millis() as i64) < give_up_ms =>
                {
                    if tries == 1 {
                        tracing::warn!(error = %status.message(), code = ?status.code(), outcomes = waiting.len(), "could not report activity outcomes; retrying until the server is back");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => break other,
            }
        };
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                let mut next_tasks = reply
                    .next_tasks
                    .into_iter()
                    .filter(|t| !t.task_token.is_empty());
                for (i, (activity_id, wants_next, slot)) in waiting.into_iter().enumerate() {
                    if let Some(ack) = reply.acks.get(i).filter(|a| !a.error.is_empty()) {
                        if tries > 1 {
                            // An earlier try may have landed before its reply was lost.
                            tracing::info!(activity_id, error = %ack.error, "activity outcome refused on a retry (an earlier try may have recorded it)");
                        } else {
                            tracing::warn!(activity_id, error = %ack.error, "activity outcome refused");
                        }
                    }
                    let next = if wants_next { next_tasks.next() } else { None };
                    let _ = slot.send(next);
                }
                // The server never sends more than asked; were it to, the attempt would time out
                // and retry rather than vanish, so say so.
                for extra in next_tasks {
                    tracing::warn!(
                        activity_id = extra.activity_id,
                        "server sent more tasks than asked for; the attempt will time out and retry"
                    );
                }
            }
            Err(status) => {
                for (activity_id, _, slot) in waiting {
                    tracing::warn!(activity_id, error = %status.message(), code = ?status.code(), tries, "activity outcome not delivered; the attempt will time out and retry");
                    let _ = slot.send(None);
                }
            }
        }
    }
}

/// Errors that say the server could not be reached (or dropped the connection), not that it
/// refused the request: worth trying again.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

async fn heartbeat_loop(
    mut rpc: TetherServiceClient<Channel>,
    dc: codec::DataConverter,
    ctx: ActivityContext,
    token: Vec<u8>,
    identity: String,
    heartbeat_timeout_ms: u64,
) {
    // Send at most every 80% of the heartbeat timeout (30 s when there is none).
    let throttle = if heartbeat_timeout_ms > 0 {
        Duration::from_millis(heartbeat_timeout_ms * 4 / 5)
    } else {
        Duration::from_secs(30)
    };
    loop {
        ctx.shared.heartbeat_wanted.notified().await;
        let details = ctx.shared.pending_details.lock().take();
        let details = match dc.encode_opt(details) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat details could not be encoded");
                None
            }
        };
        let reply = rpc
            .heartbeat_activity(pb::HeartbeatActivityRequest {
                task_token: token.clone(),
                details,
                identity: identity.clone(),
            })
            .await;
        match reply {
            Ok(r) if r.get_ref().cancel_requested => ctx.cancel(CancelReason::Requested),
            Ok(_) => {}
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                ctx.cancel(CancelReason::NotCurrent)
            }
            Err(status) => tracing::debug!(error = %status.message(), "heartbeat failed"),
        }
        tokio::time::sleep(throttle).await;
    }
}

/// A small LRU of workflow instances by run id.
struct Cache {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (u64, WorkflowInstance)>,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Cache {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn take(&mut self, run_id: &str) -> Option<WorkflowInstance> {
        self.entries.remove(run_id).map(|(_, i)| i)
    }

    fn put(&mut self, run_id: String, instance: WorkflowInstance) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(run_id, (self.tick, instance));
    }
}
