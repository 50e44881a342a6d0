//! Requirements: hard constraints and weighted preferences over a worker's capabilities, their
//! text form (what the CLI and the wire carry), and matching with explanations.
//!
//! Text form: clauses separated by commas.
//!
//! ```text
//! gpu.count>=2, gpu.memory>=40GiB, gpu.name~H100, gpu.compute>=8.0, label.zone=us-east-1a,
//! credential=s3-prod, network=internet, resource.scratch_gb>=100, host.memory>=64GiB,
//! prefer label.dataset=imagenet:50
//! ```
//!
//! GPU predicates (`gpu.memory`, `gpu.free_memory`, `gpu.name`, `gpu.compute`, `gpu.uuid`) apply to
//! each GPU, and `gpu.count` counts the GPUs that pass all of them: `gpu.count>=2,
//! gpu.memory>=40GiB` needs two GPUs with at least 40 GiB each. Without `gpu.count`, any GPU
//! predicate means "at least one such GPU". A preference (`prefer CLAUSE:WEIGHT`, weight 1 when
//! omitted) adds its weight to a worker's score when the worker meets it; among workers that meet
//! every hard clause, the highest score wins.

use std::cmp::Ordering;
use std::fmt;
use tether_wire::pb::{Capabilities, GpuDevice};

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `<`
    Lt,
    /// `~` (contains, case-insensitive; strings only)
    Contains,
}

impl Op {
    fn text(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
            Op::Contains => "~",
        }
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
            Op::Ge => ord != Ordering::Less,
            Op::Gt => ord == Ordering::Greater,
            Op::Le => ord != Ordering::Greater,
            Op::Lt => ord == Ordering::Less,
            Op::Contains => false,
        }
    }
}

/// What a predicate looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// Number of GPUs passing the per-GPU predicates.
    GpuCount,
    /// Total memory of one GPU (bytes).
    GpuMemory,
    /// Free memory of one GPU (bytes).
    GpuFreeMemory,
    /// GPU model name.
    GpuName,
    /// GPU compute capability.
    GpuCompute,
    /// GPU uuid.
    GpuUuid,
    /// A label.
    Label(String),
    /// A credential name.
    Credential,
    /// A network capability.
    Network,
    /// A countable resource.
    Resource(String),
    /// Host memory (bytes).
    HostMemory,
    /// Free disk at the worker's work directory (bytes).
    HostDisk,
    /// Logical cores.
    HostCpus,
    /// Operating system.
    HostOs,
    /// CPU architecture.
    HostArch,
    /// Host name.
    HostName,
}

impl Key {
    fn is_per_gpu(&self) -> bool {
        matches!(
            self,
            Key::GpuMemory | Key::GpuFreeMemory | Key::GpuName | Key::GpuCompute | Key::GpuUuid
        )
    }

    fn name(&self) -> String {
        match self {
            Key::GpuCount => "gpu.count".into(),
            Key::GpuMemory => "gpu.memory".into(),
            Key::GpuFreeMemory => "gpu.free_memory".into(),
            Key::GpuName => "gpu.name".into(),
            Key::GpuCompute => "gpu.compute".into(),
            Key::GpuUuid => "gpu.uuid".into(),
            Key::Label(k) => format!("label.{k}"),
            Key::Credential => "credential".into(),
            Key::Network => "network".into(),
            Key::Resource(r) => format!("resource.{r}"),
            Key::HostMemory => "host.memory".into(),
            Key::HostDisk => "host.disk".into(),
            Key::HostCpus => "host.cpus".into(),
            Key::HostOs => "host.os".into(),
            Key::HostArch => "host.arch".into(),
            Key::HostName => "host.hostname".into(),
        }
    }

    fn kind(&self) -> ValueKind {
        match self {
            Key::GpuCount | Key::HostCpus | Key::Resource(_) => ValueKind::Count,
            Key::GpuMemory | Key::GpuFreeMemory | Key::HostMemory | Key::HostDisk => {
                ValueKind::Bytes
            }
            Key::GpuCompute => ValueKind::Version,
            Key::Credential | Key::Network => ValueKind::Name,
            Key::GpuName
            | Key::GpuUuid
            | Key::Label(_)
            | Key::HostOs
            | Key::HostArch
            | Key::HostName => ValueKind::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Count,
    Bytes,
    Version,
    Text,
    /// Only `=`.
    Name,
}

/// A predicate's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// A count or a size in bytes.
    Number(u64),
    /// A version such as a compute capability.
    Version(u32, u32),
    /// Text.
    Text(String),
}

/// One clause.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Predicate {
    /// What it looks at.
    pub key: Key,
    /// How it compares.
    pub op: Op,
    /// With what.
    pub value: Value,
}

