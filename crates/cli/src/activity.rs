//! `tether activity`: standalone activities.

use crate::args::ActivityCmd;
use crate::args::Global;
use crate::remote::connect;
use crate::remote::decode_for_display;
use crate::render::execution_json;
use crate::render::failure_json;
use crate::render::payload_json;
use crate::render::print_outcome;
use crate::render::show;
use crate::render::status_name;
use crate::render::time_text;
use crate::workflow::list_runs;
use anyhow::Result;
use serde_json::json;
use tether_sdk::client::{ActivityOptions, RetryPolicy, StandaloneActivityOptions};
use tether_sdk::codec;

pub(crate) async fn activity_cmd(g: &Global, cmd: ActivityCmd) -> Result<i32> {
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
                let mut text = Vec::new();
                text.push(format!("{id} {}", handle.run_id));
                show(g, json!({"activity_id": id, "run_id": handle.run_id}), text);
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
            let mut v = execution_json(&info);
            v["attempt"] = json!(pending.map(|a| a.attempt));
            v["state"] = json!(pending.map(|a| a.state.clone()));
            v["last_worker"] = json!(pending.map(|a| a.last_worker.clone()));
            v["last_failure"] = failure_json(pending.and_then(|a| a.last_failure.as_ref()));
            v["result"] = payload_json(d.result.as_ref());
            v["failure"] = failure_json(d.failure.as_ref());
            let mut text = Vec::new();
            text.push(format!("activity id:     {}", info.workflow_id));
            text.push(format!("run id:          {}", info.run_id));
            text.push(format!("type:            {}", info.workflow_type));
            text.push(format!("task queue:      {}", info.task_queue));
            text.push(format!("status:          {}", status_name(info.status)));
            text.push(format!("started:         {}", time_text(info.start_ms)));
            text.push(format!("closed:          {}", time_text(info.close_ms)));
            if let Some(a) = pending {
                text.push(format!("attempt:         {} ({})", a.attempt, a.state));
                text.push(format!("worker:          {}", a.last_worker));
                if let Some(f) = &a.last_failure {
                    text.push(format!("last failure:    {}", f.message));
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
            Ok(0)
        }
        ActivityCmd::List {
            status,
            limit,
            matching,
        } => {
            let client = connect(g).await?;
            list_runs(g, &client, status, limit, true, matching).await?;
            Ok(0)
        }
        ActivityCmd::Cancel { activity, reason } => {
            let client = connect(g).await?;
            client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .cancel(&reason)
                .await?;
            let mut text = Vec::new();
            text.push(format!(
                "cancellation requested for {}",
                activity.activity_id
            ));
            show(g, json!({"cancel_requested": activity.activity_id}), text);
            Ok(0)
        }
        ActivityCmd::Terminate { activity, reason } => {
            let client = connect(g).await?;
            client
                .activity_handle(&activity.activity_id, &activity.run_id)
                .terminate(&reason)
                .await?;
            let mut text = Vec::new();
            text.push(format!("terminated {}", activity.activity_id));
            show(g, json!({"terminated": activity.activity_id}), text);
            Ok(0)
        }
    }
}
