//! `tether workflow`: start, signal, cancel, terminate, describe, history, result, list.

use crate::args::Global;
use crate::args::WorkflowCmd;
use crate::remote::connect;
use crate::remote::decode_for_display;
use crate::render::event_json;
use crate::render::execution_json;
use crate::render::failure_json;
use crate::render::payload_json;
use crate::render::print_outcome;
use crate::render::show;
use crate::render::status_name;
use crate::render::time_text;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use tether_sdk::client::{Client, WorkflowOptions};
use tether_sdk::codec;
use tether_wire::pb;

pub(crate) async fn workflow_cmd(g: &Global, cmd: WorkflowCmd) -> Result<i32> {
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
            let mut text = Vec::new();
            text.push(format!("workflow id: {id}\nrun id:      {}", handle.run_id));
            show(g, json!({"workflow_id": id, "run_id": handle.run_id}), text);
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
            let mut text = Vec::new();
            text.push(format!("workflow id:     {}", info.workflow_id));
            text.push(format!("run id:          {}", info.run_id));
            text.push(format!("kind:            {}", info.kind));
            text.push(format!("type:            {}", info.workflow_type));
            text.push(format!("task queue:      {}", info.task_queue));
            text.push(format!("status:          {}", status_name(info.status)));
            text.push(format!("started:         {}", time_text(info.start_ms)));
            text.push(format!("closed:          {}", time_text(info.close_ms)));
            text.push(format!("history length:  {}", info.history_length));
            text.push(format!("pending timers:  {}", d.pending_timers));
            text.push(format!("task failures:   {}", d.workflow_task_failures));
            if let Some(f) = &d.last_workflow_task_failure {
                text.push(format!(
                    "last workflow task failure ({}, attempt {}, worker {}):\n  {}",
                    f.cause, f.attempt, f.identity, f.message
                ));
            }
            if !d.pending_activities.is_empty() {
                text.push("pending activities:".to_string());
                for a in &d.pending_activities {
                    text.push(format!(
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
                    ));
                }
            }
            if d.result.is_some() {
                text.push(format!(
                    "result:          {}",
                    codec::display_payload(d.result.as_ref())
                ));
            }
            if let Some(f) = &d.failure {
                text.push(format!("failure:         {}", f.message));
            }
            show(g, v, text);
        }
        WorkflowCmd::History { run } => {
            let mut events = client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .history()
                .await?;
            decode_for_display(g, codec::event_payloads_mut(&mut events)).await?;
            let mut text = Vec::new();
            for e in &events {
                let v = event_json(e);
                text.push(format!(
                    "{:>4}  {}  {:<28} {}",
                    e.event_id,
                    time_text(e.time_ms),
                    e.kind_name(),
                    v["details"]
                ));
            }
            show(
                g,
                Value::Array(events.iter().map(event_json).collect()),
                text,
            );
        }
        WorkflowCmd::Signal { run, name, input } => {
            let value = input.value()?;
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .signal(&name, &value)
                .await?;
            let mut text = Vec::new();
            text.push(format!("signal {name} sent to {}", run.workflow_id));
            show(
                g,
                json!({"signaled": run.workflow_id, "signal": name}),
                text,
            );
        }
        WorkflowCmd::Cancel { run, reason } => {
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .cancel(&reason)
                .await?;
            let mut text = Vec::new();
            text.push(format!("cancellation requested for {}", run.workflow_id));
            show(g, json!({"cancel_requested": run.workflow_id}), text);
        }
        WorkflowCmd::Terminate { run, reason } => {
            client
                .workflow_handle(&run.workflow_id, &run.run_id)
                .terminate(&reason)
                .await?;
            let mut text = Vec::new();
            text.push(format!("terminated {}", run.workflow_id));
            show(g, json!({"terminated": run.workflow_id}), text);
        }
        WorkflowCmd::List {
            status,
            limit,
            matching,
        } => {
            list_runs(g, &client, status, limit, false, matching).await?;
        }
    }
    Ok(0)
}

/// `workflow list` and `activity list`: runs newest first, with an optional status filter.
pub(crate) async fn list_runs(
    g: &Global,
    client: &Client,
    status: Option<String>,
    limit: u32,
    activities: bool,
    matching: crate::args::RunMatchArgs,
) -> Result<()> {
    let status = match status {
        None => None,
        Some(s) => Some(pb::ExecutionStatus::from_short_name(&s).with_context(|| {
            format!("--status {s:?} is not known: use running, completed, failed, canceled, terminated or timed_out")
        })?),
    };
    let filtered = matching.run_type.is_some()
        || matching.task_queue.is_some()
        || matching.id_prefix.is_some();
    let runs = if filtered {
        let req = pb::ListWorkflowsRequest {
            namespace: g.namespace.clone(),
            status: status.map(|s| s as i32).unwrap_or(0),
            limit,
            kind: if activities { "activity" } else { "workflow" }.into(),
            page_token: String::new(),
            workflow_type: matching.run_type.unwrap_or_default(),
            task_queue: matching.task_queue.unwrap_or_default(),
            workflow_id_prefix: matching.id_prefix.unwrap_or_default(),
        };
        let reply = client
            .raw()
            .list_workflows(req)
            .await
            .map_err(tether_sdk::client::ClientError::Rpc)?;
        reply.into_inner().executions
    } else {
        client.list_workflows(status, limit, activities).await?
    };
    let mut text = Vec::new();
    let id = if activities {
        "ACTIVITY ID"
    } else {
        "WORKFLOW ID"
    };
    text.push(format!(
        "{:<36} {:<20} {:<11} {:<26} RUN ID",
        id, "TYPE", "STATUS", "STARTED"
    ));
    for r in &runs {
        text.push(format!(
            "{:<36} {:<20} {:<11} {:<26} {}",
            r.workflow_id,
            r.workflow_type,
            status_name(r.status),
            time_text(r.start_ms),
            r.run_id
        ));
    }
    show(
        g,
        Value::Array(runs.iter().map(execution_json).collect()),
        text,
    );
    Ok(())
}
