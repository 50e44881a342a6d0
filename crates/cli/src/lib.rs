//! The `tether` command: run the server (`server`, `dev`) and operate it (`workflow`, `activity`,
//! `namespace`, `queue`, `workers`). Data goes to stdout (JSON with `--json`); logs and progress
//! go to stderr.

/// Prints a line of data on stdout. A reader that went away (`tether ... | head`) ends the
/// command quietly, as it would any Unix tool, instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::render::emit(&format!($($arg)*))
    };
}

mod activity;
mod args;
mod caps;
mod certs;
mod cluster;
mod codec;
mod codec_server;
mod dev_certs;
mod namespace;
mod queue;
mod remote;
mod render;
mod serve;
mod session;
mod status;
mod workers;
mod workflow;

pub use dev_certs::{write_dev_certs, DevCa};

use anyhow::Result;
use args::{CertsCmd, Cli, ClusterCmd, Command, WorkersCmd};
use clap::Parser;
use serde_json::json;

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

/// Runs one command; returns the process's exit code.
async fn run(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Server(args) => serve::server_cmd(&g, args).await,
        Command::Dev(args) => serve::dev_cmd(&g, args).await,
        Command::Namespace(cmd) => namespace::namespace_cmd(&g, cmd).await,
        Command::Workflow(cmd) => workflow::workflow_cmd(&g, cmd).await,
        Command::Activity(cmd) => activity::activity_cmd(&g, cmd).await,
        Command::Queue(cmd) => queue::queue_cmd(&g, cmd).await,
        Command::Workers(WorkersCmd::List) => workers::workers_list(&g).await,
        Command::Workers(WorkersCmd::Describe { identity }) => {
            workers::workers_describe(&g, identity).await
        }
        Command::Session(cmd) => session::session_cmd(&g, cmd).await,
        Command::Cluster(ClusterCmd::Status) => cluster::cluster_status(&g).await,
        Command::Status { watch } => status::status(&g, watch).await,
        Command::CodecServer {
            keys,
            listen,
            allow_remote,
            allow_origins,
        } => codec::codec_server_cmd(&g, keys, listen, allow_remote, &allow_origins).await,
        Command::Keygen { id } => codec::keygen_cmd(&g, id).await,
        Command::Certs(CertsCmd::Dev { out, clients }) => certs::certs_cmd(&g, out, clients).await,
        Command::Caps(args) => caps::caps_cmd(&g, args).await,
    }
}
