//! Options of what a client starts: workflows, activities (with their retry policy), standalone activities, sessions, and the client itself.

use crate::codec::{self};
use std::time::Duration;
use tether_wire::pb::{self};

/// How the client identifies itself and which namespace it works in.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Namespace for every call. Default `default`.
    pub namespace: String,
    /// Who is calling, recorded in history. Default `HOSTNAME:PID`.
    pub identity: String,
    /// Payload conversion and codecs (e.g. AES-256-GCM encryption), applied to every payload
    /// this client and workers built on it send and receive. Default: JSON, no codec.
    pub data_converter: codec::DataConverter,
    /// TLS settings (server CA, client certificate for mTLS). Default: plaintext.
    pub tls: Option<tether_core::tls::ClientTls>,
    /// How long the client keeps trying while the server cannot be reached (down, restarting,
    /// or refusing everything after a storage failure): `connect` waits for it, and calls that
    /// are safe to repeat (reads, result waits, starts and signals, which carry request ids,
    /// cancellations, session creation) are retried with backoff. Default 30 s; zero fails at
    /// once.
    pub retry_for: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            namespace: tether_core::types::DEFAULT_NAMESPACE.into(),
            identity: default_identity(),
            data_converter: codec::DataConverter::default(),
            tls: None,
            retry_for: Duration::from_secs(30),
        }
    }
}

/// Options for starting a workflow.
#[derive(Debug, Clone)]
pub struct WorkflowOptions {
    /// Workflow id (unique among running workflows of the namespace). Required.
    pub id: tether_core::types::WorkflowId,
    /// Task queue the workflow's tasks go to. Required.
    pub task_queue: tether_core::types::TaskQueue,
    /// Run timeout. Default: none.
    pub run_timeout: Option<Duration>,
    /// Workflow task timeout. Default 10 s.
    pub task_timeout: Option<Duration>,
}

impl WorkflowOptions {
    /// Options with the given id and task queue and defaults for the rest.
    pub fn new(
        id: impl Into<tether_core::types::WorkflowId>,
        task_queue: impl Into<tether_core::types::TaskQueue>,
    ) -> Self {
        WorkflowOptions {
            id: id.into(),
            task_queue: task_queue.into(),
            run_timeout: None,
            task_timeout: None,
        }
    }
}

/// Activity options as the SDK takes them. Defaults are written on each field.
#[derive(Debug, Clone, Default)]
pub struct ActivityOptions {
    /// Task queue; empty = the workflow's own. Default empty.
    pub task_queue: String,
    /// Limit on one attempt. Default 60 s (when schedule_to_close is not set either).
    pub start_to_close: Option<Duration>,
    /// Limit on all attempts together, backoffs included. Default none.
    pub schedule_to_close: Option<Duration>,
    /// Limit on waiting in the queue. Default none.
    pub schedule_to_start: Option<Duration>,
    /// Longest gap between heartbeats. Default none.
    pub heartbeat: Option<Duration>,
    /// Retry policy. Default: initial 1 s, backoff 2.0, max interval 100 s, unlimited attempts.
    pub retry: RetryPolicy,
    /// What the worker must have (hard) and should have (preferences). Default none.
    pub requirements: crate::caps::Requirements,
    /// Run on this worker only (its host queue). Default none.
    pub worker: Option<String>,
    /// Run inside this session. Default none.
    pub session_id: Option<String>,
}

/// The default attempt timeout when neither start_to_close nor schedule_to_close is given.
pub const DEFAULT_START_TO_CLOSE: Duration = Duration::from_secs(60);

/// A duration for a field that must hold a limit (`Duration::MAX`: the longest allowed).
pub(super) fn ms(d: Option<Duration>) -> u64 {
    d.map(tether_core::types::duration_ms).unwrap_or(0)
}

/// A duration for a field where 0 means no limit (`Duration::MAX`: no limit).
pub(super) fn limit(d: Option<Duration>) -> u64 {
    d.map(tether_core::types::limit_ms).unwrap_or(0)
}

