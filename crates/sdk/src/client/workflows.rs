//! A workflow run's handle: result, signal, cancel, terminate, describe, history.

use super::activities::decode_outcome;
use super::connect::{Client, RESULT_WAIT};
use super::error::{start_error, ClientError};
use super::options::WorkflowOptions;
use crate::codec::{self};
use serde::{de::DeserializeOwned, Serialize};
use tether_wire::pb::{self};

/// A workflow run to act on.
#[derive(Clone)]
pub struct WorkflowHandle {
    pub(super) client: Client,
    /// Workflow id.
    pub workflow_id: tether_core::types::WorkflowId,
    /// Run id (empty = the current run).
    pub run_id: tether_core::types::RunId,
}

impl std::fmt::Debug for WorkflowHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowHandle")
            .field("workflow_id", &self.workflow_id)
            .field("run_id", &self.run_id)
            .finish()
    }
}

impl WorkflowHandle {
    /// Waits for the run to close and decodes its result.
    pub async fn result<O: DeserializeOwned>(&self) -> Result<O, ClientError> {
        let outcome = self.outcome().await?;
        decode_outcome("workflow", &self.workflow_id, outcome)
    }

    /// Waits for the run to close and returns its outcome (payloads decoded). A server restart
    /// meanwhile is waited out (see `ClientOptions::retry_for`).
    pub async fn outcome(&self) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        let req = pb::GetWorkflowResultRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone().into(),
            run_id: self.run_id.clone().into(),
            wait_ms: RESULT_WAIT.as_millis() as u64,
        };
        loop {
            let outcome = self
                .client
                .retrying(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.get_workflow_result(req).await }
                })
                .await?
                .into_inner();
            if outcome.status != pb::ExecutionStatus::Running as i32 {
                return self.client.decode_result(outcome);
            }
        }
    }

    /// Sends a signal. It carries a request id, so a retry (after a lost reply) is not
    /// delivered twice.
    pub async fn signal<I: Serialize + ?Sized>(
        &self,
        signal_name: &str,
        input: &I,
    ) -> Result<(), ClientError> {
        self.signal_raw(signal_name, Some(codec::to_payload(input)?))
            .await
    }

    /// Sends a signal whose input is already converted to a payload (the codec chain still
    /// runs on it).
    pub async fn signal_raw(
        &self,
        signal_name: &str,
        input: Option<pb::Payload>,
    ) -> Result<(), ClientError> {
        let input = self
            .client
            .options
            .data_converter
            .encode_opt(input)
            .map_err(codec::ConvertError::from)?;
        let req = pb::SignalWorkflowRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone().into(),
            run_id: self.run_id.clone().into(),
            signal_name: signal_name.into(),
            input,
            identity: self.client.options.identity.clone(),
            request_id: self.client.request_ids.next(),
        };
        self.client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.signal_workflow(req).await }
            })
            .await?;
        Ok(())
    }

    /// Asks the workflow to cancel (it sees the request and may clean up).
    pub async fn cancel(&self, reason: &str) -> Result<(), ClientError> {
        let req = pb::RequestCancelWorkflowRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone().into(),
            run_id: self.run_id.clone().into(),
            reason: reason.into(),
            identity: self.client.options.identity.clone(),
        };
        self.client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.request_cancel_workflow(req).await }
            })
            .await?;
        Ok(())
    }

    /// Ends the workflow at once.
    pub async fn terminate(&self, reason: &str) -> Result<(), ClientError> {
        self.client
            .raw()
            .terminate_workflow(pb::TerminateWorkflowRequest {
                namespace: self.client.options.namespace.clone(),
                workflow_id: self.workflow_id.clone().into(),
                run_id: self.run_id.clone().into(),
                reason: reason.into(),
                identity: self.client.options.identity.clone(),
            })
            .await?;
        Ok(())
    }

    /// Describes the run.
    pub async fn describe(&self) -> Result<pb::DescribeWorkflowResponse, ClientError> {
        let req = pb::DescribeWorkflowRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone().into(),
            run_id: self.run_id.clone().into(),
        };
        Ok(self
            .client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.describe_workflow(req).await }
            })
            .await?
            .into_inner())
    }

    /// The run's history.
    pub async fn history(&self) -> Result<Vec<pb::HistoryEvent>, ClientError> {
        let req = pb::GetWorkflowHistoryRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone().into(),
            run_id: self.run_id.clone().into(),
        };
        Ok(self
            .client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.get_workflow_history(req).await }
            })
            .await?
            .into_inner()
            .events)
    }
}

