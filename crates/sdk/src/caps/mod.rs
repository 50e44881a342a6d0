//! Capabilities: what a worker's host has, and what work needs.
//!
//! - GPUs through NVML, loaded at run time ([`NvmlInventory`]); building never needs a GPU or the
//!   NVIDIA libraries. Where NVML is missing the GPU list is empty and the reason is reported.
//! - A declared inventory (TOML, [`Inventory`]) for machines without NVML: tests, CI, demos. Its GPUs
//!   are always marked `source: declared`.
//! - Host facts through sysinfo, network interfaces, declared network capabilities guarded by a
//!   TCP probe, credentials by name (never the secret), labels and countable resources.
//! - [`requirements`]: the requirements language and matching.

mod gpu;
mod inventory;
pub use tether_core::requirements;

pub use gpu::{DeclaredGpus, GpuInventory, GpuSnapshot, NvmlInventory};
pub use inventory::{CredentialSpec, DeclaredGpu, Inventory, InventoryError, NetworkSpec};
pub use requirements::{ParseError, Requirements};

use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether_wire::pb::{Capabilities, HostInfo, NetworkInterface};

/// How long a network probe may take before the capability counts as absent.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Host facts from sysinfo. `work_dir` decides which disk's free space is reported.
pub fn detect_host(work_dir: &Path) -> HostInfo {
    use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_memory(MemoryRefreshKind::everything())
            .with_cpu(CpuRefreshKind::nothing()),
    )
    .ok();
    let work_dir = std::fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let disk_free = Disks::new_with_refreshed_list()
        .ok()
        .and_then(|disks| {
            disks
                .iter()
                .filter(|d| work_dir.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .map(|d| d.available_space())
        })
        .unwrap_or(0);
    let (cpu_model, logical, total, available) = match &sys {
        Some(s) => (
            s.cpus()
                .first()
                .map(|c| c.brand().trim().to_string())
                .unwrap_or_default(),
            s.cpus().len() as u32,
            s.total_memory(),
            s.available_memory(),
        ),
        None => (String::new(), 0, 0, 0),
    };
    HostInfo {
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version()
            .or_else(|_| System::name())
            .unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: System::cpu_arch(),
        cpu_model,
        logical_cores: logical.max(
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(0),
        ),
        physical_cores: System::physical_core_count().unwrap_or(0) as u32,
        memory_total_bytes: total,
        memory_available_bytes: available,
        disk_free_bytes: disk_free,
        work_dir: work_dir.display().to_string(),
    }
}

