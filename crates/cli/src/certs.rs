//! `tether certs dev`: development certificates.

use crate::args::Global;
use crate::render::{note, show};
use anyhow::Result;
use serde_json::{json, Value};
use std::path::PathBuf;

pub(crate) async fn certs_cmd(g: &Global, out: PathBuf, clients: Vec<String>) -> Result<i32> {
    let names: Vec<&str> = clients.iter().map(String::as_str).collect();
    let files = crate::dev_certs::write_dev_certs(&out, &names)?;
    let mut text = Vec::new();
    for f in &files {
        text.push(format!("{}", f.display()));
    }
    show(
        g,
        Value::Array(
            files
                .iter()
                .map(|f| json!(f.display().to_string()))
                .collect(),
        ),
        text,
    );
    note(
        g,
        &format!(
            "try it:\n  tether server --data-dir DIR --tls-cert {0}/server.pem --tls-key {0}/server.key --client-ca {0}/ca.pem\n  tether --tls-ca {0}/ca.pem --tls-cert {0}/client.pem --tls-key {0}/client.key namespace list",
            out.display()
        ),
    );
    Ok(0)
}
