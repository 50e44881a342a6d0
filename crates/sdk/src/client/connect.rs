//! The client: connecting (with TLS), request ids, retrying calls that are safe to repeat, and the calls on namespaces, workflows and standalone activities.

use super::error::{is_transient, ClientError};
use super::options::ClientOptions;
use super::routing::{endpoint_for, unreachable_now, ChannelMaker, Routed, Router};
use crate::codec::{self};
use std::time::Duration;
use tether_wire::pb::{self, tether_service_client::TetherServiceClient};

/// Largest message the client sends or accepts: the server's own limit, so whatever history
/// the server accepted can be delivered here.
pub(super) const MAX_MESSAGE: usize = tether_wire::MAX_GRPC_MESSAGE;

/// How long one result request waits on the server before the client asks again.
pub(super) const RESULT_WAIT: Duration = Duration::from_secs(30);

/// The first wait between tries, and the longest.
pub(super) const RETRY_FIRST: Duration = Duration::from_millis(50);

pub(super) const RETRY_MAX: Duration = Duration::from_secs(1);

/// The generated client over the routing transport: what [`Client::raw`] gives.
pub type Rpc = TetherServiceClient<Routed>;

/// A generated client whose calls are for `namespace`.
fn routed_client(router: &std::sync::Arc<Router>, namespace: &str) -> Rpc {
    TetherServiceClient::new(Routed {
        router: router.clone(),
        namespace: namespace.into(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE)
}

/// A connection to a tether server (or to the replicas of a cluster).
#[derive(Clone)]
pub struct Client {
    pub(super) rpc: Rpc,
    pub(super) router: std::sync::Arc<Router>,
    pub(super) options: ClientOptions,
    /// The server's address as the client reaches it.
    pub(super) address: String,
    pub(super) request_ids: std::sync::Arc<RequestIds>,
}

/// Request ids for starts and signals: a random prefix made once per client and a counter, so
/// that each id is unique without asking the OS for randomness on every call. 64 random bits
/// are plenty (an id only has to differ from the other starts of the same workflow or activity
/// id), and a short id keeps small requests small: HTTP/2 (h2) copies a message of under 256
/// bytes into its write buffer together with others, but writes a larger one on its own.
#[derive(Debug)]
pub(super) struct RequestIds {
    pub(super) prefix: String,
    pub(super) next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub(super) fn new() -> Self {
        RequestIds {
            prefix: format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    pub(super) fn next(&self) -> String {
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
        // Several replicas of a cluster: "host1:7233,host2:7233". Calls go to whichever holds
        // their namespace (see `routing`).
        let addresses: Vec<String> = address
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            return Err(ClientError::Connect {
                address,
                reason:
                    "no server address given; pass HOST:PORT (or several, comma-separated, for \
                         the replicas of a cluster)"
                        .into(),
            });
        }
        let mut endpoints = Vec::with_capacity(addresses.len());
        for a in &addresses {
            let endpoint =
                endpoint_for(a, options.tls.as_ref()).map_err(|reason| ClientError::Connect {
                    address: a.clone(),
                    reason,
                })?;
            endpoints.push(endpoint);
        }
        let deadline = std::time::Instant::now() + options.retry_for;
        let mut backoff = RETRY_FIRST;
        let mut told = false;
        // The first address that answers is where calls go first; the others connect when
        // a call needs them.
        let refused = |i: usize, e: &tonic::transport::Error| ClientError::Connect {
            address: addresses[i].clone(),
            reason: format!(
                "{e}{} (is the server running? start one with `tether dev`)",
                std::error::Error::source(e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ),
        };
        let (first, channel) = 'connected: loop {
            let mut last_unreachable = None;
            for (i, endpoint) in endpoints.iter().enumerate() {
                match endpoint.connect().await {
                    Ok(channel) => break 'connected (i, channel),
                    Err(e) if unreachable_now(&e) => last_unreachable = Some((i, e)),
                    Err(e) => return Err(refused(i, &e)),
                }
            }
            let (i, e) = last_unreachable.expect("every address failed one way or the other");
            if std::time::Instant::now() + backoff >= deadline {
                return Err(refused(i, &e));
            }
            if !told {
                tracing::warn!(address, error = %e, "the server is not reachable yet; trying again for up to {:?}", options.retry_for);
                told = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        };
        let given = addresses
            .iter()
            .zip(endpoints)
            .enumerate()
            .map(|(i, (a, endpoint))| {
                let c = if i == first {
                    channel.clone()
                } else {
                    endpoint.connect_lazy()
                };
                (a.clone(), c)
            })
            .collect();
        let tls = options.tls.clone();
        let make: ChannelMaker = std::sync::Arc::new(move |a: &str| {
            endpoint_for(a, tls.as_ref()).map(|e| e.connect_lazy())
        });
        let router = std::sync::Arc::new(Router::new(given, first, make));
        let rpc = routed_client(&router, &options.namespace);
        let client = Client {
            rpc,
            router,
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
        F: FnMut(Rpc) -> Fut,
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
        c.rpc = routed_client(&c.router, &c.options.namespace);
        c
    }

    /// The data converter payloads go through.
    pub fn data_converter(&self) -> &codec::DataConverter {
        &self.options.data_converter
    }

    /// Decodes a run's outcome through the codec chain (result and failure details).
    pub(super) fn decode_result(
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
    pub fn raw(&self) -> Rpc {
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