/// Hard constraints plus weighted preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Requirements {
    /// Every one must hold.
    pub hard: Vec<Predicate>,
    /// (predicate, weight): adds the weight to the score when it holds.
    pub soft: Vec<(Predicate, u32)>,
}

const UNITS: [(&str, u64); 10] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Renders bytes in the largest binary unit that divides them exactly.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Renders bytes approximately, for people (e.g. "39.5GiB").
pub fn human_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{:.1}GiB", gib).replace(".0GiB", "GiB")
    } else {
        format!("{:.0}MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match (&self.value, self.key.kind()) {
            (Value::Number(n), ValueKind::Bytes) => format_bytes(*n),
            (Value::Number(n), _) => n.to_string(),
            (Value::Version(a, b), _) => format!("{a}.{b}"),
            (Value::Text(t), _) => t.clone(),
        };
        write!(f, "{}{}{}", self.key.name(), self.op.text(), value)
    }
}

impl fmt::Display for Requirements {
    /// The canonical form: hard clauses sorted, then preferences sorted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hard: Vec<String> = self.hard.iter().map(|p| p.to_string()).collect();
        hard.sort();
        hard.dedup();
        let mut soft: Vec<String> = self
            .soft
            .iter()
            .map(|(p, w)| format!("prefer {p}:{w}"))
            .collect();
        soft.sort();
        let all: Vec<String> = hard.into_iter().chain(soft).collect();
        f.write_str(&all.join(", "))
    }
}

/// Why a requirements text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requirements: {message} at column {column}\n  {shown}\n  {caret}")]
pub struct ParseError {
    /// What was expected.
    pub message: String,
    /// 1-based column (in characters).
    pub column: usize,
    /// The text.
    pub input: String,
    /// The part of the text around the error that the message shows (all of it when short).
    shown: String,
    caret: String,
}

/// Characters of the input shown on each side of an error.
const SHOWN_AROUND: usize = 40;

fn err(input: &str, at: usize, message: impl Into<String>) -> ParseError {
    let at = at.min(input.len());
    let column = input[..at].chars().count() + 1;
    // Only a window around the error: a huge input must not come back in the error whole.
    let chars: Vec<char> = input.chars().collect();
    let from = (column - 1).saturating_sub(SHOWN_AROUND);
    let to = (column - 1 + SHOWN_AROUND).min(chars.len());
    let mut shown: String = chars[from..to].iter().collect();
    let mut caret_at = column - 1 - from;
    if from > 0 {
        shown.insert(0, '…');
        caret_at += 1;
    }
    if to < chars.len() {
        shown.push('…');
    }
    ParseError {
        message: crate::types::quote_prefix(&message.into(), 400),
        column,
        input: input.to_string(),
        shown,
        caret: format!("{}^", " ".repeat(caret_at)),
    }
}

const KNOWN_KEYS: &str =
    "gpu.count, gpu.memory, gpu.free_memory, gpu.name, gpu.compute, gpu.uuid, \
    label.<name>, credential, network, resource.<name>, host.memory, host.disk, host.cpus, \
    host.os, host.arch, host.hostname";

/// A piece of the input as an error message quotes it.
fn short(text: &str) -> String {
    crate::types::quote_prefix(text, 60)
}

