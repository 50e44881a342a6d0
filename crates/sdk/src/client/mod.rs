//! The client: start workflows by name, signal, cancel, terminate, describe, wait for results,
//! and run standalone activities. Thin over the gRPC API; values go through the data converter.

use crate::codec::{self, ConvertError};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use tether_wire::pb::{self, tether_service_client::TetherServiceClient};
use tonic::transport::{Channel, Endpoint};

/// Largest message the client sends or accepts: the server's own limit, so whatever history
/// the server accepted can be delivered here.
const MAX_MESSAGE: usize = tether_wire::MAX_GRPC_MESSAGE;
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
    /// The server refused or failed the call: its gRPC code, and its message (what was wrong
    /// and what to do). Not chained as a source: the message is all there is to it, and an
    /// error report that prints sources would print it twice.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(tonic::Status),
    /// The id is already running (`what`: workflow or activity).
    #[error("{what} id {workflow_id:?} is already running as run {run_id}")]
    AlreadyStarted {
        /// Workflow or activity.
        what: &'static str,
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

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(status)
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as other gRPC tools print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
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
    pub tls: Option<tether_core::tls::ClientTls>,
    /// How long the client keeps trying while the server cannot be reached (down, restarting,
    /// or refusing everything after a storage failure): `connect` waits for it, and calls that
    /// are safe to repeat (reads, result waits, starts and signals, which carry request ids,
    /// cancellations, session creation) are retried with backoff. Default 30 s; zero fails at
    /// once.
    pub retry_for: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            namespace: tether_core::types::DEFAULT_NAMESPACE.into(),
            identity: default_identity(),
            data_converter: codec::DataConverter::default(),
            tls: None,
            retry_for: Duration::from_secs(30),
        }
    }
}

/// Errors that say the server could not be reached (or dropped the connection), not that it
/// refused the request: worth trying again.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// The first wait between tries, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The client's TLS files as tonic's configuration.
fn client_tls_config(tls: &tether_core::tls::ClientTls) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca_pem {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    config
}

/// Whether a connection error means "nobody is there (yet)" rather than a setting that will
/// never work (a TLS failure, a malformed address).
fn unreachable_now(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            // Refused: nothing listens (yet). A reset or an abort means something answered and
            // hung up (a TLS server refusing the client): trying again would not help.
            return matches!(
                io.kind(),
                ConnectionRefused
                    | TimedOut
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
            );
        }
        cause = c.source();
    }
    false
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
    /// The server's address as the client reaches it.
    address: String,
    request_ids: std::sync::Arc<RequestIds>,
}

/// Request ids for starts and signals: a random prefix made once per client and a counter, so
/// that each id is unique without asking the OS for randomness on every call. 64 random bits
/// are plenty (an id only has to differ from the other starts of the same workflow or activity
/// id), and a short id keeps small requests small: HTTP/2 (h2) copies a message of under 256
/// bytes into its write buffer together with others, but writes a larger one on its own.
#[derive(Debug)]
struct RequestIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        RequestIds {
            prefix: format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", self.prefix)
    }
}

impl Client {
    /// Connects with default options (namespace `default`).
    pub async fn connect(address: impl Into<String>) -> Result<Client, ClientError> {
        Self::connect_with(address, ClientOptions::default()).await
    }

