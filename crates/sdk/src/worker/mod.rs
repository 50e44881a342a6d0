//! The worker: registers workflows and activities by name, long-polls a task queue (and its own
//! sticky queue), runs activities with bounded concurrency and heartbeats, keeps workflows it ran
//! in a bounded sticky cache, and shuts down gracefully.

mod activities;
mod cache;
mod identity;
mod inner;
mod options;
mod registration;
mod reporter;
mod start;
mod workflows;

pub use identity::{default_state_dir, IdentityError};
pub use options::{WorkerError, WorkerOptions};
pub use start::{Worker, WorkerHandle};
pub use tether_wire::STICKY_QUEUE_PREFIX;
