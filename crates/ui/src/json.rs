//! The JSON forms of what the server reports (runs, events, workers, capabilities, sessions,
//! payloads, failures): one shape for `tether ... --json` and for the web UI's API, so a script
//! written against one reads the other.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde_json::{json, Value};
use tether_sdk::codec;
use tether_wire::pb;

/// A payload as JSON when it is plain JSON; otherwise what it is (encoding, key id, size),
/// never its bytes: the server cannot read an encrypted one, and the UI decodes only in the
/// browser.
pub fn payload_json(p: Option<&pb::Payload>) -> Value {
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
                "payload": encoded_payload_json(p),
            }),
            enc => {
                json!({ "encoding": enc, "bytes": p.data.len(), "payload": encoded_payload_json(p) })
            }
        },
    }
}

/// A failure with its cause chain.
pub fn failure_json(f: Option<&pb::Failure>) -> Value {
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

/// Milliseconds since the epoch as RFC 3339 UTC ("-" for none).
pub fn time_text(ms: i64) -> String {
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

/// A run status's short name (running, completed, ...).
pub fn status_name(raw: i32) -> &'static str {
    pb::ExecutionStatus::try_from(raw)
        .unwrap_or_default()
        .short_name()
}

/// One run in a listing.
pub fn execution_json(e: &pb::ExecutionInfo) -> Value {
    json!({
        "namespace": e.namespace,
        "workflow_id": e.workflow_id,
        "run_id": e.run_id,
        "type": e.workflow_type,
        "task_queue": e.task_queue,
        "status": status_name(e.status),
        "start_time": time_text(e.start_ms),
        "close_time": if e.close_ms > 0 { json!(time_text(e.close_ms)) } else { Value::Null },
        "start_ms": e.start_ms,
        "close_ms": e.close_ms,
        "history_length": e.history_length,
        "kind": e.kind,
    })
}

/// One history event with the details of its kind.
pub fn event_json(e: &pb::HistoryEvent) -> Value {
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
            // The session as it was placed: an age or a close from today would misread as
            // part of the event.
            let placed = a.session.as_ref().map(|s| {
                let mut v = session_json(s);
                if let Some(fields) = v.as_object_mut() {
                    fields.remove("age_seconds");
                    fields.remove("closed");
                }
                v
            });
            json!({"seq": a.seq, "session": placed})
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
    json!({ "event_id": e.event_id, "time": time_text(e.time_ms), "time_ms": e.time_ms, "type": e.kind_name(), "details": details })
}

/// What a worker's host has.
pub fn caps_json(c: &pb::Capabilities) -> Value {
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

/// One worker.
pub fn worker_json(w: &pb::WorkerInfo) -> Value {
    json!({
        "identity": w.identity, "state": w.state, "task_queues": w.task_queues,
        "host_queue": w.host_queue, "registered": time_text(w.registered_ms),
        "last_seen": time_text(w.last_seen_ms),
        "last_seen_ms": w.last_seen_ms,
        "pid": w.pid,
        "stop_reason": w.stop_reason,
        "capabilities": w.capabilities.as_ref().map(caps_json),
    })
}

/// One session.
pub fn session_json(s: &pb::SessionInfo) -> Value {
    let o = s.options.clone().unwrap_or_default();
    json!({
        "session_id": s.session_id,
        "state": s.state,
        "owner": s.owner,
        "owner_workflow_id": s.owner_workflow_id,
        "worker": s.worker_identity,
        "host": s.hostname,
        "host_queue": s.host_queue,
        "gpus": s.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "name": g.name, "memory_total_bytes": g.memory_total_bytes})).collect::<Vec<_>>(),
        "resources": s.resources,
        "requirements": o.requirements,
        "requested_gpus": o.gpus,
        "task_queue": o.task_queue,
        "created": time_text(s.created_ms),
        "created_ms": s.created_ms,
        "closed": if s.closed_ms > 0 { json!(time_text(s.closed_ms)) } else { Value::Null },
        "age_seconds": if s.closed_ms > 0 { (s.closed_ms - s.created_ms) / 1000 } else { (tether_wire::now_ms() - s.created_ms) / 1000 },
        "activities_run": s.activities_run,
        "reason": s.reason,
    })
}

/// A payload the server cannot read, whole, in the body a codec server's `/decode` takes
/// (`{"metadata": {name: base64}, "data": base64}`): a codec server can then decode it for
/// whoever holds the key, and the server never does.
fn encoded_payload_json(p: &pb::Payload) -> Value {
    let metadata: serde_json::Map<String, Value> = p
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), json!(B64.encode(v))))
        .collect();
    json!({ "metadata": metadata, "data": B64.encode(&p.data) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_in_a_history_event_is_shown_as_it_was_placed() {
        let created_ms = tether_wire::now_ms() - 3_600_000;
        let event = pb::HistoryEvent {
            attributes: Some(pb::history_event::Attributes::SessionCreated(
                pb::SessionCreated {
                    seq: 1,
                    session: Some(pb::SessionInfo {
                        session_id: "s-1".into(),
                        state: "open".into(),
                        created_ms,
                        ..Default::default()
                    }),
                },
            )),
            ..Default::default()
        };
        let shown = event_json(&event);
        let session = &shown["details"]["session"];
        assert_eq!(session["session_id"], "s-1", "{shown}");
        assert!(session.get("age_seconds").is_none(), "{shown}");
        assert!(session.get("closed").is_none(), "{shown}");
        // The session's own page still shows its age.
        let listed = session_json(&pb::SessionInfo {
            created_ms,
            ..Default::default()
        });
        assert!(listed["age_seconds"].as_i64().unwrap() >= 3_600, "{listed}");
    }
}
