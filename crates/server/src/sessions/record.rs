//! A session's record (`SessionInfo`) and placement, both ways, without I/O: which registered
//! workers may host it, what its placement writes into it, and what reservation a record
//! holds (how recovery and a closing session find what to reserve or free).

use super::phase::SessionPhase;
use super::placement::{Candidate, Packing, Placement, Request};
use crate::matching::WorkerRecord;
use tether_core::requirements::Requirements;
use tether_wire::pb::{GpuDevice, ReservedGpu, SessionInfo, SessionOptions};

/// Session slots of a worker that did not say (an older SDK sends 0).
pub const DEFAULT_MAX_SESSIONS: u32 = 10;

/// What a session asks of its worker. Its options were checked when it was created; what no
/// longer reads (stored by another version) asks for nothing.
pub fn request_of(options: &SessionOptions) -> Request {
    Request {
        requirements: Requirements::parse(&options.requirements).unwrap_or_default(),
        gpus: options.gpus,
        resources: options.resources.clone().into_iter().collect(),
        packing: Packing::parse(&options.packing).unwrap_or_default(),
    }
}

/// The workers that may be considered for a session: alive, polling its task queue, the one it
/// names if it names one, and heard from within its liveness timeout (a worker silent for
/// longer than the session tolerates is no candidate, even before the registry marks it dead).
pub fn candidates<'a>(
    options: &SessionOptions,
    workers: &'a [WorkerRecord],
    now_ms: i64,
) -> Vec<Candidate<'a>> {
    workers
        .iter()
        .filter(|w| w.alive && w.task_queues.contains(&options.task_queue))
        .filter(|w| options.worker.is_empty() || w.identity == options.worker)
        .filter(|w| now_ms - w.last_seen_ms <= options.liveness_timeout_ms.max(1) as i64)
        .map(|w| Candidate {
            identity: &w.identity,
            caps: &w.caps,
            max_sessions: if w.max_sessions == 0 {
                DEFAULT_MAX_SESSIONS
            } else {
                w.max_sessions
            },
        })
        .collect()
}

/// Writes a placement into the session's record: now `open` on the placed worker (its host
/// name as the worker reported it), holding what was reserved.
pub fn record_placement(
    info: &mut SessionInfo,
    open: SessionPhase,
    placement: &Placement,
    hostname: String,
    now_ms: i64,
) {
    info.state = open.name().into();
    info.reason.clear();
    info.worker_identity = placement.identity.clone();
    info.hostname = hostname;
    info.host_queue = crate::matching::host_queue_name(&placement.identity);
    info.gpus = placement
        .gpus
        .iter()
        .map(|g| ReservedGpu {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_bytes: g.memory_total_bytes,
        })
        .collect();
    info.resources = placement.resources.clone().into_iter().collect();
    info.last_used_ms = now_ms;
}

/// The reservation a session's record describes.
pub fn placement_of(info: &SessionInfo) -> Placement {
    Placement {
        identity: info.worker_identity.clone(),
        gpus: info
            .gpus
            .iter()
            .map(|g| GpuDevice {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                memory_total_bytes: g.memory_total_bytes,
                ..Default::default()
            })
            .collect(),
        resources: info.resources.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_wire::pb::Capabilities;

    #[test]
    fn only_live_recent_workers_on_the_sessions_queue_are_candidates() {
        let matcher = crate::matching::Matcher::default();
        let register = |identity: &str, queue: &str, at_ms: i64| {
            let queues = vec![queue.to_string()];
            matcher.register(
                "default",
                identity,
                Capabilities::default(),
                queues,
                0,
                at_ms,
            );
        };
        register("dead", "gpu", 0);
        let expired = matcher.expire(3_000, std::time::Duration::from_millis(2_000));
        assert_eq!(expired.len(), 1);
        register("silent", "gpu", 1_000);
        register("fresh", "gpu", 9_000);
        register("elsewhere", "cpu", 9_500);
        let workers: Vec<WorkerRecord> = matcher.workers_in("default");
        let options = SessionOptions {
            task_queue: "gpu".into(),
            liveness_timeout_ms: 5_000,
            ..Default::default()
        };
        let found: Vec<(&str, u32)> = candidates(&options, &workers, 10_000)
            .iter()
            .map(|c| (c.identity, c.max_sessions))
            .collect();
        assert_eq!(found, vec![("fresh", DEFAULT_MAX_SESSIONS)]);
        let named = SessionOptions {
            worker: "silent".into(),
            liveness_timeout_ms: 60_000,
            ..options
        };
        let found: Vec<&str> = candidates(&named, &workers, 10_000)
            .iter()
            .map(|c| c.identity)
            .collect();
        assert_eq!(
            found,
            vec!["silent"],
            "a named worker is the only candidate"
        );
    }

    #[test]
    fn a_recorded_placement_reads_back_as_the_same_reservation() {
        let placement = Placement {
            identity: "box-1".into(),
            gpus: vec![GpuDevice {
                index: 2,
                uuid: "GPU-2".into(),
                name: "H100".into(),
                memory_total_bytes: 80 << 30,
                ..Default::default()
            }],
            resources: [("scratch_gb".to_string(), 100)].into_iter().collect(),
        };
        let mut info = SessionInfo {
            state: SessionPhase::Creating.name().into(),
            reason: "no live worker polls this task queue".into(),
            ..Default::default()
        };
        record_placement(&mut info, SessionPhase::Open, &placement, "box".into(), 42);
        assert_eq!(info.state, "open");
        assert!(info.reason.is_empty(), "the waiting reason is gone");
        assert_eq!((info.hostname.as_str(), info.last_used_ms), ("box", 42));
        assert_eq!(info.host_queue, crate::matching::host_queue_name("box-1"));
        assert_eq!(placement_of(&info), placement);
    }

    #[test]
    fn a_request_reads_the_sessions_options() {
        let request = request_of(&SessionOptions {
            requirements: "gpu.count >= 1".into(),
            gpus: 2,
            packing: "spread".into(),
            ..Default::default()
        });
        assert_eq!((request.gpus, request.packing), (2, Packing::Spread));
        assert!(!request.requirements.to_string().is_empty());
    }
}
