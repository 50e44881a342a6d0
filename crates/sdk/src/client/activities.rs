//! A standalone activity's handle: its result, description, cancellation and termination.

use super::connect::{Client, RESULT_WAIT};
use super::error::{start_error, ClientError};
use super::options::StandaloneActivityOptions;
use crate::codec::{self};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tether_wire::pb::{self};

/// Decodes a closed run's outcome.
pub(super) fn decode_outcome<O: DeserializeOwned>(
    what: &'static str,
    id: &str,
    outcome: pb::GetWorkflowResultResponse,
) -> Result<O, ClientError> {
    let status = pb::ExecutionStatus::try_from(outcome.status).unwrap_or_default();
    if status == pb::ExecutionStatus::Completed {
        return Ok(codec::from_payload(outcome.result.as_ref())?);
    }
    Err(ClientError::Failed {
        what,
        id: id.to_string(),
        status,
        failure: Box::new(outcome.failure.unwrap_or_else(|| pb::Failure {
            message: format!("ended {}", status.short_name()),
            ..Default::default()
        })),
    })
}

/// A started standalone activity.
#[derive(Clone)]
pub struct ActivityHandle {
    pub(super) client: Client,
    /// Activity id.
    pub activity_id: tether_core::types::ActivityId,
    /// Run id.
    pub run_id: tether_core::types::RunId,
    /// Why no live worker could take it when it started ("" when one could): it waits.
    pub placement_note: String,
}

impl ActivityHandle {
    /// Waits for the activity to finish and decodes its result.
    pub async fn result<O: DeserializeOwned>(&self) -> Result<O, ClientError> {
        let outcome = self.outcome().await?;
        decode_outcome("activity", &self.activity_id, outcome)
    }

    /// Waits for the activity to finish and returns its outcome (payloads decoded). A server
    /// restart meanwhile is waited out (see `ClientOptions::retry_for`).
    pub async fn outcome(&self) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        let req = pb::GetActivityResultRequest {
            namespace: self.client.options.namespace.clone(),
            activity_id: self.activity_id.clone().into(),
            run_id: self.run_id.clone().into(),
            wait_ms: RESULT_WAIT.as_millis() as u64,
        };
        loop {
            let outcome = self
                .client
                .retrying(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.get_activity_result(req).await }
                })
                .await?
                .into_inner();
            if outcome.status != pb::ExecutionStatus::Running as i32 {
                return self.client.decode_result(outcome);
            }
        }
    }

    /// Describes the activity: status, attempt, last failure, worker.
    pub async fn describe(&self) -> Result<pb::DescribeWorkflowResponse, ClientError> {
        let req = pb::DescribeActivityRequest {
            namespace: self.client.options.namespace.clone(),
            activity_id: self.activity_id.clone().into(),
            run_id: self.run_id.clone().into(),
        };
        Ok(self
            .client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.describe_activity(req).await }
            })
            .await?
            .into_inner())
    }

    /// Asks the activity to cancel: a running attempt is told through its heartbeats, a
    /// waiting one is cancelled at once.
    pub async fn cancel(&self, reason: &str) -> Result<(), ClientError> {
        let req = pb::RequestCancelActivityRequest {
            namespace: self.client.options.namespace.clone(),
            activity_id: self.activity_id.clone().into(),
            run_id: self.run_id.clone().into(),
            reason: reason.into(),
            identity: self.client.options.identity.clone(),
        };
        self.client
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.request_cancel_activity(req).await }
            })
            .await?;
        Ok(())
    }

    /// Ends the activity at once: a running attempt's outcome is refused from then on.
    pub async fn terminate(&self, reason: &str) -> Result<(), ClientError> {
        self.client
            .raw()
            .terminate_activity(pb::TerminateActivityRequest {
                namespace: self.client.options.namespace.clone(),
                activity_id: self.activity_id.clone().into(),
                run_id: self.run_id.clone().into(),
                reason: reason.into(),
                identity: self.client.options.identity.clone(),
            })
            .await?;
        Ok(())
    }
}

