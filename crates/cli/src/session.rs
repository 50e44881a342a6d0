//! `tether session`: list, describe, complete and terminate sessions.

use crate::args::Global;
use crate::args::SessionCmd;
use crate::remote::connect;
use crate::render::session_json;
use crate::render::show;
use crate::render::time_text;
use anyhow::Result;
use serde_json::Value;

pub(crate) async fn session_cmd(g: &Global, cmd: SessionCmd) -> Result<i32> {
    let client = connect(g).await?;
    match cmd {
        SessionCmd::Terminate { session_id, reason } => {
            let s = client.terminate_session(&session_id, &reason).await?;
            let mut text = Vec::new();
            text.push(format!("session {} terminated: {}", s.session_id, s.reason));
            show(g, session_json(&s), text);
        }
        SessionCmd::List { all } => {
            let sessions = client.list_sessions(all).await?;
            let mut text = Vec::new();
            text.push(format!(
                "{:<40} {:<10} {:<16} {:<10} {:>8} {:>5}  OWNER",
                "SESSION", "STATE", "WORKER", "GPUS", "AGE(s)", "ACTS"
            ));
            for s in &sessions {
                let v = session_json(s);
                let gpus: Vec<String> = s.gpus.iter().map(|g| g.index.to_string()).collect();
                text.push(format!(
                    "{:<40} {:<10} {:<16} {:<10} {:>8} {:>5}  {}",
                    s.session_id,
                    s.state,
                    s.worker_identity,
                    gpus.join(","),
                    v["age_seconds"],
                    s.activities_run,
                    s.owner
                ));
            }
            show(
                g,
                Value::Array(sessions.iter().map(session_json).collect()),
                text,
            );
        }
        SessionCmd::Describe { session_id } => {
            let s = client.describe_session(&session_id).await?;
            let mut text = Vec::new();
            let v = session_json(&s);
            text.push(format!("session:         {}", s.session_id));
            text.push(format!("state:           {}", s.state));
            text.push(format!("owner:           {}", s.owner));
            text.push(format!(
                "worker:          {} (host {})",
                s.worker_identity, s.hostname
            ));
            for gpu in &s.gpus {
                text.push(format!(
                    "gpu:             {} {} ({})",
                    gpu.index, gpu.name, gpu.uuid
                ));
            }
            for (k, n) in &s.resources {
                text.push(format!("resource:        {k}={n}"));
            }
            text.push(format!(
                "requirements:    {}",
                v["requirements"].as_str().unwrap_or("")
            ));
            text.push(format!("created:         {}", time_text(s.created_ms)));
            text.push(format!("age:             {} s", v["age_seconds"]));
            text.push(format!("activities run:  {}", s.activities_run));
            if !s.reason.is_empty() {
                let label = if s.state == "creating" {
                    "waiting because"
                } else {
                    "reason"
                };
                text.push(format!("{label}: {}", s.reason));
            }
            show(g, session_json(&s), text);
        }
    }
    Ok(0)
}