    /// Connects with the given options. While nobody answers at the address (the server is
    /// starting, or restarting) it keeps trying for `options.retry_for`.
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
            tether_core::tls::install_crypto_provider();
            endpoint =
                endpoint
                    .tls_config(client_tls_config(tls))
                    .map_err(|e| ClientError::Connect {
                        address: address.clone(),
                        reason: format!("TLS settings: {e}"),
                    })?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        let deadline = std::time::Instant::now() + options.retry_for;
        let mut backoff = RETRY_FIRST;
        let mut told = false;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if unreachable_now(&e) && std::time::Instant::now() + backoff < deadline => {
                    if !told {
                        tracing::warn!(address, error = %e, "the server is not reachable yet; trying again for up to {:?}", options.retry_for);
                        told = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    return Err(ClientError::Connect {
                        address: address.clone(),
                        reason: format!(
                            "{e}{} (is the server running? start one with `tether dev`)",
                            std::error::Error::source(&e)
                                .map(|s| format!(": {s}"))
                                .unwrap_or_default()
                        ),
                    })
                }
            }
        };
        let rpc = TetherServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let client = Client {
            rpc,
            options,
            address: address.clone(),
            request_ids: std::sync::Arc::new(RequestIds::new()),
        };
        // One call now, so that a server that speaks another protocol (TLS to a plaintext
        // client), or refuses the client certificate (which TLS 1.3 only shows on the first
        // call), is reported here with what to do, not as a protocol error later.
        if let Err(status) = client
            .raw()
            .list_namespaces(pb::ListNamespacesRequest {})
            .await
        {
            let hint = match &client.options.tls {
                None => "the server did not answer plain gRPC; it probably requires TLS (pass --tls-ca, and --tls-cert/--tls-key if it requires client certificates; in Rust, ClientOptions::tls)",
                Some(tls) if tls.identity.is_none() => "the server refused the connection; it probably requires a client certificate (pass --tls-cert and --tls-key)",
                Some(_) => "the server refused the connection or its certificate; check that the client certificate is issued by the server's client CA and not expired, and that --tls-ca matches the server",
            };
            return Err(ClientError::Connect {
                address,
                reason: format!("{hint} ({})", status.message()),
            });
        }
        Ok(client)
    }

    /// The server's address as this client reaches it.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Runs a call that is safe to repeat, retrying it with backoff while the server cannot
    /// be reached, for up to `retry_for`.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(TetherServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = std::time::Instant::now() + self.options.retry_for;
        let mut backoff = RETRY_FIRST;
        let mut tries = 0u32;
        loop {
            tries += 1;
            // Boxed: the call's future is large, and a caller that keeps many calls in flight
            // (or their join handles) should not carry it inline in every one of its own.
            match Box::pin(call(self.raw())).await {
                Err(status)
                    if is_transient(&status) && std::time::Instant::now() + backoff < deadline =>
                {
                    if tries == 1 {
                        tracing::warn!(error = %status.message(), code = ?status.code(), "the server cannot be reached; retrying for up to {:?}", self.options.retry_for);
                    }
                    Box::pin(tokio::time::sleep(backoff)).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                other => return other,
            }
        }
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
                retention_ms: tether_core::types::limit_ms(retention),
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
                retention_ms: retention.map(tether_core::types::limit_ms),
            })
            .await?
            .into_inner())
    }

    /// Lists namespaces.
    pub async fn list_namespaces(&self) -> Result<Vec<pb::NamespaceInfo>, ClientError> {
        Ok(self
            .retrying(
                |mut rpc| async move { rpc.list_namespaces(pb::ListNamespacesRequest {}).await },
            )
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
                run_id: resp.into_inner().run_id,
            }),
            Err(status) => Err(start_error(status, options.id, "workflow")),
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
            placement_note: String::new(),
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
            Err(status) => return Err(start_error(status, options.id, "activity")),
        };
        if !reply.placement_note.is_empty() {
            tracing::warn!(
                activity_id = options.id,
                why = reply.placement_note,
                "no worker can take the activity now; it waits"
            );
        }
        let handle = ActivityHandle {
            client: self.clone(),
            activity_id: options.id,
            run_id: reply.run_id,
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
        let req = pb::DescribeTaskQueueRequest {
            namespace: self.options.namespace.clone(),
            task_queue: task_queue.into(),
        };
        Ok(self
            .retrying(|mut rpc| {
                let req = req.clone();
                async move { rpc.describe_task_queue(req).await }
            })
            .await?
            .into_inner())
    }

    /// Workers registered (or seen polling) in this namespace, every page.
    pub async fn list_workers(&self) -> Result<Vec<pb::WorkerInfo>, ClientError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListWorkersRequest {
                namespace: self.options.namespace.clone(),
                page_size: 0,
                page_token: token.clone(),
            };
            let reply = self
                .retrying(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.list_workers(req).await }
                })
                .await?
                .into_inner();
            all.extend(reply.workers);
            if reply.next_page_token.is_empty() {
                return Ok(all);
            }
            token = reply.next_page_token;
        }
    }

    /// Sessions of this namespace (closed ones too with `include_closed`), newest first, every
    /// page.
    pub async fn list_sessions(
        &self,
        include_closed: bool,
    ) -> Result<Vec<pb::SessionInfo>, ClientError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListSessionsRequest {
                namespace: self.options.namespace.clone(),
                include_closed,
                page_size: 0,
                page_token: token.clone(),
            };
            let reply = self
                .retrying(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.list_sessions(req).await }
                })
                .await?
                .into_inner();
            all.extend(reply.sessions);
            if reply.next_page_token.is_empty() {
                return Ok(all);
            }
            token = reply.next_page_token;
        }
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

