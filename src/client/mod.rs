//! The client: start workflows by name, signal, cancel, terminate, describe, wait for results,
//! and run standalone activities. Thin over the gRPC API; values go through the data converter.

use crate::api::pb::{self, tether_service_client::TetherServiceClient};
use crate::codec::{self, ConvertError};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Largest message the client accepts (histories can be large).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// How long one result request waits on the server before the client asks again.
const RESULT_WAIT: Duration = Duration::from_secs(30);

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address was malformed or the server could not be reached.
    #[error("could not connect to {address}: {reason}")]
    Connect {
        /// The address.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The server refused or failed the call.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The workflow id is already running.
    #[error("workflow id {workflow_id:?} is already running as run {run_id}")]
    AlreadyStarted {
        /// Id.
        workflow_id: String,
        /// The running run.
        run_id: String,
    },
    /// The run closed without a result.
    #[error("{what} {id} ended {}: {}", status.short_name(), failure.message)]
    Failed {
        /// Workflow or activity.
        what: &'static str,
        /// Its id.
        id: String,
        /// How it ended.
        status: pb::ExecutionStatus,
        /// Why.
        failure: Box<pb::Failure>,
    },
    /// A value could not be converted.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl ClientError {
    /// The gRPC code, when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc(s) => Some(s.code()),
            ClientError::AlreadyStarted { .. } => Some(tonic::Code::AlreadyExists),
            _ => None,
        }
    }
}

/// How the client identifies itself and which namespace it works in.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Namespace for every call. Default `default`.
    pub namespace: String,
    /// Who is calling, recorded in history. Default `HOSTNAME:PID`.
    pub identity: String,
    /// Payload conversion and codecs (e.g. AES-256-GCM encryption), applied to every payload
    /// this client and workers built on it send and receive. Default: JSON, no codec.
    pub data_converter: codec::DataConverter,
    /// TLS settings (server CA, client certificate for mTLS). Default: plaintext.
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            namespace: crate::types::DEFAULT_NAMESPACE.into(),
            identity: default_identity(),
            data_converter: codec::DataConverter::default(),
            tls: None,
        }
    }
}

/// `HOSTNAME:PID`, the default identity of clients and workers.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Options for starting a workflow.
#[derive(Debug, Clone)]
pub struct WorkflowOptions {
    /// Workflow id (unique among running workflows of the namespace). Required.
    pub id: String,
    /// Task queue the workflow's tasks go to. Required.
    pub task_queue: String,
    /// Run timeout. Default: none.
    pub run_timeout: Option<Duration>,
    /// Workflow task timeout. Default 10 s.
    pub task_timeout: Option<Duration>,
}

impl WorkflowOptions {
    /// Options with the given id and task queue and defaults for the rest.
    pub fn new(id: impl Into<String>, task_queue: impl Into<String>) -> Self {
        WorkflowOptions {
            id: id.into(),
            task_queue: task_queue.into(),
            run_timeout: None,
            task_timeout: None,
        }
    }
}

/// A connection to a tether server.
#[derive(Clone)]
pub struct Client {
    rpc: TetherServiceClient<Channel>,
    options: ClientOptions,
}

impl Client {
    /// Connects with default options (namespace `default`).
    pub async fn connect(address: impl Into<String>) -> Result<Client, ClientError> {
        Self::connect_with(address, ClientOptions::default()).await
    }

