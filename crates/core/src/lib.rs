//! Domain types every side of tether shares: typed ids, limits and name validation
//! ([`types`]), the requirements language work is routed by ([`requirements`]), and the TLS
//! material servers, clients and workers load ([`tls`]).
#![warn(missing_docs)]

pub mod requirements;
pub mod tls;
pub mod types;
