//! The transport under every call: one or more server addresses, and the namespace each
//! call is for. A cluster replica that does not hold a namespace answers UNAVAILABLE with the
//! holder's address ([`tether_wire::OWNER_METADATA`]); the call is sent again there (the
//! replica did nothing with it), and later calls of that namespace go there first. An address
//! where nothing listens any more (a replica killed) is skipped for the next one in the list.
//!
//! Calls are unary, and small enough to keep: the request body is read once and re-sent
//! as it is.

use http_body_util::BodyExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::codegen::http;
use tonic::codegen::{Bytes, Service, StdError};
use tonic::transport::{Channel, Endpoint};

/// Most redirects one call follows (a namespace moving while the call is under way; more
/// means replicas disagree, and the caller's retry takes over).
const MAX_REDIRECTS: usize = 3;

/// Makes the channel to an address (with the client's TLS settings).
pub(super) type ChannelMaker = Arc<dyn Fn(&str) -> Result<Channel, String> + Send + Sync>;

/// Where calls go: the addresses the client was given, and what it learned since.
pub(super) struct Router {
    /// The given addresses with their channels, in the order given.
    given: Vec<(String, Channel)>,
    /// The given address that answered last: the first tried for a namespace whose holder is
    /// not known.
    preferred: AtomicUsize,
    /// Channels to replicas learned from redirects.
    learned: Mutex<HashMap<String, Channel>>,
    /// Namespace -> the address of the replica that holds it, as last heard.
    holders: Mutex<HashMap<String, String>>,
    make: ChannelMaker,
}

impl Router {
    pub(super) fn new(given: Vec<(String, Channel)>, preferred: usize, make: ChannelMaker) -> Self {
        Router {
            given,
            preferred: AtomicUsize::new(preferred),
            learned: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            make,
        }
    }

    /// The addresses given, in order.
    pub(super) fn addresses(&self) -> Vec<String> {
        self.given.iter().map(|(a, _)| a.clone()).collect()
    }

    fn channel(&self, address: &str) -> Result<Channel, String> {
        if let Some((_, c)) = self.given.iter().find(|(a, _)| a == address) {
            return Ok(c.clone());
        }
        let mut learned = self.learned.lock();
        if let Some(c) = learned.get(address) {
            return Ok(c.clone());
        }
        let channel = (self.make)(address)?;
        learned.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Where a call for `namespace` goes first.
    fn first_target(&self, namespace: &str) -> String {
        if let Some(holder) = self.holders.lock().get(namespace) {
            return holder.clone();
        }
        let i = self.preferred.load(Ordering::Relaxed) % self.given.len();
        self.given[i].0.clone()
    }

    /// The next given address after `failed` that this call has not tried yet.
    fn next_given(&self, tried: &[String]) -> Option<String> {
        let start = self.preferred.load(Ordering::Relaxed);
        (0..self.given.len())
            .map(|k| &self.given[(start + k) % self.given.len()].0)
            .find(|a| !tried.contains(a))
            .cloned()
    }

    fn answered(&self, address: &str) {
        if let Some(i) = self.given.iter().position(|(a, _)| a == address) {
            self.preferred.store(i, Ordering::Relaxed);
        }
    }
}

/// The channel the generated client sends through: a [`Router`] and the namespace of the
/// client that makes the calls.
#[derive(Clone)]
pub struct Routed {
    pub(super) router: Arc<Router>,
    pub(super) namespace: Arc<str>,
}

impl Routed {
    /// The address list the client was given.
    pub fn addresses(&self) -> Vec<String> {
        self.router.addresses()
    }
}

fn is_unreachable(e: &StdError) -> bool {
    unreachable_now(e.as_ref())
}

/// The request again, with the same method, URI, headers and body.
fn rebuild(
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
    body: &Bytes,
) -> http::Request<tonic::body::Body> {
    let mut req = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        body.clone(),
    )));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.version_mut() = version;
    *req.headers_mut() = headers.clone();
    req
}

impl Service<http::Request<tonic::body::Body>> for Routed {
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is that of the channel a call picks, awaited in `call`.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let router = self.router.clone();
        let namespace = self.namespace.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let mut target = router.first_target(&namespace);
            let mut tried: Vec<String> = Vec::new();
            let mut redirects = 0;
            loop {
                let mut channel = router.channel(&target).map_err(StdError::from)?;
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                let request = rebuild(
                    &parts.method,
                    &parts.uri,
                    parts.version,
                    &parts.headers,
                    &body,
                );
                match channel.call(request).await.map_err(StdError::from) {
                    Ok(response) => {
                        let holder = response
                            .headers()
                            .get(tether_wire::OWNER_METADATA)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        match holder {
                            Some(holder) if redirects < MAX_REDIRECTS && holder != target => {
                                tracing::debug!(namespace = %namespace, from = %target, to = %holder, "namespace is served elsewhere; following");
                                router.answered(&target);
                                router
                                    .holders
                                    .lock()
                                    .insert(namespace.to_string(), holder.clone());
                                redirects += 1;
                                target = holder;
                            }
                            _ => {
                                router.answered(&target);
                                return Ok(response);
                            }
                        }
                    }
                    // Nothing listens there (a replica that stopped): the call never reached
                    // it, so it goes to the next address.
                    Err(e) if is_unreachable(&e) => {
                        router.holders.lock().remove(&*namespace);
                        tried.push(target.clone());
                        match router.next_given(&tried) {
                            Some(next) => {
                                tracing::debug!(from = %target, to = %next, "server unreachable; trying the next address");
                                target = next;
                            }
                            None => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

/// An endpoint for `address` with the client's settings (scheme, TLS, timeouts).
pub(super) fn endpoint_for(
    address: &str,
    tls: Option<&tether_core::tls::ClientTls>,
) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = match address.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{address}"),
    };
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| e.to_string())?;
    if let Some(tls) = tls {
        tether_core::tls::install_crypto_provider();
        endpoint = endpoint
            .tls_config(client_tls_config(tls))
            .map_err(|e| format!("TLS settings: {e}"))?;
    }
    Ok(endpoint
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(10)))
}

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
pub(super) fn unreachable_now(e: &(dyn std::error::Error + 'static)) -> bool {
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