fn parse_key(input: &str, at: usize, text: &str) -> Result<Key, ParseError> {
    let bad_name = |name: &str| {
        name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
    };
    Ok(match text {
        "gpu.count" => Key::GpuCount,
        "gpu.memory" => Key::GpuMemory,
        "gpu.free_memory" => Key::GpuFreeMemory,
        "gpu.name" => Key::GpuName,
        "gpu.compute" => Key::GpuCompute,
        "gpu.uuid" => Key::GpuUuid,
        "credential" => Key::Credential,
        "network" => Key::Network,
        "host.memory" => Key::HostMemory,
        "host.disk" => Key::HostDisk,
        "host.cpus" => Key::HostCpus,
        "host.os" => Key::HostOs,
        "host.arch" => Key::HostArch,
        "host.hostname" => Key::HostName,
        _ => {
            if let Some(name) = text.strip_prefix("label.") {
                if bad_name(name) {
                    return Err(err(
                        input,
                        at,
                        format!(
                            "label name {:?} must be letters, digits, '_', '-', '.' or '/'",
                            short(name)
                        ),
                    ));
                }
                Key::Label(name.to_string())
            } else if let Some(name) = text.strip_prefix("resource.") {
                if bad_name(name) {
                    return Err(err(
                        input,
                        at,
                        format!(
                            "resource name {:?} must be letters, digits, '_', '-', '.' or '/'",
                            short(name)
                        ),
                    ));
                }
                Key::Resource(name.to_string())
            } else if text.is_empty() {
                return Err(err(
                    input,
                    at,
                    format!("expected a key (one of {KNOWN_KEYS})"),
                ));
            } else {
                return Err(err(
                    input,
                    at,
                    format!(
                        "unknown key {:?}; expected one of {KNOWN_KEYS}",
                        short(text)
                    ),
                ));
            }
        }
    })
}

fn parse_value(input: &str, at: usize, key: &Key, op: Op, text: &str) -> Result<Value, ParseError> {
    let kind = key.kind();
    let allowed = match kind {
        ValueKind::Count | ValueKind::Bytes | ValueKind::Version => op != Op::Contains,
        ValueKind::Text => matches!(op, Op::Eq | Op::Ne | Op::Contains),
        ValueKind::Name => op == Op::Eq,
    };
    if !allowed {
        let hint = match kind {
            ValueKind::Name => "only '=' is allowed",
            ValueKind::Text => "use '=', '!=' or '~'",
            _ => "use '=', '!=', '>=', '>', '<=' or '<'",
        };
        return Err(err(
            input,
            at,
            format!(
                "operator '{}' does not apply to {}: {hint}",
                op.text(),
                key.name()
            ),
        ));
    }
    if text.is_empty() {
        return Err(err(
            input,
            at,
            format!("expected a value after {}{}", key.name(), op.text()),
        ));
    }
    match kind {
        ValueKind::Count => text.parse::<u64>().map(Value::Number).map_err(|_| {
            err(
                input,
                at,
                format!("expected a whole number for {}, found {text:?}", key.name()),
            )
        }),
        ValueKind::Bytes => {
            let split = text
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(text.len());
            let (num, unit) = text.split_at(split);
            let Some((_, size)) = UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(err(input, at + split, format!(
                    "expected a size with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) for {}, found {text:?}",
                    key.name()
                )));
            };
            let n: f64 = num.parse().map_err(|_| {
                err(
                    input,
                    at,
                    format!("expected a number before the unit, found {num:?}"),
                )
            })?;
            Ok(Value::Number((n * *size as f64).round() as u64))
        }
        ValueKind::Version => {
            let (a, b) = text.split_once('.').unwrap_or((text, "0"));
            match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => Ok(Value::Version(a, b)),
                _ => Err(err(
                    input,
                    at,
                    format!(
                        "expected a version such as 8.0 for {}, found {text:?}",
                        key.name()
                    ),
                )),
            }
        }
        ValueKind::Text | ValueKind::Name => Ok(Value::Text(text.to_string())),
    }
}

fn parse_predicate(input: &str, at: usize, text: &str) -> Result<Predicate, ParseError> {
    let op_at = text.find(['=', '!', '>', '<', '~']).ok_or_else(|| {
        err(
            input,
            at + text.len(),
            format!(
                "expected an operator (=, !=, >=, >, <=, <, ~) after {:?}",
                text.trim()
            ),
        )
    })?;
    let key_text = text[..op_at].trim();
    let key_at = at + text[..op_at].find(key_text).unwrap_or(0);
    let key = parse_key(input, key_at, key_text)?;
    let rest = &text[op_at..];
    let (op, len) = if rest.starts_with(">=") {
        (Op::Ge, 2)
    } else if rest.starts_with("<=") {
        (Op::Le, 2)
    } else if rest.starts_with("!=") {
        (Op::Ne, 2)
    } else if rest.starts_with('>') {
        (Op::Gt, 1)
    } else if rest.starts_with('<') {
        (Op::Lt, 1)
    } else if rest.starts_with('=') {
        (Op::Eq, 1)
    } else if rest.starts_with('~') {
        (Op::Contains, 1)
    } else {
        return Err(err(
            input,
            at + op_at,
            "expected an operator (=, !=, >=, >, <=, <, ~)",
        ));
    };
    let value_raw = &rest[len..];
    let value_text = value_raw.trim();
    let value_at = at + op_at + len + value_raw.find(value_text).unwrap_or(0);
    let value = parse_value(input, value_at, &key, op, value_text)?;
    Ok(Predicate { key, op, value })
}

