//! Sessions a client owns: created, used for activities pinned to their worker, completed.

use super::connect::{Client, RESULT_WAIT};
use super::error::ClientError;
use super::options::{ActivityOptions, SessionOptions, StandaloneActivityOptions};
use serde::{de::DeserializeOwned, Serialize};
use tether_wire::pb::{self};

/// An open session: activities run on its worker, seeing its reservation.
#[derive(Clone)]
pub struct Session {
    pub(super) client: Client,
    /// What the server placed: worker, host, reserved GPUs and resources.
    pub info: pb::SessionInfo,
}

impl Client {
    /// Creates a session and waits for the server to place it (up to its creation timeout).
    /// Each request waits on the server; asking again (the id is the client's, so a retry is
    /// the same request) goes on waiting for the same session.
    pub async fn create_session(&self, options: SessionOptions) -> Result<Session, ClientError> {
        let req = pb::CreateSessionRequest {
            namespace: self.options.namespace.clone(),
            options: Some(options.to_proto()),
            owner: self.options.identity.clone(),
            session_id: uuid::Uuid::now_v7().to_string(),
            wait_ms: RESULT_WAIT.as_millis() as u64,
        };
        loop {
            let reply = self
                .retrying(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.create_session(req).await }
                })
                .await?
                .into_inner();
            let info = reply.session.unwrap_or_default();
            match info.state.as_str() {
                "open" => {
                    return Ok(Session {
                        client: self.clone(),
                        info,
                    })
                }
                // Still waiting for a placement: the server ends it at its creation timeout.
                "creating" => continue,
                _ => {
                    return Err(ClientError::Rpc(tonic::Status::failed_precondition(
                        format!(
                            "session {} {}: {}",
                            info.session_id, info.state, info.reason
                        ),
                    )))
                }
            }
        }
    }

    /// A session's current state.
    pub async fn describe_session(&self, session_id: &str) -> Result<pb::SessionInfo, ClientError> {
        let req = pb::DescribeSessionRequest {
            namespace: self.options.namespace.clone(),
            session_id: session_id.into(),
        };
        Ok(self
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.describe_session(req).await }
            })
            .await?
            .into_inner())
    }

    /// Ends any session at once (an operator's call): its reservation is freed and its pending
    /// activities fail with SessionFailed.
    pub async fn terminate_session(
        &self,
        session_id: &str,
        reason: &str,
    ) -> Result<pb::SessionInfo, ClientError> {
        Ok(self
            .raw()
            .terminate_session(pb::TerminateSessionRequest {
                namespace: self.options.namespace.clone(),
                session_id: session_id.into(),
                reason: reason.into(),
                identity: self.options.identity.clone(),
            })
            .await?
            .into_inner()
            .session
            .unwrap_or_default())
    }
}

impl Session {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.info.session_id
    }

    /// Runs an activity in the session (on its worker only) and waits for the result.
    pub async fn execute_activity<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        activity_type: &str,
        input: &I,
        options: ActivityOptions,
    ) -> Result<O, ClientError> {
        self.client
            .execute_activity(activity_type, input, self.activity_options(options))
            .await
    }

    /// Runs an activity in the session with an already-converted input, and returns its
    /// outcome whatever the status (see [`Client::execute_activity_raw`]).
    pub async fn execute_activity_raw(
        &self,
        activity_type: &str,
        input: Option<pb::Payload>,
        options: ActivityOptions,
    ) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        let (_, outcome) = self
            .client
            .execute_activity_raw(activity_type, input, self.activity_options(options))
            .await?;
        Ok(outcome)
    }

    /// Options that put an activity in this session: on its worker's host queue, under a
    /// fresh id. The id is a bare time-ordered UUID, not the session id with a suffix: the
    /// store indexes runs by id, and ids that begin with their session's scatter the inserts
    /// of concurrent sessions over the whole index (W3 on SQLite wrote 27 of 75 pages per
    /// commit to that index, 3 of 45 with these). The run records its session anyway.
    fn activity_options(&self, options: ActivityOptions) -> StandaloneActivityOptions {
        let mut o = StandaloneActivityOptions::new(
            uuid::Uuid::now_v7().to_string(),
            self.info.host_queue.clone(),
        );
        o.options = options;
        o.options.session_id = Some(self.info.session_id.clone());
        o
    }

    /// Ends the session and releases its reservation.
    pub async fn complete(&self) -> Result<pb::SessionInfo, ClientError> {
        Ok(self
            .client
            .raw()
            .complete_session(pb::CompleteSessionRequest {
                namespace: self.client.options.namespace.clone(),
                session_id: self.info.session_id.clone(),
            })
            .await?
            .into_inner()
            .session
            .unwrap_or_default())
    }
}
