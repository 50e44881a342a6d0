//! The tether server: a gRPC frontend (validation, limits, error mapping) over the [`Engine`]
//! (history state machine, matching, timers) over a [`Store`](crate::store::Store).
#![warn(missing_docs)]

pub mod auth;
mod clock;
pub mod cluster;
mod config;
mod engine;
mod error;
mod frontend;
pub mod history;
pub mod matching;
mod serve;
pub mod sessions;
pub mod state;
pub mod store;
pub mod timers;

pub use clock::Clock;
pub use config::{ServerConfig, DEFAULT_MAX_HISTORY_BYTES};
pub use engine::{
    Engine, EngineStats, ForeignSignals, NextTasks, RunSelector, RunTarget, StartedActivity,
    StorageFailure,
};
pub use error::EngineError;
pub use frontend::{Frontend, Reader};
pub use serve::{run, LocalServer, ServeError, StoreLocation};
pub use store::RunMatch;
pub use tether_wire::{MAX_GRPC_MESSAGE, RUN_ID_METADATA};