impl std::str::FromStr for Requirements {
    type Err = ParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let mut reqs = Requirements::default();
        if input.trim().is_empty() {
            return Ok(reqs);
        }
        let mut offset = 0;
        for raw in input.split(',') {
            let at = offset;
            offset += raw.len() + 1;
            let trimmed = raw.trim_start();
            let at = at + (raw.len() - trimmed.len());
            let clause = trimmed.trim_end();
            if clause.is_empty() {
                return Err(err(
                    input,
                    at,
                    "expected a clause (a comma is doubled or trailing)",
                ));
            }
            if let Some(rest) = clause.strip_prefix("prefer ") {
                let rest_at = at + "prefer ".len() + (rest.len() - rest.trim_start().len());
                let rest = rest.trim_start();
                // The weight follows the last ':' (values such as uuids never contain one here).
                let (pred_text, weight) = match rest.rfind(':') {
                    Some(i) => {
                        let w = rest[i + 1..].trim();
                        let weight = w.parse::<u32>().map_err(|_| {
                            err(
                                input,
                                rest_at + i + 1,
                                format!("expected a whole-number weight after ':', found {w:?}"),
                            )
                        })?;
                        (&rest[..i], weight)
                    }
                    None => (rest, 1),
                };
                reqs.soft
                    .push((parse_predicate(input, rest_at, pred_text)?, weight));
            } else {
                reqs.hard.push(parse_predicate(input, at, clause)?);
            }
        }
        Ok(reqs)
    }
}

// ----------------------------------------------------------------------------------------------
// Matching
// ----------------------------------------------------------------------------------------------

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

