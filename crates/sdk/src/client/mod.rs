//! The client: start workflows by name, signal, cancel, terminate, describe, wait for results,
//! and run standalone activities. Thin over the gRPC API; values go through the data converter.

mod activities;
mod connect;
mod error;
mod options;
mod routing;
mod sessions;
mod workflows;

pub use activities::ActivityHandle;
pub use connect::{Client, Rpc};
pub use error::{code_name, is_transient, ClientError};
pub use options::{
    default_identity, ActivityOptions, ClientOptions, RetryPolicy, SessionOptions,
    StandaloneActivityOptions, WorkflowOptions, DEFAULT_START_TO_CLOSE,
};
pub use routing::Routed;
pub use sessions::Session;
pub use workflows::WorkflowHandle;
