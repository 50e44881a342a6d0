//! The tether SDK: what an application links to start and watch work ([`client`]) and to host
//! workflow and activity code ([`worker`], [`workflow`], [`activity`]), with the payload codecs
//! ([`codec`]) and capability detection ([`caps`]). It compiles no server, store, HTTP or CLI
//! code.
#![warn(missing_docs)]

pub mod activity;
pub mod caps;
pub mod client;
pub mod codec;
pub mod fuzz_checks;
pub mod worker;
pub mod workflow;

pub use tether_core::{tls, types};
pub use tether_wire as api;