/// What a worker lacks for one requirement (for explanations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// The clause(s), as written canonically.
    pub needs: String,
    /// What the worker has instead.
    pub has: String,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tether_wire::pb::HostInfo;

    fn gpu(index: u32, name: &str, gib: u64, cc: (u32, u32)) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            name: name.into(),
            memory_total_bytes: gib << 30,
            memory_free_bytes: gib << 30,
            compute_major: cc.0,
            compute_minor: cc.1,
            source: "declared".into(),
            ..Default::default()
        }
    }

    fn a100x2() -> Capabilities {
        Capabilities {
            host: Some(HostInfo {
                hostname: "gpu-3".into(),
                memory_total_bytes: 256 << 30,
                logical_cores: 32,
                os: "linux".into(),
                ..Default::default()
            }),
            gpus: vec![
                gpu(0, "NVIDIA A100-SXM4-40GB", 40, (8, 0)),
                gpu(1, "NVIDIA A100-SXM4-40GB", 40, (8, 0)),
            ],
            credentials: vec!["s3-prod".into()],
            labels: [("zone".to_string(), "us-east-1a".to_string())].into(),
            resources: [("scratch_gb".to_string(), 500u64)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let text = "gpu.count>=2, gpu.memory>=40GiB, gpu.name~H100, gpu.compute>=8.0, \
                    label.zone=us-east-1a, credential=s3-prod, network=internet, \
                    resource.scratch_gb>=100, host.memory>=64GiB, prefer label.dataset=imagenet:50";
        let r = Requirements::parse(text).unwrap();
        assert_eq!(r.hard.len(), 9);
        assert_eq!(r.soft.len(), 1);
        assert_eq!(r.soft[0].1, 50);
        assert_eq!(r.hard[1].value, Value::Number(40 << 30));
        assert_eq!(r.hard[3].value, Value::Version(8, 0));
        // Canonical form round-trips.
        let again = Requirements::parse(&r.to_string()).unwrap();
        assert_eq!(again.to_string(), r.to_string());
    }

    #[test]
    fn parse_errors_point_at_the_problem() {
        let e = Requirements::parse("gpu.count>=2, gpu.colour=red").unwrap_err();
        assert_eq!(e.column, 15);
        assert!(e.message.contains("unknown key \"gpu.colour\""), "{e}");
        let e = Requirements::parse("gpu.memory>=40").unwrap_err();
        assert!(e.message.contains("expected a size with a unit"), "{e}");
        let e = Requirements::parse("credential>=x").unwrap_err();
        assert!(e.message.contains("only '=' is allowed"), "{e}");
        let e = Requirements::parse("gpu.count 2").unwrap_err();
        assert!(e.message.contains("expected an operator"), "{e}");
        let e = Requirements::parse("gpu.count>=2,,").unwrap_err();
        assert!(e.message.contains("expected a clause"), "{e}");
        assert_eq!(e.column, 14);
        let e = Requirements::parse("prefer label.a=b:x").unwrap_err();
        assert!(e.message.contains("weight"), "{e}");
        let e = Requirements::parse("gpu.compute>=eight").unwrap_err();
        assert!(e.message.contains("version"), "{e}");
        assert!(e.to_string().contains('^'));
    }

    #[test]
    fn per_gpu_predicates_combine_with_the_count() {
        let caps = Capabilities {
            gpus: vec![gpu(0, "A100", 80, (8, 0)), gpu(1, "T4", 16, (7, 5))],
            ..Default::default()
        };
        // Two GPUs, but only one has >= 40 GiB.
        let r = Requirements::parse("gpu.count>=2, gpu.memory>=40GiB").unwrap();
        assert!(!r.satisfied_by(&caps));
        assert!(Requirements::parse("gpu.count>=1, gpu.memory>=40GiB")
            .unwrap()
            .satisfied_by(&caps));
        assert!(Requirements::parse("gpu.count>=2")
            .unwrap()
            .satisfied_by(&caps));
        assert!(Requirements::parse("gpu.name~t4, gpu.compute>=7.5")
            .unwrap()
            .satisfied_by(&caps));
        assert!(!Requirements::parse("gpu.name~t4, gpu.compute>=8.0")
            .unwrap()
            .satisfied_by(&caps));
        assert!(Requirements::parse("gpu.count=0")
            .unwrap()
            .satisfied_by(&Capabilities::default()));
    }

    #[test]
    fn labels_credentials_resources_and_host() {
        let caps = a100x2();
        let yes = [
            "label.zone=us-east-1a",
            "label.zone~EAST",
            "label.rack!=r1",
            "credential=s3-prod",
            "resource.scratch_gb>=100",
            "host.memory>=64GiB",
            "host.cpus>16",
            "host.os=linux",
        ];
        for clause in yes {
            assert!(
                Requirements::parse(clause).unwrap().satisfied_by(&caps),
                "{clause}"
            );
        }
        let no = [
            "label.zone=eu",
            "label.rack=r1",
            "credential=gcs",
            "network=internet",
            "resource.licenses>=1",
            "host.memory>=1TiB",
        ];
        for clause in no {
            assert!(
                !Requirements::parse(clause).unwrap().satisfied_by(&caps),
                "{clause}"
            );
        }
    }

    #[test]
    fn preferences_score() {
        let caps = a100x2();
        let r = Requirements::parse(
            "prefer label.zone=us-east-1a:50, prefer credential=gcs:10, prefer gpu.name~A100:5",
        )
        .unwrap();
        assert!(r.satisfied_by(&caps), "preferences are not constraints");
        assert_eq!(r.score(&caps), 55);
    }

    #[test]
    fn explanation_names_the_closest_worker() {
        let big = a100x2();
        let cpu = Capabilities {
            network: vec!["internet".into()],
            ..Default::default()
        };
        let r = Requirements::parse("gpu.memory>=80GiB").unwrap();
        let text = r.explain([("gpu-3", &big), ("cpu-1", &cpu)]);
        assert_eq!(
            text,
            "needs gpu.memory>=80GiB; best is worker gpu-3 with 2×NVIDIA A100-SXM4-40GB 40GiB (0 matching)"
        );
        let r = Requirements::parse("credential=s3-prod, network=internet").unwrap();
        let text = r.explain([("gpu-3", &big), ("cpu-1", &cpu)]);
        assert!(
            text.starts_with("needs network=internet; best is worker gpu-3"),
            "{text}"
        );
        assert_eq!(
            r.explain(std::iter::empty()),
            "needs credential=s3-prod, network=internet; no live worker is registered"
        );
    }
}
