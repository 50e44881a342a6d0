//! Matching: whether a worker's capabilities satisfy requirements, its preference score, and
//! what it lacks (for explanations).

use super::*;

fn cmp_text(op: Op, have: &str, want: &str) -> bool {
    match op {
        Op::Contains => have.to_lowercase().contains(&want.to_lowercase()),
        Op::Eq => have == want,
        Op::Ne => have != want,
        _ => false,
    }
}

fn holds_number(op: Op, have: u64, want: &Value) -> bool {
    match want {
        Value::Number(w) => op.holds(have.cmp(w)),
        _ => false,
    }
}

fn gpu_passes(g: &GpuDevice, p: &Predicate) -> bool {
    match (&p.key, &p.value) {
        (Key::GpuMemory, v) => holds_number(p.op, g.memory_total_bytes, v),
        (Key::GpuFreeMemory, v) => holds_number(p.op, g.memory_free_bytes, v),
        (Key::GpuName, Value::Text(t)) => cmp_text(p.op, &g.name, t),
        (Key::GpuUuid, Value::Text(t)) => cmp_text(p.op, &g.uuid, t),
        (Key::GpuCompute, Value::Version(a, b)) => {
            p.op.holds((g.compute_major, g.compute_minor).cmp(&(*a, *b)))
        }
        _ => false,
    }
}

/// Whether a single (non-GPU-group) predicate holds.
fn holds(caps: &Capabilities, p: &Predicate) -> bool {
    static NO_HOST: std::sync::OnceLock<tether_wire::pb::HostInfo> = std::sync::OnceLock::new();
    let host = caps
        .host
        .as_ref()
        .unwrap_or_else(|| NO_HOST.get_or_init(Default::default));
    match (&p.key, &p.value) {
        (k, _) if k.is_per_gpu() => caps.gpus.iter().any(|g| gpu_passes(g, p)),
        (Key::GpuCount, v) => holds_number(p.op, caps.gpus.len() as u64, v),
        (Key::Label(k), Value::Text(t)) => match caps.labels.get(k) {
            Some(have) => cmp_text(p.op, have, t),
            None => p.op == Op::Ne,
        },
        (Key::Credential, Value::Text(t)) => caps.credentials.iter().any(|c| c == t),
        (Key::Network, Value::Text(t)) => caps.network.iter().any(|n| n == t),
        (Key::Resource(r), v) => holds_number(p.op, caps.resources.get(r).copied().unwrap_or(0), v),
        (Key::HostMemory, v) => holds_number(p.op, host.memory_total_bytes, v),
        (Key::HostDisk, v) => holds_number(p.op, host.disk_free_bytes, v),
        (Key::HostCpus, v) => holds_number(p.op, host.logical_cores as u64, v),
        (Key::HostOs, Value::Text(t)) => cmp_text(p.op, &host.os, t),
        (Key::HostArch, Value::Text(t)) => cmp_text(p.op, &host.arch, t),
        (Key::HostName, Value::Text(t)) => cmp_text(p.op, &host.hostname, t),
        _ => false,
    }
}

