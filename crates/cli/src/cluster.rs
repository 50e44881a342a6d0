//! `tether cluster status`: the server replicas and what each holds.

use crate::args::Global;
use crate::remote::connect;
use crate::render::show;
use anyhow::Result;
use serde_json::{json, Value};
use tether_wire::pb;

/// A duration in milliseconds the way the table shows it (negative: that long ago).
fn age(ms: i64) -> String {
    match ms.unsigned_abs() {
        m if m < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        m if m < 3_600_000 => format!("{}s", ms / 1000),
        _ => format!("{}h{}m", ms / 3_600_000, (ms.abs() % 3_600_000) / 60_000),
    }
}

pub(crate) async fn cluster_status(g: &Global) -> Result<i32> {
    let client = connect(g).await?;
    let status = client
        .raw()
        .describe_cluster(pb::DescribeClusterRequest {})
        .await
        .map_err(tether_sdk::client::ClientError::from)?
        .into_inner();
    let mut text = Vec::new();
    if status.store != "postgres" {
        text.push(format!(
            "one server on {} (not a cluster): it serves every namespace ({})",
            status.store,
            status
                .leases
                .iter()
                .map(|l| l.namespace.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    } else {
        text.push(format!(
            "lease timeout {}; answered by {}",
            age(status.lease_timeout_ms as i64),
            status.answered_by
        ));
        text.push(String::new());
        text.push(format!(
            "{:<32} {:<28} {:<6} {:<10} {:<10} NAMESPACES",
            "REPLICA", "ADDRESS", "LIVE", "SEEN AGO", "UP"
        ));
        for r in &status.replicas {
            let held: Vec<&str> = status
                .leases
                .iter()
                .filter(|l| l.owner == r.replica_id)
                .map(|l| l.namespace.as_str())
                .collect();
            text.push(format!(
                "{:<32} {:<28} {:<6} {:<10} {:<10} {}",
                r.replica_id,
                r.address,
                if r.live { "yes" } else { "no" },
                age(r.seen_ms_ago),
                age(r.up_ms),
                held.join(",")
            ));
        }
        text.push(String::new());
        text.push(format!(
            "{:<24} {:<32} {:<6} {:<10} {:<12} EXPIRES IN",
            "NAMESPACE", "OWNER", "EPOCH", "HELD FOR", "RENEWED AGO"
        ));
        for l in &status.leases {
            text.push(format!(
                "{:<24} {:<32} {:<6} {:<10} {:<12} {}",
                l.namespace,
                if l.owner.is_empty() {
                    "(none: takeover due)"
                } else {
                    &l.owner
                },
                l.epoch,
                if l.owner.is_empty() {
                    "-".into()
                } else {
                    age(l.held_ms)
                },
                age(l.renewed_ms_ago),
                if l.expires_in_ms < 0 {
                    "lapsed".into()
                } else {
                    age(l.expires_in_ms)
                },
            ));
        }
    }
    let data = json!({
        "store": status.store,
        "answered_by": status.answered_by,
        "lease_timeout_ms": status.lease_timeout_ms,
        "replicas": status.replicas.iter().map(|r| json!({
            "replica_id": r.replica_id,
            "address": r.address,
            "live": r.live,
            "seen_ms_ago": r.seen_ms_ago,
            "up_ms": r.up_ms,
        })).collect::<Vec<Value>>(),
        "leases": status.leases.iter().map(|l| json!({
            "namespace": l.namespace,
            "owner": l.owner,
            "epoch": l.epoch,
            "held_ms": l.held_ms,
            "renewed_ms_ago": l.renewed_ms_ago,
            "expires_in_ms": l.expires_in_ms,
        })).collect::<Vec<Value>>(),
    });
    show(g, data, text);
    Ok(0)
}
