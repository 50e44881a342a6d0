//! What every request is checked against before the engine sees it: names, sizes, durations,
//! page sizes, registration limits, host queues.

use crate::history::check_payload;
use tether_core::types::validate_name;
use tether_wire::pb;
use tonic::Status;

/// Most list entries in one page, and the default.
pub(super) const MAX_PAGE_SIZE: u32 = 1_000;
pub(super) const DEFAULT_PAGE_SIZE: u32 = 100;

pub(super) fn page_size(requested: u32) -> usize {
    if requested == 0 {
        DEFAULT_PAGE_SIZE as usize
    } else {
        requested.min(MAX_PAGE_SIZE) as usize
    }
}

/// Bounds on what a worker may register, so that one worker cannot make lists undeliverable
/// (see `RegisterWorkerRequest` in the proto).
pub(super) mod registration_limits {
    pub const TASK_QUEUES: usize = 64;
    pub const GPUS: usize = 64;
    pub const ENTRIES: usize = 256;
    pub const ADDRESSES: usize = 64;
    pub const STRING_BYTES: usize = 1024;
    pub const TOTAL_BYTES: usize = 256 * 1024;
}

/// Refuses capabilities past the registration limits, naming what was too large.
pub(super) fn check_capabilities(caps: Option<&pb::Capabilities>) -> Result<(), Status> {
    use registration_limits::*;
    let Some(c) = caps else { return Ok(()) };
    let too_many = |what: &str, n: usize, max: usize| {
        Err(Status::invalid_argument(format!(
            "the worker's capabilities list {n} {what}; at most {max} may be registered"
        )))
    };
    let long = |what: &str, value: &str| -> Result<(), Status> {
        if value.len() > STRING_BYTES {
            return Err(Status::invalid_argument(format!(
                "{what} {:?} is {} bytes; at most {STRING_BYTES} bytes may be registered",
                tether_core::types::quote_prefix(value, 40),
                value.len()
            )));
        }
        Ok(())
    };
    if c.gpus.len() > GPUS {
        return too_many("GPUs", c.gpus.len(), GPUS);
    }
    for (what, n) in [
        ("labels", c.labels.len()),
        ("credentials", c.credentials.len()),
        ("network capabilities", c.network.len()),
        ("resources", c.resources.len()),
        ("network interfaces", c.interfaces.len()),
    ] {
        if n > ENTRIES {
            return too_many(what, n, ENTRIES);
        }
    }
    for (k, v) in &c.labels {
        long("label name", k)?;
        long("label value", v)?;
    }
    for k in c.resources.keys() {
        long("resource name", k)?;
    }
    for x in c.credentials.iter().chain(&c.network) {
        long("capability", x)?;
    }
    for i in &c.interfaces {
        long("interface name", &i.name)?;
        if i.addresses.len() > ADDRESSES {
            return too_many("addresses on one interface", i.addresses.len(), ADDRESSES);
        }
    }
    for g in &c.gpus {
        long("GPU name", &g.name)?;
        long("GPU uuid", &g.uuid)?;
    }
    if let Some(h) = &c.host {
        for v in [
            &h.hostname,
            &h.os,
            &h.kernel,
            &h.arch,
            &h.cpu_model,
            &h.work_dir,
        ] {
            long("host fact", v)?;
        }
    }
    for v in [&c.gpu_driver_version, &c.cuda_driver_version, &c.gpu_note] {
        long("GPU fact", v)?;
    }
    // Last: each count and string within bounds can still add up.
    let size = prost::Message::encoded_len(c);
    if size > TOTAL_BYTES {
        return Err(Status::invalid_argument(format!(
            "the worker's capabilities take {size} bytes; at most {TOTAL_BYTES} bytes may be \
             registered"
        )));
    }
    Ok(())
}

pub(super) fn duration(field: &str, ms: u64) -> Result<(), Status> {
    tether_core::types::check_duration_ms(field, ms).map_err(Status::invalid_argument)
}

pub(super) fn name(what: &'static str, value: &str) -> Result<(), Status> {
    validate_name(what, value).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub(super) fn optional_name(what: &'static str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Ok(())
    } else {
        name(what, value)
    }
}

/// A host queue is its worker's alone: this is what keeps session work on its worker.
pub(super) fn check_host_queue(queue: &str, identity: &str) -> Result<(), Status> {
    if queue.starts_with(crate::matching::HOST_QUEUE_PREFIX)
        && queue != crate::matching::host_queue_name(identity)
    {
        return Err(Status::permission_denied(format!(
            "task queue {queue:?} is the host queue of another worker; worker {identity:?} may poll only {:?}",
            crate::matching::host_queue_name(identity)
        )));
    }
    Ok(())
}

pub(super) fn payload(what: &str, p: Option<&pb::Payload>, max: usize) -> Result<(), Status> {
    check_payload(what, p, max).map_err(Status::from)
}

/// Most outcomes one RespondActivityTasks call may carry.
pub(super) const MAX_OUTCOMES_PER_BATCH: usize = 1000;
/// Most tasks one RespondActivityTasks call may ask for.
pub(super) const MAX_NEXT_TASKS: u32 = 1000;

pub(super) fn status_filter(raw: i32) -> Result<Option<i32>, Status> {
    match pb::ExecutionStatus::try_from(raw) {
        Ok(pb::ExecutionStatus::Unspecified) => Ok(None),
        Ok(s) => Ok(Some(s as i32)),
        Err(_) => Err(Status::invalid_argument(format!(
            "status {raw} is not a known execution status"
        ))),
    }
}

pub(super) fn kind_is_activity(kind: &str) -> Result<bool, Status> {
    match kind {
        "" | "workflow" => Ok(false),
        "activity" => Ok(true),
        other => Err(Status::invalid_argument(format!(
            "kind {other:?} is not known: use \"workflow\" or \"activity\""
        ))),
    }
}

/// A listing's filters beyond status and kind, checked as names are.
pub(super) fn run_match(req: &pb::ListWorkflowsRequest) -> Result<crate::store::RunMatch, Status> {
    optional_name("workflow type", &req.workflow_type)?;
    optional_name("task queue", &req.task_queue)?;
    if req.workflow_id_prefix.len() > 1024 {
        return Err(Status::invalid_argument(
            "workflow_id_prefix is longer than 1,024 bytes; no id is that long",
        ));
    }
    Ok(crate::store::RunMatch {
        workflow_type: req.workflow_type.clone(),
        task_queue: req.task_queue.clone(),
        id_prefix: req.workflow_id_prefix.clone(),
    })
}