fn describe_gpus(caps: &Capabilities) -> String {
    if caps.gpus.is_empty() {
        return "no GPUs".into();
    }
    // Group identical models: "2×NVIDIA A100 40GiB".
    let mut groups: Vec<(String, usize)> = Vec::new();
    for g in &caps.gpus {
        let label = format!("{} {}", g.name, human_bytes(g.memory_total_bytes));
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => groups.push((label, 1)),
        }
    }
    groups
        .iter()
        .map(|(l, n)| format!("{n}×{l}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn describe_have(caps: &Capabilities, p: &Predicate) -> String {
    let host = caps.host.clone().unwrap_or_default();
    match &p.key {
        Key::Label(k) => match caps.labels.get(k) {
            Some(v) => format!("label.{k}={v}"),
            None => format!("no label {k}"),
        },
        Key::Credential => {
            if caps.credentials.is_empty() {
                "no credentials".into()
            } else {
                format!("credentials {}", caps.credentials.join(","))
            }
        }
        Key::Network => {
            if caps.network.is_empty() {
                "no network capabilities".into()
            } else {
                format!("network {}", caps.network.join(","))
            }
        }
        Key::Resource(r) => format!(
            "resource.{r}={}",
            caps.resources.get(r).copied().unwrap_or(0)
        ),
        Key::HostMemory => format!("host.memory={}", human_bytes(host.memory_total_bytes)),
        Key::HostDisk => format!("host.disk={}", human_bytes(host.disk_free_bytes)),
        Key::HostCpus => format!("host.cpus={}", host.logical_cores),
        Key::HostOs => format!("host.os={}", host.os),
        Key::HostArch => format!("host.arch={}", host.arch),
        Key::HostName => format!("host.hostname={}", host.hostname),
        _ => describe_gpus(caps),
    }
}

impl Requirements {
    /// Parses the text form (an empty text means "no requirements").
    pub fn parse(text: &str) -> Result<Requirements, ParseError> {
        text.parse()
    }

    /// True when there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.hard.is_empty() && self.soft.is_empty()
    }

    /// Adds a hard clause from its text form (`gpu.memory>=40GiB`).
    pub fn require(mut self, clause: &str) -> Result<Self, ParseError> {
        let parsed = Requirements::parse(clause)?;
        self.hard.extend(parsed.hard);
        self.soft.extend(parsed.soft);
        Ok(self)
    }

    /// Adds a preference with a weight.
    pub fn prefer(mut self, clause: &str, weight: u32) -> Result<Self, ParseError> {
        let parsed = Requirements::parse(clause)?;
        for p in parsed.hard {
            self.soft.push((p, weight));
        }
        Ok(self)
    }

    /// What the worker lacks, one entry per unmet clause (GPU clauses count as one); empty when
    /// it satisfies every hard clause.
    pub fn unmet(&self, caps: &Capabilities) -> Vec<Unmet> {
        let mut out = Vec::new();
        let gpu_filters: Vec<&Predicate> =
            self.hard.iter().filter(|p| p.key.is_per_gpu()).collect();
        let count: Vec<&Predicate> = self
            .hard
            .iter()
            .filter(|p| p.key == Key::GpuCount)
            .collect();
        if !gpu_filters.is_empty() || !count.is_empty() {
            let matching = caps
                .gpus
                .iter()
                .filter(|g| gpu_filters.iter().all(|p| gpu_passes(g, p)))
                .count() as u64;
            let ok = if count.is_empty() {
                matching >= 1
            } else {
                count.iter().all(|p| holds_number(p.op, matching, &p.value))
            };
            if !ok {
                let mut needs: Vec<String> = count.iter().map(|p| p.to_string()).collect();
                needs.extend(gpu_filters.iter().map(|p| p.to_string()));
                out.push(Unmet {
                    needs: needs.join(", "),
                    has: format!("{} ({matching} matching)", describe_gpus(caps)),
                });
            }
        }
        for p in &self.hard {
            if p.key.is_per_gpu() || p.key == Key::GpuCount {
                continue;
            }
            if !holds(caps, p) {
                out.push(Unmet {
                    needs: p.to_string(),
                    has: describe_have(caps, p),
                });
            }
        }
        out
    }

    /// Whether one GPU passes every hard per-GPU clause (used to pick GPUs to reserve).
    pub fn gpu_eligible(&self, gpu: &GpuDevice) -> bool {
        self.hard
            .iter()
            .filter(|p| p.key.is_per_gpu())
            .all(|p| gpu_passes(gpu, p))
    }

    /// Whether the worker meets every hard clause.
    pub fn satisfied_by(&self, caps: &Capabilities) -> bool {
        // The fast path of `unmet`: no explanation text is built (matching calls this a lot).
        let mut gpu_filters = self.hard.iter().filter(|p| p.key.is_per_gpu()).peekable();
        let mut counts = self
            .hard
            .iter()
            .filter(|p| p.key == Key::GpuCount)
            .peekable();
        if gpu_filters.peek().is_some() || counts.peek().is_some() {
            let filters: Vec<&Predicate> = gpu_filters.collect();
            let matching = caps
                .gpus
                .iter()
                .filter(|g| filters.iter().all(|p| gpu_passes(g, p)))
                .count() as u64;
            let ok = match counts.peek() {
                None => matching >= 1,
                Some(_) => counts.all(|p| holds_number(p.op, matching, &p.value)),
            };
            if !ok {
                return false;
            }
        }
        self.hard
            .iter()
            .filter(|p| !p.key.is_per_gpu() && p.key != Key::GpuCount)
            .all(|p| holds(caps, p))
    }

    /// Sum of the weights of the preferences the worker meets.
    pub fn score(&self, caps: &Capabilities) -> u64 {
        self.soft
            .iter()
            .filter(|(p, _)| holds(caps, p))
            .map(|(_, w)| *w as u64)
            .sum()
    }

    /// Explains why none of `workers` can take work with these requirements, naming the closest.
    pub fn explain<'a>(
        &self,
        workers: impl IntoIterator<Item = (&'a str, &'a Capabilities)>,
    ) -> String {
        // Closest: fewest unmet clauses; then the biggest GPU (the usual thing that falls short);
        // then the identity, so the answer does not depend on iteration order.
        let mut best: Option<(&str, Vec<Unmet>, u64)> = None;
        for (id, caps) in workers {
            let unmet = self.unmet(caps);
            let biggest = caps
                .gpus
                .iter()
                .map(|g| g.memory_total_bytes)
                .max()
                .unwrap_or(0);
            let better = match &best {
                None => true,
                Some((bid, b, bbig)) => {
                    (unmet.len(), std::cmp::Reverse(biggest), id)
                        < (b.len(), std::cmp::Reverse(*bbig), *bid)
                }
            };
            if better {
                best = Some((id, unmet, biggest));
            }
        }
        let best = best.map(|(id, unmet, _)| (id, unmet));
        match best {
            None => format!("needs {self}; no live worker is registered"),
            Some((_, unmet)) if unmet.is_empty() => String::new(),
            Some((id, unmet)) => {
                let needs: Vec<String> = unmet.iter().map(|u| u.needs.clone()).collect();
                let has: Vec<String> = unmet.iter().map(|u| u.has.clone()).collect();
                format!(
                    "needs {}; best is worker {id} with {}",
                    needs.join(" and "),
                    has.join("; ")
                )
            }
        }
    }
}
