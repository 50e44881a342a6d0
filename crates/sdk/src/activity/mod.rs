//! What activity code sees: [`ActivityContext`] (info, heartbeats, cancellation) and
//! [`ActivityError`], which says whether a failure should be retried.

use crate::codec;
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb;
use tokio::sync::{watch, Notify};

/// An activity's failure, as activity code returns it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActivityError {
    /// Try again (per the retry policy).
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// A type name matched against the policy's non-retryable types.
        error_type: String,
    },
    /// Do not try again.
    #[error("{message}")]
    NonRetryable {
        /// What went wrong.
        message: String,
        /// A type name.
        error_type: String,
    },
    /// The activity stopped because it was asked to cancel.
    #[error("activity cancelled")]
    Cancelled,
}

impl ActivityError {
    /// A failure that the retry policy may retry.
    pub fn retryable(message: impl Into<String>) -> Self {
        ActivityError::Retryable {
            message: message.into(),
            error_type: String::new(),
        }
    }

    /// A failure that is never retried.
    pub fn non_retryable(message: impl Into<String>) -> Self {
        ActivityError::NonRetryable {
            message: message.into(),
            error_type: String::new(),
        }
    }

    /// Sets the error type (matched against `RetryPolicy::non_retryable_error_types`).
    pub fn with_type(self, error_type: impl Into<String>) -> Self {
        match self {
            ActivityError::Retryable { message, .. } => ActivityError::Retryable {
                message,
                error_type: error_type.into(),
            },
            ActivityError::NonRetryable { message, .. } => ActivityError::NonRetryable {
                message,
                error_type: error_type.into(),
            },
            ActivityError::Cancelled => ActivityError::Cancelled,
        }
    }

    /// The wire form.
    pub fn to_failure(&self) -> pb::Failure {
        match self {
            ActivityError::Retryable {
                message,
                error_type,
            } => pb::Failure {
                message: message.clone(),
                error_type: error_type.clone(),
                kind: pb::FailureKind::Application as i32,
                ..Default::default()
            },
            ActivityError::NonRetryable {
                message,
                error_type,
            } => pb::Failure {
                message: message.clone(),
                error_type: error_type.clone(),
                non_retryable: true,
                kind: pb::FailureKind::Application as i32,
                ..Default::default()
            },
            ActivityError::Cancelled => pb::Failure {
                message: "activity cancelled".into(),
                kind: pb::FailureKind::Canceled as i32,
                ..Default::default()
            },
        }
    }
}

impl From<codec::ConvertError> for ActivityError {
    fn from(e: codec::ConvertError) -> Self {
        // Bad input will not get better on retry.
        ActivityError::non_retryable(e.to_string()).with_type("ConvertError")
    }
}

/// Facts about the running attempt.
#[derive(Debug, Clone)]
pub struct ActivityInfo {
    /// Namespace.
    pub namespace: tether_core::types::Namespace,
    /// Activity id.
    pub activity_id: tether_core::types::ActivityId,
    /// Activity type.
    pub activity_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The workflow that scheduled it (empty for a standalone activity).
    pub workflow_id: tether_core::types::WorkflowId,
    /// The run that scheduled it.
    pub run_id: tether_core::types::RunId,
    /// Task queue it was polled from.
    pub task_queue: tether_core::types::TaskQueue,
    /// Heartbeat timeout, if any.
    pub heartbeat_timeout: Option<Duration>,
    /// When this attempt must end (ms since the epoch).
    pub deadline_ms: i64,
    /// The identity of the worker running it.
    pub worker_identity: tether_core::types::WorkerId,
    /// The session it runs in, with the reservation (None outside sessions).
    pub session: Option<pb::SessionInfo>,
}

/// Why an activity was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Its workflow (or a client) asked for cancellation.
    Requested,
    /// The server no longer considers this attempt current (timed out, or the run closed).
    NotCurrent,
    /// The worker is shutting down and the grace period ran out.
    WorkerShutdown,
}

/// What an activity may use of the worker it runs on.
pub(crate) struct WorkerLocal {
    pub(crate) caps: crate::caps::CapabilitySource,
    /// Woken when labels change, so the worker re-advertises at once.
    pub(crate) caps_changed: Notify,
}

pub(crate) struct ActivityShared {
    pub(crate) info: ActivityInfo,
    pub(crate) worker: Option<Arc<WorkerLocal>>,
    pub(crate) previous_details: Option<pb::Payload>,
    pub(crate) pending_details: Mutex<Option<pb::Payload>>,
    /// Whether the attempt ever recorded a heartbeat.
    pub(crate) heartbeated: std::sync::atomic::AtomicBool,
    pub(crate) heartbeat_wanted: Notify,
    pub(crate) cancel: watch::Sender<Option<CancelReason>>,
}

