//! The deterministic workflow runtime, in two parts with "activation in, commands out" between
//! them:
//!
//! - `replay`: what does not depend on how the code is written. It splits a workflow task's
//!   events into activations, hands each to the code that has not run it yet, and matches every
//!   command the code issues, in order, against the command events history recorded for it; a
//!   mismatch is non-determinism, reported as a failed workflow task rather than run. The code
//!   behind it is a [`WorkflowCode`].
//! - `future_code`: a Rust workflow, an `async fn(WorkflowContext, Input) -> Result<Output,
//!   WorkflowError>`, as a [`WorkflowCode`]: the worker polls it with its own waker (never with
//!   tokio), applying each activation's events and polling until no more progress is possible.
//!   Code in another language implements [`WorkflowCode`] instead and registers it with
//!   `Worker::register_workflow_code`.
//!
//! Workflow code must not use tokio, threads, wall-clock time or unseeded randomness: the context
//! offers durable timers, signals, deterministic `now`, random numbers and uuids, side effects and
//! cancellation instead.

mod context;
mod future_code;
mod replay;

pub use context::{
    ActivityFailure, ActivityFailureKind, ActivityFuture, CancelledFuture, RecreatePolicy,
    SessionFuture, SessionHandle, SignalChannel, SignalExternalFuture, SignalFuture, TimerFuture,
    WorkflowContext, WorkflowError, WorkflowInfo,
};
pub(crate) use future_code::{FutureCode, WorkflowFactory};
pub(crate) use replay::{panic_failure, WorkflowInstance};
pub use replay::{TaskFailure, WorkflowCode};

/// Makes the code of one run of a workflow type, from the run's facts.
pub type WorkflowCodeFactory =
    std::sync::Arc<dyn Fn(WorkflowInfo) -> Box<dyn WorkflowCode> + Send + Sync>;