impl Client {
    /// Starts a workflow by type name.
    pub async fn start_workflow<I: Serialize + ?Sized>(
        &self,
        workflow_type: &str,
        input: &I,
        options: WorkflowOptions,
    ) -> Result<WorkflowHandle, ClientError> {
        // Plain JSON here: start_workflow_raw runs the codec chain.
        let input = codec::to_payload(input)?;
        self.start_workflow_raw(workflow_type, Some(input), options)
            .await
    }

    /// Starts a workflow with an already-encoded input.
    pub async fn start_workflow_raw(
        &self,
        workflow_type: &str,
        input: Option<pb::Payload>,
        options: WorkflowOptions,
    ) -> Result<WorkflowHandle, ClientError> {
        let input = self
            .options
            .data_converter
            .encode_opt(input)
            .map_err(codec::ConvertError::from)?;
        let req = pb::StartWorkflowRequest {
            namespace: self.options.namespace.clone(),
            workflow_id: options.id.clone().into(),
            workflow_type: workflow_type.into(),
            task_queue: options.task_queue.into(),
            input,
            run_timeout_ms: options
                .run_timeout
                .map(tether_core::types::limit_ms)
                .unwrap_or(0),
            task_timeout_ms: options
                .task_timeout
                .map(tether_core::types::duration_ms)
                .unwrap_or(0),
            identity: self.options.identity.clone(),
            // A retried start (the reply was lost) is then answered with its own run.
            request_id: self.request_ids.next(),
            resent: false,
        };
        let mut sent = false;
        let started = self
            .retrying(|mut rpc| {
                let req = pb::StartWorkflowRequest {
                    resent: std::mem::replace(&mut sent, true),
                    ..req.clone()
                };
                async move { rpc.start_workflow(req).await }
            })
            .await;
        match started {
            Ok(resp) => Ok(WorkflowHandle {
                client: self.clone(),
                workflow_id: options.id,
                run_id: resp.into_inner().run_id.into(),
            }),
            Err(status) => Err(start_error(status, options.id.into(), "workflow")),
        }
    }

    /// A handle to an existing workflow (the current run when `run_id` is empty).
    pub fn workflow_handle(&self, workflow_id: &str, run_id: &str) -> WorkflowHandle {
        WorkflowHandle {
            client: self.clone(),
            workflow_id: workflow_id.into(),
            run_id: run_id.into(),
        }
    }

    /// Lists workflow runs (newest first), at most `limit`.
    pub async fn list_workflows(
        &self,
        status: Option<pb::ExecutionStatus>,
        limit: u32,
        standalone_activities: bool,
    ) -> Result<Vec<pb::ExecutionInfo>, ClientError> {
        Ok(self
            .list_workflows_page(status, limit, standalone_activities, "")
            .await?
            .0)
    }

    /// One page of runs (newest first) after `page_token` ("" for the first), and the token of
    /// the next page ("" after the last).
    pub async fn list_workflows_page(
        &self,
        status: Option<pb::ExecutionStatus>,
        limit: u32,
        standalone_activities: bool,
        page_token: &str,
    ) -> Result<(Vec<pb::ExecutionInfo>, String), ClientError> {
        let req = pb::ListWorkflowsRequest {
            namespace: self.options.namespace.clone(),
            status: status.map(|s| s as i32).unwrap_or(0),
            limit,
            kind: if standalone_activities {
                "activity".into()
            } else {
                "workflow".into()
            },
            page_token: page_token.to_string(),
            ..Default::default()
        };
        let reply = self
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.list_workflows(req).await }
            })
            .await?
            .into_inner();
        Ok((reply.executions, reply.next_page_token))
    }
}
