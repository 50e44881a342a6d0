//! How data is shown: JSON forms of runs, events, workers, sessions and capabilities, their text forms, and stdout itself.

use crate::args::Global;
use serde_json::{json, Value};
use tether_sdk::codec;
pub(crate) use tether_ui::json::{
    caps_json, event_json, execution_json, failure_json, payload_json, session_json, status_name,
    time_text, worker_json,
};
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