/// A duration for a field that must hold a limit (`Duration::MAX`: the longest allowed).
fn ms(d: Option<Duration>) -> u64 {
    d.map(tether_core::types::duration_ms).unwrap_or(0)
}

/// A duration for a field where 0 means no limit (`Duration::MAX`: no limit).
fn limit(d: Option<Duration>) -> u64 {
    d.map(tether_core::types::limit_ms).unwrap_or(0)
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
            schedule_to_close_timeout_ms: limit(self.schedule_to_close),
            schedule_to_start_timeout_ms: limit(self.schedule_to_start),
            start_to_close_timeout_ms: ms(start_to_close),
            heartbeat_timeout_ms: limit(self.heartbeat),
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
            initial_interval_ms: tether_core::types::duration_ms(self.initial_interval).max(1),
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
fn start_error(status: tonic::Status, id: String, what: &'static str) -> ClientError {
    if status.code() != tonic::Code::AlreadyExists {
        return status.into();
    }
    let run_id = status
        .metadata()
        .get(tether_wire::RUN_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ClientError::AlreadyStarted {
        what,
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
            activity_id: self.activity_id.clone(),
            run_id: self.run_id.clone(),
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
            activity_id: self.activity_id.clone(),
            run_id: self.run_id.clone(),
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
            activity_id: self.activity_id.clone(),
            run_id: self.run_id.clone(),
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
                activity_id: self.activity_id.clone(),
                run_id: self.run_id.clone(),
                reason: reason.into(),
                identity: self.client.options.identity.clone(),
            })
            .await?;
        Ok(())
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

    /// Waits for the run to close and returns its outcome (payloads decoded). A server restart
    /// meanwhile is waited out (see `ClientOptions::retry_for`).
    pub async fn outcome(&self) -> Result<pb::GetWorkflowResultResponse, ClientError> {
        let req = pb::GetWorkflowResultRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone(),
            run_id: self.run_id.clone(),
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
        let req = pb::SignalWorkflowRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone(),
            run_id: self.run_id.clone(),
            signal_name: signal_name.into(),
            input: Some(self.client.options.data_converter.to_payload(input)?),
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
            workflow_id: self.workflow_id.clone(),
            run_id: self.run_id.clone(),
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
        let req = pb::DescribeWorkflowRequest {
            namespace: self.client.options.namespace.clone(),
            workflow_id: self.workflow_id.clone(),
            run_id: self.run_id.clone(),
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
            workflow_id: self.workflow_id.clone(),
            run_id: self.run_id.clone(),
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
    /// For a session a client owns: it ends after this long with no activity in it. Default
    /// 10 min. (A workflow's sessions end with the workflow run.)
    pub idle_timeout: Option<Duration>,
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
            idle_timeout_ms: ms(self.idle_timeout),
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