    /// Connects with the given options.
    pub async fn connect_with(
        address: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let address = address.into();
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = match address.split_once("://") {
            Some((_, rest)) => format!("{scheme}://{rest}"),
            None => format!("{scheme}://{address}"),
        };
        let mut endpoint = Endpoint::from_shared(url).map_err(|e| ClientError::Connect {
            address: address.clone(),
            reason: e.to_string(),
        })?;
        if let Some(tls) = &options.tls {
            crate::tls::install_crypto_provider();
            endpoint = endpoint
                .tls_config(tls.to_tonic())
                .map_err(|e| ClientError::Connect {
                    address: address.clone(),
                    reason: format!("TLS settings: {e}"),
                })?;
        }
        let channel = endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                address: address.clone(),
                reason: format!("{e} (is the server running? start one with `tether dev`)"),
            })?;
        let rpc = TetherServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let client = Client { rpc, options };
        if let Some(tls) = &client.options.tls {
            // Under TLS 1.3 a refused client certificate only shows on the first call: make one
            // now so the error says what is wrong.
            if let Err(status) = client
                .raw()
                .list_namespaces(pb::ListNamespacesRequest {})
                .await
            {
                let hint = if tls.identity.is_none() {
                    "the server refused the connection; it probably requires a client certificate (pass --tls-cert and --tls-key)"
                } else {
                    "the server refused the connection or its certificate; check that the client certificate is issued by the server's client CA and not expired, and that --tls-ca matches the server"
                };
                return Err(ClientError::Connect {
                    address,
                    reason: format!("{hint} ({})", status.message()),
                });
            }
        }
        Ok(client)
    }

    /// The same connection working in another namespace.
    pub fn with_namespace(&self, namespace: impl Into<String>) -> Client {
        let mut c = self.clone();
        c.options.namespace = namespace.into();
        c
    }

    /// The data converter payloads go through.
    pub fn data_converter(&self) -> &codec::DataConverter {
        &self.options.data_converter
    }

    /// Decodes a run's outcome through the codec chain (result and failure details).
    fn decode_result(
        &self,
        mut outcome: pb::GetWorkflowResultResponse,
    ) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        let dc = &self.options.data_converter;
        outcome.result = dc
            .decode_opt(outcome.result)
            .map_err(codec::ConvertError::from)?;
        outcome.failure = dc
            .decode_failure(outcome.failure)
            .map_err(codec::ConvertError::from)?;
        Ok(outcome)
    }

    /// The namespace this client works in.
    pub fn namespace(&self) -> &str {
        &self.options.namespace
    }

    /// The identity this client reports.
    pub fn identity(&self) -> &str {
        &self.options.identity
    }

    /// The raw gRPC client, for calls this type does not wrap.
    pub fn raw(&self) -> TetherServiceClient<Channel> {
        self.rpc.clone()
    }

    /// Creates a namespace that keeps closed runs forever.
    pub async fn register_namespace(
        &self,
        name: &str,
        description: &str,
    ) -> Result<(), ClientError> {
        self.register_namespace_with_retention(name, description, Duration::ZERO)
            .await
    }

    /// Creates a namespace whose closed runs (and their history) are deleted `retention` after
    /// they close; `Duration::ZERO` keeps them forever.
    pub async fn register_namespace_with_retention(
        &self,
        name: &str,
        description: &str,
        retention: Duration,
    ) -> Result<(), ClientError> {
        self.raw()
            .register_namespace(pb::RegisterNamespaceRequest {
                namespace: name.into(),
                description: description.into(),
                retention_ms: retention.as_millis() as u64,
            })
            .await?;
        Ok(())
    }

    /// Changes a namespace's description and/or retention (`None` leaves it as it is); returns
    /// the namespace as it now is.
    pub async fn update_namespace(
        &self,
        name: &str,
        description: Option<&str>,
        retention: Option<Duration>,
    ) -> Result<pb::NamespaceInfo, ClientError> {
        Ok(self
            .raw()
            .update_namespace(pb::UpdateNamespaceRequest {
                namespace: name.into(),
                description: description.map(str::to_string),
                retention_ms: retention.map(|r| r.as_millis() as u64),
            })
            .await?
            .into_inner())
    }

    /// Lists namespaces.
    pub async fn list_namespaces(&self) -> Result<Vec<pb::NamespaceInfo>, ClientError> {
        Ok(self
            .raw()
            .list_namespaces(pb::ListNamespacesRequest {})
            .await?
            .into_inner()
            .namespaces)
    }

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
            workflow_id: options.id.clone(),
            workflow_type: workflow_type.into(),
            task_queue: options.task_queue,
            input,
            run_timeout_ms: options
                .run_timeout
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            task_timeout_ms: options
                .task_timeout
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            identity: self.options.identity.clone(),
        };
        match self.raw().start_workflow(req).await {
            Ok(resp) => Ok(WorkflowHandle {
                client: self.clone(),
                workflow_id: options.id,
                run_id: resp.into_inner().run_id,
            }),
            Err(status) => Err(start_error(status, options.id)),
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

    /// A handle to an existing standalone activity (the current run when `run_id` is empty).
    pub fn activity_handle(&self, activity_id: &str, run_id: &str) -> ActivityHandle {
        ActivityHandle {
            client: self.clone(),
            activity_id: activity_id.into(),
            run_id: run_id.into(),
        }
    }

    /// Lists workflow runs (newest first).
    pub async fn list_workflows(
        &self,
        status: Option<pb::ExecutionStatus>,
        limit: u32,
        standalone_activities: bool,
    ) -> Result<Vec<pb::ExecutionInfo>, ClientError> {
        Ok(self
            .raw()
            .list_workflows(pb::ListWorkflowsRequest {
                namespace: self.options.namespace.clone(),
                status: status.map(|s| s as i32).unwrap_or(0),
                limit,
                kind: if standalone_activities {
                    "activity".into()
                } else {
                    "workflow".into()
                },
            })
            .await?
            .into_inner()
            .executions)
    }

    /// Starts a standalone activity: durable, with timeouts and retries, without a workflow.
    pub async fn start_activity<I: Serialize + ?Sized>(
        &self,
        activity_type: &str,
        input: &I,
        options: StandaloneActivityOptions,
    ) -> Result<ActivityHandle, ClientError> {
        let (handle, _) = self
            .start_activity_waiting(activity_type, input, options, Duration::ZERO)
            .await?;
        Ok(handle)
    }

    async fn start_activity_waiting<I: Serialize + ?Sized>(
        &self,
        activity_type: &str,
        input: &I,
        options: StandaloneActivityOptions,
        wait: Duration,
    ) -> Result<(ActivityHandle, Option<pb::GetWorkflowResultResponse>), ClientError> {
        let req = pb::StartActivityRequest {
            namespace: self.options.namespace.clone(),
            activity_id: options.id.clone(),
            activity_type: activity_type.into(),
            task_queue: options.task_queue.clone(),
            input: Some(self.options.data_converter.to_payload(input)?),
            options: Some(options.options.to_proto()),
            identity: self.options.identity.clone(),
            wait_ms: wait.as_millis() as u64,
        };
        let reply = match self.raw().start_activity(req).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(start_error(status, options.id)),
        };
        let handle = ActivityHandle {
            client: self.clone(),
            activity_id: options.id,
            run_id: reply.run_id,
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
        let (handle, outcome) = self
            .start_activity_waiting(activity_type, input, options, RESULT_WAIT)
            .await?;
        match outcome {
            Some(outcome) => decode_outcome(
                "activity",
                &handle.activity_id,
                self.decode_result(outcome)?,
            ),
            None => handle.result().await,
        }
    }

    /// Describes a task queue.
    pub async fn describe_task_queue(
        &self,
        task_queue: &str,
    ) -> Result<pb::DescribeTaskQueueResponse, ClientError> {
        Ok(self
            .raw()
            .describe_task_queue(pb::DescribeTaskQueueRequest {
                namespace: self.options.namespace.clone(),
                task_queue: task_queue.into(),
            })
            .await?
            .into_inner())
    }

    /// Workers seen polling in this namespace.
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerInfo>, ClientError> {
        Ok(self
            .raw()
            .list_workers(pb::ListWorkersRequest {
                namespace: self.options.namespace.clone(),
            })
            .await?
            .into_inner()
            .workers)
    }
}

