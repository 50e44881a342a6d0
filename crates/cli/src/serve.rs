//! `tether server` and `tether dev`: settings, serving, metrics, reloading the access file, stopping on a signal.

use crate::args::DevArgs;
use crate::args::Global;
use crate::args::ServerArgs;
use crate::args::ServerOptionsArgs;
use anyhow::{bail, Context, Result};
use std::time::Duration;
use tether_server::{LocalServer, ServerConfig, StoreLocation};

pub(crate) fn server_config(o: &ServerOptionsArgs) -> Result<ServerConfig> {
    if o.max_payload_bytes == 0 {
        bail!("--max-payload-bytes must be greater than 0");
    }
    if o.long_poll_timeout.is_zero() {
        bail!("--long-poll-timeout must be greater than 0");
    }
    if o.worker_liveness_timeout.is_zero() {
        bail!("--worker-liveness-timeout must be greater than 0");
    }
    let tls = match (&o.tls_cert, &o.tls_key) {
        (Some(cert), Some(key)) => Some(tether_core::tls::ServerTls::from_files(
            cert,
            key,
            o.client_ca.as_deref(),
        )?),
        (None, None) => {
            if o.client_ca.is_some() {
                bail!("--client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)");
            }
            None
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let access = match &o.access {
        None => None,
        Some(path) => {
            if o.client_ca.is_none() {
                bail!("--access needs --client-ca: identities come from client certificates");
            }
            Some(std::sync::Arc::new(
                tether_server::auth::Access::load(path).map_err(anyhow::Error::msg)?,
            ))
        }
    };
    Ok(ServerConfig {
        long_poll_timeout: o.long_poll_timeout,
        max_payload_bytes: o.max_payload_bytes,
        sync_mode: o.sync,
        worker_liveness_timeout: o.worker_liveness_timeout,
        tls,
        access,
        max_history_events: o.max_history_events,
        max_pending_activities: o.max_pending_activities,
        max_requests_per_second: o.max_requests_per_second,
        metrics: o.metrics_listen.is_some(),
        max_history_bytes: o.max_history_bytes,
        store_busy_timeout: o.store_busy_timeout,
        ..ServerConfig::default()
    })
}

/// Where `tether dev` serves the web UI unless told otherwise (Temporal's dev server uses the
/// same port for its UI).
pub(crate) const DEV_UI_LISTEN: &str = "127.0.0.1:8233";

pub(crate) async fn serve(
    o: &ServerOptionsArgs,
    location: StoreLocation,
    config: ServerConfig,
    ui_by_default: Option<&str>,
) -> Result<()> {
    let listen = &o.listen;
    let access_file = o.access.as_deref();
    // The metrics listener comes up first so a bad address fails before the server starts.
    let metrics = match &o.metrics_listen {
        Some(addr) => Some(start_metrics(addr).await?),
        None => None,
    };
    let ui = bind_ui(o, ui_by_default).await?;
    let server = LocalServer::start_on(listen, location.clone(), config)
        .await
        .with_context(|| format!("starting the server on {listen} ({location})"))?;
    tracing::info!(address = %server.addr(), store = %location, "tether server listening");
    let data = match &location {
        StoreLocation::Sqlite(dir) => format!("data in {}", dir.display()),
        other => format!("data in {other}"),
    };
    eprintln!(
        "tether server listening on {} ({data}); Ctrl-C to stop",
        server.addr()
    );
    if let Some((addr, _)) = &metrics {
        eprintln!("metrics on http://{addr}/metrics");
    }
    let _ui = ui.map(|listener| {
        let ui = listener.serve(server.reader());
        eprintln!("web UI at {}", ui.url());
        ui
    });
    if let Some(path) = access_file {
        eprintln!(
            "access rules from {}; send SIGHUP to reload them",
            path.display()
        );
    }
    let reload = async {
        match access_file {
            Some(path) => reload_access_on_hangup(&server, path).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = reload => {}
        failure = server.storage_failed() => {
            // Nothing can be written any more, and nothing after the failed write was
            // acknowledged: stop, so that a supervisor restarts the server, which recovers
            // from the last durable state. Callers meanwhile are told UNAVAILABLE.
            eprintln!(
                "error: storage failed ({}); every request is refused; exiting so the server \
                 can be restarted from the last durable state",
                failure.reason
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = server.stop().await;
            std::process::exit(STORAGE_FAILED_EXIT);
        }
    }
    eprintln!("shutting down");
    server.stop().await?;
    Ok(())
}

/// Takes the web UI's address where --ui-listen says (or, for `tether dev`, its default
/// address, which only warns when taken: another dev server may hold it), before the server
/// starts, so that a refused address changes nothing.
async fn bind_ui(
    o: &ServerOptionsArgs,
    by_default: Option<&str>,
) -> Result<Option<tether_ui::UiListener>> {
    let (listen, explicit) = match (&o.ui_listen, by_default) {
        (Some(addr), _) => (addr.clone(), true),
        (None, Some(addr)) => (addr.to_string(), false),
        (None, None) => return Ok(None),
    };
    let config = tether_ui::UiConfig {
        listen,
        authorization_on: o.access.is_some(),
        allow_remote: o.ui_allow_remote,
    };
    match tether_ui::bind(&config).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if explicit => Err(e.into()),
        Err(e) => {
            eprintln!(
                "web UI not served: {e} (pass --ui-listen 127.0.0.1:0 for any free port, or \
                 --no-ui)"
            );
            Ok(None)
        }
    }
}

/// The exit status of a server whose store failed a write.
pub(crate) const STORAGE_FAILED_EXIT: i32 = 3;

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (port 0: any free port).
pub(crate) async fn start_metrics(
    addr: &str,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    // Latency buckets from 0.25 ms (a loopback round trip) to a minute (a long poll).
    let buckets = [
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen: could not listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok((bound, task))
}

/// Re-reads the access file on each SIGHUP. A file that does not parse changes nothing: the
/// rules in force stay, and the error says what to fix.
pub(crate) async fn reload_access_on_hangup(server: &LocalServer, path: &std::path::Path) {
    #[cfg(unix)]
    {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("could not listen for SIGHUP; the access file is read only at start");
            return std::future::pending().await;
        };
        while hangup.recv().await.is_some() {
            let loaded = tether_server::auth::Access::load(path)
                .map_err(anyhow::Error::msg)
                .and_then(|access| {
                    let grants = access.grant_count();
                    server.replace_access(access)?;
                    Ok(grants)
                });
            match loaded {
                Ok(grants) => {
                    eprintln!(
                        "access rules reloaded from {} ({grants} grants)",
                        path.display()
                    );
                }
                Err(e) => {
                    eprintln!("access file not reloaded, the previous rules stay in force: {e:#}");
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (server, path);
        std::future::pending::<()>().await
    }
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `tether server` and `tether dev` listen on --listen; an --address there is a mistake for
/// it, and silently listening elsewhere would hide that.
pub(crate) fn refuse_address_for_servers(g: &Global, command: &str) -> Result<()> {
    if let Some(address) = &g.address {
        bail!(
            "tether {command} listens on --listen (default 127.0.0.1:7233); --address names the \
             server that client commands connect to. To listen on {address}, pass --listen \
             {address}"
        );
    }
    Ok(())
}

pub(crate) async fn server_cmd(g: &Global, args: ServerArgs) -> Result<i32> {
    refuse_address_for_servers(g, "server")?;
    let mut config = server_config(&args.options)?;
    config.replica = tether_server::cluster::ReplicaConfig {
        id: args.replica_id.unwrap_or_default(),
        advertise_address: match args.advertise_address {
            Some(address) => address,
            None if args.options.listen.starts_with("0.0.0.0")
                || args.options.listen.starts_with("[::]") =>
            {
                if args.database_url.is_some() {
                    bail!(
                        "--listen {} is every interface, which is no address for the other \
                         replicas to send clients to; give --advertise-address http://HOST:PORT",
                        args.options.listen
                    );
                }
                String::new()
            }
            None => String::new(),
        },
        lease_timeout: args.lease_timeout,
    };
    let location = match (args.data_dir, args.database_url) {
        (_, Some(url)) => StoreLocation::Postgres(url),
        (Some(dir), None) => StoreLocation::Sqlite(dir),
        (None, None) => bail!(
            "tether server needs a store: --data-dir DIR (embedded SQLite) or --database-url \
             postgres://USER@HOST:PORT/DATABASE (PostgreSQL)"
        ),
    };
    serve(&args.options, location, config, None).await?;
    Ok(0)
}

pub(crate) async fn dev_cmd(g: &Global, args: DevArgs) -> Result<i32> {
    refuse_address_for_servers(g, "dev")?;
    let config = server_config(&args.options)?;
    let ui = (!args.no_ui).then_some(DEV_UI_LISTEN);
    match &args.data_dir {
        Some(dir) => {
            serve(
                &args.options,
                StoreLocation::Sqlite(dir.clone()),
                config,
                ui,
            )
            .await?
        }
        None => {
            let dir = tempfile::Builder::new().prefix("tether-dev-").tempdir()?;
            let location = StoreLocation::Sqlite(dir.path().to_path_buf());
            serve(&args.options, location, config, ui).await?;
        }
    }
    Ok(0)
}
