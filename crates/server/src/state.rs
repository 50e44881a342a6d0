//! The server's persisted state of runs and sessions (`proto/tether/internal/state.proto`).
//! Internal: kept in protobuf so stored state stays readable across versions, but no part of
//! the public API.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("tether.internal");