/// Activity options as the SDK takes them. Defaults are written on each field.
#[derive(Debug, Clone, Default)]
pub struct ActivityOptions {
    /// Task queue; empty = the workflow's own. Default empty.
    pub task_queue: String,
    /// Limit on one attempt. Default 60 s (when schedule_to_close is not set either).
    pub start_to_close: Option<Duration>,
    /// Limit on all attempts together, backoffs included. Default none.
    pub schedule_to_close: Option<Duration>,
    /// Limit on waiting in the queue. Default none.
    pub schedule_to_start: Option<Duration>,
    /// Longest gap between heartbeats. Default none.
    pub heartbeat: Option<Duration>,
    /// Retry policy. Default: initial 1 s, backoff 2.0, max interval 100 s, unlimited attempts.
    pub retry: RetryPolicy,
    /// What the worker must have (hard) and should have (preferences). Default none.
    pub requirements: crate::caps::Requirements,
    /// Run on this worker only (its host queue). Default none.
    pub worker: Option<String>,
    /// Run inside this session. Default none.
    pub session_id: Option<String>,
}

/// The default attempt timeout when neither start_to_close nor schedule_to_close is given.
pub const DEFAULT_START_TO_CLOSE: Duration = Duration::from_secs(60);

fn ms(d: Option<Duration>) -> u64 {
    d.map(|d| d.as_millis().max(1) as u64).unwrap_or(0)
}

