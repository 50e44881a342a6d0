//! Capability routing: an in-process server and three workers with declared inventories, tasks
//! with different requirements, where each one ran, and one task no worker can take, with the
//! server's explanation. Run it with `cargo run --example capability_routing`.

use anyhow::Result;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::caps::{CapabilitySource, Inventory, Requirements};
use tether::client::{ActivityOptions, Client, ClientError, StandaloneActivityOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};

fn inventory(text: &str) -> Result<CapabilitySource> {
    Ok(CapabilitySource::detect().with_inventory(Inventory::parse(text, "example")?))
}

async fn start_worker(
    client: &Client,
    identity: &str,
    caps: CapabilitySource,
) -> Result<WorkerHandle> {
    let mut worker = Worker::new(
        client.clone(),
        WorkerOptions::new("fleet")
            .identity(identity)
            .capabilities(caps),
    );
    for name in [
        "train",
        "sync_to_s3",
        "fetch_dataset",
        "finetune",
        "render",
        "huge_model",
    ] {
        worker.register_activity(name, |ctx: ActivityContext, _: ()| async move {
            if ctx.info().activity_type == "sync_to_s3" {
                // The secret is read here, on the worker; the server only knows its name.
                let key = ctx.credential("s3-prod")?;
                return Ok::<_, ActivityError>(format!(
                    "{} (used a {}-byte key)",
                    ctx.info().worker_identity,
                    key.len()
                ));
            }
            Ok(ctx.info().worker_identity.to_string())
        });
    }
    Ok(worker.start()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let data = tempfile::tempdir()?;
    let server = LocalServer::start("127.0.0.1:0", data.path(), ServerConfig::default()).await?;
    let client = Client::connect(server.url()).await?;
    println!(
        "server {} with three workers (declared inventories, not detected hardware):",
        server.url()
    );

    let secret = data.path().join("s3-prod.key");
    std::fs::write(&secret, "example-secret")?;
    let a100 = inventory(&format!(
        "hostname = \"a100-box\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-40GB\"\nmemory = \"40GiB\"\ncompute = \"8.0\"\ncount = 2\n\
         [[credential]]\nname = \"s3-prod\"\nfile = \"{}\"\n",
        secret.display()
    ))?;
    let h100 = inventory(
        "hostname = \"h100-box\"\n[[gpu]]\nname = \"NVIDIA H100 80GB HBM3\"\nmemory = \"80GiB\"\ncompute = \"9.0\"\ncount = 8\n\
         [labels]\nzone = \"us-east-1a\"\n",
    )?;
    // Declared without a probe: this demo must not reach out to the internet.
    let cpu = inventory(
        "hostname = \"cpu-box\"\n[[network]]\nname = \"internet\"\n[resources]\nscratch_gb = 500\n",
    )?;
    let workers = vec![
        start_worker(&client, "a100-box", a100).await?,
        start_worker(&client, "h100-box", h100).await?,
        start_worker(&client, "cpu-box", cpu).await?,
    ];
    loop {
        let listed = client.list_workers().await?;
        if listed.iter().filter(|w| w.state == "alive").count() == 3 {
            for w in &listed {
                let caps = w.capabilities.clone().unwrap_or_default();
                let gpus = match caps.gpus.first() {
                    Some(g) => format!("{}×{} ({})", caps.gpus.len(), g.name, g.source),
                    None => "no GPUs".into(),
                };
                println!(
                    "  {:<9} {:<36} credentials [{}] network [{}]",
                    w.identity,
                    gpus,
                    caps.credentials.join(","),
                    caps.network.join(",")
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let tasks = [
        ("train", "gpu.count>=4, gpu.memory>=80GiB"),
        ("sync_to_s3", "credential=s3-prod"),
        ("fetch_dataset", "network=internet"),
        (
            "finetune",
            "gpu.count>=2, gpu.compute>=8.0, prefer gpu.name~A100:10",
        ),
        ("render", ""),
    ];
    println!("\ntasks:");
    for (i, (activity, reqs)) in tasks.iter().enumerate() {
        let mut options = StandaloneActivityOptions::new(format!("{activity}-{i}"), "fleet");
        options.options = ActivityOptions::default().requirements(Requirements::parse(reqs)?);
        let ran_on: String = client.execute_activity(activity, &(), options).await?;
        let shown = if reqs.is_empty() {
            "(no requirements)"
        } else {
            reqs
        };
        println!("  {activity:<14} {shown:<58} ran on {ran_on}");
    }

    // Nobody has a 120 GiB GPU: the server says so, and the task times out with the same reason.
    let mut options = StandaloneActivityOptions::new("huge_model-1", "fleet");
    options.options = ActivityOptions::default()
        .requirements(Requirements::parse("gpu.memory>=120GiB")?)
        .schedule_to_start(Duration::from_secs(2));
    let handle = client.start_activity("huge_model", &(), options).await?;
    let queue = client.describe_task_queue("fleet").await?;
    for b in queue.requirement_backlogs.iter().filter(|b| b.unplaceable) {
        println!(
            "\nunplaceable: {} task(s) needing {}\n  {}",
            b.tasks, b.requirements, b.explanation
        );
    }
    match handle.result::<String>().await {
        Err(ClientError::Failed {
            status, failure, ..
        }) => {
            println!(
                "  after its schedule-to-start timeout: {} — {}",
                status.short_name(),
                failure.message
            )
        }
        other => println!("  unexpected outcome: {other:?}"),
    }

    for w in workers {
        w.shutdown().await;
    }
    server.stop().await?;
    Ok(())
}
