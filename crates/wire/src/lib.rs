//! The wire contract every side shares: the code generated from
//! `proto/tether/v1/tether.proto`, the names both ends must agree on (queue naming, metadata
//! keys, message size), and small helpers used at the edges. Domain code converts to and from
//! these types only where it meets the wire. The server's persisted state is not here: it is
//! the server's own business (`tether-server`, module `state`).
#![warn(missing_docs)]

/// Generated code, nested like the proto packages so that other packages (the server's
/// persisted state) can refer to it by its proto path.
#[allow(clippy::all, missing_docs)]
pub mod generated {
    /// Package `tether`.
    pub mod tether {
        /// Package `tether.v1`: the public API.
        pub mod v1 {
            tonic::include_proto!("tether.v1");
        }
    }
}

pub use generated::tether::v1 as pb;

mod names;
pub use names::*;

use pb::history_event::Attributes;

/// Milliseconds since the Unix epoch, the time unit the wire uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl pb::HistoryEvent {
    /// The event's kind as a short, stable name (used in CLI output and error messages).
    pub fn kind_name(&self) -> &'static str {
        match &self.attributes {
            None => "Unknown",
            Some(a) => match a {
                Attributes::WorkflowExecutionStarted(_) => "WorkflowExecutionStarted",
                Attributes::WorkflowTaskCompleted(_) => "WorkflowTaskCompleted",
                Attributes::ActivityTaskScheduled(_) => "ActivityTaskScheduled",
                Attributes::ActivityTaskCompleted(_) => "ActivityTaskCompleted",
                Attributes::ActivityTaskFailed(_) => "ActivityTaskFailed",
                Attributes::ActivityTaskTimedOut(_) => "ActivityTaskTimedOut",
                Attributes::ActivityTaskCanceled(_) => "ActivityTaskCanceled",
                Attributes::ActivityCancelRequested(_) => "ActivityCancelRequested",
                Attributes::TimerStarted(_) => "TimerStarted",
                Attributes::TimerFired(_) => "TimerFired",
                Attributes::TimerCanceled(_) => "TimerCanceled",
                Attributes::WorkflowSignaled(_) => "WorkflowSignaled",
                Attributes::WorkflowCancelRequested(_) => "WorkflowCancelRequested",
                Attributes::MarkerRecorded(_) => "MarkerRecorded",
                Attributes::SignalExternalInitiated(_) => "SignalExternalInitiated",
                Attributes::SignalExternalResolved(_) => "SignalExternalResolved",
                Attributes::SessionCreateRequested(_) => "SessionCreateRequested",
                Attributes::SessionCreated(_) => "SessionCreated",
                Attributes::SessionCreateFailed(_) => "SessionCreateFailed",
                Attributes::SessionCompleteRequested(_) => "SessionCompleteRequested",
                Attributes::SessionEnded(_) => "SessionEnded",
                Attributes::WorkflowExecutionCompleted(_) => "WorkflowExecutionCompleted",
                Attributes::WorkflowExecutionFailed(_) => "WorkflowExecutionFailed",
                Attributes::WorkflowExecutionCanceled(_) => "WorkflowExecutionCanceled",
                Attributes::WorkflowExecutionTerminated(_) => "WorkflowExecutionTerminated",
                Attributes::WorkflowExecutionTimedOut(_) => "WorkflowExecutionTimedOut",
            },
        }
    }
}

impl pb::ExecutionStatus {
    /// Lower-case name used by the CLI (`running`, `completed`, ...).
    pub fn short_name(self) -> &'static str {
        match self {
            pb::ExecutionStatus::Unspecified => "unspecified",
            pb::ExecutionStatus::Running => "running",
            pb::ExecutionStatus::Completed => "completed",
            pb::ExecutionStatus::Failed => "failed",
            pb::ExecutionStatus::Canceled => "canceled",
            pb::ExecutionStatus::Terminated => "terminated",
            pb::ExecutionStatus::TimedOut => "timed_out",
        }
    }

    /// Parses the CLI name back.
    pub fn from_short_name(name: &str) -> Option<Self> {
        Some(match name {
            "running" => pb::ExecutionStatus::Running,
            "completed" => pb::ExecutionStatus::Completed,
            "failed" => pb::ExecutionStatus::Failed,
            "canceled" | "cancelled" => pb::ExecutionStatus::Canceled,
            "terminated" => pb::ExecutionStatus::Terminated,
            "timed_out" => pb::ExecutionStatus::TimedOut,
            _ => return None,
        })
    }
}

/// The `encoding` metadata key of a payload.
pub const ENCODING_KEY: &str = "encoding";