impl ActivityOptions {
    /// Sets the attempt timeout.
    pub fn start_to_close(mut self, d: Duration) -> Self {
        self.start_to_close = Some(d);
        self
    }
    /// Sets the overall timeout.
    pub fn schedule_to_close(mut self, d: Duration) -> Self {
        self.schedule_to_close = Some(d);
        self
    }
    /// Sets the queue-wait timeout.
    pub fn schedule_to_start(mut self, d: Duration) -> Self {
        self.schedule_to_start = Some(d);
        self
    }
    /// Sets the heartbeat timeout.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = Some(d);
        self
    }
    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets the task queue.
    pub fn task_queue(mut self, q: impl Into<String>) -> Self {
        self.task_queue = q.into();
        self
    }
    /// Sets the requirements.
    pub fn requirements(mut self, requirements: crate::caps::Requirements) -> Self {
        self.requirements = requirements;
        self
    }
    /// Runs the activity on one worker only, through that worker's host queue (e.g. the worker
    /// an earlier step reported with `ctx.info().worker_identity`).
    pub fn on_worker(mut self, identity: impl Into<String>) -> Self {
        self.worker = Some(identity.into());
        self
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::ActivityOptions {
        let start_to_close = match (self.start_to_close, self.schedule_to_close) {
            (None, None) => Some(DEFAULT_START_TO_CLOSE),
            (s, _) => s,
        };
        pb::ActivityOptions {
            task_queue: self.task_queue.clone(),
            schedule_to_close_timeout_ms: ms(self.schedule_to_close),
            schedule_to_start_timeout_ms: ms(self.schedule_to_start),
            start_to_close_timeout_ms: ms(start_to_close),
            heartbeat_timeout_ms: ms(self.heartbeat),
            retry_policy: Some(self.retry.to_proto()),
            requirements: self.requirements.to_string(),
            worker: self.worker.clone().unwrap_or_default(),
            session_id: self.session_id.clone().unwrap_or_default(),
        }
    }
}

/// When and how often a failed activity is tried again. Defaults are written on each field.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Wait before the second attempt. Default 1 s.
    pub initial_interval: Duration,
    /// Each wait is this times the previous. Default 2.0.
    pub backoff_coefficient: f64,
    /// Longest wait. Default 100 × initial_interval.
    pub maximum_interval: Option<Duration>,
    /// Most attempts; 0 = unlimited. Default 0.
    pub maximum_attempts: u32,
    /// Error types that are never retried. Default none.
    pub non_retryable_error_types: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            maximum_interval: None,
            maximum_attempts: 0,
            non_retryable_error_types: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The wire form.
    pub fn to_proto(&self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            initial_interval_ms: self.initial_interval.as_millis().max(1) as u64,
            backoff_coefficient: self.backoff_coefficient,
            maximum_interval_ms: ms(self.maximum_interval),
            maximum_attempts: self.maximum_attempts,
            non_retryable_error_types: self.non_retryable_error_types.clone(),
        }
    }
}

