//! `tether queue`: what waits in a task queue and who polls it.

use crate::args::Global;
use crate::args::QueueCmd;
use crate::remote::connect;
use crate::render::show;
use crate::render::time_text;
use anyhow::Result;
use serde_json::json;

pub(crate) async fn queue_cmd(g: &Global, cmd: QueueCmd) -> Result<i32> {
    let QueueCmd::Describe { task_queue } = cmd;
    let client = connect(g).await?;
    let q = client.describe_task_queue(&task_queue).await?;
    let mut text = Vec::new();
    text.push(format!("task queue:        {task_queue}"));
    text.push(format!("workflow backlog:  {}", q.workflow_backlog));
    text.push(format!("activity backlog:  {}", q.activity_backlog));
    text.push("pollers:".to_string());
    for p in &q.pollers {
        text.push(format!(
            "  {:<32} {:<9} {:<13} last poll {}",
            p.identity,
            p.kind,
            p.state,
            time_text(p.last_poll_ms)
        ));
    }
    if !q.requirement_backlogs.is_empty() {
        text.push("waiting activities by requirements:".to_string());
        for b in &q.requirement_backlogs {
            let reqs = if b.requirements.is_empty() {
                "(none)"
            } else {
                b.requirements.as_str()
            };
            text.push(format!("  {:>6}  {reqs}", b.tasks));
            if b.unplaceable {
                text.push(format!("          unplaceable: {}", b.explanation));
            }
        }
    }
    show(
        g,
        json!({
            "task_queue": task_queue,
            "workflow_backlog": q.workflow_backlog,
            "activity_backlog": q.activity_backlog,
            "pollers": q.pollers.iter().map(|p| json!({"identity": p.identity, "kind": p.kind, "state": p.state, "last_poll": time_text(p.last_poll_ms)})).collect::<Vec<_>>(),
            "requirement_backlogs": q.requirement_backlogs.iter().map(|b| json!({
                "requirements": b.requirements, "tasks": b.tasks,
                "unplaceable": b.unplaceable, "explanation": b.explanation,
            })).collect::<Vec<_>>(),
        }),
        text,
    );
    Ok(0)
}
