//! A Rust worker for the Python SDK's interoperability tests (python/tests/test_interop.py),
//! also a small example of a Rust worker serving clients and activities in Python:
//!
//! ```text
//! cargo run --example interop_worker -- ADDRESS TASK_QUEUE [KEY_FILE]
//! ```
//!
//! It hosts the workflows `greet_through_python` (it calls the Python activity `py_shout` on
//! the task queue its input names, then its own `rust_reverse`) and `wait_for_signal` (answers
//! the value of the first signal `go`), and the activity `rust_reverse`.
//! With KEY_FILE every payload is encrypted (AES-256-GCM) with those keys. It prints `ready`
//! once it runs, and stops on SIGTERM or Ctrl-C.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{ActivityOptions, Client, ClientOptions};
use tether::codec::{AesGcmCodec, DataConverter};
use tether::worker::{Worker, WorkerOptions};
use tether::workflow::{WorkflowContext, WorkflowError};

#[derive(Deserialize)]
struct Greeting {
    name: String,
    python_queue: String,
}

#[derive(Serialize)]
struct Greeted {
    shouted: String,
    reversed: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (address, queue) = match (args.first(), args.get(1)) {
        (Some(a), Some(q)) => (a.clone(), q.clone()),
        _ => anyhow::bail!("usage: interop_worker ADDRESS TASK_QUEUE [KEY_FILE]"),
    };
    let mut options = ClientOptions::default();
    if let Some(keys) = args.get(2) {
        let codec = AesGcmCodec::from_file(keys.as_ref()).context("reading the key file")?;
        options.data_converter = DataConverter::default().with_codec(Arc::new(codec));
    }
    let client = Client::connect_with(address, options).await?;
    let mut worker = Worker::new(client, WorkerOptions::new(queue.as_str()).state_dir(None));
    worker.register_activity(
        "rust_reverse",
        |_ctx: ActivityContext, s: String| async move {
            Ok::<_, ActivityError>(s.chars().rev().collect::<String>())
        },
    );
    worker.register_workflow(
        "greet_through_python",
        |ctx: WorkflowContext, g: Greeting| async move {
            let shouted: String = ctx
                .execute_activity(
                    "py_shout",
                    &g.name,
                    ActivityOptions::default().task_queue(g.python_queue),
                )
                .await?;
            let reversed: String = ctx
                .execute_activity("rust_reverse", &g.name, ActivityOptions::default())
                .await?;
            Ok::<_, WorkflowError>(Greeted { shouted, reversed })
        },
    );
    worker.register_workflow(
        "wait_for_signal",
        |ctx: WorkflowContext, _: serde_json::Value| async move {
            let value: serde_json::Value = ctx.signal_channel("go").recv().await?;
            Ok::<_, WorkflowError>(value)
        },
    );
    let running = worker.start()?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    running.shutdown().await;
    Ok(())
}
