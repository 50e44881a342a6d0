//! What each page shows, built from the server's answers: the fleet with its GPU grid and
//! totals, the run timeline, and the summary `tether status` prints. Pure functions of the
//! data, so they are tested without a server.

use crate::json::{failure_json, session_json, worker_json};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use tether_wire::pb;

/// Sessions that hold what they reserved: placed and not yet closed.
fn holds_reservation(s: &pb::SessionInfo) -> bool {
    s.state == "open"
}

/// Every worker with its GPU grid (each GPU with the session holding it, or free), the units
/// its sessions reserve, and totals over the live workers, like `ray status`.
pub fn fleet(workers: &[pb::WorkerInfo], sessions: &[pb::SessionInfo], now_ms: i64) -> Value {
    let mut held: HashMap<(&str, u32), &pb::SessionInfo> = HashMap::new();
    let mut units: HashMap<&str, BTreeMap<&str, u64>> = HashMap::new();
    let mut open_per_worker: HashMap<&str, usize> = HashMap::new();
    for s in sessions.iter().filter(|s| holds_reservation(s)) {
        *open_per_worker.entry(&s.worker_identity).or_default() += 1;
        for g in &s.gpus {
            held.insert((&s.worker_identity, g.index), s);
        }
        let per = units.entry(&s.worker_identity).or_default();
        for (name, n) in &s.resources {
            *per.entry(name).or_default() += n;
        }
    }
    // model -> (total, reserved), live workers only: a dead worker's GPUs cannot be had.
    let mut models: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    let mut shown = Vec::new();
    for w in workers {
        *by_state.entry(&w.state).or_default() += 1;
        let caps = w.capabilities.clone().unwrap_or_default();
        let grid: Vec<Value> = caps
            .gpus
            .iter()
            .map(|g| {
                let holder = held.get(&(w.identity.as_str(), g.index));
                if w.state == "alive" {
                    let entry = models.entry(g.name.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += u64::from(holder.is_some());
                }
                json!({
                    "index": g.index,
                    "name": g.name,
                    "uuid": g.uuid,
                    "memory_total_bytes": g.memory_total_bytes,
                    "utilization_percent": if g.utilization_percent >= 0 { json!(g.utilization_percent) } else { Value::Null },
                    "source": g.source,
                    "held_by": holder.map(|s| json!({
                        "session_id": s.session_id,
                        "owner": s.owner,
                        "owner_workflow_id": s.owner_workflow_id,
                    })),
                })
            })
            .collect();
        let mut entry = worker_json(w);
        entry["last_seen_age_ms"] = json!((now_ms - w.last_seen_ms).max(0));
        entry["gpu_grid"] = Value::Array(grid);
        entry["resources_reserved"] = json!(units.get(w.identity.as_str()));
        entry["open_sessions"] = json!(open_per_worker.get(w.identity.as_str()).unwrap_or(&0));
        shown.push(entry);
    }
    let totals: Vec<Value> = models
        .iter()
        .map(|(model, (total, reserved))| {
            json!({"model": model, "total": total, "reserved": reserved, "free": total - reserved})
        })
        .collect();
    json!({
        "workers": shown,
        "workers_by_state": by_state,
        "gpu_totals": totals,
    })
}

/// Sessions for the sessions page, newest first, with the filters applied.
pub fn sessions(all: &[pb::SessionInfo], state: &str, worker: &str) -> Value {
    let mut kept: Vec<&pb::SessionInfo> = all
        .iter()
        .filter(|s| state.is_empty() || s.state == state)
        .filter(|s| worker.is_empty() || s.worker_identity == worker)
        .collect();
    kept.sort_by_key(|s| std::cmp::Reverse(s.created_ms));
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for s in all {
        *by_state.entry(&s.state).or_default() += 1;
    }
    json!({
        "sessions": kept.iter().map(|s| session_json(s)).collect::<Vec<_>>(),
        "sessions_by_state": by_state,
    })
}

/// A run's activities as bars on the lanes of the workers that ran them: from when each was
/// scheduled to its outcome (or now, while it is pending). A session activity's lane is its
/// session's worker, so a pipeline whose machine died shows a bar that ends failed on one
/// worker and a bar that goes on on another.
pub fn timeline(
    events: &[pb::HistoryEvent],
    pending: &[pb::PendingActivityInfo],
    now_ms: i64,
) -> Value {
    use pb::history_event::Attributes as A;
    struct Bar {
        scheduled_event_id: u64,
        activity_type: String,
        session_id: String,
        start_ms: i64,
        end_ms: i64,
        worker: String,
        outcome: &'static str,
        attempt: u32,
        failure: Value,
    }
    let mut session_workers: HashMap<&str, &str> = HashMap::new();
    let mut bars: Vec<Bar> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for e in events {
        match &e.attributes {
            Some(A::SessionCreated(c)) => {
                if let Some(s) = &c.session {
                    session_workers.insert(&s.session_id, &s.worker_identity);
                }
            }
            Some(A::ActivityTaskScheduled(a)) => {
                index.insert(e.event_id, bars.len());
                bars.push(Bar {
                    scheduled_event_id: e.event_id,
                    activity_type: a.activity_type.clone(),
                    session_id: a
                        .options
                        .as_ref()
                        .map(|o| o.session_id.clone())
                        .unwrap_or_default(),
                    start_ms: e.time_ms,
                    end_ms: now_ms,
                    worker: String::new(),
                    outcome: "pending",
                    attempt: 1,
                    failure: Value::Null,
                });
            }
            Some(attrs) => {
                let (id, outcome, worker, attempt, failure) = match attrs {
                    A::ActivityTaskCompleted(a) => (
                        a.scheduled_event_id,
                        "completed",
                        a.identity.as_str(),
                        a.attempt,
                        None,
                    ),
                    A::ActivityTaskFailed(a) => (
                        a.scheduled_event_id,
                        "failed",
                        a.identity.as_str(),
                        a.attempt,
                        a.failure.as_ref(),
                    ),
                    A::ActivityTaskTimedOut(a) => (
                        a.scheduled_event_id,
                        "timed_out",
                        "",
                        a.attempt,
                        a.failure.as_ref(),
                    ),
                    A::ActivityTaskCanceled(a) => (a.scheduled_event_id, "canceled", "", 0, None),
                    _ => continue,
                };
                if let Some(bar) = index.get(&id).map(|i| &mut bars[*i]) {
                    bar.end_ms = e.time_ms;
                    bar.outcome = outcome;
                    bar.worker = worker.to_string();
                    if attempt > 0 {
                        bar.attempt = attempt;
                    }
                    bar.failure = failure_json(failure);
                }
            }
            None => {}
        }
    }
    for p in pending {
        if let Some(bar) = index.get(&p.scheduled_event_id).map(|i| &mut bars[*i]) {
            bar.worker = p.last_worker.clone();
            bar.attempt = p.attempt;
            bar.outcome = if p.state == "started" {
                "running"
            } else {
                "waiting"
            };
        }
    }
    let lane_of = |bar: &Bar| -> String {
        if let Some(worker) = session_workers.get(bar.session_id.as_str()) {
            return worker.to_string();
        }
        if bar.worker.is_empty() {
            "(no worker)".into()
        } else {
            bar.worker.clone()
        }
    };
    let mut lanes: Vec<String> = Vec::new();
    let shown: Vec<Value> = bars
        .iter()
        .map(|bar| {
            let lane = lane_of(bar);
            if !lanes.contains(&lane) {
                lanes.push(lane.clone());
            }
            json!({
                "scheduled_event_id": bar.scheduled_event_id,
                "activity_type": bar.activity_type,
                "session_id": bar.session_id,
                "lane": lane,
                "start_ms": bar.start_ms,
                "end_ms": bar.end_ms.max(bar.start_ms),
                "outcome": bar.outcome,
                "attempt": bar.attempt,
                "failure": bar.failure,
            })
        })
        .collect();
    let start = events.first().map(|e| e.time_ms).unwrap_or(now_ms);
    let end = shown
        .iter()
        .filter_map(|b| b["end_ms"].as_i64())
        .chain(events.last().map(|e| e.time_ms))
        .max()
        .unwrap_or(now_ms);
    json!({ "lanes": lanes, "bars": shown, "start_ms": start, "end_ms": end.max(start) })
}

/// `tether status`'s data: workers by state, GPUs per model reserved / free, sessions by state,
/// and the queues with a backlog or unplaceable work.
pub fn summary(
    workers: &[pb::WorkerInfo],
    sessions: &[pb::SessionInfo],
    queues: &[(String, pb::DescribeTaskQueueResponse)],
    now_ms: i64,
) -> Value {
    let fleet = fleet(workers, sessions, now_ms);
    let mut sessions_by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for s in sessions {
        *sessions_by_state.entry(&s.state).or_default() += 1;
    }
    json!({
        "workers_by_state": fleet["workers_by_state"],
        "gpu_totals": fleet["gpu_totals"],
        "sessions_by_state": sessions_by_state,
        "queues": queues
            .iter()
            .filter(|(_, q)| {
                q.workflow_backlog > 0
                    || q.activity_backlog > 0
                    || q.requirement_backlogs.iter().any(|b| b.unplaceable)
            })
            .map(|(name, q)| queue_json(name, q))
            .collect::<Vec<_>>(),
    })
}

/// One task queue: its backlogs, pollers and waiting requirement classes.
pub fn queue_json(name: &str, q: &pb::DescribeTaskQueueResponse) -> Value {
    json!({
        "task_queue": name,
        "workflow_backlog": q.workflow_backlog,
        "activity_backlog": q.activity_backlog,
        "pollers": q.pollers.iter().map(|p| json!({
            "identity": p.identity, "kind": p.kind, "state": p.state,
            "last_poll_ms": p.last_poll_ms,
        })).collect::<Vec<_>>(),
        "requirement_backlogs": q.requirement_backlogs.iter().map(|b| json!({
            "requirements": b.requirements, "tasks": b.tasks,
            "unplaceable": b.unplaceable, "explanation": b.explanation,
        })).collect::<Vec<_>>(),
    })
}

/// The summary as lines for a terminal.
pub fn summary_lines(summary: &Value) -> Vec<String> {
    let counts = |v: &Value| -> String {
        match v.as_object() {
            Some(m) if !m.is_empty() => m
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "none".into(),
        }
    };
    let mut lines = vec![
        format!("workers:   {}", counts(&summary["workers_by_state"])),
        format!("sessions:  {}", counts(&summary["sessions_by_state"])),
    ];
    let gpus = summary["gpu_totals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if gpus.is_empty() {
        lines.push("gpus:      none on live workers".into());
    } else {
        lines.push("gpus (live workers):".into());
        for g in gpus {
            lines.push(format!(
                "  {:<28} {} reserved / {} free of {}",
                g["model"].as_str().unwrap_or(""),
                g["reserved"],
                g["free"],
                g["total"]
            ));
        }
    }
    let queues = summary["queues"].as_array().cloned().unwrap_or_default();
    if queues.is_empty() {
        lines.push("queues:    no backlog, nothing unplaceable".into());
    } else {
        lines.push("queues with work waiting:".into());
        for q in queues {
            lines.push(format!(
                "  {}: {} workflow tasks, {} activity tasks waiting",
                q["task_queue"].as_str().unwrap_or(""),
                q["workflow_backlog"],
                q["activity_backlog"]
            ));
            for b in q["requirement_backlogs"].as_array().into_iter().flatten() {
                if b["unplaceable"].as_bool() == Some(true) {
                    lines.push(format!(
                        "    unplaceable: {} task(s) needing {}: {}",
                        b["tasks"],
                        b["requirements"].as_str().unwrap_or(""),
                        b["explanation"].as_str().unwrap_or("")
                    ));
                }
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::history_event::Attributes as A;

    fn worker(identity: &str, state: &str, gpus: u32, model: &str) -> pb::WorkerInfo {
        pb::WorkerInfo {
            identity: identity.into(),
            state: state.into(),
            capabilities: Some(pb::Capabilities {
                gpus: (0..gpus)
                    .map(|index| pb::GpuDevice {
                        index,
                        name: model.into(),
                        utilization_percent: -1,
                        source: "declared".into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn session(id: &str, worker: &str, state: &str, gpus: &[u32]) -> pb::SessionInfo {
        pb::SessionInfo {
            session_id: id.into(),
            worker_identity: worker.into(),
            state: state.into(),
            owner: format!("run:r-{id}:1"),
            owner_workflow_id: format!("wf-{id}"),
            gpus: gpus
                .iter()
                .map(|&index| pb::ReservedGpu {
                    index,
                    ..Default::default()
                })
                .collect(),
            resources: [("scratch_gb".to_string(), 100)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_gpu_shows_the_open_session_holding_it_and_totals_count_live_workers_only() {
        let workers = [
            worker("a", "alive", 2, "A100"),
            worker("b", "dead", 4, "A100"),
        ];
        let sessions = [
            session("s1", "a", "open", &[1]),
            // Closed: it holds nothing any more.
            session("s0", "a", "completed", &[0]),
        ];
        let view = fleet(&workers, &sessions, 0);
        let grid = &view["workers"][0]["gpu_grid"];
        assert_eq!(grid[0]["held_by"], Value::Null);
        assert_eq!(grid[1]["held_by"]["session_id"], "s1");
        assert_eq!(grid[1]["held_by"]["owner_workflow_id"], "wf-s1");
        assert_eq!(view["workers"][0]["resources_reserved"]["scratch_gb"], 100);
        assert_eq!(view["workers"][0]["open_sessions"], 1);
        assert_eq!(
            view["gpu_totals"],
            json!([{"model": "A100", "total": 2, "reserved": 1, "free": 1}]),
            "the dead worker's 4 GPUs are not counted"
        );
        assert_eq!(view["workers_by_state"], json!({"alive": 1, "dead": 1}));
    }

    fn event(id: u64, ms: i64, attributes: A) -> pb::HistoryEvent {
        pb::HistoryEvent {
            event_id: id,
            time_ms: ms,
            attributes: Some(attributes),
        }
    }

    fn created(session_id: &str, worker: &str) -> A {
        A::SessionCreated(pb::SessionCreated {
            seq: 1,
            session: Some(session(session_id, worker, "open", &[0])),
        })
    }

    fn scheduled(session_id: &str) -> A {
        A::ActivityTaskScheduled(pb::ActivityTaskScheduled {
            activity_type: "train".into(),
            options: Some(pb::ActivityOptions {
                session_id: session_id.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn a_failover_is_a_failed_bar_on_one_worker_and_a_bar_on_the_other() {
        let events = [
            event(1, 1_000, created("s1", "gpu-a")),
            event(2, 1_100, scheduled("s1")),
            // The session's worker died: the server fails the activity (no worker identity).
            event(
                3,
                5_000,
                A::ActivityTaskFailed(pb::ActivityTaskFailed {
                    scheduled_event_id: 2,
                    attempt: 1,
                    ..Default::default()
                }),
            ),
            event(4, 6_000, created("s2", "gpu-b")),
            event(5, 6_100, scheduled("s2")),
            event(
                6,
                7_000,
                A::ActivityTaskCompleted(pb::ActivityTaskCompleted {
                    scheduled_event_id: 5,
                    attempt: 1,
                    identity: "gpu-b".into(),
                    ..Default::default()
                }),
            ),
            event(7, 7_100, scheduled("")),
        ];
        let pending = [pb::PendingActivityInfo {
            scheduled_event_id: 7,
            state: "started".into(),
            attempt: 2,
            last_worker: "cpu-c".into(),
            ..Default::default()
        }];
        let t = timeline(&events, &pending, 9_000);
        let bars: Vec<(&str, &str, i64, i64)> = t["bars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["lane"].as_str().unwrap(),
                    b["outcome"].as_str().unwrap(),
                    b["start_ms"].as_i64().unwrap(),
                    b["end_ms"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            bars,
            [
                ("gpu-a", "failed", 1_100, 5_000),
                ("gpu-b", "completed", 6_100, 7_000),
                // Still running: up to now, on the worker that has it.
                ("cpu-c", "running", 7_100, 9_000),
            ]
        );
        assert_eq!(t["lanes"], json!(["gpu-a", "gpu-b", "cpu-c"]));
        assert_eq!(t["bars"][2]["attempt"], 2);
    }

    #[test]
    fn the_summary_lists_only_queues_with_work_waiting_and_says_why_it_cannot_be_placed() {
        let idle = pb::DescribeTaskQueueResponse::default();
        let stuck = pb::DescribeTaskQueueResponse {
            activity_backlog: 3,
            requirement_backlogs: vec![pb::RequirementBacklog {
                requirements: "gpu.count>=8".into(),
                tasks: 3,
                unplaceable: true,
                explanation: "needs gpu.count>=8; best is worker a with 2".into(),
            }],
            ..Default::default()
        };
        let workers = [worker("a", "alive", 2, "A100")];
        let sessions = [
            session("s1", "a", "open", &[0]),
            session("s2", "a", "failed", &[]),
        ];
        let queues = [("idle".to_string(), idle), ("gpu".to_string(), stuck)];
        let s = summary(&workers, &sessions, &queues, 0);
        assert_eq!(s["queues"].as_array().unwrap().len(), 1);
        assert_eq!(s["queues"][0]["task_queue"], "gpu");
        assert_eq!(s["sessions_by_state"], json!({"failed": 1, "open": 1}));
        let text = summary_lines(&s).join("\n");
        assert!(text.contains("1 alive"), "{text}");
        assert!(
            text.contains("A100") && text.contains("1 reserved / 1 free of 2"),
            "{text}"
        );
        assert!(
            text.contains("unplaceable: 3 task(s) needing gpu.count>=8: needs gpu.count>=8"),
            "{text}"
        );
    }
}
