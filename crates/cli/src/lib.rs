//! The `tether` command: run the server (`server`, `dev`) and operate it (`workflow`, `activity`,
//! `namespace`, `queue`, `workers`). Data goes to stdout (JSON with `--json`); logs and progress
//! go to stderr.

mod codec_server;
mod dev_certs;

pub use dev_certs::{write_dev_certs, DevCa};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tether_sdk::client::{
    ActivityOptions, Client, ClientOptions, RetryPolicy, StandaloneActivityOptions, WorkflowOptions,
};
use tether_sdk::codec;
use tether_server::store::SyncMode;
use tether_server::{LocalServer, ServerConfig};
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
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Server address for client commands (host:port or http://host:port; env TETHER_ADDRESS,
    /// default 127.0.0.1:7233). `tether server` and `tether dev` listen on --listen instead.
    #[arg(long, global = true)]
    address: Option<String>,
    /// How long a client command keeps trying while the server cannot be reached (it is
    /// starting or restarting): connecting, and calls that are safe to repeat.
    #[arg(
        long,
        global = true,
        env = "TETHER_RETRY_FOR",
        default_value = "5s",
        value_parser = parse_duration
    )]
    retry_for: Duration,
    /// Namespace to work in.
    #[arg(
        long,
        global = true,
        env = "TETHER_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// CA certificate (PEM) that issued the server's certificate; turns TLS on.
    #[arg(long, global = true, env = "TETHER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mTLS).
    #[arg(long, global = true, env = "TETHER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "TETHER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Name to check the server certificate against (default: the address's host).
    #[arg(long, global = true, env = "TETHER_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Key file to decode encrypted payloads locally for display (history, describe, result).
    #[arg(long, global = true, env = "TETHER_KEYS")]
    keys: Option<PathBuf>,
    /// Codec server (http://host:port) that decodes payloads for display, instead of --keys.
    #[arg(long, global = true, env = "TETHER_CODEC_SERVER")]
    codec_server: Option<String>,
}

/// Where client commands connect when neither --address nor TETHER_ADDRESS says.
const DEFAULT_ADDRESS: &str = "127.0.0.1:7233";

impl Global {
    /// The server client commands connect to.
    fn server_address(&self) -> String {
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

/// Prints a line of data on stdout. A reader that went away (`tether ... | head`) ends the
/// command quietly, as it would any Unix tool, instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(&format!($($arg)*))
    };
}