/// Handed to activity code: info about the attempt, heartbeats and cancellation.
#[derive(Clone)]
pub struct ActivityContext {
    pub(crate) shared: Arc<ActivityShared>,
}

impl ActivityContext {
    pub(crate) fn new(
        info: ActivityInfo,
        previous_details: Option<pb::Payload>,
        worker: Option<Arc<WorkerLocal>>,
    ) -> Self {
        let (cancel, _) = watch::channel(None);
        ActivityContext {
            shared: Arc::new(ActivityShared {
                info,
                worker,
                previous_details,
                pending_details: Mutex::new(None),
                heartbeated: std::sync::atomic::AtomicBool::new(false),
                heartbeat_wanted: Notify::new(),
                cancel,
            }),
        }
    }

    /// Facts about this attempt.
    pub fn info(&self) -> &ActivityInfo {
        &self.shared.info
    }

    /// Records progress. Heartbeats are sent in the background, throttled; the server keeps the
    /// latest details so the next attempt can resume from them.
    pub fn heartbeat<T: Serialize + ?Sized>(&self, details: &T) {
        match codec::to_payload(details) {
            Ok(p) => *self.shared.pending_details.lock() = Some(p),
            Err(e) => tracing::warn!(error = %e, "heartbeat details could not be encoded"),
        }
        self.shared
            .heartbeated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.heartbeat_wanted.notify_one();
    }

    /// Records progress with details already converted to a payload (see [`Self::heartbeat`]):
    /// how an SDK in another language hands over its own encoding.
    pub fn heartbeat_payload(&self, details: pb::Payload) {
        *self.shared.pending_details.lock() = Some(details);
        self.shared
            .heartbeated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.heartbeat_wanted.notify_one();
    }

    /// The payload of the last heartbeat of a previous attempt, if any (codecs already undone).
    pub fn heartbeat_details_payload(&self) -> Option<&pb::Payload> {
        self.shared.previous_details.as_ref()
    }

    /// The details of the last heartbeat of a previous attempt, if any.
    pub fn heartbeat_details<T: DeserializeOwned>(&self) -> Option<T> {
        let p = self.shared.previous_details.as_ref()?;
        codec::from_payload(Some(p)).ok()
    }

    /// The session this activity runs in, if any: its id, worker and reserved GPUs/resources.
    pub fn session(&self) -> Option<&pb::SessionInfo> {
        self.shared.info.session.as_ref()
    }

    /// `CUDA_VISIBLE_DEVICES` for the session's reserved GPUs (e.g. "2,3"); None outside a
    /// session, "" for a session without GPUs.
    pub fn cuda_visible_devices(&self) -> Option<String> {
        let s = self.session()?;
        Some(
            s.gpus
                .iter()
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// A command for a child process that sees only the session's GPUs (`CUDA_VISIBLE_DEVICES`
    /// set; also `TETHER_SESSION_ID`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        if let Some(devices) = self.cuda_visible_devices() {
            cmd.env("CUDA_VISIBLE_DEVICES", devices);
        }
        if let Some(s) = self.session() {
            cmd.env("TETHER_SESSION_ID", &s.session_id);
        }
        cmd
    }

    /// Reads a credential declared on this worker, by name. The secret is read here, on the
    /// worker; it never travels to the server.
    pub fn credential(&self, name: &str) -> Result<String, ActivityError> {
        self.shared
            .worker
            .as_ref()
            .and_then(|w| w.caps.read_credential(name))
            .ok_or_else(|| {
                ActivityError::non_retryable(format!(
                    "credential {name:?} is not available on worker {}",
                    self.shared.info.worker_identity
                ))
                .with_type("CredentialMissing")
            })
    }

    /// Sets a label on this worker (e.g. `model_loaded=llama-70b`); the worker advertises it at
    /// once, so routing can follow.
    pub fn set_label(&self, key: impl Into<String>, value: impl Into<String>) {
        if let Some(w) = &self.shared.worker {
            w.caps.labels().write().insert(key.into(), value.into());
            w.caps_changed.notify_one();
        }
    }

    /// Removes a label from this worker.
    pub fn remove_label(&self, key: &str) {
        if let Some(w) = &self.shared.worker {
            w.caps.labels().write().remove(key);
            w.caps_changed.notify_one();
        }
    }

    /// True once the activity has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.borrow().is_some()
    }

    /// Why it was asked to stop, if it was.
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        *self.shared.cancel.borrow()
    }

    /// Resolves when the activity is asked to stop. Cancellation reaches a running activity
    /// through heartbeat responses, so an activity that wants it must heartbeat.
    pub async fn cancelled(&self) {
        let mut rx = self.shared.cancel.subscribe();
        let _ = rx.wait_for(|c| c.is_some()).await;
    }

    pub(crate) fn cancel(&self, reason: CancelReason) {
        self.shared.cancel.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(reason);
                true
            } else {
                false
            }
        });
    }
}
