//! A read-only handle on the API for views inside the server's own process (the web UI): the
//! same handlers, checks and answers as over gRPC, but only the calls that look, never one that
//! changes anything. Its calls carry a mark that only code in this process can attach, so with
//! authorization on they are admitted as reads without a client certificate; who may reach the
//! view is then the view's listener's business (loopback unless the operator says otherwise).

use super::Frontend;
use std::sync::Arc;
use tether_wire::pb::{self, tether_service_server::TetherService};
use tonic::{Request, Status};

/// Marks a call made by a [`Reader`]: extensions never cross the wire, so no remote caller can
/// attach it.
#[derive(Clone, Copy, Debug)]
pub(super) struct InProcessRead;

/// Read-only calls on a server in this process.
#[derive(Clone)]
pub struct Reader {
    frontend: Arc<Frontend>,
}

fn marked<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(InProcessRead);
    request
}

impl Reader {
    pub(crate) fn new(frontend: Frontend) -> Reader {
        Reader {
            frontend: Arc::new(frontend),
        }
    }

    /// Every namespace.
    pub async fn list_namespaces(&self) -> Result<pb::ListNamespacesResponse, Status> {
        let reply = self
            .frontend
            .list_namespaces(marked(pb::ListNamespacesRequest {}))
            .await?;
        Ok(reply.into_inner())
    }

    /// Workers of a namespace, a page at a time.
    pub async fn list_workers(
        &self,
        req: pb::ListWorkersRequest,
    ) -> Result<pb::ListWorkersResponse, Status> {
        Ok(self.frontend.list_workers(marked(req)).await?.into_inner())
    }

    /// Sessions of a namespace, a page at a time.
    pub async fn list_sessions(
        &self,
        req: pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse, Status> {
        Ok(self.frontend.list_sessions(marked(req)).await?.into_inner())
    }

    /// Workflow runs or standalone activities, newest first, a page at a time.
    pub async fn list_workflows(
        &self,
        req: pb::ListWorkflowsRequest,
    ) -> Result<pb::ListWorkflowsResponse, Status> {
        Ok(self
            .frontend
            .list_workflows(marked(req))
            .await?
            .into_inner())
    }

    /// One workflow run (its latest run when `run_id` is empty).
    pub async fn describe_workflow(
        &self,
        req: pb::DescribeWorkflowRequest,
    ) -> Result<pb::DescribeWorkflowResponse, Status> {
        Ok(self
            .frontend
            .describe_workflow(marked(req))
            .await?
            .into_inner())
    }

    /// One standalone activity.
    pub async fn describe_activity(
        &self,
        req: pb::DescribeActivityRequest,
    ) -> Result<pb::DescribeWorkflowResponse, Status> {
        Ok(self
            .frontend
            .describe_activity(marked(req))
            .await?
            .into_inner())
    }

    /// A run's history.
    pub async fn history(
        &self,
        req: pb::GetWorkflowHistoryRequest,
    ) -> Result<pb::GetWorkflowHistoryResponse, Status> {
        Ok(self
            .frontend
            .get_workflow_history(marked(req))
            .await?
            .into_inner())
    }

    /// A task queue's backlog, pollers and unplaceable work.
    pub async fn describe_task_queue(
        &self,
        req: pb::DescribeTaskQueueRequest,
    ) -> Result<pb::DescribeTaskQueueResponse, Status> {
        Ok(self
            .frontend
            .describe_task_queue(marked(req))
            .await?
            .into_inner())
    }

    /// The cluster's replicas and leases (one entry on SQLite).
    pub async fn describe_cluster(&self) -> Result<pb::DescribeClusterResponse, Status> {
        Ok(self
            .frontend
            .describe_cluster(marked(pb::DescribeClusterRequest {}))
            .await?
            .into_inner())
    }
}
