//! What a client call can fail with, and which failures are worth trying again.

use crate::codec::ConvertError;
use tether_wire::pb::{self};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address was malformed or the server could not be reached.
    #[error("could not connect to {address}: {reason}")]
    Connect {
        /// The address.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused or failed the call: its gRPC code, and its message (what was wrong
    /// and what to do). Not chained as a source: the message is all there is to it, and an
    /// error report that prints sources would print it twice.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(tonic::Status),
    /// The id is already running (`what`: workflow or activity).
    #[error("{what} id {workflow_id:?} is already running as run {run_id}")]
    AlreadyStarted {
        /// Workflow or activity.
        what: &'static str,
        /// Id.
        workflow_id: String,
        /// The running run.
        run_id: String,
    },
    /// The run closed without a result.
    #[error("{what} {id} ended {}: {}", status.short_name(), failure.message)]
    Failed {
        /// Workflow or activity.
        what: &'static str,
        /// Its id.
        id: String,
        /// How it ended.
        status: pb::ExecutionStatus,
        /// Why.
        failure: Box<pb::Failure>,
    },
    /// A value could not be converted.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(status)
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as other gRPC tools print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl ClientError {
    /// The gRPC code, when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc(s) => Some(s.code()),
            ClientError::AlreadyStarted { .. } => Some(tonic::Code::AlreadyExists),
            _ => None,
        }
    }
}

/// Errors that say the server could not be reached (or dropped the connection), not that it
/// refused the request: worth trying again.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Turns a refused start into an error; ALREADY_EXISTS carries the running run's id.
pub(super) fn start_error(status: tonic::Status, id: String, what: &'static str) -> ClientError {
    if status.code() != tonic::Code::AlreadyExists {
        return status.into();
    }
    let run_id = status
        .metadata()
        .get(tether_wire::RUN_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ClientError::AlreadyStarted {
        what,
        workflow_id: id,
        run_id,
    }
}