/// Network interfaces and their addresses.
pub fn detect_interfaces() -> Vec<NetworkInterface> {
    let Ok(networks) = sysinfo::Networks::new_with_refreshed_list() else {
        return Vec::new();
    };
    let mut out: Vec<NetworkInterface> = networks
        .iter()
        .map(|(name, data)| {
            let mut addresses: Vec<String> =
                data.ip_networks().iter().map(|n| n.to_string()).collect();
            addresses.sort();
            NetworkInterface {
                name: name.to_string_lossy().into_owned(),
                addresses,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// True when a TCP connection to `target` (host:port) succeeds within [`PROBE_TIMEOUT`].
pub fn probe(target: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = target.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
}

/// Everything a worker needs to describe its host, and the parts that change at run time.
#[derive(Clone)]
pub struct CapabilitySource {
    gpus: Arc<dyn GpuInventory>,
    work_dir: PathBuf,
    hostname_override: Option<String>,
    credentials: Vec<CredentialSpec>,
    network: Vec<NetworkSpec>,
    labels: Arc<RwLock<BTreeMap<String, String>>>,
    resources: BTreeMap<String, u64>,
}

impl std::fmt::Debug for CapabilitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapabilitySource")
            .field("work_dir", &self.work_dir)
            .field(
                "credentials",
                &self.credentials.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field("network", &self.network)
            .field("labels", &*self.labels.read())
            .field("resources", &self.resources)
            .finish()
    }
}

impl CapabilitySource {
    /// Real detection: NVML for GPUs, sysinfo for the host, nothing declared.
    pub fn detect() -> Self {
        CapabilitySource {
            gpus: Arc::new(NvmlInventory::load()),
            work_dir: PathBuf::from("."),
            hostname_override: None,
            credentials: Vec::new(),
            network: Vec::new(),
            labels: Arc::new(RwLock::new(BTreeMap::new())),
            resources: BTreeMap::new(),
        }
    }

    /// Uses a declared inventory. Its GPUs (if it lists any) replace NVML's and are marked
    /// declared; its labels, resources, credentials and network capabilities are added.
    pub fn with_inventory(mut self, inventory: Inventory) -> Self {
        if !inventory.gpu.is_empty() {
            self.gpus = Arc::new(DeclaredGpus::new(inventory.gpu_devices()));
        }
        if inventory.hostname.is_some() {
            self.hostname_override = inventory.hostname.clone();
        }
        self.labels.write().extend(inventory.labels);
        self.resources.extend(inventory.resources);
        self.credentials.extend(inventory.credential);
        self.network.extend(inventory.network);
        self
    }

    /// Replaces the GPU inventory (tests use a fake behind the trait).
    pub fn with_gpus(mut self, gpus: Arc<dyn GpuInventory>) -> Self {
        self.gpus = gpus;
        self
    }

    /// Sets the directory whose disk's free space is reported.
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = dir.into();
        self
    }

    /// Adds a label.
    pub fn label(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.write().insert(key.into(), value.into());
        self
    }

    /// Adds a countable resource.
    pub fn resource(mut self, name: impl Into<String>, amount: u64) -> Self {
        self.resources.insert(name.into(), amount);
        self
    }

    /// Declares a credential backed by an environment variable or a file.
    pub fn credential(mut self, spec: CredentialSpec) -> Self {
        self.credentials.push(spec);
        self
    }

    /// Declares a network capability, optionally guarded by a TCP probe (`host:port`).
    pub fn network(mut self, name: impl Into<String>, probe: Option<String>) -> Self {
        self.network.push(NetworkSpec {
            name: name.into(),
            probe,
        });
        self
    }

    /// The shared, mutable label map (activities change labels through it at run time).
    pub fn labels(&self) -> Arc<RwLock<BTreeMap<String, String>>> {
        self.labels.clone()
    }

    /// Reads a credential's secret on this machine. Never sent anywhere.
    pub fn read_credential(&self, name: &str) -> Option<String> {
        self.credentials.iter().find(|c| c.name == name)?.read()
    }

    /// The host name this source reports: a declared inventory's, else the detected one.
    pub fn hostname(&self) -> String {
        self.hostname_override
            .clone()
            .unwrap_or_else(|| sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into()))
    }

    /// What tells this worker's host description apart from another's on the same host (the
    /// declared GPUs, host name, labels at start, resources, credentials and network names):
    /// the same configuration gives the same text on every start.
    pub fn fingerprint(&self) -> String {
        let credentials: Vec<&str> = self.credentials.iter().map(|c| c.name.as_str()).collect();
        let network: Vec<&str> = self.network.iter().map(|n| n.name.as_str()).collect();
        format!(
            "gpus={};host={:?};labels={:?};resources={:?};credentials={:?};network={:?}",
            self.gpus.describe(),
            self.hostname_override,
            *self.labels.read(),
            self.resources,
            credentials,
            network
        )
    }

    /// Takes a snapshot of everything (runs network probes; may block up to [`PROBE_TIMEOUT`]
    /// per probe).
    pub fn snapshot(&self) -> Capabilities {
        let gpus = self.gpus.snapshot();
        let mut host = detect_host(&self.work_dir);
        if let Some(h) = &self.hostname_override {
            host.hostname = h.clone();
        }
        let mut credentials: Vec<String> = self
            .credentials
            .iter()
            .filter(|c| c.read().is_some())
            .map(|c| c.name.clone())
            .collect();
        credentials.sort();
        credentials.dedup();
        let mut network: Vec<String> = self
            .network
            .iter()
            .filter(|n| n.probe.as_deref().is_none_or(probe))
            .map(|n| n.name.clone())
            .collect();
        network.sort();
        network.dedup();
        Capabilities {
            host: Some(host),
            gpus: gpus.gpus,
            gpu_driver_version: gpus.driver_version,
            cuda_driver_version: gpus.cuda_driver_version,
            gpu_note: gpus.note,
            interfaces: detect_interfaces(),
            network,
            credentials,
            labels: self.labels.read().clone().into_iter().collect(),
            resources: self.resources.clone().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_capability_is_advertised_only_while_its_probe_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let source = CapabilitySource::detect()
            .with_gpus(Arc::new(DeclaredGpus::new(vec![])))
            .network("vpc:prod", Some(open))
            .network("vpc:dev", Some(closed))
            .network("internet", None);
        let caps = source.snapshot();
        assert_eq!(
            caps.network,
            vec!["internet".to_string(), "vpc:prod".to_string()]
        );
        drop(listener);
    }

    #[test]
    fn labels_and_resources_are_advertised() {
        let source = CapabilitySource::detect()
            .with_gpus(Arc::new(DeclaredGpus::new(vec![])))
            .label("zone", "a")
            .resource("licenses", 2);
        source
            .labels()
            .write()
            .insert("model_loaded".into(), "llama".into());
        let caps = source.snapshot();
        assert_eq!(caps.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(
            caps.labels.get("model_loaded").map(String::as_str),
            Some("llama")
        );
        assert_eq!(caps.resources.get("licenses"), Some(&2));
        let host = caps.host.unwrap();
        assert!(
            host.memory_total_bytes > 0 && host.logical_cores > 0,
            "sysinfo host facts"
        );
    }
}
