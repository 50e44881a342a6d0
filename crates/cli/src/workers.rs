//! `tether workers`: the fleet, and one worker in detail.

use crate::args::Global;
use crate::remote::connect;
use crate::render::print_caps;
use crate::render::print_json;
use crate::render::time_text;
use crate::render::worker_json;
use anyhow::Result;
use serde_json::Value;
use tether_wire::pb;

pub(crate) async fn workers_list(g: &Global) -> Result<i32> {
    let client = connect(g).await?;
    let workers = client.list_workers().await?;
    if g.json {
        print_json(&Value::Array(workers.iter().map(worker_json).collect()));
    } else {
        out!(
            "{:<32} {:<13} {:<26} {:<6} TASK QUEUES",
            "IDENTITY",
            "STATE",
            "LAST SEEN",
            "GPUS"
        );
        for w in workers {
            let gpus = w.capabilities.as_ref().map(|c| c.gpus.len()).unwrap_or(0);
            out!(
                "{:<32} {:<13} {:<26} {:<6} {}",
                w.identity,
                w.state,
                time_text(w.last_seen_ms),
                gpus,
                w.task_queues.join(",")
            );
        }
    }
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
    if g.json {
        print_json(&worker_json(&w));
    } else {
        out!("identity:      {}", w.identity);
        out!("state:         {}", w.state);
        out!("registered:    {}", time_text(w.registered_ms));
        out!("last seen:     {}", time_text(w.last_seen_ms));
        out!("task queues:   {}", w.task_queues.join(", "));
        out!("host queue:    {}", w.host_queue);
        if let Some(caps) = &w.capabilities {
            print_caps(caps);
        }
    }
    Ok(0)
}