fn emit(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(line.as_bytes())
        .and_then(|_| stdout.write_all(b"\n"));
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: could not write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Input for a command: JSON text (--input), or a file of it (--input-file; `-` reads stdin).
#[derive(Args, Clone, Default)]
struct InputArgs {
    /// Input as JSON text.
    #[arg(long, conflicts_with = "input_file")]
    input: Option<String>,
    /// Read the input (JSON) from this file; `-` reads it from stdin.
    #[arg(long, value_name = "PATH")]
    input_file: Option<PathBuf>,
}

impl InputArgs {
    /// The JSON text given, if any.
    fn text(&self) -> Result<Option<String>> {
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

    fn payload(&self) -> Result<Option<pb::Payload>> {
        parse_json_input(self.text()?.as_deref())
    }

    fn value(&self) -> Result<Value> {
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
enum Command {
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
    },
    /// Write a new key file with one random AES-256 key.
    Keygen {
        /// Key id.
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
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
enum SessionCmd {
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
struct CapsArgs {
    /// A declared inventory (TOML) to use instead of / in addition to detection.
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Directory whose disk's free space is reported.
    #[arg(long, default_value = ".")]
    work_dir: PathBuf,
    /// Add a label (KEY=VALUE); repeatable.
    #[arg(long = "label", value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Add a countable resource (NAME=AMOUNT); repeatable.
    #[arg(long = "resource", value_parser = parse_resource)]
    resources: Vec<(String, u64)>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn parse_resource(text: &str) -> Result<(String, u64), String> {
    let (k, v) = parse_key_value(text)?;
    let n = v
        .parse()
        .map_err(|_| format!("resource {k:?}: {v:?} is not a whole number"))?;
    Ok((k, n))
}

#[derive(Args)]
struct ServerOptionsArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7233")]
    listen: String,
    /// Longest time a poll or a result wait is held open (e.g. 60s, 500ms).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    long_poll_timeout: Duration,
    /// Largest payload accepted, in bytes.
    #[arg(long, default_value_t = tether_core::types::DEFAULT_MAX_PAYLOAD_BYTES)]
    max_payload_bytes: usize,
    /// Commit durability: `full` (fsync every commit; survives power loss) or `normal`
    /// (survives a crash of the server process).
    #[arg(long, default_value = "full")]
    sync: SyncMode,
    /// A worker without a heartbeat or poll for this long is marked dead and gets no work.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    worker_liveness_timeout: Duration,
    /// Server certificate (PEM); with --tls-key turns TLS on.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM): mTLS.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Access file (TOML) granting roles per certificate identity and namespace; whatever is
    /// not granted is denied. Needs --client-ca. Re-read on SIGHUP (a broken file changes
    /// nothing).
    #[arg(long)]
    access: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests per method and code with
    /// latencies, store commits, open runs, sessions, workers, task queue backlogs). Off unless
    /// given.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Most events one workflow run's history may hold.
    #[arg(long, default_value_t = 50_000)]
    max_history_events: u64,
    /// Most activities one workflow run may have pending at once.
    #[arg(long, default_value_t = 2_000)]
    max_pending_activities: usize,
    /// Most requests per second from one caller (certificate identity, else address); 0 = off.
    #[arg(long, default_value_t = 100_000)]
    max_requests_per_second: u32,
    /// Largest encoded size of one run's history, in bytes; appends past it are refused.
    #[arg(long, default_value_t = tether_server::DEFAULT_MAX_HISTORY_BYTES)]
    max_history_bytes: u64,
    /// How long a commit waits for another process's lock on the database before it fails
    /// (the server then refuses every request and exits, to be restarted).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    store_busy_timeout: Duration,
}

#[derive(Args)]
struct ServerArgs {
    /// Directory for the embedded SQLite store (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    #[command(flatten)]
    options: ServerOptionsArgs,
}

#[derive(Args)]
struct DevArgs {
    /// Keep data here instead of a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    options: ServerOptionsArgs,
}

#[derive(Subcommand)]
enum NamespaceCmd {
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
struct RunRef {
    /// Workflow id.
    #[arg(long = "id", short = 'w')]
    workflow_id: String,
    /// Run id (default: the latest run).
    #[arg(long, default_value = "")]
    run_id: String,
}

#[derive(Subcommand)]
enum WorkflowCmd {
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
    },
}

#[derive(Subcommand)]
enum ActivityCmd {
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
struct ActivityRef {
    /// Activity id.
    #[arg(long = "id", short = 'a')]
    activity_id: String,
    /// Run id (default: the latest run).
    #[arg(long, default_value = "")]
    run_id: String,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Show a task queue's backlog and pollers.
    Describe {
        /// Task queue name.
        #[arg(long)]
        task_queue: String,
    },
}

#[derive(Subcommand)]
enum WorkersCmd {
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
fn parse_retention(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "forever" | "0" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

/// How a retention period reads in listings.
fn retention_text(ms: u64) -> String {
    match ms {
        0 => "forever".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
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

fn parse_json_input(input: Option<&str>) -> Result<Option<pb::Payload>> {
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

fn payload_json(p: Option<&pb::Payload>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => match codec::encoding_of(p).as_str() {
            codec::JSON_ENCODING | "" => serde_json::from_slice(&p.data).unwrap_or_else(
                |_| json!({ "undecodable_json": String::from_utf8_lossy(&p.data) }),
            ),
            codec::ENCRYPTED_ENCODING => json!({
                "encoding": codec::ENCRYPTED_ENCODING,
                "key_id": p.metadata.get(codec::KEY_ID_KEY).map(|v| String::from_utf8_lossy(v).into_owned()),
                "bytes": p.data.len(),
            }),
            enc => json!({ "encoding": enc, "bytes": p.data.len() }),
        },
    }
}

fn failure_json(f: Option<&pb::Failure>) -> Value {
    match f {
        None => Value::Null,
        Some(f) => json!({
            "message": f.message,
            "error_type": f.error_type,
            "non_retryable": f.non_retryable,
            "kind": pb::FailureKind::try_from(f.kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN"),
            "timeout_type": f.timeout_type,
            "cause": failure_json(f.cause.as_deref()),
        }),
    }
}

fn time_text(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since epoch (Howard Hinnant's algorithm), to avoid a date dependency.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

fn status_name(raw: i32) -> &'static str {
    pb::ExecutionStatus::try_from(raw)
        .unwrap_or_default()
        .short_name()
}

fn execution_json(e: &pb::ExecutionInfo) -> Value {
    json!({
        "namespace": e.namespace,
        "workflow_id": e.workflow_id,
        "run_id": e.run_id,
        "type": e.workflow_type,
        "task_queue": e.task_queue,
        "status": status_name(e.status),
        "start_time": time_text(e.start_ms),
        "close_time": if e.close_ms > 0 { json!(time_text(e.close_ms)) } else { Value::Null },
        "history_length": e.history_length,
        "kind": e.kind,
    })
}

fn event_json(e: &pb::HistoryEvent) -> Value {
    use pb::history_event::Attributes as A;
    let details = match &e.attributes {
        Some(A::WorkflowExecutionStarted(a)) => {
            json!({"workflow_type": a.workflow_type, "task_queue": a.task_queue, "input": payload_json(a.input.as_ref())})
        }
        Some(A::WorkflowTaskCompleted(a)) => json!({"identity": a.identity}),
        Some(A::ActivityTaskScheduled(a)) => {
            json!({"seq": a.seq, "activity_id": a.activity_id, "activity_type": a.activity_type, "input": payload_json(a.input.as_ref()), "task_queue": a.options.as_ref().map(|o| o.task_queue.clone())})
        }
        Some(A::ActivityTaskCompleted(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "identity": a.identity, "result": payload_json(a.result.as_ref())})
        }
        Some(A::ActivityTaskFailed(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "identity": a.identity, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::ActivityTaskTimedOut(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id, "attempt": a.attempt, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::ActivityTaskCanceled(a)) => {
            json!({"seq": a.seq, "scheduled_event_id": a.scheduled_event_id})
        }
        Some(A::ActivityCancelRequested(a)) => json!({"seq": a.seq}),
        Some(A::TimerStarted(a)) => json!({"seq": a.seq, "duration_ms": a.duration_ms}),
        Some(A::TimerFired(a)) => json!({"seq": a.seq}),
        Some(A::TimerCanceled(a)) => json!({"seq": a.seq}),
        Some(A::WorkflowSignaled(a)) => {
            json!({"signal_name": a.signal_name, "input": payload_json(a.input.as_ref()), "identity": a.identity})
        }
        Some(A::WorkflowCancelRequested(a)) => json!({"reason": a.reason, "identity": a.identity}),
        Some(A::MarkerRecorded(a)) => {
            json!({"seq": a.seq, "marker_name": a.marker_name, "data": payload_json(a.data.as_ref())})
        }
        Some(A::SignalExternalInitiated(a)) => {
            json!({"seq": a.seq, "namespace": a.namespace, "workflow_id": a.workflow_id, "signal_name": a.signal_name})
        }
        Some(A::SignalExternalResolved(a)) => {
            json!({"seq": a.seq, "failure": failure_json(a.failure.as_ref())})
        }
        Some(A::SessionCreateRequested(a)) => {
            json!({"seq": a.seq, "session_id": a.session_id, "options": a.options.as_ref().map(|o| json!({"task_queue": o.task_queue, "requirements": o.requirements, "gpus": o.gpus, "resources": o.resources, "worker": o.worker}))})
        }
        Some(A::SessionCreated(a)) => {
            json!({"seq": a.seq, "session": a.session.as_ref().map(session_json)})
        }
        Some(A::SessionCreateFailed(a)) => {
            json!({"seq": a.seq, "session_id": a.session_id, "reason": a.reason})
        }
        Some(A::SessionCompleteRequested(a)) => json!({"seq": a.seq, "session_id": a.session_id}),
        Some(A::SessionEnded(a)) => {
            json!({"session_id": a.session_id, "state": a.state, "reason": a.reason})
        }
        Some(A::WorkflowExecutionCompleted(a)) => {
            json!({"result": payload_json(a.result.as_ref())})
        }
        Some(A::WorkflowExecutionFailed(a)) => json!({"failure": failure_json(a.failure.as_ref())}),
        Some(A::WorkflowExecutionCanceled(_)) => json!({}),
        Some(A::WorkflowExecutionTerminated(a)) => {
            json!({"reason": a.reason, "identity": a.identity})
        }
        Some(A::WorkflowExecutionTimedOut(_)) => json!({}),
        None => json!({}),
    };
    json!({ "event_id": e.event_id, "time": time_text(e.time_ms), "type": e.kind_name(), "details": details })
}

fn caps_json(c: &pb::Capabilities) -> Value {
    let h = c.host.clone().unwrap_or_default();
    json!({
        "host": {
            "hostname": h.hostname, "os": h.os, "kernel": h.kernel, "arch": h.arch,
            "cpu_model": h.cpu_model, "logical_cores": h.logical_cores, "physical_cores": h.physical_cores,
            "memory_total_bytes": h.memory_total_bytes, "memory_available_bytes": h.memory_available_bytes,
            "disk_free_bytes": h.disk_free_bytes, "work_dir": h.work_dir,
        },
        "gpus": c.gpus.iter().map(|g| json!({
            "index": g.index, "uuid": g.uuid, "name": g.name,
            "memory_total_bytes": g.memory_total_bytes, "memory_free_bytes": g.memory_free_bytes,
            "compute_capability": format!("{}.{}", g.compute_major, g.compute_minor),
            "pci_bus_id": g.pci_bus_id, "mig_mode": g.mig_mode,
            "utilization_percent": if g.utilization_percent >= 0 { json!(g.utilization_percent) } else { Value::Null },
            "source": g.source,
        })).collect::<Vec<_>>(),
        "gpu_driver_version": c.gpu_driver_version,
        "cuda_driver_version": c.cuda_driver_version,
        "gpu_note": c.gpu_note,
        "interfaces": c.interfaces.iter().map(|i| json!({"name": i.name, "addresses": i.addresses})).collect::<Vec<_>>(),
        "network": c.network,
        "credentials": c.credentials,
        "labels": c.labels,
        "resources": c.resources,
    })
}

fn worker_json(w: &pb::WorkerInfo) -> Value {
    json!({
        "identity": w.identity, "state": w.state, "task_queues": w.task_queues,
        "host_queue": w.host_queue, "registered": time_text(w.registered_ms),
        "last_seen": time_text(w.last_seen_ms),
        "capabilities": w.capabilities.as_ref().map(caps_json),
    })
}

fn print_caps(c: &pb::Capabilities) {
    use tether_sdk::caps::requirements::human_bytes;
    let h = c.host.clone().unwrap_or_default();
    out!(
        "host:          {} ({}, kernel {}, {})",
        h.hostname,
        h.os,
        h.kernel,
        h.arch
    );
    out!(
        "cpu:           {} ({} logical, {} physical cores)",
        h.cpu_model,
        h.logical_cores,
        h.physical_cores
    );
    out!(
        "memory:        {} total, {} available",
        human_bytes(h.memory_total_bytes),
        human_bytes(h.memory_available_bytes)
    );
    out!(
        "disk:          {} free at {}",
        human_bytes(h.disk_free_bytes),
        h.work_dir
    );
    if c.gpus.is_empty() {
        out!(
            "gpus:          none ({})",
            if c.gpu_note.is_empty() {
                "no devices"
            } else {
                &c.gpu_note
            }
        );
    } else {
        if !c.gpu_driver_version.is_empty() {
            out!(
                "gpu driver:    {} (CUDA {})",
                c.gpu_driver_version,
                c.cuda_driver_version
            );
        }
        for g in &c.gpus {
            out!(
                "GPU {}: {} (UUID: {}) {}, compute {}.{}, source: {}",
                g.index,
                g.name,
                g.uuid,
                human_bytes(g.memory_total_bytes),
                g.compute_major,
                g.compute_minor,
                g.source
            );
        }
        if !c.gpu_note.is_empty() {
            out!("               {}", c.gpu_note);
        }
    }
    let ifaces: Vec<String> = c
        .interfaces
        .iter()
        .map(|i| format!("{} {}", i.name, i.addresses.join(" ")))
        .collect();
    out!("interfaces:    {}", ifaces.join("; "));
    out!(
        "network:       {}",
        if c.network.is_empty() {
            "-".to_string()
        } else {
            c.network.join(", ")
        }
    );
    out!(
        "credentials:   {}",
        if c.credentials.is_empty() {
            "-".to_string()
        } else {
            c.credentials.join(", ")
        }
    );
    let labels: Vec<String> = c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out!(
        "labels:        {}",
        if labels.is_empty() {
            "-".to_string()
        } else {
            labels.join(", ")
        }
    );
    let res: Vec<String> = c
        .resources
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out!(
        "resources:     {}",
        if res.is_empty() {
            "-".to_string()
        } else {
            res.join(", ")
        }
    );
}

fn session_json(s: &pb::SessionInfo) -> Value {
    let o = s.options.clone().unwrap_or_default();
    json!({
        "session_id": s.session_id,
        "state": s.state,
        "owner": s.owner,
        "worker": s.worker_identity,
        "host": s.hostname,
        "host_queue": s.host_queue,
        "gpus": s.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "name": g.name, "memory_total_bytes": g.memory_total_bytes})).collect::<Vec<_>>(),
        "resources": s.resources,
        "requirements": o.requirements,
        "requested_gpus": o.gpus,
        "task_queue": o.task_queue,
        "created": time_text(s.created_ms),
        "closed": if s.closed_ms > 0 { json!(time_text(s.closed_ms)) } else { Value::Null },
        "age_seconds": if s.closed_ms > 0 { (s.closed_ms - s.created_ms) / 1000 } else { (tether_wire::now_ms() - s.created_ms) / 1000 },
        "activities_run": s.activities_run,
        "reason": s.reason,
    })
}

/// Decodes payloads for display with --keys (locally) or --codec-server; without either,
/// encrypted payloads are shown as such (with their key id).
async fn decode_for_display(g: &Global, payloads: Vec<&mut pb::Payload>) -> Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    if let Some(path) = &g.keys {
        let dc = codec::DataConverter::default()
            .with_codec(std::sync::Arc::new(codec::AesGcmCodec::from_file(path)?));
        for p in payloads {
            *p = dc.decode(p.clone())?;
        }
    } else if let Some(url) = &g.codec_server {
        let owned: Vec<pb::Payload> = payloads.iter().map(|p| (**p).clone()).collect();
        let decoded = crate::codec_server::decode_remote(url, &owned)
            .await
            .map_err(anyhow::Error::msg)?;
        for (slot, p) in payloads.into_iter().zip(decoded) {
            *slot = p;
        }
    }
    Ok(())
}

fn print_json(v: &Value) {
    out!("{}", serde_json::to_string_pretty(v).expect("json"));
}

async fn connect(g: &Global) -> Result<Client> {
    let tls = if g.tls_ca.is_some() || g.tls_cert.is_some() || g.tls_key.is_some() {
        Some(tether_core::tls::ClientTls::from_files(
            g.tls_ca.as_deref(),
            g.tls_cert.as_deref(),
            g.tls_key.as_deref(),
            g.tls_server_name.clone(),
        )?)
    } else {
        None
    };
    Ok(Client::connect_with(
        g.server_address(),
        ClientOptions {
            namespace: g.namespace.clone(),
            tls,
            retry_for: g.retry_for,
            ..Default::default()
        },
    )
    .await?)
}

fn server_config(o: &ServerOptionsArgs) -> Result<ServerConfig> {
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

async fn serve(
    o: &ServerOptionsArgs,
    data_dir: &std::path::Path,
    config: ServerConfig,
) -> Result<()> {
    let listen = &o.listen;
    let access_file = o.access.as_deref();
    // The metrics listener comes up first so a bad address fails before the server starts.
    let metrics = match &o.metrics_listen {
        Some(addr) => Some(start_metrics(addr).await?),
        None => None,
    };
    let server = LocalServer::start(listen, data_dir, config)
        .await
        .with_context(|| format!("starting the server on {listen}"))?;
    tracing::info!(address = %server.addr(), data_dir = %data_dir.display(), "tether server listening");
    eprintln!(
        "tether server listening on {} (data in {}); Ctrl-C to stop",
        server.addr(),
        data_dir.display()
    );
    if let Some((addr, _)) = &metrics {
        eprintln!("metrics on http://{addr}/metrics");
    }
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

/// The exit status of a server whose store failed a write.
const STORAGE_FAILED_EXIT: i32 = 3;

/// Installs the Prometheus recorder and serves `GET /metrics` on `addr` (port 0: any free port).
async fn start_metrics(addr: &str) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
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
async fn reload_access_on_hangup(server: &LocalServer, path: &std::path::Path) {
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

async fn shutdown_signal() {
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

/// Runs the command line and exits with its status (the `tether` binary's whole `main`).
#[tokio::main]
pub async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,tether=info,tether_server=info,tether_sdk=info,tether_cli=info".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.global.json;
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One report, on stderr: as JSON under --json, so a script reads it the same way
            // it reads data.
            let code = e
                .downcast_ref::<tether_sdk::client::ClientError>()
                .and_then(|c| c.code())
                .map(tether_sdk::client::code_name);
            if json {
                eprintln!(
                    "{}",
                    json!({"error": {"message": format!("{e:#}"), "code": code}})
                );
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::exit(1);
        }
    }
}

/// `tether server` and `tether dev` listen on --listen; an --address there is a mistake for
/// it, and silently listening elsewhere would hide that.
fn refuse_address_for_servers(g: &Global, command: &str) -> Result<()> {
    if let Some(address) = &g.address {
        bail!(
            "tether {command} listens on --listen (default 127.0.0.1:7233); --address names the \
             server that client commands connect to. To listen on {address}, pass --listen \
             {address}"
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Server(args) => {
            refuse_address_for_servers(&g, "server")?;
            let config = server_config(&args.options)?;
            serve(&args.options, &args.data_dir, config).await?;
        }
        Command::Dev(args) => {
            refuse_address_for_servers(&g, "dev")?;
            let config = server_config(&args.options)?;
            match &args.data_dir {
                Some(dir) => serve(&args.options, dir, config).await?,
                None => {
                    let dir = tempfile::Builder::new().prefix("tether-dev-").tempdir()?;
                    serve(&args.options, dir.path(), config).await?;
                }
            }
        }
        Command::Namespace(cmd) => {
            let client = connect(&g).await?;
            match cmd {
                NamespaceCmd::Create {
                    name,
                    description,
                    retention,
                } => {
                    client
                        .register_namespace_with_retention(&name, &description, retention)
                        .await?;
                    let retention = retention_text(retention.as_millis() as u64);
                    if g.json {
                        print_json(&json!({ "namespace": name, "retention": retention }));
                    } else {
                        out!("namespace {name} created (closed runs kept {retention})");
                    }
                }
                NamespaceCmd::Update {
                    name,
                    description,
                    retention,
                } => {
                    if description.is_none() && retention.is_none() {
                        bail!("nothing to change: give --description and/or --retention");
                    }
                    let n = client
                        .update_namespace(&name, description.as_deref(), retention)
                        .await?;
                    let retention = retention_text(n.retention_ms);
                    if g.json {
                        print_json(
                            &json!({"name": n.name, "description": n.description, "retention": retention}),
                        );
                    } else {
                        out!(
                            "namespace {} updated (closed runs kept {retention})",
                            n.name
                        );
                    }
                }
                NamespaceCmd::List => {
                    let list = client.list_namespaces().await?;
                    if g.json {
                        print_json(&Value::Array(
                            list.iter()
                                .map(|n| json!({"name": n.name, "description": n.description, "created": time_text(n.created_ms), "retention": retention_text(n.retention_ms)}))
                                .collect(),
                        ));
                    } else {
                        out!("{:<24} {:<10} DESCRIPTION", "NAME", "RETENTION");
                        for n in list {
                            out!(
                                "{:<24} {:<10} {}",
                                n.name,
                                retention_text(n.retention_ms),
                                n.description
                            );
                        }
                    }
                }
            }
        }
        Command::Workflow(cmd) => return workflow_cmd(&g, cmd).await,
        Command::Activity(cmd) => return activity_cmd(&g, cmd).await,
        Command::Queue(QueueCmd::Describe { task_queue }) => {
            let client = connect(&g).await?;
            let q = client.describe_task_queue(&task_queue).await?;
            if g.json {
                print_json(&json!({
                    "task_queue": task_queue,
                    "workflow_backlog": q.workflow_backlog,
                    "activity_backlog": q.activity_backlog,
                    "pollers": q.pollers.iter().map(|p| json!({"identity": p.identity, "kind": p.kind, "state": p.state, "last_poll": time_text(p.last_poll_ms)})).collect::<Vec<_>>(),
                    "requirement_backlogs": q.requirement_backlogs.iter().map(|b| json!({
                        "requirements": b.requirements, "tasks": b.tasks,
                        "unplaceable": b.unplaceable, "explanation": b.explanation,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                out!("task queue:        {task_queue}");
                out!("workflow backlog:  {}", q.workflow_backlog);
                out!("activity backlog:  {}", q.activity_backlog);
                out!("pollers:");
                for p in &q.pollers {
                    out!(
                        "  {:<32} {:<9} {:<13} last poll {}",
                        p.identity,
                        p.kind,
                        p.state,
                        time_text(p.last_poll_ms)
                    );
                }
                if !q.requirement_backlogs.is_empty() {
                    out!("waiting activities by requirements:");
                    for b in &q.requirement_backlogs {
                        let reqs = if b.requirements.is_empty() {
                            "(none)"
                        } else {
                            b.requirements.as_str()
                        };
                        out!("  {:>6}  {reqs}", b.tasks);
                        if b.unplaceable {
                            out!("          unplaceable: {}", b.explanation);
                        }
                    }
                }
            }
        }
        Command::Workers(WorkersCmd::List) => {
            let client = connect(&g).await?;
            let workers = client.list_workers().await?;
            if g.json {
                print_json(&Value::Array(workers.iter().map(worker_json).collect()));
            } else {
                out!(
                    "{:<32} {:<13} {:<26} {:<6} TASK QUEUES",
                    "IDENTITY",
                    "STATE",
                    "LAST SEEN",
                    "GPUS"
                );
                for w in workers {
                    let gpus = w.capabilities.as_ref().map(|c| c.gpus.len()).unwrap_or(0);
                    out!(
                        "{:<32} {:<13} {:<26} {:<6} {}",
                        w.identity,
                        w.state,
                        time_text(w.last_seen_ms),
                        gpus,
                        w.task_queues.join(",")
                    );
                }
            }
        }
        Command::Workers(WorkersCmd::Describe { identity }) => {
            let client = connect(&g).await?;
            let w = client
                .raw()
                .describe_worker(pb::DescribeWorkerRequest {
                    namespace: g.namespace.clone(),
                    identity,
                })
                .await
                .map_err(tether_sdk::client::ClientError::from)?
                .into_inner()
                .worker
                .unwrap_or_default();
            if g.json {
                print_json(&worker_json(&w));
            } else {
                out!("identity:      {}", w.identity);
                out!("state:         {}", w.state);
                out!("registered:    {}", time_text(w.registered_ms));
                out!("last seen:     {}", time_text(w.last_seen_ms));
                out!("task queues:   {}", w.task_queues.join(", "));
                out!("host queue:    {}", w.host_queue);
                if let Some(caps) = &w.capabilities {
                    print_caps(caps);
                }
            }
        }
        Command::Session(cmd) => {
            let client = connect(&g).await?;
            match cmd {
                SessionCmd::Terminate { session_id, reason } => {
                    let s = client.terminate_session(&session_id, &reason).await?;
                    if g.json {
                        print_json(&session_json(&s));
                    } else {
                        out!("session {} terminated: {}", s.session_id, s.reason);
                    }
                }
                SessionCmd::List { all } => {
                    let sessions = client.list_sessions(all).await?;
                    if g.json {
                        print_json(&Value::Array(sessions.iter().map(session_json).collect()));
                    } else {
                        out!(
                            "{:<40} {:<10} {:<16} {:<10} {:>8} {:>5}  OWNER",
                            "SESSION",
                            "STATE",
                            "WORKER",
                            "GPUS",
                            "AGE(s)",
                            "ACTS"
                        );
                        for s in sessions {
                            let v = session_json(&s);
                            let gpus: Vec<String> =
                                s.gpus.iter().map(|g| g.index.to_string()).collect();
                            out!(
                                "{:<40} {:<10} {:<16} {:<10} {:>8} {:>5}  {}",
                                s.session_id,
                                s.state,
                                s.worker_identity,
                                gpus.join(","),
                                v["age_seconds"],
                                s.activities_run,
                                s.owner
                            );
                        }
                    }
                }
                SessionCmd::Describe { session_id } => {
                    let s = client.describe_session(&session_id).await?;
                    if g.json {
                        print_json(&session_json(&s));
                    } else {
                        let v = session_json(&s);
                        out!("session:         {}", s.session_id);
                        out!("state:           {}", s.state);
                        out!("owner:           {}", s.owner);
                        out!(
                            "worker:          {} (host {})",
                            s.worker_identity,
                            s.hostname
                        );
                        for gpu in &s.gpus {
                            out!("gpu:             {} {} ({})", gpu.index, gpu.name, gpu.uuid);
                        }
                        for (k, n) in &s.resources {
                            out!("resource:        {k}={n}");
                        }
                        out!(
                            "requirements:    {}",
                            v["requirements"].as_str().unwrap_or("")
                        );
                        out!("created:         {}", time_text(s.created_ms));
                        out!("age:             {} s", v["age_seconds"]);
                        out!("activities run:  {}", s.activities_run);
                        if !s.reason.is_empty() {
                            let label = if s.state == "creating" {
                                "waiting because"
                            } else {
                                "reason"
                            };
                            out!("{label}: {}", s.reason);
                        }
                    }
                }
            }
        }
        Command::CodecServer {
            keys,
            listen,
            allow_remote,
        } => {
            let dc = codec::DataConverter::default()
                .with_codec(std::sync::Arc::new(codec::AesGcmCodec::from_file(&keys)?));
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("could not listen on {listen}"))?;
            let bound = listener.local_addr()?;
            if !bound.ip().is_loopback() && !allow_remote {
                bail!(
                    "--listen {listen} is reachable from other machines, and the codec server \
                     decrypts for anyone who asks (plain HTTP, no authentication); listen on \
                     127.0.0.1 or ::1, or pass --allow-remote if a TLS proxy that authenticates \
                     callers stands in front of it"
                );
            }
            eprintln!(
                "tether codec server listening on {} (POST /encode, /decode); Ctrl-C to stop",
                listener.local_addr()?
            );
            crate::codec_server::serve(listener, dc, shutdown_signal()).await?;
        }
        Command::Keygen { id } => {
            // Loadable as it is, and appended to an existing file (`>> keys.txt`) for rotation.
            out!("# tether payload key {id} (the first key, or the one named by active = ID, encrypts)");
            out!("{id} = {}", codec::AesGcmCodec::generate_key_hex());
        }
        Command::Certs(CertsCmd::Dev { out, clients }) => {
            let names: Vec<&str> = clients.iter().map(String::as_str).collect();
            let files = crate::dev_certs::write_dev_certs(&out, &names)?;
            if g.json {
                print_json(&Value::Array(
                    files
                        .iter()
                        .map(|f| json!(f.display().to_string()))
                        .collect(),
                ));
            } else {
                for f in &files {
                    out!("{}", f.display());
                }
                eprintln!(
                    "try it:\n  tether server --data-dir DIR --tls-cert {0}/server.pem --tls-key {0}/server.key --client-ca {0}/ca.pem\n  tether --tls-ca {0}/ca.pem --tls-cert {0}/client.pem --tls-key {0}/client.key namespace list",
                    out.display()
                );
            }
        }
        Command::Caps(args) => {
            let mut source = tether_sdk::caps::CapabilitySource::detect().work_dir(args.work_dir);
            if let Some(path) = &args.inventory {
                source = source.with_inventory(tether_sdk::caps::Inventory::load(path)?);
            }
            for (k, v) in args.labels {
                source = source.label(k, v);
            }
            for (k, n) in args.resources {
                source = source.resource(k, n);
            }
            let caps = tokio::task::spawn_blocking(move || source.snapshot()).await?;
            if g.json {
                print_json(&caps_json(&caps));
            } else {
                print_caps(&caps);
            }
        }
    }
    Ok(0)
}

/// Prints a run's outcome (`what`: workflow or activity); the exit code says whether it
/// completed.
fn print_outcome(g: &Global, what: &str, id: &str, outcome: &pb::GetWorkflowResultResponse) -> i32 {
    let status = pb::ExecutionStatus::try_from(outcome.status).unwrap_or_default();
    if g.json {
        let mut v = json!({
            "run_id": outcome.run_id,
            "status": status.short_name(),
            "result": payload_json(outcome.result.as_ref()),
            "failure": failure_json(outcome.failure.as_ref()),
        });
        v[format!("{what}_id")] = json!(id);
        print_json(&v);
    } else if status == pb::ExecutionStatus::Completed {
        out!("{}", codec::display_payload(outcome.result.as_ref()));
    } else {
        eprintln!(
            "{what} {id} {}: {}",
            status.short_name(),
            outcome
                .failure
                .as_ref()
                .map(|f| f.message.as_str())
                .unwrap_or("")
        );
    }
    if status == pb::ExecutionStatus::Completed {
        0
    } else {
        2
    }
}

async fn workflow_cmd(g: &Global, cmd: WorkflowCmd) -> Result<i32> {
    let client = connect(g).await?;
    match cmd {
        WorkflowCmd::Start {
            workflow_type,
            task_queue,
            id,
            input,
            run_timeout,
            wait,
        } => {
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut options = WorkflowOptions::new(id.clone(), task_queue);
            options.run_timeout = run_timeout;
            let handle = client
                .start_workflow_raw(&workflow_type, input.payload()?, options)
                .await?;
            if wait {
                eprintln!(
                    "started workflow {id} (run {}); waiting for the result",
                    handle.run_id
                );
                let outcome = handle.outcome().await?;
                return Ok(print_outcome(g, "workflow", &id, &outcome));
            }
            if g.json {
                print_json(&json!({"workflow_id": id, "run_id": handle.run_id}));
            } else {
                out!("workflow id: {id}\nrun id:      {}", handle.run_id);
            }
        }
        WorkflowCmd::Result { run } => {
            let handle = client.workflow_handle(&run.workflow_id, &run.run_id);
            let mut outcome = handle.outcome().await?;
            decode_for_display(g, outcome.result.iter_mut().collect()).await?;
            return Ok(print_outcome(g, "workflow", &run.workflow_id, &outcome));
        }
        WorkflowCmd::Describe { run } => {
            let mut d = client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .describe()
                .await?;
            decode_for_display(g, d.result.iter_mut().collect()).await?;
            let info = d.info.clone().unwrap_or_default();
            if g.json {
                let mut v = execution_json(&info);
                v["pending_activities"] = Value::Array(
                    d.pending_activities
                        .iter()
                        .map(|a| json!({
                            "activity_id": a.activity_id, "activity_type": a.activity_type, "state": a.state,
                            "attempt": a.attempt, "task_queue": a.task_queue, "last_worker": a.last_worker,
                            "last_failure": failure_json(a.last_failure.as_ref()),
                            "next_attempt": if a.next_attempt_ms > 0 { json!(time_text(a.next_attempt_ms)) } else { Value::Null },
                        }))
                        .collect(),
                );
                v["pending_timers"] = json!(d.pending_timers);
                v["workflow_task_failures"] = json!(d.workflow_task_failures);
                v["last_workflow_task_failure"] = match &d.last_workflow_task_failure {
                    Some(f) => {
                        json!({"cause": f.cause, "message": f.message, "attempt": f.attempt, "identity": f.identity, "time": time_text(f.time_ms)})
                    }
                    None => Value::Null,
                };
                v["result"] = payload_json(d.result.as_ref());
                v["failure"] = failure_json(d.failure.as_ref());
                print_json(&v);
            } else {
                out!("workflow id:     {}", info.workflow_id);
                out!("run id:          {}", info.run_id);
                out!("kind:            {}", info.kind);
                out!("type:            {}", info.workflow_type);
                out!("task queue:      {}", info.task_queue);
                out!("status:          {}", status_name(info.status));
                out!("started:         {}", time_text(info.start_ms));
                out!("closed:          {}", time_text(info.close_ms));
                out!("history length:  {}", info.history_length);
                out!("pending timers:  {}", d.pending_timers);
                out!("task failures:   {}", d.workflow_task_failures);
                if let Some(f) = &d.last_workflow_task_failure {
                    out!(
                        "last workflow task failure ({}, attempt {}, worker {}):\n  {}",
                        f.cause,
                        f.attempt,
                        f.identity,
                        f.message
                    );
                }
                if !d.pending_activities.is_empty() {
                    out!("pending activities:");
                    for a in &d.pending_activities {
                        out!(
                            "  #{:<3} {:<20} {:<16} attempt {:<3} queue {:<16} worker {}{}",
                            a.seq,
                            a.activity_type,
                            a.state,
                            a.attempt,
                            a.task_queue,
                            a.last_worker,
                            a.last_failure
                                .as_ref()
                                .map(|f| format!(" (last failure: {})", f.message))
                                .unwrap_or_default()
                        );
                    }
                }
                if d.result.is_some() {
                    out!(
                        "result:          {}",
                        codec::display_payload(d.result.as_ref())
                    );
                }
                if let Some(f) = &d.failure {
                    out!("failure:         {}", f.message);
                }
            }
        }
        WorkflowCmd::History { run } => {
            let mut events = client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .history()
                .await?;
            decode_for_display(g, codec::event_payloads_mut(&mut events)).await?;
            if g.json {
                print_json(&Value::Array(events.iter().map(event_json).collect()));
            } else {
                for e in &events {
                    let v = event_json(e);
                    out!(
                        "{:>4}  {}  {:<28} {}",
                        e.event_id,
                        time_text(e.time_ms),
                        e.kind_name(),
                        v["details"]
                    );
                }
            }
        }
        WorkflowCmd::Signal { run, name, input } => {
            let value = input.value()?;
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .signal(&name, &value)
                .await?;
            if g.json {
                print_json(&json!({"signaled": run.workflow_id, "signal": name}));
            } else {
                out!("signal {name} sent to {}", run.workflow_id);
            }
        }
        WorkflowCmd::Cancel { run, reason } => {
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .cancel(&reason)
                .await?;
            if g.json {
                print_json(&json!({"cancel_requested": run.workflow_id}));
            } else {
                out!("cancellation requested for {}", run.workflow_id);
            }
        }
        WorkflowCmd::Terminate { run, reason } => {
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .terminate(&reason)
                .await?;
            if g.json {
                print_json(&json!({"terminated": run.workflow_id}));
            } else {
                out!("terminated {}", run.workflow_id);
            }
        }
        WorkflowCmd::List { status, limit } => {
            list_runs(g, &client, status, limit, false).await?;
        }
    }
    Ok(0)
}

/// `workflow list` and `activity list`: runs newest first, with an optional status filter.
async fn list_runs(
    g: &Global,
    client: &Client,
    status: Option<String>,
    limit: u32,
    activities: bool,
) -> Result<()> {
    let status = match status {
        None => None,
        Some(s) => Some(pb::ExecutionStatus::from_short_name(&s).with_context(|| {
            format!("--status {s:?} is not known: use running, completed, failed, canceled, terminated or timed_out")
        })?),
    };
    let runs = client.list_workflows(status, limit, activities).await?;
    if g.json {
        print_json(&Value::Array(runs.iter().map(execution_json).collect()));
        return Ok(());
    }
    let id = if activities {
        "ACTIVITY ID"
    } else {
        "WORKFLOW ID"
    };
    out!(
        "{:<36} {:<20} {:<11} {:<26} RUN ID",
        id,
        "TYPE",
        "STATUS",
        "STARTED"
    );
    for r in runs {
        out!(
            "{:<36} {:<20} {:<11} {:<26} {}",
            r.workflow_id,
            r.workflow_type,
            status_name(r.status),
            time_text(r.start_ms),
            r.run_id
        );
    }
    Ok(())
}

async fn activity_cmd(g: &Global, cmd: ActivityCmd) -> Result<i32> {
    match cmd {
        ActivityCmd::Execute {
            activity_type,
            task_queue,
            id,
            input,
            start_to_close,
            schedule_to_close,
            schedule_to_start,
            max_attempts,
            no_wait,
            requirements,
            worker,
        } => {
            let requirements = tether_sdk::caps::Requirements::parse(&requirements)
                .map_err(|e| anyhow::anyhow!("--requirements: {e}"))?;
            let input = input.value()?;
            let client = connect(g).await?;
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut options = StandaloneActivityOptions::new(id.clone(), task_queue);
            options.options = ActivityOptions {
                start_to_close: Some(start_to_close),
                schedule_to_close,
                schedule_to_start,
                retry: RetryPolicy {
                    maximum_attempts: max_attempts,
                    ..Default::default()
                },
                requirements,
                worker,
                ..Default::default()
            };
            let handle = client
                .start_activity(&activity_type, &input, options)
                .await?;
            eprintln!("started activity {id} (run {})", handle.run_id);
            if !handle.placement_note.is_empty() {
                eprintln!(
                    "waiting: {}{}",
                    handle.placement_note,
                    if schedule_to_start.is_none() {
                        " (give --schedule-to-start to stop waiting after a while)"
                    } else {
                        ""
                    }
                );
            }
            if no_wait {
                if g.json {
                    print_json(&json!({"activity_id": id, "run_id": handle.run_id}));
                } else {
                    out!("{id} {}", handle.run_id);
                }
                return Ok(0);
            }
            let mut outcome = handle.outcome().await?;
            decode_for_display(g, outcome.result.iter_mut().collect()).await?;
            Ok(print_outcome(g, "activity", &id, &outcome))
        }
        ActivityCmd::Result { activity } => {
            let client = connect(g).await?;
            let mut outcome = client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .outcome()
                .await?;
            decode_for_display(g, outcome.result.iter_mut().collect()).await?;
            Ok(print_outcome(
                g,
                "activity",
                &activity.activity_id,
                &outcome,
            ))
        }
        ActivityCmd::Describe { activity } => {
            let client = connect(g).await?;
            let mut d = client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .describe()
                .await?;
            decode_for_display(g, d.result.iter_mut().collect()).await?;
            let info = d.info.clone().unwrap_or_default();
            let pending = d.pending_activities.first();
            if g.json {
                let mut v = execution_json(&info);
                v["attempt"] = json!(pending.map(|a| a.attempt));
                v["state"] = json!(pending.map(|a| a.state.clone()));
                v["last_worker"] = json!(pending.map(|a| a.last_worker.clone()));
                v["last_failure"] = failure_json(pending.and_then(|a| a.last_failure.as_ref()));
                v["result"] = payload_json(d.result.as_ref());
                v["failure"] = failure_json(d.failure.as_ref());
                print_json(&v);
            } else {
                out!("activity id:     {}", info.workflow_id);
                out!("run id:          {}", info.run_id);
                out!("type:            {}", info.workflow_type);
                out!("task queue:      {}", info.task_queue);
                out!("status:          {}", status_name(info.status));
                out!("started:         {}", time_text(info.start_ms));
                out!("closed:          {}", time_text(info.close_ms));
                if let Some(a) = pending {
                    out!("attempt:         {} ({})", a.attempt, a.state);
                    out!("worker:          {}", a.last_worker);
                    if let Some(f) = &a.last_failure {
                        out!("last failure:    {}", f.message);
                    }
                }
                if d.result.is_some() {
                    out!(
                        "result:          {}",
                        codec::display_payload(d.result.as_ref())
                    );
                }
                if let Some(f) = &d.failure {
                    out!("failure:         {}", f.message);
                }
            }
            Ok(0)
        }
        ActivityCmd::List { status, limit } => {
            let client = connect(g).await?;
            list_runs(g, &client, status, limit, true).await?;
            Ok(0)
        }
        ActivityCmd::Cancel { activity, reason } => {
            let client = connect(g).await?;
            client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .cancel(&reason)
                .await?;
            if g.json {
                print_json(&json!({"cancel_requested": activity.activity_id}));
            } else {
                out!("cancellation requested for {}", activity.activity_id);
            }
            Ok(0)
        }
        ActivityCmd::Terminate { activity, reason } => {
            let client = connect(g).await?;
            client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .terminate(&reason)
                .await?;
            if g.json {
                print_json(&json!({"terminated": activity.activity_id}));
            } else {
                out!("terminated {}", activity.activity_id);
            }
            Ok(0)
        }
    }
}
