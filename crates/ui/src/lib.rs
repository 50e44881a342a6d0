//! tether's web UI, served by the server itself (`tether server --ui-listen ADDR`, and `tether
//! dev` on 127.0.0.1:8233 by default): the fleet and its GPUs, sessions, workflows and standalone
//! activities with their history and a timeline per worker, task queues with their unplaceable
//! work. Everything it shows is read through the server's read-only [`Reader`]; its page, script
//! and style are compiled into the binary, and it fetches nothing from anywhere but the server
//! (and, when the user points it at one, a codec server, from the browser).
//!
//! The pages refresh themselves by short polling (once a second) of the JSON under `/api/`.

#![warn(missing_docs)]

mod api;
pub mod json;
mod source;
pub mod views;

pub use source::{all_sessions, all_workers, queue_names, ReadApi};

use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use std::net::SocketAddr;
use tether_server::Reader;

/// Where and how the UI is served.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// Address to listen on (port 0: any free port).
    pub listen: String,
    /// The server checks client certificates and an access file: the UI, which reads without
    /// one, is then served on loopback only unless `allow_remote`.
    pub authorization_on: bool,
    /// Serve it on a non-loopback address even with authorization on.
    pub allow_remote: bool,
}

/// Why the UI could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// The address could not be listened on.
    #[error("--ui-listen: could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A remote address was given while authorization is on.
    #[error(
        "--ui-listen {0} is not a loopback address, and with --access on the UI (which shows \
         everything, read-only, without a client certificate) is served on loopback only: \
         listen on 127.0.0.1 or [::1] and reach it through an SSH tunnel, or pass \
         --ui-allow-remote to serve it on {0} anyway"
    )]
    RemoteWithAuthorization(SocketAddr),
}

/// The UI, being served.
pub struct UiServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl UiServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its first page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing from elsewhere: no script, style, font or image but the server's own
            // (a codec server the user names is reached with fetch, hence connect-src).
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src *; frame-ancestors 'none'",
            ),
        ],
        INDEX_HTML,
    )
}

/// The router: the page (one document for every page URL, which the script renders), its
/// script and style, and the JSON API.
pub fn router(reader: Reader) -> axum::Router {
    axum::Router::new()
        .route(
            "/",
            get(|| async { Redirect::temporary("/ns/default/fleet") }),
        )
        .route("/ns/{ns}", get(index))
        .route("/ns/{ns}/{*page}", get(index))
        .route(
            "/assets/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS) }),
        )
        .route("/api/namespaces", get(api::namespaces))
        .route("/api/ns/{ns}/fleet", get(api::fleet))
        .route("/api/ns/{ns}/sessions", get(api::sessions))
        .route("/api/ns/{ns}/workflows", get(api::workflows))
        .route("/api/ns/{ns}/runs/{kind}/{id}", get(api::run))
        .route("/api/ns/{ns}/queues", get(api::queues))
        .with_state(reader)
}

/// The UI's address, taken and checked but not yet served: a server binds it before it
/// opens its store, so a bad `--ui-listen` changes nothing.
pub struct UiListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl UiListener {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the UI over `reader` until the returned server is dropped.
    pub fn serve(self, reader: Reader) -> UiServer {
        let app = router(reader);
        let listener = self.listener;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the web UI's listener stopped");
            }
        });
        UiServer {
            addr: self.addr,
            task,
        }
    }
}

/// Listens on `config.listen`, refusing a non-loopback address while authorization is on
/// (unless allowed).
pub async fn bind(config: &UiConfig) -> Result<UiListener, UiError> {
    let bind = |source| UiError::Bind {
        addr: config.listen.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    if config.authorization_on && !config.allow_remote && !addr.ip().is_loopback() {
        return Err(UiError::RemoteWithAuthorization(addr));
    }
    Ok(UiListener { listener, addr })
}

/// Listens on `config.listen` and serves the UI over `reader` until the returned server is
/// dropped.
pub async fn start(config: &UiConfig, reader: Reader) -> Result<UiServer, UiError> {
    Ok(bind(config).await?.serve(reader))
}

/// The size of the page, script and style together, in bytes (what a browser loads once).
pub fn asset_bytes() -> usize {
    INDEX_HTML.len() + APP_JS.len() + APP_CSS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reader() -> (tempfile::TempDir, tether_server::LocalServer) {
        let dir = tempfile::tempdir().unwrap();
        let server = tether_server::LocalServer::start(
            "127.0.0.1:0",
            dir.path(),
            tether_server::ServerConfig::default(),
        )
        .await
        .unwrap();
        (dir, server)
    }

    #[tokio::test]
    async fn with_authorization_on_the_ui_stays_on_loopback_unless_allowed() {
        let (_dir, server) = reader().await;
        let remote = UiConfig {
            listen: "0.0.0.0:0".into(),
            authorization_on: true,
            allow_remote: false,
        };
        let refused = start(&remote, server.reader())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(refused, UiError::RemoteWithAuthorization(_)),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("--ui-allow-remote"),
            "{refused}"
        );
        let allowed = UiConfig {
            allow_remote: true,
            ..remote.clone()
        };
        assert!(start(&allowed, server.reader()).await.is_ok());
        let loopback = UiConfig {
            listen: "127.0.0.1:0".into(),
            ..remote
        };
        assert!(start(&loopback, server.reader()).await.is_ok());
    }

    #[test]
    fn the_page_is_light_and_loads_nothing_from_elsewhere() {
        // What a browser loads once, all of it compiled in.
        assert!(asset_bytes() < 64 * 1024, "{} bytes", asset_bytes());
        for asset in [INDEX_HTML, APP_JS, APP_CSS] {
            for outside in [
                "http://",
                "https://",
                "//cdn",
                "@import",
                "fonts.googleapis",
            ] {
                let found = asset
                    .lines()
                    .filter(|l| l.contains(outside))
                    // The codec server's address is the user's own, typed into the page.
                    .filter(|l| !l.contains("codec"))
                    .collect::<Vec<_>>();
                assert!(found.is_empty(), "{outside} in an asset: {found:?}");
            }
        }
    }
}