impl ActivityOptions {
    /// Sets the attempt timeout.
    pub fn start_to_close(mut self, d: Duration) -> Self {
        self.start_to_close = Some(d);
        self
    }
    /// Sets the overall timeout.
    pub fn schedule_to_close(mut self, d: Duration) -> Self {
        self.schedule_to_close = Some(d);
        self
    }
    /// Sets the queue-wait timeout.
    pub fn schedule_to_start(mut self, d: Duration) -> Self {
        self.schedule_to_start = Some(d);
        self
    }
    /// Sets the heartbeat timeout.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = Some(d);
        self
    }
    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets the task queue.
    pub fn task_queue(mut self, q: impl Into<String>) -> Self {
        self.task_queue = q.into();
        self
    }
    /// Sets the requirements.
    pub fn requirements(mut self, requirements: crate::caps::Requirements) -> Self {
        self.requirements = requirements;
        self
    }
    /// Runs the activity on one worker only, through that worker's host queue (e.g. the worker
    /// an earlier step reported with `ctx.info().worker_identity`).
    pub fn on_worker(mut self, identity: impl Into<String>) -> Self {
        self.worker = Some(identity.into());
        self
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::ActivityOptions {
        let start_to_close = match (self.start_to_close, self.schedule_to_close) {
            (None, None) => Some(DEFAULT_START_TO_CLOSE),
            (s, _) => s,
        };
        pb::ActivityOptions {
            task_queue: self.task_queue.clone(),
            schedule_to_close_timeout_ms: limit(self.schedule_to_close),
            schedule_to_start_timeout_ms: limit(self.schedule_to_start),
            start_to_close_timeout_ms: ms(start_to_close),
            heartbeat_timeout_ms: limit(self.heartbeat),
            retry_policy: Some(self.retry.to_proto()),
            requirements: self.requirements.to_string(),
            worker: self.worker.clone().unwrap_or_default(),
            session_id: self.session_id.clone().unwrap_or_default(),
        }
    }
}

/// When and how often a failed activity is tried again. Defaults are written on each field.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Wait before the second attempt. Default 1 s.
    pub initial_interval: Duration,
    /// Each wait is this times the previous. Default 2.0.
    pub backoff_coefficient: f64,
    /// Longest wait. Default 100 × initial_interval.
    pub maximum_interval: Option<Duration>,
    /// Most attempts; 0 = unlimited. Default 0.
    pub maximum_attempts: u32,
    /// Error types that are never retried. Default none.
    pub non_retryable_error_types: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            maximum_interval: None,
            maximum_attempts: 0,
            non_retryable_error_types: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The wire form.
    pub fn to_proto(&self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            initial_interval_ms: tether_core::types::duration_ms(self.initial_interval).max(1),
            backoff_coefficient: self.backoff_coefficient,
            maximum_interval_ms: ms(self.maximum_interval),
            maximum_attempts: self.maximum_attempts,
            non_retryable_error_types: self.non_retryable_error_types.clone(),
        }
    }
}

/// Options for a standalone activity.
#[derive(Debug, Clone)]
pub struct StandaloneActivityOptions {
    /// Activity id (unique among running standalone activities of the namespace). Required.
    pub id: tether_core::types::ActivityId,
    /// Task queue. Required.
    pub task_queue: tether_core::types::TaskQueue,
    /// Timeouts and retries.
    pub options: ActivityOptions,
}

impl StandaloneActivityOptions {
    /// Options with defaults for timeouts and retries.
    pub fn new(
        id: impl Into<tether_core::types::ActivityId>,
        task_queue: impl Into<tether_core::types::TaskQueue>,
    ) -> Self {
        StandaloneActivityOptions {
            id: id.into(),
            task_queue: task_queue.into(),
            options: ActivityOptions::default(),
        }
    }
}

/// What a session asks for. Defaults are written on each field.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Task queue whose workers may host it. Required.
    pub task_queue: String,
    /// Hard requirements and preferences; per-GPU predicates also select the GPUs. Default none.
    pub requirements: crate::caps::Requirements,
    /// GPUs to reserve. Default 0.
    pub gpus: u32,
    /// Resource units to reserve. Default none.
    pub resources: std::collections::BTreeMap<String, u64>,
    /// "tightest" (default) or "spread".
    pub packing: String,
    /// How long to wait for a placement. Default 60 s.
    pub creation_timeout: Option<Duration>,
    /// When the session ends by itself. Default 24 h.
    pub execution_timeout: Option<Duration>,
    /// How long its worker may be silent before the session fails. Default: the server's worker
    /// liveness timeout (15 s).
    pub liveness_timeout: Option<Duration>,
    /// Only this worker may host it. Default none.
    pub worker: Option<String>,
    /// For a session a client owns: it ends after this long with no activity in it. Default
    /// 10 min. (A workflow's sessions end with the workflow run.)
    pub idle_timeout: Option<Duration>,
}

impl SessionOptions {
    /// Options for a task queue.
    pub fn new(task_queue: impl Into<String>) -> Self {
        SessionOptions {
            task_queue: task_queue.into(),
            ..Default::default()
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::SessionOptions {
        pb::SessionOptions {
            task_queue: self.task_queue.clone(),
            requirements: self.requirements.to_string(),
            gpus: self.gpus,
            resources: self.resources.clone().into_iter().collect(),
            packing: self.packing.clone(),
            creation_timeout_ms: ms(self.creation_timeout),
            execution_timeout_ms: ms(self.execution_timeout),
            liveness_timeout_ms: ms(self.liveness_timeout),
            worker: self.worker.clone().unwrap_or_default(),
            idle_timeout_ms: ms(self.idle_timeout),
        }
    }
}

/// `HOSTNAME:PID`, the default identity of clients and workers.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}
