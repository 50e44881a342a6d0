//! Choosing a session's worker and reserving concrete GPUs and resource units on it (see the
//! module above for the rules), and the reservations of every worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use tether_core::requirements::Requirements;
use tether_wire::pb::{Capabilities, GpuDevice};

/// How to choose among equally preferred workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packing {
    /// Leave the fewest free GPUs behind (default).
    #[default]
    Tightest,
    /// Leave the most free GPUs behind.
    Spread,
}

impl Packing {
    /// Parses "tightest" / "spread" ("" = tightest).
    pub fn parse(text: &str) -> Result<Packing, String> {
        match text {
            "" | "tightest" => Ok(Packing::Tightest),
            "spread" => Ok(Packing::Spread),
            other => Err(format!(
                "packing {other:?} is not known: use \"tightest\" or \"spread\""
            )),
        }
    }
}

/// What one session asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Hard requirements and preferences.
    pub requirements: Requirements,
    /// GPUs to reserve.
    pub gpus: u32,
    /// Resource units to reserve.
    pub resources: BTreeMap<String, u64>,
    /// Packing policy.
    pub packing: Packing,
}

/// What is reserved on one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Reserved GPU indices.
    pub gpus: BTreeSet<u32>,
    /// Reserved resource units.
    pub resources: BTreeMap<String, u64>,
    /// Open sessions.
    pub sessions: u32,
}

/// A worker that could host a session.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Identity.
    pub identity: &'a str,
    /// Capabilities.
    pub caps: &'a Capabilities,
    /// Session slots.
    pub max_sessions: u32,
}

/// The chosen worker and the concrete reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Worker identity.
    pub identity: String,
    /// Reserved GPUs, by index.
    pub gpus: Vec<GpuDevice>,
    /// Reserved resource units.
    pub resources: BTreeMap<String, u64>,
}

/// Reservations of all workers (keyed by namespace and identity).
#[derive(Debug, Default)]
pub struct Reservations {
    held: HashMap<(String, String), Held>,
}

