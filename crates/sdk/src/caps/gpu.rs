//! GPU inventories: NVML in production, declared lists for machines without it.

use tether_wire::pb::GpuDevice;

/// What a GPU inventory reports.
#[derive(Debug, Clone, Default)]
pub struct GpuSnapshot {
    /// Devices by index.
    pub gpus: Vec<GpuDevice>,
    /// NVIDIA driver version.
    pub driver_version: String,
    /// CUDA driver version (e.g. "12.4").
    pub cuda_driver_version: String,
    /// Why the list is empty or declared.
    pub note: String,
}

/// Something that can list the GPUs of this host.
pub trait GpuInventory: Send + Sync {
    /// The current devices, with refreshed free memory and utilisation.
    fn snapshot(&self) -> GpuSnapshot;

    /// What this inventory is, stably (no free memory or utilisation): a declared list is its
    /// devices, detection is the detector's name. Part of what tells two workers on one host
    /// apart (their default identities).
    fn describe(&self) -> String {
        "detected".into()
    }
}

/// GPUs detected through NVML, loaded at run time.
pub struct NvmlInventory {
    nvml: Option<nvml_wrapper::Nvml>,
    unavailable: String,
}

impl NvmlInventory {
    /// Loads NVML. Where it is missing this succeeds with an empty inventory and a reason.
    pub fn load() -> Self {
        match nvml_wrapper::Nvml::init() {
            Ok(nvml) => NvmlInventory {
                nvml: Some(nvml),
                unavailable: String::new(),
            },
            Err(e) => {
                let text = e.to_string();
                let reason = if text.contains("libnvidia-ml")
                    || text.contains("LibloadingError")
                    || text.contains("cannot open shared object")
                {
                    "NVML not available: libnvidia-ml.so.1 not found (no NVIDIA driver on this host)".to_string()
                } else {
                    format!("NVML not available: {text}")
                };
                NvmlInventory {
                    nvml: None,
                    unavailable: reason,
                }
            }
        }
    }

    /// Whether NVML loaded.
    pub fn is_available(&self) -> bool {
        self.nvml.is_some()
    }

    /// Why NVML is not available ("" when it is).
    pub fn unavailable_reason(&self) -> &str {
        &self.unavailable
    }
}

impl GpuInventory for NvmlInventory {
    fn snapshot(&self) -> GpuSnapshot {
        let Some(nvml) = &self.nvml else {
            return GpuSnapshot {
                note: self.unavailable.clone(),
                ..Default::default()
            };
        };
        let mut snap = GpuSnapshot {
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            cuda_driver_version: nvml
                .sys_cuda_driver_version()
                .map(|v| {
                    format!(
                        "{}.{}",
                        nvml_wrapper::cuda_driver_version_major(v),
                        nvml_wrapper::cuda_driver_version_minor(v)
                    )
                })
                .unwrap_or_default(),
            ..Default::default()
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                snap.note = format!("NVML could not count devices: {e}");
                return snap;
            }
        };
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    snap.note = format!("NVML could not open device {index}: {e}");
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            let cc = device.cuda_compute_capability().ok();
            snap.gpus.push(GpuDevice {
                index,
                uuid: device.uuid().unwrap_or_default(),
                name: device.name().unwrap_or_default(),
                memory_total_bytes: memory.as_ref().map(|m| m.total).unwrap_or(0),
                memory_free_bytes: memory.as_ref().map(|m| m.free).unwrap_or(0),
                compute_major: cc.as_ref().map(|c| c.major as u32).unwrap_or(0),
                compute_minor: cc.as_ref().map(|c| c.minor as u32).unwrap_or(0),
                pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                mig_mode: match device.mig_mode() {
                    Ok(m) if m.current == 1 => "enabled".into(),
                    Ok(_) => "disabled".into(),
                    Err(_) => String::new(),
                },
                utilization_percent: device
                    .utilization_rates()
                    .map(|u| u.gpu as i32)
                    .unwrap_or(-1),
                source: "nvml".into(),
            });
        }
        snap
    }
}

/// A fixed, declared list of GPUs (from an inventory file or test code). Always reported as
/// declared, never as detected.
pub struct DeclaredGpus {
    gpus: Vec<GpuDevice>,
}

impl DeclaredGpus {
    /// Wraps a list; every device is marked `source: declared`.
    pub fn new(gpus: Vec<GpuDevice>) -> Self {
        let gpus = gpus
            .into_iter()
            .map(|mut g| {
                g.source = "declared".into();
                g
            })
            .collect();
        DeclaredGpus { gpus }
    }
}

impl GpuInventory for DeclaredGpus {
    fn describe(&self) -> String {
        self.gpus
            .iter()
            .map(|g| format!("{}:{}:{}:{}", g.index, g.name, g.memory_total_bytes, g.uuid))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn snapshot(&self) -> GpuSnapshot {
        GpuSnapshot {
            gpus: self.gpus.clone(),
            note: "GPUs are declared (inventory file), not detected".into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_absence_is_a_reason_not_an_error() {
        let nvml = NvmlInventory::load();
        let snap = nvml.snapshot();
        if nvml.is_available() {
            // On a GPU host: devices come from NVML and say so.
            assert!(snap.gpus.iter().all(|g| g.source == "nvml"));
        } else {
            assert!(snap.gpus.is_empty());
            assert!(
                nvml.unavailable_reason().starts_with("NVML not available"),
                "{}",
                nvml.unavailable_reason()
            );
            assert_eq!(snap.note, nvml.unavailable_reason());
        }
    }

    #[test]
    fn declared_gpus_are_never_passed_off_as_detected() {
        let declared = DeclaredGpus::new(vec![GpuDevice {
            name: "X".into(),
            source: "nvml".into(),
            ..Default::default()
        }]);
        let snap = declared.snapshot();
        assert_eq!(snap.gpus[0].source, "declared");
        assert!(snap.note.contains("declared"));
    }
}
