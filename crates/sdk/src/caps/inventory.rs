//! The declared inventory file (TOML) for machines without NVML, and for demos and tests.
//!
//! ```toml
//! hostname = "gpu-7"              # optional: report this host name
//!
//! [[gpu]]
//! name = "NVIDIA A100-SXM4-40GB"
//! memory = "40GiB"
//! compute = "8.0"
//! count = 2                       # optional, default 1
//!
//! [labels]
//! zone = "us-east-1a"
//!
//! [resources]
//! scratch_gb = 500
//!
//! [[credential]]
//! name = "s3-prod"
//! env = "S3_PROD_KEY"             # or: file = "/etc/tether/s3-prod.key"
//!
//! [[network]]
//! name = "internet"
//! probe = "example.com:443"       # optional: advertised only while this connects
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tether_wire::pb::GpuDevice;

/// Why an inventory file was refused.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("could not read inventory {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown fields.
    #[error("inventory {path} is invalid: {message}")]
    Invalid {
        /// Path.
        path: String,
        /// What toml said.
        message: String,
    },
}

/// A declared inventory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Host name to report instead of the detected one.
    #[serde(default)]
    pub hostname: Option<String>,
    /// GPUs.
    #[serde(default)]
    pub gpu: Vec<DeclaredGpu>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Countable resources.
    #[serde(default)]
    pub resources: BTreeMap<String, u64>,
    /// Credentials by name.
    #[serde(default)]
    pub credential: Vec<CredentialSpec>,
    /// Network capabilities.
    #[serde(default)]
    pub network: Vec<NetworkSpec>,
}

/// One declared GPU model (repeated `count` times).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredGpu {
    /// Model name.
    pub name: String,
    /// Memory per GPU, e.g. "40GiB".
    pub memory: String,
    /// Compute capability, e.g. "8.0".
    #[serde(default)]
    pub compute: Option<String>,
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// A credential: a name backed by an environment variable or a file on the worker.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// The name work asks for.
    pub name: String,
    /// Environment variable holding the secret.
    #[serde(default)]
    pub env: Option<String>,
    /// File holding the secret.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl CredentialSpec {
    /// A credential read from an environment variable.
    pub fn from_env(name: impl Into<String>, var: impl Into<String>) -> Self {
        CredentialSpec {
            name: name.into(),
            env: Some(var.into()),
            file: None,
        }
    }

    /// A credential read from a file.
    pub fn from_file(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        CredentialSpec {
            name: name.into(),
            env: None,
            file: Some(path.into()),
        }
    }

    /// The secret, when present (non-empty).
    pub fn read(&self) -> Option<String> {
        if let Some(var) = &self.env {
            if let Ok(v) = std::env::var(var) {
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
        if let Some(path) = &self.file {
            if let Ok(v) = std::fs::read_to_string(path) {
                let v = v.trim_end_matches(['\n', '\r']).to_string();
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
        None
    }
}

/// A declared network capability.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Its name, e.g. "internet" or "vpc:prod".
    pub name: String,
    /// `host:port` that must accept a TCP connection for the capability to be advertised.
    #[serde(default)]
    pub probe: Option<String>,
}

impl Inventory {
    /// Parses inventory TOML.
    pub fn parse(text: &str, path: &str) -> Result<Inventory, InventoryError> {
        let inv: Inventory = toml::from_str(text).map_err(|e| InventoryError::Invalid {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        for g in &inv.gpu {
            tether_core::requirements::Requirements::parse(&format!("gpu.memory>={}", g.memory))
                .map_err(|_| InventoryError::Invalid {
                    path: path.to_string(),
                    message: format!(
                        "gpu {:?}: memory {:?} needs a unit, e.g. \"40GiB\"",
                        g.name, g.memory
                    ),
                })?;
            if let Some(c) = &g.compute {
                tether_core::requirements::Requirements::parse(&format!("gpu.compute>={c}"))
                    .map_err(|_| InventoryError::Invalid {
                        path: path.to_string(),
                        message: format!("gpu {:?}: compute {c:?} must look like \"8.0\"", g.name),
                    })?;
            }
            if g.count == 0 {
                return Err(InventoryError::Invalid {
                    path: path.to_string(),
                    message: format!("gpu {:?}: count must be at least 1", g.name),
                });
            }
        }
        for c in &inv.credential {
            if c.env.is_none() && c.file.is_none() {
                return Err(InventoryError::Invalid {
                    path: path.to_string(),
                    message: format!(
                        "credential {:?} needs env = \"VAR\" or file = \"PATH\"",
                        c.name
                    ),
                });
            }
        }
        Ok(inv)
    }

    /// Reads an inventory file.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Inventory::parse(&text, &path.display().to_string())
    }

    /// The declared GPUs as devices, indexed in order.
    pub fn gpu_devices(&self) -> Vec<GpuDevice> {
        let mut out = Vec::new();
        let host = self.hostname.clone().unwrap_or_else(|| "declared".into());
        for g in &self.gpu {
            let bytes = match tether_core::requirements::Requirements::parse(&format!(
                "gpu.memory>={}",
                g.memory
            )) {
                Ok(r) => match r.hard[0].value {
                    tether_core::requirements::Value::Number(n) => n,
                    _ => 0,
                },
                Err(_) => 0,
            };
            let (major, minor) = g
                .compute
                .as_deref()
                .and_then(|c| c.split_once('.'))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .unwrap_or((0, 0));
            for _ in 0..g.count {
                let index = out.len() as u32;
                out.push(GpuDevice {
                    index,
                    uuid: format!("GPU-declared-{host}-{index}"),
                    name: g.name.clone(),
                    memory_total_bytes: bytes,
                    memory_free_bytes: bytes,
                    compute_major: major,
                    compute_minor: minor,
                    pci_bus_id: String::new(),
                    mig_mode: String::new(),
                    utilization_percent: -1,
                    source: "declared".into(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_inventory() {
        let inv = Inventory::parse(
            r#"
            hostname = "gpu-7"
            [[gpu]]
            name = "NVIDIA H100 80GB HBM3"
            memory = "80GiB"
            compute = "9.0"
            count = 8
            [labels]
            zone = "a"
            [resources]
            scratch_gb = 500
            [[credential]]
            name = "s3-prod"
            env = "TETHER_TEST_NEVER_SET"
            [[network]]
            name = "internet"
            "#,
            "inv.toml",
        )
        .unwrap();
        let gpus = inv.gpu_devices();
        assert_eq!(gpus.len(), 8);
        assert_eq!(gpus[7].index, 7);
        assert_eq!(gpus[0].memory_total_bytes, 80 << 30);
        assert_eq!((gpus[0].compute_major, gpus[0].compute_minor), (9, 0));
        assert!(gpus.iter().all(|g| g.source == "declared"));
        assert_eq!(
            inv.credential[0].read(),
            None,
            "absent env var: not advertised"
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = Inventory::parse("[[gpu]]\nname = \"x\"\nmemory = \"40\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("needs a unit"), "{e}");
        let e = Inventory::parse("gpus = 3\n", "f").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Inventory::parse("[[credential]]\nname = \"k\"\n", "f").unwrap_err();
        assert!(e.to_string().contains("needs env"), "{e}");
    }

    #[test]
    fn credential_from_file_is_read_locally() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let spec = CredentialSpec::from_file("k", &path);
        assert_eq!(spec.read().as_deref(), Some("s3cr3t"));
        std::fs::write(&path, "").unwrap();
        assert_eq!(spec.read(), None, "an empty secret counts as absent");
    }
}
