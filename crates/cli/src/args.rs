//! The command line itself: every command, subcommand and flag, and the parsers of their values.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tether_sdk::codec;
use tether_server::store::SyncMode;
use tether_wire::pb;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Durable-execution server and operator CLI",
    long_about = "tether runs durable workflows and activities on a fleet of workers.\n\n\
        Start a throwaway server with `tether dev`, or a persistent one with\n\
        `tether server --data-dir DIR`; then start, signal and inspect workflows."
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct Global {
    /// Server address for client commands (host:port or http://host:port; for the replicas of
    /// a cluster, several, comma-separated; env TETHER_ADDRESS, default 127.0.0.1:7233).
    /// `tether server` and `tether dev` listen on --listen instead.
    #[arg(long, global = true)]
    pub(crate) address: Option<String>,
    /// How long a client command keeps trying while the server cannot be reached (it is
    /// starting or restarting): connecting, and calls that are safe to repeat.
    #[arg(
        long,
        global = true,
        env = "TETHER_RETRY_FOR",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub(crate) retry_for: Duration,
    /// Namespace to work in.
    #[arg(
        long,
        global = true,
        env = "TETHER_NAMESPACE",
        default_value = "default"
    )]
    pub(crate) namespace: String,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// CA certificate (PEM) that issued the server's certificate; turns TLS on.
    #[arg(long, global = true, env = "TETHER_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mTLS).
    #[arg(long, global = true, env = "TETHER_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "TETHER_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Name to check the server certificate against (default: the address's host).
    #[arg(long, global = true, env = "TETHER_TLS_SERVER_NAME")]
    pub(crate) tls_server_name: Option<String>,
    /// Key file to decode encrypted payloads locally for display (history, describe, result).
    #[arg(long, global = true, env = "TETHER_KEYS")]
    pub(crate) keys: Option<PathBuf>,
    /// Codec server (http://host:port) that decodes payloads for display, instead of --keys.
    #[arg(long, global = true, env = "TETHER_CODEC_SERVER")]
    pub(crate) codec_server: Option<String>,
}

/// Where client commands connect when neither --address nor TETHER_ADDRESS says.
pub(crate) const DEFAULT_ADDRESS: &str = "127.0.0.1:7233";

impl Global {
    /// The server client commands connect to.
    pub(crate) fn server_address(&self) -> String {
        self.address
            .clone()
            .or_else(|| {
                std::env::var("TETHER_ADDRESS")
                    .ok()
                    .filter(|a| !a.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_string())
    }
}

/// Input for a command: JSON text (--input), or a file of it (--input-file; `-` reads stdin).
#[derive(Args, Clone, Default)]
pub(crate) struct InputArgs {
    /// Input as JSON text.
    #[arg(long, conflicts_with = "input_file")]
    pub(crate) input: Option<String>,
    /// Read the input (JSON) from this file; `-` reads it from stdin.
    #[arg(long, value_name = "PATH")]
    pub(crate) input_file: Option<PathBuf>,
}

impl InputArgs {
    /// The JSON text given, if any.
    pub(crate) fn text(&self) -> Result<Option<String>> {
        if let Some(text) = &self.input {
            return Ok(Some(text.clone()));
        }
        let Some(path) = &self.input_file else {
            return Ok(None);
        };
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading the input from stdin")?;
            text
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("--input-file {}", path.display()))?
        };
        Ok(Some(text))
    }

    pub(crate) fn payload(&self) -> Result<Option<pb::Payload>> {
        parse_json_input(self.text()?.as_deref())
    }

