//! What an engine operation can fail with, and how each failure reaches the wire.

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
                    status
                        .metadata_mut()
                        .insert(tether_wire::RUN_ID_METADATA, v);
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
