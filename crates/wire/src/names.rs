//! Names client, worker and server must spell the same way.

/// Sticky queues are named with this prefix, so tools can tell them from real task queues.
pub const STICKY_QUEUE_PREFIX: &str = "__sticky/";

/// A worker's own host queue is this prefix followed by its identity.
pub const HOST_QUEUE_PREFIX: &str = "host/";

/// The host queue of the worker with this identity: work sent there runs on that machine.
pub fn host_queue_name(identity: &str) -> String {
    format!("{HOST_QUEUE_PREFIX}{identity}")
}

/// Metadata key carrying, on an UNAVAILABLE reply from a cluster replica that does not hold
/// the call's namespace, the address of the replica that does: the SDK resends the call there
/// (nothing of it was done where it was refused).
pub const OWNER_METADATA: &str = "tether-owner";

/// Metadata key carrying the running run's id on an ALREADY_EXISTS reply to a start.
pub const RUN_ID_METADATA: &str = "tether-run-id";

/// Largest gRPC message accepted or sent, by the server and by clients alike; payloads above
/// the server's `max_payload_bytes` get its own clear error instead of a transport error, as
/// long as the whole message is below this.
pub const MAX_GRPC_MESSAGE: usize = 64 * 1024 * 1024;
