//! Session-based file processing, the classic sessions scenario: for each file, download it to a
//! worker's local disk, process it there, and upload the result — all three steps on the same
//! host, because the file only exists on that host's disk. Three workers, six files, one workflow
//! per file. Run it with `cargo run --example file_processing`.

use anyhow::Result;
use std::path::PathBuf;
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{ActivityOptions, Client, SessionOptions, WorkflowOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::worker::{Worker, WorkerHandle, WorkerOptions};
use tether::workflow::{WorkflowContext, WorkflowError};

fn io_err(e: std::io::Error) -> ActivityError {
    ActivityError::retryable(e.to_string())
}

async fn process_file(ctx: WorkflowContext, name: String) -> Result<Vec<String>, WorkflowError> {
    // Spread: files go to the least busy host (no GPUs to pack here).
    let options = SessionOptions {
        packing: "spread".into(),
        ..SessionOptions::new("files")
    };
    let session = ctx.create_session(options).await?;
    let options = ActivityOptions::default().start_to_close(Duration::from_secs(30));
    let local: String = session
        .execute_activity("download", &name, options.clone())
        .await?;
    let processed: String = session
        .execute_activity("process", &local, options.clone())
        .await?;
    let uploaded: String = session
        .execute_activity("upload", &processed, options)
        .await?;
    session.complete();
    Ok(vec![local, processed, uploaded])
}

fn start_worker(
    client: &Client,
    identity: &str,
    disk: PathBuf,
    bucket: PathBuf,
) -> Result<WorkerHandle> {
    let mut worker = Worker::new(
        client.clone(),
        WorkerOptions::new("files").identity(identity),
    );
    worker.register_workflow("process_file", process_file);
    let d = disk.clone();
    worker.register_activity("download", move |ctx: ActivityContext, name: String| {
        let disk = d.clone();
        async move {
            // "Download": the file lands on this worker's local disk only.
            let path = disk.join(&name);
            std::fs::write(&path, format!("contents of {name}\n")).map_err(io_err)?;
            println!(
                "  {:<8} download {name:<12} -> {}",
                ctx.info().worker_identity,
                path.display()
            );
            Ok::<_, ActivityError>(path.display().to_string())
        }
    });
    let d = disk.clone();
    worker.register_activity("process", move |ctx: ActivityContext, path: String| {
        let disk = d.clone();
        async move {
            if !path.starts_with(&disk.display().to_string()) {
                return Err(ActivityError::non_retryable(format!(
                    "{path} is not on this host's disk"
                )));
            }
            let text = std::fs::read_to_string(&path).map_err(io_err)?;
            let out = format!("{path}.processed");
            std::fs::write(&out, text.to_uppercase()).map_err(io_err)?;
            println!("  {:<8} process  {path}", ctx.info().worker_identity);
            Ok::<_, ActivityError>(out)
        }
    });
    let b = bucket.clone();
    worker.register_activity("upload", move |ctx: ActivityContext, path: String| {
        let bucket = b.clone();
        async move {
            let name = PathBuf::from(&path)
                .file_name()
                .unwrap_or_default()
                .to_owned();
            let target = bucket.join(name);
            std::fs::copy(&path, &target).map_err(io_err)?;
            println!(
                "  {:<8} upload   {path} -> {}",
                ctx.info().worker_identity,
                target.display()
            );
            Ok::<_, ActivityError>(format!("uploaded by {}", ctx.info().worker_identity))
        }
    });
    Ok(worker.start()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let data = tempfile::tempdir()?;
    let server = LocalServer::start("127.0.0.1:0", data.path(), ServerConfig::default()).await?;
    let client = Client::connect(server.url()).await?;
    let bucket = data.path().join("bucket");
    std::fs::create_dir_all(&bucket)?;
    let mut workers = Vec::new();
    for id in ["host-1", "host-2", "host-3"] {
        let disk = data.path().join(id);
        std::fs::create_dir_all(&disk)?;
        workers.push(start_worker(&client, id, disk, bucket.clone())?);
    }
    println!(
        "server {}; three workers, each with its own local disk",
        server.url()
    );
    let files = ["a.csv", "b.csv", "c.csv", "d.csv", "e.csv", "f.csv"];
    let mut runs = Vec::new();
    for f in files {
        runs.push((
            f,
            client
                .start_workflow(
                    "process_file",
                    f,
                    WorkflowOptions::new(format!("file-{f}"), "files"),
                )
                .await?,
        ));
    }
    println!("\nresults:");
    for (f, run) in runs {
        let steps: Vec<String> = run.result().await?;
        let host = steps[2].trim_start_matches("uploaded by ").to_string();
        let same =
            steps[0].contains(&format!("/{host}/")) && steps[1].contains(&format!("/{host}/"));
        println!("  {f:<6} download, process and upload all on {host}: {same}");
    }
    for w in workers {
        w.shutdown().await;
    }
    server.stop().await?;
    Ok(())
}
