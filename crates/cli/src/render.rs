//! How data is shown: JSON forms of runs, events, workers, sessions and capabilities, their text forms, and stdout itself.

use crate::args::Global;
use serde_json::{json, Value};
use tether_sdk::codec;
use tether_wire::pb;

pub(crate) fn emit(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(line.as_bytes())
        .and_then(|_| stdout.write_all(b"\n"));
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: could not write to stdout: {e}");
        std::process::exit(1);
    }
}

/// How a retention period reads in listings.
pub(crate) fn retention_text(ms: u64) -> String {
    match ms {
        0 => "forever".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

pub(crate) fn payload_json(p: Option<&pb::Payload>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => match codec::encoding_of(p).as_str() {
            codec::JSON_ENCODING | "" => serde_json::from_slice(&p.data).unwrap_or_else(
                |_| json!({ "undecodable_json": String::from_utf8_lossy(&p.data) }),
            ),
            codec::ENCRYPTED_ENCODING => json!({
                "encoding": codec::ENCRYPTED_ENCODING,
                "key_id": p.metadata.get(codec::KEY_ID_KEY).map(|v| String::from_utf8_lossy(v).into_owned()),
                "bytes": p.data.len(),
            }),
            enc => json!({ "encoding": enc, "bytes": p.data.len() }),
        },
    }
}

pub(crate) fn failure_json(f: Option<&pb::Failure>) -> Value {
    match f {
        None => Value::Null,
        Some(f) => json!({
            "message": f.message,
            "error_type": f.error_type,
            "non_retryable": f.non_retryable,
            "kind": pb::FailureKind::try_from(f.kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN"),
            "timeout_type": f.timeout_type,
            "cause": failure_json(f.cause.as_deref()),
        }),
    }
}

pub(crate) fn time_text(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since epoch (Howard Hinnant's algorithm), to avoid a date dependency.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

pub(crate) fn status_name(raw: i32) -> &'static str {
    pb::ExecutionStatus::try_from(raw)
        .unwrap_or_default()
        .short_name()
}

pub(crate) fn execution_json(e: &pb::ExecutionInfo) -> Value {
    json!({
        "namespace": e.namespace,
        "workflow_id": e.workflow_id,
        "run_id": e.run_id,
        "type": e.workflow_type,
        "task_queue": e.task_queue,
        "status": status_name(e.status),
        "start_time": time_text(e.start_ms),
        "close_time": if e.close_ms > 0 { json!(time_text(e.close_ms)) } else { Value::Null },
        "history_length": e.history_length,
        "kind": e.kind,
    })
}

pub(crate) fn event_json(e: &pb::HistoryEvent) -> Value {
    use pb::history_event::Attributes as A;
    let details = match &e.attributes {
        Some(A::WorkflowExecutionStarted(a)) => {
            json!({"workflow_type": a.workflow_type, "task_queue": a.task_queue, "input": payload_json(a.input.as_ref())})
        }
        Some(A::WorkflowTaskCompleted(a)) => json!({"identity": a.identity}),
        Some(A::ActivityTaskScheduled(a)) => {
            json!({"seq": a.seq, "activity_id": a.activity_id, "activity_type": a.activity_type, "input": payload_json(a.input.as_ref()), "task_queue": a.options.as_ref().map(|o| o.task_queue.clone())})
        }
        Some(A::ActivityTaskCompleted(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "identity": a.identity, "result": payload_json(a.result.as_ref())})
        }
        Some(A::ActivityTaskFailed(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "identity": a.identity, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::ActivityTaskTimedOut(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::ActivityTaskCanceled(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id})
        }
        Some(A::ActivityCancelRequested(a)) => json!({"seq": a.seq}),
        Some(A::TimerStarted(a)) => json!({"seq": a.seq, "duration_ms": a.duration_ms}),
        Some(A::TimerFired(a)) => json!({"seq": a.seq}),
        Some(A::TimerCanceled(a)) => json!({"seq": a.seq}),
        Some(A::WorkflowSignaled(a)) => {
            json!({"signal_name": a.signal_name, "input": payload_json(a.input.as_ref()), "identity": a.identity})
        }
        Some(A::WorkflowCancelRequested(a)) => json!({"reason": a.reason, "identity": a.identity}),
        Some(A::MarkerRecorded(a)) => {
            json!({"seq": a.seq, "marker_name": a.marker_name, "data": payload_json(a.data.as_ref())})
        }
        Some(A::SignalExternalInitiated(a)) => {
            json!({"seq": a.seq, "namespace": a.namespace, "workflow_id": a.workflow_id, "signal_name": a.signal_name})
        }
        Some(A::SignalExternalResolved(a)) => {
            json!({"seq": a.seq, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::SessionCreateRequested(a)) => {
            json!({"seq": a.seq, "session_id": a.session_id, "options": a.options.as_ref().map(|o| json!({"task_queue": o.task_queue, "requirements": o.requirements, "gpus": o.gpus, "resources": o.resources, "worker": o.worker}))})
        }
        Some(A::SessionCreated(a)) => {
            json!({"seq": a.seq, "session": a.session.as_ref().map(session_json)})
        }
        Some(A::SessionCreateFailed(a)) => {
            json!({"seq": a.seq, "session_id": a.session_id, "reason": a.reason})
        }
        Some(A::SessionCompleteRequested(a)) => json!({"seq": a.seq, "session_id": a.session_id}),
        Some(A::SessionEnded(a)) => {
            json!({"session_id": a.session_id, "state": a.state, "reason": a.reason})
        }
        Some(A::WorkflowExecutionCompleted(a)) => {
            json!({"result": payload_json(a.result.as_ref())})
        }
        Some(A::WorkflowExecutionFailed(a)) => json!({"failure": failure_json(a.failure.as_ref())}),
        Some(A::WorkflowExecutionCanceled(_)) => json!({}),
        Some(A::WorkflowExecutionTerminated(a)) => {
            json!({"reason": a.reason, "identity": a.identity})
        }
        Some(A::WorkflowExecutionTimedOut(_)) => json!({}),
        None => json!({}),
    };
    json!({ "event_id": e.event_id, "time": time_text(e.time_ms), "type": e.kind_name(), "details": details })
}

pub(crate) fn caps_json(c: &pb::Capabilities) -> Value {
    let h = c.host.clone().unwrap_or_default();
    json!({
        "host": {
            "hostname": h.hostname, "os": h.os, "kernel": h.kernel, "arch": h.arch,
            "cpu_model": h.cpu_model, "logical_cores": h.logical_cores, "physical_cores": h.physical_cores,
            "memory_total_bytes": h.memory_total_bytes, "memory_available_bytes": h.memory_available_bytes,
            "disk_free_bytes": h.disk_free_bytes, "work_dir": h.work_dir,
        },
        "gpus": c.gpus.iter().map(|g| json!({
            "index": g.index, "uuid": g.uuid, "name": g.name,
            "memory_total_bytes": g.memory_total_bytes, "memory_free_bytes": g.memory_free_bytes,
            "compute_capability": format!("{}.{}", g.compute_major, g.compute_minor),
            "pci_bus_id": g.pci_bus_id, "mig_mode": g.mig_mode,
            "utilization_percent": if g.utilization_percent >= 0 { json!(g.utilization_percent) } else { Value::Null },
            "source": g.source,
        })).collect::<Vec<_>>(),
        "gpu_driver_version": c.gpu_driver_version,
        "cuda_driver_version": c.cuda_driver_version,
        "gpu_note": c.gpu_note,
        "interfaces": c.interfaces.iter().map(|i| json!({"name": i.name, "addresses": i.addresses})).collect::<Vec<_>>(),
        "network": c.network,
        "credentials": c.credentials,
        "labels": c.labels,
        "resources": c.resources,
    })
}

pub(crate) fn worker_json(w: &pb::WorkerInfo) -> Value {
    json!({
        "identity": w.identity, "state": w.state, "task_queues": w.task_queues,
        "host_queue": w.host_queue, "registered": time_text(w.registered_ms),
        "last_seen": time_text(w.last_seen_ms),
        "capabilities": w.capabilities.as_ref().map(caps_json),
    })
}

pub(crate) fn caps_lines(c: &pb::Capabilities) -> Vec<String> {
    let mut text = Vec::new();
    use tether_sdk::caps::requirements::human_bytes;
    let h = c.host.clone().unwrap_or_default();
    text.push(format!(
        "host:          {} ({}, kernel {}, {})",
        h.hostname, h.os, h.kernel, h.arch
    ));
    text.push(format!(
        "cpu:           {} ({} logical, {} physical cores)",
        h.cpu_model, h.logical_cores, h.physical_cores
    ));
    text.push(format!(
        "memory:        {} total, {} available",
        human_bytes(h.memory_total_bytes),
        human_bytes(h.memory_available_bytes)
    ));
    text.push(format!(
        "disk:          {} free at {}",
        human_bytes(h.disk_free_bytes),
        h.work_dir
    ));
    if c.gpus.is_empty() {
        text.push(format!(
            "gpus:          none ({})",
            if c.gpu_note.is_empty() {
                "no devices"
            } else {
                &c.gpu_note
            }
        ));
    } else {
        if !c.gpu_driver_version.is_empty() {
            text.push(format!(
                "gpu driver:    {} (CUDA {})",
                c.gpu_driver_version, c.cuda_driver_version
            ));
        }
        for g in &c.gpus {
            text.push(format!(
                "GPU {}: {} (UUID: {}) {}, compute {}.{}, source: {}",
                g.index,
                g.name,
                g.uuid,
                human_bytes(g.memory_total_bytes),
                g.compute_major,
                g.compute_minor,
                g.source
            ));
        }
        if !c.gpu_note.is_empty() {
            text.push(format!("               {}", c.gpu_note));
        }
    }
    let ifaces: Vec<String> = c
        .interfaces
        .iter()
        .map(|i| format!("{} {}", i.name, i.addresses.join(" ")))
        .collect();
    text.push(format!("interfaces:    {}", ifaces.join("; ")));
    text.push(format!(
        "network:       {}",
        if c.network.is_empty() {
            "-".to_string()
        } else {
            c.network.join(", ")
        }
    ));
    text.push(format!(
        "credentials:   {}",
        if c.credentials.is_empty() {
            "-".to_string()
        } else {
            c.credentials.join(", ")
        }
    ));
    let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    text.push(format!(
        "labels:        {}",
        if labels.is_empty() {
            "-".to_string()
        } else {
            labels.join(", ")
        }
    ));
    let res: Vec<String> = c
        .resources
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    text.push(format!(
        "resources:     {}",
        if res.is_empty() {
            "-".to_string()
        } else {
            res.join(", ")
        }
    ));
    text
}

pub(crate) fn session_json(s: &pb::SessionInfo) -> Value {
    let o = s.options.clone().unwrap_or_default();
    json!({
        "session_id": s.session_id,
        "state": s.state,
        "owner": s.owner,
        "worker": s.worker_identity,
        "host": s.hostname,
        "host_queue": s.host_queue,
        "gpus": s.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "name": g.name, "memory_total_bytes": g.memory_total_bytes})).collect::<Vec<_>>(),
        "resources": s.resources,
        "requirements": o.requirements,
        "requested_gpus": o.gpus,
        "task_queue": o.task_queue,
        "created": time_text(s.created_ms),
        "closed": if s.closed_ms > 0 { json!(time_text(s.closed_ms)) } else { Value::Null },
        "age_seconds": if s.closed_ms > 0 { (s.closed_ms - s.created_ms) / 1000 } else { (tether_wire::now_ms() - s.created_ms) / 1000 },
        "activities_run": s.activities_run,
        "reason": s.reason,
    })
}

/// The one way a command shows what it found: under `--json` its data (pretty-printed JSON on
/// stdout), otherwise its text, a line at a time. Commands build both; none decides by itself.
pub(crate) fn show(g: &Global, data: Value, text: Vec<String>) {
    if g.json {
        print_json(&data);
    } else {
        for line in text {
            emit(&line);
        }
    }
}

/// A remark for a reader, on stderr (a hint, why there is no result); under `--json` a script
/// gets the data alone.
pub(crate) fn note(g: &Global, remark: &str) {
    if !g.json {
        eprintln!("{remark}");
    }
}

pub(crate) fn print_json(v: &Value) {
    out!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Prints a run's outcome (`what`: workflow or activity); the exit code says whether it
/// completed.
pub(crate) fn print_outcome(
    g: &Global,
    what: &str,
    id: &str,
    outcome: &pb::GetWorkflowResultResponse,
) -> i32 {
    let status = pb::ExecutionStatus::try_from(outcome.status).unwrap_or_default();
    let mut v = json!({
        "run_id": outcome.run_id,
        "status": status.short_name(),
        "result": payload_json(outcome.result.as_ref()),
        "failure": failure_json(outcome.failure.as_ref()),
    });
    v[format!("{what}_id")] = json!(id);
    let mut text = Vec::new();
    if status == pb::ExecutionStatus::Completed {
        text.push(codec::display_payload(outcome.result.as_ref()));
    } else {
        // Not data: why there is no result goes to stderr, as errors do.
        let why = outcome
            .failure
            .as_ref()
            .map(|f| f.message.as_str())
            .unwrap_or("");
        note(g, &format!("{what} {id} {}: {why}", status.short_name()));
    }
    show(g, v, text);
    if status == pb::ExecutionStatus::Completed {
        0
    } else {
        2
    }
}
