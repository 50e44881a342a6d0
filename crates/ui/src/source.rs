//! Where the views read from: the server's own [`Reader`] for the web UI, a gRPC client for
//! `tether status`. Both answer the same read calls; the views are built once, on top.

use std::future::Future;
use tether_server::Reader;
use tether_wire::pb;
use tonic::Status;

/// The read calls the views need.
pub trait ReadApi: Sync {
    /// A page of workers.
    fn list_workers(
        &self,
        req: pb::ListWorkersRequest,
    ) -> impl Future<Output = Result<pb::ListWorkersResponse, Status>> + Send;
    /// A page of sessions.
    fn list_sessions(
        &self,
        req: pb::ListSessionsRequest,
    ) -> impl Future<Output = Result<pb::ListSessionsResponse, Status>> + Send;
    /// A page of runs.
    fn list_workflows(
        &self,
        req: pb::ListWorkflowsRequest,
    ) -> impl Future<Output = Result<pb::ListWorkflowsResponse, Status>> + Send;
    /// One task queue.
    fn describe_task_queue(
        &self,
        req: pb::DescribeTaskQueueRequest,
    ) -> impl Future<Output = Result<pb::DescribeTaskQueueResponse, Status>> + Send;
}

impl ReadApi for Reader {
    fn list_workers(
        &self,
        req: pb::ListWorkersRequest,
    ) -> impl Future<Output = Result<pb::ListWorkersResponse, Status>> + Send {
        Reader::list_workers(self, req)
    }
    fn list_sessions(
        &self,
        req: pb::ListSessionsRequest,
    ) -> impl Future<Output = Result<pb::ListSessionsResponse, Status>> + Send {
        Reader::list_sessions(self, req)
    }
    fn list_workflows(
        &self,
        req: pb::ListWorkflowsRequest,
    ) -> impl Future<Output = Result<pb::ListWorkflowsResponse, Status>> + Send {
        Reader::list_workflows(self, req)
    }
    fn describe_task_queue(
        &self,
        req: pb::DescribeTaskQueueRequest,
    ) -> impl Future<Output = Result<pb::DescribeTaskQueueResponse, Status>> + Send {
        Reader::describe_task_queue(self, req)
    }
}

/// Most pages one view reads of one listing: a view of a fleet of 10,000 workers still
/// answers, and says it stopped.
const MOST_PAGES: usize = 10;

/// Every worker of `namespace` (up to 10,000), and whether there were more.
pub async fn all_workers(
    api: &impl ReadApi,
    namespace: &str,
) -> Result<(Vec<pb::WorkerInfo>, bool), Status> {
    let mut workers = Vec::new();
    let mut token = String::new();
    for _ in 0..MOST_PAGES {
        let page = api
            .list_workers(pb::ListWorkersRequest {
                namespace: namespace.into(),
                page_size: 1000,
                page_token: token,
            })
            .await?;
        workers.extend(page.workers);
        if page.next_page_token.is_empty() {
            return Ok((workers, false));
        }
        token = page.next_page_token;
    }
    Ok((workers, true))
}

/// The sessions of `namespace` (open ones, or all with `include_closed`; up to 10,000), and
/// whether there were more.
pub async fn all_sessions(
    api: &impl ReadApi,
    namespace: &str,
    include_closed: bool,
) -> Result<(Vec<pb::SessionInfo>, bool), Status> {
    let mut sessions = Vec::new();
    let mut token = String::new();
    for _ in 0..MOST_PAGES {
        let page = api
            .list_sessions(pb::ListSessionsRequest {
                namespace: namespace.into(),
                include_closed,
                page_size: 1000,
                page_token: token,
            })
            .await?;
        sessions.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return Ok((sessions, false));
        }
        token = page.next_page_token;
    }
    Ok((sessions, true))
}

/// The task queues worth showing: those workers poll (their host queues too) and those open
/// runs are on, sorted.
pub async fn queue_names(
    api: &impl ReadApi,
    namespace: &str,
    workers: &[pb::WorkerInfo],
) -> Result<Vec<String>, Status> {
    let mut names = std::collections::BTreeSet::new();
    for w in workers {
        names.extend(w.task_queues.iter().cloned());
        if !w.host_queue.is_empty() {
            names.insert(w.host_queue.clone());
        }
    }
    for kind in ["workflow", "activity"] {
        let open = api
            .list_workflows(pb::ListWorkflowsRequest {
                namespace: namespace.into(),
                status: pb::ExecutionStatus::Running as i32,
                limit: 1000,
                kind: kind.into(),
                ..Default::default()
            })
            .await?;
        names.extend(open.executions.into_iter().map(|e| e.task_queue));
    }
    names.remove("");
    Ok(names.into_iter().collect())
}
