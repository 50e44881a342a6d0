//! `tether namespace`: create, update, describe, list.

use crate::args::Global;
use crate::args::NamespaceCmd;
use crate::remote::connect;
use crate::render::retention_text;
use crate::render::show;
use crate::render::time_text;
use anyhow::{bail, Result};
use serde_json::{json, Value};

pub(crate) async fn namespace_cmd(g: &Global, cmd: NamespaceCmd) -> Result<i32> {
    let client = connect(g).await?;
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
            let mut text = Vec::new();
            text.push(format!(
                "namespace {name} created (closed runs kept {retention})"
            ));
            show(
                g,
                json!({ "namespace": name, "retention": retention }),
                text,
            );
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
            let mut text = Vec::new();
            text.push(format!(
                "namespace {} updated (closed runs kept {retention})",
                n.name
            ));
            show(
                g,
                json!({"name": n.name, "description": n.description, "retention": retention}),
                text,
            );
        }
        NamespaceCmd::List => {
            let list = client.list_namespaces().await?;
            let mut text = Vec::new();
            text.push(format!("{:<24} {:<10} DESCRIPTION", "NAME", "RETENTION"));
            for n in &list {
                text.push(format!(
                    "{:<24} {:<10} {}",
                    n.name,
                    retention_text(n.retention_ms),
                    n.description
                ));
            }
            show(g, Value::Array(
                        list.iter()
                            .map(|n| json!({"name": n.name, "description": n.description, "created": time_text(n.created_ms), "retention": retention_text(n.retention_ms)}))
                            .collect(),
                    ), text);
        }
    }
    Ok(0)
}
