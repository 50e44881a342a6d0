//! `tether session`: list, describe, complete and terminate sessions.

use crate::args::Global;
use crate::args::SessionCmd;
use crate::remote::connect;
use crate::render::print_json;
use crate::render::session_json;
use crate::render::time_text;
use anyhow::Result;
use serde_json::Value;

pub(crate) async fn session_cmd(g: &Global, cmd: SessionCmd) -> Result<i32> {
    let client = connect(g).await?;
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
                    let gpus: Vec<String> = s.gpus.iter().map(|g| g.index.to_string()).collect();
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
    Ok(0)
}
