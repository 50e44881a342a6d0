//! `tether status`: the fleet in one screen (workers by state, GPUs per model reserved / free,
//! sessions by state, queues with work waiting or unplaceable), once or refreshed in place. The
//! same summary the web UI's views are built from.

use crate::args::Global;
use crate::remote::connect;
use crate::render::show;
use anyhow::Result;
use std::future::Future;
use std::time::Duration;
use tether_sdk::client::Client;
use tether_ui::{all_sessions, all_workers, queue_names, views, ReadApi};
use tether_wire::pb;
use tonic::Status;

/// The views' read calls over the client's gRPC connection (which follows a replica's
/// redirect to the namespace's holder).
struct Remote(Client);

impl ReadApi for Remote {
    fn list_workers(
        &self,
        req: pb::ListWorkersRequest,
    ) -> impl Future<Output = Result<pb::ListWorkersResponse, Status>> + Send {
        let mut rpc = self.0.raw();
        async move { Ok(rpc.list_workers(req).await?.into_inner()) }
    }
    fn list_sessions(
        &self,
        req: pb::ListSessionsRequest,
    ) -> impl Future<Output = Result<pb::ListSessionsResponse, Status>> + Send {
        let mut rpc = self.0.raw();
        async move { Ok(rpc.list_sessions(req).await?.into_inner()) }
    }
    fn list_workflows(
        &self,
        req: pb::ListWorkflowsRequest,
    ) -> impl Future<Output = Result<pb::ListWorkflowsResponse, Status>> + Send {
        let mut rpc = self.0.raw();
        async move { Ok(rpc.list_workflows(req).await?.into_inner()) }
    }
    fn describe_task_queue(
        &self,
        req: pb::DescribeTaskQueueRequest,
    ) -> impl Future<Output = Result<pb::DescribeTaskQueueResponse, Status>> + Send {
        let mut rpc = self.0.raw();
        async move { Ok(rpc.describe_task_queue(req).await?.into_inner()) }
    }
}

async fn summary(remote: &Remote, namespace: &str) -> Result<serde_json::Value> {
    let failed = |e: Status| tether_sdk::client::ClientError::Rpc(e);
    let (workers, _) = all_workers(remote, namespace).await.map_err(failed)?;
    let (sessions, _) = all_sessions(remote, namespace, true)
        .await
        .map_err(failed)?;
    let mut queues = Vec::new();
    for name in queue_names(remote, namespace, &workers)
        .await
        .map_err(failed)?
    {
        let described = remote
            .describe_task_queue(pb::DescribeTaskQueueRequest {
                namespace: namespace.into(),
                task_queue: name.clone(),
            })
            .await
            .map_err(failed)?;
        queues.push((name, described));
    }
    Ok(views::summary(
        &workers,
        &sessions,
        &queues,
        tether_wire::now_ms(),
    ))
}

pub(crate) async fn status(g: &Global, watch: Option<Duration>) -> Result<i32> {
    let remote = Remote(connect(g).await?);
    let Some(every) = watch else {
        let data = summary(&remote, &g.namespace).await?;
        let text = views::summary_lines(&data);
        show(g, data, text);
        return Ok(0);
    };
    let mut answered_once = false;
    loop {
        // A watch outlives a server restart or a network blip: it says so and tries again.
        // A first call that fails (a namespace that does not exist, a missing grant) ends it.
        let drawn = summary(&remote, &g.namespace).await;
        if drawn.is_ok() {
            answered_once = true;
        }
        let drawn = match drawn {
            Err(e) if !answered_once => return Err(e),
            other => other,
        };
        let header = || {
            format!(
                "\x1b[H\x1b[2Jtether status: namespace {} at {} (every {:?}; Ctrl-C to stop)\n",
                g.namespace,
                crate::render::time_text(tether_wire::now_ms()),
                every
            )
        };
        match drawn {
            Ok(data) if g.json => {
                // One summary per line, for a script to follow.
                out!("{}", serde_json::to_string(&data).expect("json"));
            }
            Ok(data) => {
                // Home, clear to the end: the summary is redrawn in place.
                out!("{}", header());
                for line in views::summary_lines(&data) {
                    out!("{line}");
                }
            }
            Err(e) if g.json => eprintln!("tether status: {e:#}; trying again in {every:?}"),
            Err(e) => {
                out!("{}", header());
                out!("could not read the summary: {e:#}; trying again in {every:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}