/// Options for a standalone activity.
#[derive(Debug, Clone)]
pub struct StandaloneActivityOptions {
    /// Activity id (unique among running standalone activities of the namespace). Required.
    pub id: String,
    /// Task queue. Required.
    pub task_queue: String,
    /// Timeouts and retries.
    pub options: ActivityOptions,
}

impl StandaloneActivityOptions {
    /// Options with defaults for timeouts and retries.
    pub fn new(id: impl Into<String>, task_queue: impl Into<String>) -> Self {
        StandaloneActivityOptions {
            id: id.into(),
            task_queue: task_queue.into(),
            options: ActivityOptions::default(),
        }
    }
}

/// Turns a refused start into an error; ALREADY_EXISTS carries the running run's id.
fn start_error(status: tonic::Status, id: String) -> ClientError {
    if status.code() != tonic::Code::AlreadyExists {
        return status.into();
    }
    let run_id = status
        .metadata()
        .get(crate::server::RUN_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ClientError::AlreadyStarted {
        workflow_id: id,
        run_id,
    }
}

/// Decodes a closed run's outcome.
fn decode_outcome<O: DeserializeOwned>(
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
    client: Client,
    /// Activity id.
    pub activity_id: String,
    /// Run id.
    pub run_id: String,
}

impl ActivityHandle {
    /// Waits for the activity to finish and decodes its result.
    pub async fn result<O: DeserializeOwned>(&self) -> Result<O, ClientError> {
        loop {
            let outcome = self
                .client
                .raw()
                .get_activity_result(pb::GetActivityResultRequest {
                    namespace: self.client.options.namespace.clone(),
                    activity_id: self.activity_id.clone(),
                    run_id: self.run_id.clone(),
                    wait_ms: RESULT_WAIT.as_millis() as u64,
                })
                .await?
                .into_inner();
            if outcome.status != pb::ExecutionStatus::Running as i32 {
                return decode_outcome(
                    "activity",
                    &self.activity_id,
                    self.client.decode_result(outcome)?,
                );
            }
        }
    }
}

/// A workflow run to act on.
#[derive(Clone)]
pub struct WorkflowHandle {
    client: Client,
    /// Workflow id.
    pub workflow_id: String,
    /// Run id (empty = the current run).
    pub run_id: String,
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

    /// Waits for the run to close and returns its outcome (payloads decoded).
    pub async fn outcome(&self) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        loop {
            let outcome = self
                .client
                .raw()
                .get_workflow_result(pb::GetWorkflowResultRequest {
                    namespace: self.client.options.namespace.clone(),
                    workflow_id: self.workflow_id.clone(),
                    run_id: self.run_id.clone(),
                    wait_ms: RESULT_WAIT.as_millis() as u64,
                })
                .await?
                .into_inner();
            if outcome.status != pb::ExecutionStatus::Running as i32 {
                return self.client.decode_result(outcome);
            }
        }
    }

    /// Sends a signal.
    pub async fn signal<I: Serialize + ?Sized>(
        &self,
        signal_name: &str,
        input: &I,
    ) -> Result<(), ClientError> {
        self.client
            .raw()
            .signal_workflow(pb::SignalWorkflowRequest {
                namespace: self.client.options.namespace.clone(),
                workflow_id: self.workflow_id.clone(),
                run_id: self.run_id.clone(),
                signal_name: signal_name.into(),
                input: Some(self.client.options.data_converter.to_payload(input)?),
                identity: self.client.options.identity.clone(),
            })
            .await?;
        Ok(())
    }

    /// Asks the workflow to cancel (it sees the request and may clean up).
    pub async fn cancel(&self, reason: &str) -> Result<(), ClientError> {
        self.client
            .raw()
            .request_cancel_workflow(pb::RequestCancelWorkflowRequest {
                namespace: self.client.options.namespace.clone(),
                workflow_id: self.workflow_id.clone(),
                run_id: self.run_id.clone(),
                reason: reason.into(),
                identity: self.client.options.identity.clone(),
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
                workflow_id: self.workflow_id.clone(),
                run_id: self.run_id.clone(),
                reason: reason.into(),
                identity: self.client.options.identity.clone(),
            })
            .await?;
        Ok(())
    }

    /// Describes the run.
    pub async fn describe(&self) -> Result<pb::DescribeWorkflowResponse, ClientError> {
        Ok(self
            .client
            .raw()
            .describe_workflow(pb::DescribeWorkflowRequest {
                namespace: self.client.options.namespace.clone(),
                workflow_id: self.workflow_id.clone(),
                run_id: self.run_id.clone(),
            })
            .await?
            .into_inner())
    }

    /// The run's history.
    pub async fn history(&self) -> Result<Vec<pb::HistoryEvent>, ClientError> {
        Ok(self
            .client
            .raw()
            .get_workflow_history(pb::GetWorkflowHistoryRequest {
                namespace: self.client.options.namespace.clone(),
                workflow_id: self.workflow_id.clone(),
                run_id: self.run_id.clone(),
            })
            .await?
            .into_inner()
            .events)
    }
}

