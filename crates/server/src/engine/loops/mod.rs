//! The engine's background loops, one per file.

mod gauges;
mod liveness;
mod pruning;
mod retention;
mod session_checks;
mod timers;
