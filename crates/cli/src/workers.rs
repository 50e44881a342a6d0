//! `tether workers`: the fleet, and one worker in detail.

use crate::args::Global;
use crate::remote::connect;
use crate::render::caps_lines;
use crate::render::show;
use crate::render::time_text;
use crate::render::worker_json;
use anyhow::Result;
use serde_json::Value;
use tether_wire::pb;

pub(crate) async fn workers_list(g: &Global) -> Result<i32> {
    let client = connect(g).await?;
    let workers = client.list_workers().await?;
    let mut text = Vec::new();
    text.push(format!(
        "{:<32} {:<13} {:<26} {:<6} TASK QUEUES",
        "IDENTITY", "STATE", "LAST SEEN", "GPUS"
    ));
    for w in &workers {
        let gpus = w.capabilities.as_ref().map(|c| c.gpus.len()).unwrap_or(0);
        text.push(format!(
            "{:<32} {:<13} {:<26} {:<6} {}",
            w.identity,
            w.state,
            time_text(w.last_seen_ms),
            gpus,
            w.task_queues.join(",")
        ));
    }
    show(
        g,
        Value::Array(workers.iter().map(worker_json).collect()),
        text,
    );
    Ok(0)
}

pub(crate) async fn workers_describe(g: &Global, identity: String) -> Result<i32> {
    let client = connect(g).await?;
    let w = client
        .raw()
        .describe_worker(pb::DescribeWorkerRequest {
            namespace: g.namespace.clone(),
            identity,
        })
        .await
        .map_err(tether_sdk::client::ClientError::from)?
        .into_inner()
        .worker
        .unwrap_or_default();
    let mut text = Vec::new();
    text.push(format!("identity:      {}", w.identity));
    text.push(format!("state:         {}", w.state));
    text.push(format!("registered:    {}", time_text(w.registered_ms)));
    text.push(format!("last seen:     {}", time_text(w.last_seen_ms)));
    text.push(format!("task queues:   {}", w.task_queues.join(", ")));
    text.push(format!("host queue:    {}", w.host_queue));
    if let Some(caps) = &w.capabilities {
        text.extend(caps_lines(caps));
    }
    show(g, worker_json(&w), text);
    Ok(0)
}
