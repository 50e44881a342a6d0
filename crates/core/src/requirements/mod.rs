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

mod matching;
mod parse;

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
    pub(super) shown: String,
    pub(super) caret: String,
}

/// What a worker lacks for one requirement (for explanations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// The clause(s), as written canonically.
    pub needs: String,
    /// What the worker has instead.
    pub has: String,
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
        // `==` is what many languages write; here it would have asked for a label "=a".
        let e = Requirements::parse("gpu.count>=1, label.zone==a").unwrap_err();
        assert!(e.message.contains("'==' is not an operator"), "{e}");
        assert!(e.message.contains("label.zone=a"), "{e}");
        let e = Requirements::parse("gpu.count==2").unwrap_err();
        assert!(e.message.contains("gpu.count=2"), "{e}");
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