impl Reservations {
    /// What is held on a worker.
    pub fn on(&self, namespace: &str, identity: &str) -> Held {
        self.held
            .get(&(namespace.to_string(), identity.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Records a reservation. Panics in debug builds if it overlaps (a bug in placement).
    pub fn reserve(&mut self, namespace: &str, p: &Placement) {
        let h = self
            .held
            .entry((namespace.to_string(), p.identity.clone()))
            .or_default();
        for g in &p.gpus {
            let fresh = h.gpus.insert(g.index);
            debug_assert!(fresh, "GPU {} of {} reserved twice", g.index, p.identity);
        }
        for (name, units) in &p.resources {
            *h.resources.entry(name.clone()).or_default() += units;
        }
        h.sessions += 1;
    }

    /// Releases a reservation.
    pub fn release(&mut self, namespace: &str, p: &Placement) {
        let key = (namespace.to_string(), p.identity.clone());
        if let Some(h) = self.held.get_mut(&key) {
            for g in &p.gpus {
                h.gpus.remove(&g.index);
            }
            for (name, units) in &p.resources {
                if let Some(v) = h.resources.get_mut(name) {
                    *v = v.saturating_sub(*units);
                }
            }
            h.sessions = h.sessions.saturating_sub(1);
            if h.sessions == 0 {
                self.held.remove(&key);
            }
        }
    }
}

/// Why one worker cannot host the session.
fn shortfall(req: &Request, c: &Candidate<'_>, held: &Held) -> Option<String> {
    let unmet = req.requirements.unmet(c.caps);
    if !unmet.is_empty() {
        let needs: Vec<String> = unmet.iter().map(|u| u.needs.clone()).collect();
        let has: Vec<String> = unmet.iter().map(|u| u.has.clone()).collect();
        return Some(format!(
            "needs {} but has {}",
            needs.join(" and "),
            has.join("; ")
        ));
    }
    if held.sessions >= c.max_sessions {
        return Some(format!("all {} session slots are taken", c.max_sessions));
    }
    let free = free_gpus(req, c, held);
    if (free.len() as u32) < req.gpus {
        let matching = c
            .caps
            .gpus
            .iter()
            .filter(|g| req.requirements.gpu_eligible(g))
            .count();
        return Some(format!(
            "needs {} free GPU(s) but has {} ({} matching, {} reserved by other sessions)",
            req.gpus,
            free.len(),
            matching,
            held.gpus.len()
        ));
    }
    for (name, units) in &req.resources {
        let total = c.caps.resources.get(name).copied().unwrap_or(0);
        let reserved = held.resources.get(name).copied().unwrap_or(0);
        if total.saturating_sub(reserved) < *units {
            return Some(format!(
                "needs {units} unit(s) of {name} but has {} free of {total}",
                total.saturating_sub(reserved)
            ));
        }
    }
    None
}

fn free_gpus<'c>(req: &Request, c: &Candidate<'c>, held: &Held) -> Vec<&'c GpuDevice> {
    c.caps
        .gpus
        .iter()
        .filter(|g| !held.gpus.contains(&g.index) && req.requirements.gpu_eligible(g))
        .collect()
}

/// Chooses a worker and the concrete GPUs and units to reserve, or explains why none can host
/// the session (naming the closest candidate).
pub fn place(
    namespace: &str,
    req: &Request,
    candidates: &[Candidate<'_>],
    reservations: &Reservations,
) -> Result<Placement, String> {
    let mut best: Option<(u64, (i64, i64), &str, Placement)> = None;
    let mut reasons: Vec<(String, String)> = Vec::new();
    for c in candidates {
        let held = reservations.on(namespace, c.identity);
        if let Some(why) = shortfall(req, c, &held) {
            reasons.push((c.identity.to_string(), why));
            continue;
        }
        let free = free_gpus(req, c, &held);
        let gpus: Vec<GpuDevice> = free
            .iter()
            .take(req.gpus as usize)
            .map(|g| (*g).clone())
            .collect();
        let left_after = (c.caps.gpus.len() - held.gpus.len()) as i64 - req.gpus as i64;
        // GPUs left free first, then sessions already there: tightest fills one worker up,
        // spread evens the load out.
        let packing_key = match req.packing {
            Packing::Tightest => (-left_after, held.sessions as i64),
            Packing::Spread => (left_after, -(held.sessions as i64)),
        };
        let score = req.requirements.score(c.caps);
        let better = match &best {
            None => true,
            Some((bs, bp, bid, _)) => {
                (score, packing_key, std::cmp::Reverse(c.identity))
                    > (*bs, *bp, std::cmp::Reverse(*bid))
            }
        };
        if better {
            best = Some((
                score,
                packing_key,
                c.identity,
                Placement {
                    identity: c.identity.to_string(),
                    gpus,
                    resources: req.resources.clone(),
                },
            ));
        }
    }
    if let Some((_, _, _, p)) = best {
        return Ok(p);
    }
    if reasons.is_empty() {
        return Err("no live worker polls this task queue".into());
    }
    reasons.sort();
    let text: Vec<String> = reasons
        .iter()
        .map(|(id, why)| format!("worker {id} {why}"))
        .collect();
    Err(text.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn box_with(gpus: usize, gib: u64) -> Capabilities {
        Capabilities {
            gpus: (0..gpus)
                .map(|i| GpuDevice {
                    index: i as u32,
                    uuid: format!("GPU-{i}"),
                    name: "A100".into(),
                    memory_total_bytes: gib << 30,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn req(gpus: u32, reqs: &str) -> Request {
        Request {
            requirements: Requirements::parse(reqs).unwrap(),
            gpus,
            ..Default::default()
        }
    }

    #[test]
    fn tightest_fit_keeps_the_big_free_block() {
        let small = box_with(2, 80);
        let big = box_with(8, 80);
        let cands = [
            Candidate {
                identity: "big",
                caps: &big,
                max_sessions: 10,
            },
            Candidate {
                identity: "small",
                caps: &small,
                max_sessions: 10,
            },
        ];
        let r = Reservations::default();
        let p = place("ns", &req(2, ""), &cands, &r).unwrap();
        assert_eq!(
            p.identity, "small",
            "the 2-GPU request fits the 2-GPU box exactly"
        );
        assert_eq!(
            p.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let spread = Request {
            packing: Packing::Spread,
            ..req(2, "")
        };
        assert_eq!(place("ns", &spread, &cands, &r).unwrap().identity, "big");
    }

    #[test]
    fn reserved_gpus_are_not_handed_out_again() {
        let b = box_with(4, 80);
        let cands = [Candidate {
            identity: "b",
            caps: &b,
            max_sessions: 10,
        }];
        let mut r = Reservations::default();
        let first = place("ns", &req(3, ""), &cands, &r).unwrap();
        r.reserve("ns", &first);
        let second = place("ns", &req(1, ""), &cands, &r).unwrap();
        assert_eq!(second.gpus[0].index, 3);
        r.reserve("ns", &second);
        let err = place("ns", &req(1, ""), &cands, &r).unwrap_err();
        assert!(err.contains("needs 1 free GPU(s) but has 0"), "{err}");
        r.release("ns", &first);
        assert_eq!(place("ns", &req(2, ""), &cands, &r).unwrap().gpus.len(), 2);
    }

    #[test]
    fn per_gpu_predicates_select_the_gpus() {
        let mut mixed = box_with(3, 80);
        mixed.gpus[0].memory_total_bytes = 16 << 30;
        let cands = [Candidate {
            identity: "m",
            caps: &mixed,
            max_sessions: 10,
        }];
        let p = place(
            "ns",
            &req(2, "gpu.memory>=40GiB"),
            &cands,
            &Reservations::default(),
        )
        .unwrap();
        assert_eq!(
            p.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let err = place(
            "ns",
            &req(3, "gpu.memory>=40GiB"),
            &cands,
            &Reservations::default(),
        )
        .unwrap_err();
        assert!(err.contains("2 matching"), "{err}");
    }

    #[test]
    fn session_slots_and_resources_limit_placement() {
        let mut b = box_with(0, 0);
        b.resources.insert("scratch_gb".into(), 500);
        let cands = [Candidate {
            identity: "b",
            caps: &b,
            max_sessions: 2,
        }];
        let mut r = Reservations::default();
        let want = Request {
            resources: [("scratch_gb".to_string(), 300)].into(),
            ..Default::default()
        };
        let p = place("ns", &want, &cands, &r).unwrap();
        r.reserve("ns", &p);
        let err = place("ns", &want, &cands, &r).unwrap_err();
        assert!(err.contains("has 200 free of 500"), "{err}");
        let none = Request::default();
        r.reserve("ns", &place("ns", &none, &cands, &r).unwrap());
        let err = place("ns", &none, &cands, &r).unwrap_err();
        assert!(err.contains("session slots"), "{err}");
    }

    #[test]
    fn spread_evens_out_sessions_without_gpus() {
        let a = box_with(0, 0);
        let b = box_with(0, 0);
        let cands = [
            Candidate {
                identity: "a",
                caps: &a,
                max_sessions: 10,
            },
            Candidate {
                identity: "b",
                caps: &b,
                max_sessions: 10,
            },
        ];
        let mut r = Reservations::default();
        let spread = Request {
            packing: Packing::Spread,
            ..Request::default()
        };
        let first = place("ns", &spread, &cands, &r).unwrap();
        r.reserve("ns", &first);
        let second = place("ns", &spread, &cands, &r).unwrap();
        assert_ne!(first.identity, second.identity);
        r.reserve("ns", &second);
        // Tightest fills the worker that already has sessions.
        r.reserve("ns", &place("ns", &spread, &cands, &r).unwrap());
        let tight = place("ns", &Request::default(), &cands, &r).unwrap();
        assert_eq!(r.on("ns", &tight.identity).sessions, 2);
    }

    #[test]
    fn preference_beats_packing() {
        let a = box_with(2, 80);
        let mut b = box_with(8, 80);
        b.labels.insert("dataset".into(), "imagenet".into());
        let cands = [
            Candidate {
                identity: "a",
                caps: &a,
                max_sessions: 10,
            },
            Candidate {
                identity: "b",
                caps: &b,
                max_sessions: 10,
            },
        ];
        let p = place(
            "ns",
            &req(2, "prefer label.dataset=imagenet:5"),
            &cands,
            &Reservations::default(),
        )
        .unwrap();
        assert_eq!(p.identity, "b");
    }
}
