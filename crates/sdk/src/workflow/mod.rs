//! The deterministic workflow runtime.
//!
//! A workflow is an `async fn(WorkflowContext, Input) -> Result<Output, WorkflowError>`. The worker
//! polls it with its own waker (never with tokio), one activation per workflow task: it applies
//! the events the workflow has not seen, polls until no more progress is possible, and sends the
//! commands the code issued. On replay every command the code issues is matched, in order, against
//! the command events history recorded for it; a mismatch is non-determinism, reported as a failed
//! workflow task rather than run.
//!
//! Workflow code must not use tokio, threads, wall-clock time or unseeded randomness: the context
//! offers durable timers, signals, deterministic `now`, random numbers and uuids, side effects and
//! cancellation instead.

mod context;
mod instance;

pub use context::{
    ActivityFailure, ActivityFailureKind, ActivityFuture, CancelledFuture, RecreatePolicy,
    SessionFuture, SessionHandle, SignalChannel, SignalExternalFuture, SignalFuture, TimerFuture,
    WorkflowContext, WorkflowError, WorkflowInfo,
};
pub(crate) use instance::{WorkflowFactory, WorkflowInstance};