    pub(crate) fn value(&self) -> Result<Value> {
        Ok(match self.text()? {
            Some(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "the input is not valid JSON: {:?}",
                    tether_core::types::quote_prefix(&text, 80)
                )
            })?,
            None => Value::Null,
        })
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the server on a persistent data directory.
    Server(ServerArgs),
    /// Run a server on a temporary data directory, for trying things out.
    Dev(DevArgs),
    /// Manage namespaces.
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Start, signal, inspect and stop workflows.
    #[command(subcommand)]
    Workflow(WorkflowCmd),
    /// Run standalone activities (no workflow needed).
    #[command(subcommand)]
    Activity(ActivityCmd),
    /// Inspect task queues.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Inspect workers.
    #[command(subcommand)]
    Workers(WorkersCmd),
    /// Print what this host would advertise as a worker (GPUs, host, network, labels...).
    Caps(CapsArgs),
    /// Inspect sessions (a worker and resources reserved for a sequence of activities).
    #[command(subcommand)]
    Session(SessionCmd),
    /// The fleet at a glance: workers by state, GPUs per model reserved / free, sessions by
    /// state, and task queues with work waiting or unplaceable (the web UI shows the same).
    Status {
        /// Redraw it in place every so often (e.g. --watch 2s; bare --watch: every second).
        /// With --json, one summary per line.
        #[arg(long, value_name = "EVERY", num_args = 0..=1, default_missing_value = "1s", value_parser = parse_duration)]
        watch: Option<Duration>,
    },
    /// Inspect the cluster of server replicas (on PostgreSQL).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Make certificates for trying mTLS.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Serve /encode and /decode over HTTP with the given keys, so tools can show payloads
    /// without holding keys themselves.
    CodecServer {
        /// Key file (lines KEY_ID = 64 hex characters; optional `active = KEY_ID`).
        #[arg(long)]
        keys: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
        /// Allow an address other than loopback. The codec server speaks plain HTTP without
        /// authentication: whoever reaches it can decrypt payloads. Only behind a TLS proxy
        /// that authenticates callers.
        #[arg(long)]
        allow_remote: bool,
        /// A web page's origin (scheme://host[:port]) that may call it from a browser, e.g.
        /// the web UI at http://127.0.0.1:8233; repeat for several. Pages from any other
        /// origin are refused.
        #[arg(long = "allow-origin", value_name = "ORIGIN")]
        allow_origins: Vec<String>,
    },
    /// Write a new key file with one random AES-256 key.
    Keygen {
        /// Key id.
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum CertsCmd {
    /// Write a development CA, a server certificate for localhost and client certificates.
    /// For development only: the CA key is written in plain text.
    Dev {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Client identities to issue certificates for (the certificate's CN and SAN).
        #[arg(long = "client", default_values_t = ["client".to_string(), "worker".to_string(), "admin".to_string()])]
        clients: Vec<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum SessionCmd {
    /// List sessions: open and waiting ones, or all with --all.
    List {
        /// Include completed, failed, timed-out and terminated sessions.
        #[arg(long)]
        all: bool,
    },
    /// Show one session: worker, host, GPUs, resources, state, age, activities run, why it waits.
    Describe {
        /// The session id.
        session_id: String,
    },
    /// End a session at once: its GPUs and units are freed, its pending activities fail with
    /// SessionFailed, and the workflow that owns it is told.
    Terminate {
        /// The session id.
        session_id: String,
        /// Why (shown with the session and to its owner).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args)]
pub(crate) struct CapsArgs {
    /// A declared inventory (TOML) to use instead of / in addition to detection.
    #[arg(long)]
    pub(crate) inventory: Option<PathBuf>,
    /// Directory whose disk's free space is reported.
    #[arg(long, default_value = ".")]
    pub(crate) work_dir: PathBuf,
    /// Add a label (KEY=VALUE); repeatable.
    #[arg(long = "label", value_parser = parse_key_value)]
    pub(crate) labels: Vec<(String, String)>,
    /// Add a countable resource (NAME=AMOUNT); repeatable.
    #[arg(long = "resource", value_parser = parse_resource)]
    pub(crate) resources: Vec<(String, u64)>,
}

pub(crate) fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

pub(crate) fn parse_resource(text: &str) -> Result<(String, u64), String> {
    let (k, v) = parse_key_value(text)?;
    let n = v
        .parse()
        .map_err(|_| format!("resource {k:?}: {v:?} is not a whole number"))?;
    Ok((k, n))
}

#[derive(Args)]
pub(crate) struct ServerOptionsArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7233")]
    pub(crate) listen: String,
    /// Longest time a poll or a result wait is held open (e.g. 60s, 500ms).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) long_poll_timeout: Duration,
    /// Largest payload accepted, in bytes.
    #[arg(long, default_value_t = tether_core::types::DEFAULT_MAX_PAYLOAD_BYTES)]
    pub(crate) max_payload_bytes: usize,
    /// Commit durability: `full` (fsync every commit; survives power loss) or `normal`
    /// (survives a crash of the server process).
    #[arg(long, default_value = "full")]
    pub(crate) sync: SyncMode,
    /// A worker without a heartbeat or poll for this long is marked dead and gets no work.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub(crate) worker_liveness_timeout: Duration,
    /// Server certificate (PEM); with --tls-key turns TLS on.
    #[arg(long)]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM): mTLS.
    #[arg(long)]
    pub(crate) client_ca: Option<PathBuf>,
    /// Access file (TOML) granting roles per certificate identity and namespace; whatever is
    /// not granted is denied. Needs --client-ca. Re-read on SIGHUP (a broken file changes
    /// nothing).
    #[arg(long)]
    pub(crate) access: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests per method and code with
    /// latencies, store commits, open runs, sessions, workers, task queue backlogs). Off unless
    /// given.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
    /// Serve the web UI (fleet, GPUs, sessions, workflows, task queues; read-only) at
    /// http://ADDR/. `tether server`: off unless given. `tether dev`: 127.0.0.1:8233 unless
    /// given (or --no-ui). With --access on it is served on loopback only, unless
    /// --ui-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub(crate) ui_listen: Option<String>,
    /// Serve the web UI on a non-loopback --ui-listen address even with --access on: whoever
    /// reaches it sees every namespace's workers, sessions and runs (read-only) without a
    /// client certificate.
    #[arg(long)]
    pub(crate) ui_allow_remote: bool,
    /// Most events one workflow run's history may hold.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) max_history_events: u64,
    /// Most activities one workflow run may have pending at once.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) max_pending_activities: usize,
    /// Most requests per second from one caller (certificate identity, else address); 0 = off.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) max_requests_per_second: u32,
    /// Largest encoded size of one run's history, in bytes; appends past it are refused.
    #[arg(long, default_value_t = tether_server::DEFAULT_MAX_HISTORY_BYTES)]
    pub(crate) max_history_bytes: u64,
    /// How long a commit waits for another process's lock on the database before it fails
    /// (the server then refuses every request and exits, to be restarted).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) store_busy_timeout: Duration,
}

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// Directory for the embedded SQLite store (created if missing). Give this or
    /// --database-url.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Keep state in PostgreSQL instead: postgres://USER[:PASSWORD]@HOST:PORT/DATABASE (the
    /// tables are created or migrated at start). Also read from TETHER_DATABASE_URL.
    #[arg(long, env = "TETHER_DATABASE_URL", conflicts_with = "data_dir")]
    pub(crate) database_url: Option<String>,
    /// With --database-url: this replica's id in the cluster (default: HOST:PORT, the host name
    /// and the listening port). Servers on one database share its namespaces, each held by one
    /// of them.
    #[arg(long, requires = "database_url")]
    pub(crate) replica_id: Option<String>,
    /// With --database-url: where clients and the other replicas reach this one
    /// (http://HOST:PORT; default: the --listen address, which must then not be 0.0.0.0).
    #[arg(long, requires = "database_url")]
    pub(crate) advertise_address: Option<String>,
    /// With --database-url: a replica that has not renewed its leases for this long loses its
    /// namespaces to the others (e.g. 8s, 2s).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub(crate) lease_timeout: Duration,
    #[command(flatten)]
    pub(crate) options: ServerOptionsArgs,
}

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Keep data here instead of a temporary directory removed on exit.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Do not serve the web UI.
    #[arg(long, conflicts_with = "ui_listen")]
    pub(crate) no_ui: bool,
    #[command(flatten)]
    pub(crate) options: ServerOptionsArgs,
}

#[derive(Subcommand)]
pub(crate) enum NamespaceCmd {
    /// Create a namespace.
    Create {
        /// Its name.
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// How long closed runs and their history are kept (e.g. 30d, 12h), or "forever".
        #[arg(long, default_value = "forever", value_parser = parse_retention)]
        retention: Duration,
    },
    /// Change a namespace's description or retention.
    Update {
        /// Its name.
        name: String,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// New retention (e.g. 30d, 12h), or "forever"; runs already past it are deleted at the
        /// next sweep (within a minute).
        #[arg(long, value_parser = parse_retention)]
        retention: Option<Duration>,
    },
    /// List namespaces.
    List,
}

#[derive(Args)]
pub(crate) struct RunRef {
    /// Workflow id.
    #[arg(long = "id", short = 'w')]
    pub(crate) workflow_id: String,
    /// Run id (default: the latest run).
    #[arg(long, default_value = "")]
    pub(crate) run_id: String,
}

#[derive(Subcommand)]
pub(crate) enum WorkflowCmd {
    /// Start a workflow by type name.
    Start {
        /// Workflow type (the name it is registered under).
        #[arg(long = "type")]
        workflow_type: String,
        /// Task queue its workers poll.
        #[arg(long)]
        task_queue: String,
        /// Workflow id (default: a random uuid).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        input: InputArgs,
        /// End the run if it takes longer than this (e.g. 1h).
        #[arg(long, value_parser = parse_duration)]
        run_timeout: Option<Duration>,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Wait for a workflow's result.
    Result {
        #[command(flatten)]
        run: RunRef,
    },
    /// Show a workflow's state, pending activities and last task failure.
    Describe {
        #[command(flatten)]
        run: RunRef,
    },
    /// Print a workflow's event history.
    History {
        #[command(flatten)]
        run: RunRef,
    },
    /// Send a signal.
    Signal {
        #[command(flatten)]
        run: RunRef,
        /// Signal name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        input: InputArgs,
    },
    /// Ask a workflow to cancel (it may clean up first).
    Cancel {
        #[command(flatten)]
        run: RunRef,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a workflow at once.
    Terminate {
        #[command(flatten)]
        run: RunRef,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List workflow runs, newest first.
    List {
        /// Only runs with this status: running, completed, failed, canceled, terminated, timed_out.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        matching: RunMatchArgs,
    },
}

/// What `workflow list` and `activity list` keep beyond the status (the web UI's filters too).
#[derive(Args, Clone, Default)]
pub(crate) struct RunMatchArgs {
    /// Only runs of this type.
    #[arg(long = "type", value_name = "TYPE")]
    pub(crate) run_type: Option<String>,
    /// Only runs on this task queue.
    #[arg(long)]
    pub(crate) task_queue: Option<String>,
    /// Only runs whose id starts with this.
    #[arg(long)]
    pub(crate) id_prefix: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum ActivityCmd {
    /// Run an activity on a task queue without a workflow and wait for its result.
    Execute {
        /// Activity type.
        #[arg(long = "type")]
        activity_type: String,
        /// Task queue its workers poll.
        #[arg(long)]
        task_queue: String,
        /// Activity id (default: a random uuid).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        input: InputArgs,
        /// Limit on one attempt.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        start_to_close: Duration,
        /// Limit on all attempts together.
        #[arg(long, value_parser = parse_duration)]
        schedule_to_close: Option<Duration>,
        /// Limit on waiting in the queue for a worker that can take it (not retried). Without
        /// it, work no worker can take waits until one can.
        #[arg(long, value_parser = parse_duration)]
        schedule_to_start: Option<Duration>,
        /// Most attempts (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        /// Start it and print its ids without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Requirements, e.g. "gpu.count>=1, gpu.memory>=40GiB, prefer label.zone=a:10".
        #[arg(long, default_value = "")]
        requirements: String,
        /// Run on this worker only.
        #[arg(long)]
        worker: Option<String>,
    },
    /// Wait for a standalone activity's result.
    Result {
        #[command(flatten)]
        activity: ActivityRef,
    },
    /// Show a standalone activity's state: attempt, worker, last failure, result.
    Describe {
        #[command(flatten)]
        activity: ActivityRef,
    },
    /// List standalone activities, newest first.
    List {
        /// Only those with this status: running, completed, failed, canceled, terminated,
        /// timed_out.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        matching: RunMatchArgs,
    },
    /// Ask a standalone activity to cancel (a running attempt is told through its heartbeats).
    Cancel {
        #[command(flatten)]
        activity: ActivityRef,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a standalone activity at once.
    Terminate {
        #[command(flatten)]
        activity: ActivityRef,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args)]
pub(crate) struct ActivityRef {
    /// Activity id.
    #[arg(long = "id", short = 'a')]
    pub(crate) activity_id: String,
    /// Run id (default: the latest run).
    #[arg(long, default_value = "")]
    pub(crate) run_id: String,
}

#[derive(Subcommand)]
pub(crate) enum QueueCmd {
    /// Show a task queue's backlog and pollers.
    Describe {
        /// Task queue name.
        #[arg(long)]
        task_queue: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum ClusterCmd {
    /// The replicas, their addresses and heartbeats, and which namespaces each holds (with
    /// lease epochs and ages).
    Status,
}

#[derive(Subcommand)]
pub(crate) enum WorkersCmd {
    /// List workers: registered ones (alive or dead) and pollers that never registered.
    List,
    /// Show one worker: its capabilities, queues and state.
    Describe {
        /// The worker's identity.
        identity: String,
    },
}

/// Parses `500ms`, `10s`, `5m`, `2h` (a bare number is seconds).
/// A retention period: a duration, or "forever" (kept until deleted by hand: never).
pub(crate) fn parse_retention(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "forever" | "0" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 500ms, 10s, 5m, 2h, 7d"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}: use ms, s, m, h or d"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn parse_json_input(input: Option<&str>) -> Result<Option<pb::Payload>> {
    match input {
        None => Ok(None),
        Some(text) => {
            let value: Value = serde_json::from_str(text).with_context(|| {
                format!("--input is not valid JSON: {text:?} (quote strings: '\"text\"')")
            })?;
            Ok(Some(codec::to_payload(&value)?))
        }
    }
}