impl Client {
    /// A handle to an existing standalone activity (the current run when `run_id` is empty).
    pub fn activity_handle(&self, activity_id: &str, run_id: &str) -> ActivityHandle {
        ActivityHandle {
            client: self.clone(),
            activity_id: activity_id.into(),
            run_id: run_id.into(),
            placement_note: String::new(),
        }
    }

    /// Starts a standalone activity: durable, with timeouts and retries, without a workflow.
    pub async fn start_activity<I: Serialize + ?Sized>(
        &self,
        activity_type: &str,
        input: &I,
        options: StandaloneActivityOptions,
    ) -> Result<ActivityHandle, ClientError> {
        let input = codec::to_payload(input)?;
        self.start_activity_raw(activity_type, Some(input), options)
            .await
    }

    /// Starts a standalone activity with an input already converted to a payload (the codec
    /// chain still runs on it): how an SDK in another language hands over its own encoding.
    pub async fn start_activity_raw(
        &self,
        activity_type: &str,
        input: Option<pb::Payload>,
        options: StandaloneActivityOptions,
    ) -> Result<ActivityHandle, ClientError> {
        let (handle, _) = self
            .start_activity_waiting(activity_type, input, options, Duration::ZERO)
            .await?;
        Ok(handle)
    }

    /// Starts a standalone activity with an already-converted input and waits for it to
    /// finish: its outcome, payloads decoded, whatever the status (see
    /// [`ActivityHandle::outcome`]).
    pub async fn execute_activity_raw(
        &self,
        activity_type: &str,
        input: Option<pb::Payload>,
        options: StandaloneActivityOptions,
    ) -> Result<(ActivityHandle, pb::GetWorkflowResultResponse), ClientError> {
        let (handle, outcome) = self
            .start_activity_waiting(activity_type, input, options, RESULT_WAIT)
            .await?;
        let outcome = match outcome {
            Some(outcome) => self.decode_result(outcome)?,
            None => handle.outcome().await?,
        };
        Ok((handle, outcome))
    }

    /// `input` is plain (not yet through the codec chain).
    pub(super) async fn start_activity_waiting(
        &self,
        activity_type: &str,
        input: Option<pb::Payload>,
        options: StandaloneActivityOptions,
        wait: Duration,
    ) -> Result<(ActivityHandle, Option<pb::GetWorkflowResultResponse>), ClientError> {
        let input = self
            .options
            .data_converter
            .encode_opt(input)
            .map_err(codec::ConvertError::from)?;
        let req = pb::StartActivityRequest {
            namespace: self.options.namespace.clone(),
            activity_id: options.id.clone().into(),
            activity_type: activity_type.into(),
            task_queue: options.task_queue.clone().into(),
            input,
            options: Some(options.options.to_proto()),
            identity: self.options.identity.clone(),
            wait_ms: wait.as_millis() as u64,
            request_id: self.request_ids.next(),
            resent: false,
        };
        let mut sent = false;
        let started = self
            .retrying(|mut rpc| {
                let req = pb::StartActivityRequest {
                    resent: std::mem::replace(&mut sent, true),
                    ..req.clone()
                };
                async move { rpc.start_activity(req).await }
            })
            .await;
        let reply = match started {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(start_error(status, options.id.into(), "activity")),
        };
        if !reply.placement_note.is_empty() {
            tracing::warn!(
                activity_id = options.id.as_str(),
                why = reply.placement_note,
                "no worker can take the activity now; it waits"
            );
        }
        let handle = ActivityHandle {
            client: self.clone(),
            activity_id: options.id,
            run_id: reply.run_id.into(),
            placement_note: reply.placement_note,
        };
        Ok((handle, reply.outcome))
    }

    /// Starts a standalone activity and waits for its result (one round trip when it finishes
    /// quickly).
    pub async fn execute_activity<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        activity_type: &str,
        input: &I,
        options: StandaloneActivityOptions,
    ) -> Result<O, ClientError> {
        let input = codec::to_payload(input)?;
        let (handle, outcome) = self
            .execute_activity_raw(activity_type, Some(input), options)
            .await?;
        decode_outcome("activity", &handle.activity_id, outcome)
    }
}
