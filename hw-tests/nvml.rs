//! Hardware tests: run on a host with an NVIDIA GPU and its driver. They compare what tether
//! detects through NVML with `nvidia-smi`, and route an activity by the GPU's real model.
//! Without NVML they pass by skipping, printing why.
//!
//!   cargo test --test hw_nvml -- --nocapture

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::caps::{CapabilitySource, GpuInventory, NvmlInventory, Requirements};
use tether::client::{ActivityOptions, StandaloneActivityOptions};
use tether::worker::{Worker, WorkerOptions};

/// NVML, or None after printing why the test is skipped.
fn nvml_or_skip(test: &str) -> Option<NvmlInventory> {
    let nvml = NvmlInventory::load();
    if !nvml.is_available() {
        println!("SKIP {test}: {}", nvml.unavailable_reason());
        return None;
    }
    Some(nvml)
}

#[derive(Debug)]
struct SmiGpu {
    index: u32,
    uuid: String,
    name: String,
    memory_mib: u64,
    compute: String,
}

fn nvidia_smi() -> Vec<SmiGpu> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total,compute_cap",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .expect("nvidia-smi runs where NVML loads");
    assert!(
        out.status.success(),
        "nvidia-smi failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split(',').map(|s| s.trim()).collect();
            SmiGpu {
                index: f[0].parse().unwrap(),
                uuid: f[1].to_string(),
                name: f[2].to_string(),
                memory_mib: f[3].parse().unwrap(),
                compute: f[4].to_string(),
            }
        })
        .collect()
}

#[test]
fn detected_gpus_match_nvidia_smi() {
    let Some(nvml) = nvml_or_skip("detected_gpus_match_nvidia_smi") else {
        return;
    };
    let snap = nvml.snapshot();
    let smi = nvidia_smi();
    println!("nvidia-smi: {smi:#?}");
    println!(
        "driver {} / CUDA {}",
        snap.driver_version, snap.cuda_driver_version
    );
    assert_eq!(snap.gpus.len(), smi.len(), "same number of GPUs");
    for (ours, theirs) in snap.gpus.iter().zip(&smi) {
        println!(
            "GPU {}: {} {} {} MiB compute {}.{} pci {} mig {:?} util {}%",
            ours.index,
            ours.name,
            ours.uuid,
            ours.memory_total_bytes >> 20,
            ours.compute_major,
            ours.compute_minor,
            ours.pci_bus_id,
            ours.mig_mode,
            ours.utilization_percent
        );
        assert_eq!(ours.index, theirs.index);
        assert_eq!(ours.uuid, theirs.uuid);
        assert_eq!(ours.name, theirs.name);
        let ours_mib = ours.memory_total_bytes >> 20;
        assert!(
            ours_mib.abs_diff(theirs.memory_mib) <= 1,
            "memory {ours_mib} MiB vs {} MiB",
            theirs.memory_mib
        );
        assert_eq!(
            format!("{}.{}", ours.compute_major, ours.compute_minor),
            theirs.compute
        );
        assert_eq!(ours.source, "nvml");
        assert!(ours.memory_free_bytes <= ours.memory_total_bytes);
    }
    assert!(!snap.driver_version.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_activity_requires_the_real_model() {
    let Some(nvml) = nvml_or_skip("routed_activity_requires_the_real_model") else {
        return;
    };
    let model = nvml.snapshot().gpus[0].name.clone();
    let env = common::TestEnv::start().await;
    let mut worker = Worker::new(
        env.client.clone(),
        WorkerOptions::new("gpu")
            .identity("real-gpu")
            .capabilities(CapabilitySource::detect()),
    );
    worker.register_activity("which_gpu", |ctx: ActivityContext, _: ()| async move {
        Ok::<_, ActivityError>(ctx.info().worker_identity.clone())
    });
    let worker = worker.start().unwrap();
    let mut options = StandaloneActivityOptions::new("real-model", "gpu");
    options.options = ActivityOptions::default()
        .requirements(Requirements::parse(&format!("gpu.count>=1, gpu.name={model}")).unwrap());
    let ran_on: String = common::within(
        Duration::from_secs(60),
        "routed activity",
        env.client.execute_activity("which_gpu", &(), options),
    )
    .await
    .unwrap();
    assert_eq!(ran_on, "real-gpu");
    println!("activity requiring gpu.name={model} ran on {ran_on}");
    // A model this host does not have is unplaceable, with the real GPU named as the closest.
    let mut options = StandaloneActivityOptions::new("other-model", "gpu");
    options.options = ActivityOptions::default()
        .requirements(Requirements::parse("gpu.name=NoSuchGPU-9000").unwrap())
        .schedule_to_start(Duration::from_secs(1));
    let handle = env
        .client
        .start_activity("which_gpu", &(), options)
        .await
        .unwrap();
    let err = handle.result::<String>().await.unwrap_err();
    println!("unplaceable: {err}");
    assert!(err.to_string().contains(&model), "{err}");
    worker.shutdown().await;
}