/// What a session asks for. Defaults are written on each field.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Task queue whose workers may host it. Required.
    pub task_queue: String,
    /// Hard requirements and preferences; per-GPU predicates also select the GPUs. Default none.
    pub requirements: crate::caps::Requirements,
    /// GPUs to reserve. Default 0.
    pub gpus: u32,
    /// Resource units to reserve. Default none.
    pub resources: std::collections::BTreeMap<String, u64>,
    /// "tightest" (default) or "spread".
    pub packing: String,
    /// How long to wait for a placement. Default 60 s.
    pub creation_timeout: Option<Duration>,
    /// When the session ends by itself. Default 24 h.
    pub execution_timeout: Option<Duration>,
    /// How long its worker may be silent before the session fails. Default: the server's worker
    /// liveness timeout (15 s).
    pub liveness_timeout: Option<Duration>,
    /// Only this worker may host it. Default none.
    pub worker: Option<String>,
}

impl SessionOptions {
    /// Options for a task queue.
    pub fn new(task_queue: impl Into<String>) -> Self {
        SessionOptions {
            task_queue: task_queue.into(),
            ..Default::default()
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::SessionOptions {
        pb::SessionOptions {
            task_queue: self.task_queue.clone(),
            requirements: self.requirements.to_string(),
            gpus: self.gpus,
            resources: self.resources.clone().into_iter().collect(),
            packing: self.packing.clone(),
            creation_timeout_ms: ms(self.creation_timeout),
            execution_timeout_ms: ms(self.execution_timeout),
            liveness_timeout_ms: ms(self.liveness_timeout),
            worker: self.worker.clone().unwrap_or_default(),
        }
    }
}

/// An open session: activities run on its worker, seeing its reservation.
#[derive(Clone)]
pub struct Session {
    client: Client,
    /// What the server placed: worker, host, reserved GPUs and resources.
    pub info: pb::SessionInfo,
}

impl Client {
    /// Creates a session and waits for the server to place it (up to its creation timeout).
    pub async fn create_session(&self, options: SessionOptions) -> Result<Session, ClientError> {
        let creation = options.creation_timeout.unwrap_or(Duration::from_secs(60));
        let deadline = std::time::Instant::now() + creation + Duration::from_secs(5);
        let session_id = uuid::Uuid::now_v7().to_string();
        loop {
            let reply = self
                .raw()
                .create_session(pb::CreateSessionRequest {
                    namespace: self.options.namespace.clone(),
                    options: Some(options.to_proto()),
                    owner: self.options.identity.clone(),
                    session_id: session_id.clone(),
                    wait_ms: RESULT_WAIT.as_millis() as u64,
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
                "creating" if std::time::Instant::now() < deadline => continue,
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
        Ok(self
            .raw()
            .describe_session(pb::DescribeSessionRequest {
                namespace: self.options.namespace.clone(),
                session_id: session_id.into(),
            })
            .await?
            .into_inner())
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
        let mut o = StandaloneActivityOptions::new(
            format!("{}-{}", self.info.session_id, uuid::Uuid::now_v7()),
            self.info.host_queue.clone(),
        );
        o.options = options;
        o.options.session_id = Some(self.info.session_id.clone());
        self.client.execute_activity(activity_type, input, o).await
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
