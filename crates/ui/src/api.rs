//! The JSON the pages read: one endpoint per page, each a read of the server's own API through
//! its [`Reader`] (never a write), shaped by [`crate::views`] and [`crate::json`].

use crate::json::{event_json, execution_json, failure_json, payload_json};
use crate::source::{all_sessions, all_workers, queue_names};
use crate::views;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tether_server::Reader;
use tether_wire::pb;

/// A read that failed, as the page shows it: the server's own message, with the HTTP status
/// that matches its gRPC code.
pub(crate) struct ApiError(tonic::Status);

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        ApiError(status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use tonic::Code;
        let code = match self.0.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
            Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = json!({ "error": self.0.message(), "code": format!("{:?}", self.0.code()) });
        (code, fresh(), axum::Json(body)).into_response()
    }
}

/// Answers change from one poll to the next: no cache may keep one.
fn fresh() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}

fn reply(body: Value) -> Response {
    (fresh(), axum::Json(body)).into_response()
}

type Answer = Result<Response, ApiError>;

pub(crate) async fn namespaces(State(reader): State<Reader>) -> Answer {
    let listed = reader.list_namespaces().await?;
    Ok(reply(json!({
        "namespaces": listed.namespaces.iter().map(|n| json!({
            "name": n.name, "description": n.description,
        })).collect::<Vec<_>>(),
    })))
}

pub(crate) async fn fleet(State(reader): State<Reader>, Path(ns): Path<String>) -> Answer {
    let (workers, more_workers) = all_workers(&reader, &ns).await?;
    let (sessions, _) = all_sessions(&reader, &ns, false).await?;
    let mut view = views::fleet(&workers, &sessions, tether_wire::now_ms());
    view["truncated"] = json!(more_workers);
    Ok(reply(view))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct SessionFilter {
    state: String,
    worker: String,
}

pub(crate) async fn sessions(
    State(reader): State<Reader>,
    Path(ns): Path<String>,
    Query(filter): Query<SessionFilter>,
) -> Answer {
    let (all, more) = all_sessions(&reader, &ns, true).await?;
    let mut view = views::sessions(&all, &filter.state, &filter.worker);
    view["truncated"] = json!(more);
    Ok(reply(view))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct RunFilter {
    kind: String,
    status: String,
    #[serde(rename = "type")]
    workflow_type: String,
    task_queue: String,
    prefix: String,
    page_token: String,
    limit: u32,
}

pub(crate) async fn workflows(
    State(reader): State<Reader>,
    Path(ns): Path<String>,
    Query(filter): Query<RunFilter>,
) -> Answer {
    let status = if filter.status.is_empty() {
        0
    } else {
        match pb::ExecutionStatus::from_short_name(&filter.status) {
            Some(status) => status as i32,
            None => {
                return Err(ApiError(tonic::Status::invalid_argument(format!(
                    "status {:?} is not one of running, completed, failed, canceled, terminated, \
                     timed_out",
                    filter.status
                ))))
            }
        }
    };
    let page = reader
        .list_workflows(pb::ListWorkflowsRequest {
            namespace: ns,
            status,
            limit: if filter.limit == 0 { 50 } else { filter.limit },
            kind: if filter.kind.is_empty() {
                "workflow".into()
            } else {
                filter.kind
            },
            page_token: filter.page_token,
            workflow_type: filter.workflow_type,
            task_queue: filter.task_queue,
            workflow_id_prefix: filter.prefix,
        })
        .await?;
    Ok(reply(json!({
        "executions": page.executions.iter().map(execution_json).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct RunChoice {
    run_id: String,
}

pub(crate) async fn run(
    State(reader): State<Reader>,
    Path((ns, kind, id)): Path<(String, String, String)>,
    Query(choice): Query<RunChoice>,
) -> Answer {
    let described = match kind.as_str() {
        "workflow" => {
            reader
                .describe_workflow(pb::DescribeWorkflowRequest {
                    namespace: ns.clone(),
                    workflow_id: id.clone(),
                    run_id: choice.run_id.clone(),
                })
                .await?
        }
        "activity" => {
            reader
                .describe_activity(pb::DescribeActivityRequest {
                    namespace: ns.clone(),
                    activity_id: id.clone(),
                    run_id: choice.run_id.clone(),
                })
                .await?
        }
        other => {
            return Err(ApiError(tonic::Status::invalid_argument(format!(
                "{other:?} is no kind of run: workflow or activity"
            ))))
        }
    };
    let info = described.info.clone().unwrap_or_default();
    let history = reader
        .history(pb::GetWorkflowHistoryRequest {
            namespace: ns,
            workflow_id: id,
            run_id: info.run_id.clone(),
        })
        .await?;
    let input = history.events.iter().find_map(|e| match &e.attributes {
        Some(pb::history_event::Attributes::WorkflowExecutionStarted(s)) => s.input.as_ref(),
        Some(pb::history_event::Attributes::ActivityTaskScheduled(s)) if kind == "activity" => {
            s.input.as_ref()
        }
        _ => None,
    });
    let pending: Vec<Value> = described
        .pending_activities
        .iter()
        .map(|p| {
            json!({
                "scheduled_event_id": p.scheduled_event_id,
                "activity_id": p.activity_id,
                "activity_type": p.activity_type,
                "state": p.state,
                "attempt": p.attempt,
                "last_worker": p.last_worker,
                "last_heartbeat_ms": p.last_heartbeat_ms,
                "last_failure": failure_json(p.last_failure.as_ref()),
                "next_attempt_ms": p.next_attempt_ms,
                "task_queue": p.task_queue,
            })
        })
        .collect();
    let now = tether_wire::now_ms();
    Ok(reply(json!({
        "run": execution_json(&info),
        "input": payload_json(input),
        "result": payload_json(described.result.as_ref()),
        "failure": failure_json(described.failure.as_ref()),
        "pending_activities": pending,
        "pending_timers": described.pending_timers,
        "last_workflow_task_failure": described.last_workflow_task_failure.as_ref().map(|f| json!({
            "cause": f.cause, "message": f.message, "attempt": f.attempt, "identity": f.identity,
        })),
        "events": history.events.iter().map(event_json).collect::<Vec<_>>(),
        "timeline": views::timeline(&history.events, &described.pending_activities, now),
        "now_ms": now,
    })))
}

pub(crate) async fn queues(State(reader): State<Reader>, Path(ns): Path<String>) -> Answer {
    let (workers, _) = all_workers(&reader, &ns).await?;
    let mut shown = Vec::new();
    for name in queue_names(&reader, &ns, &workers).await? {
        let described = reader
            .describe_task_queue(pb::DescribeTaskQueueRequest {
                namespace: ns.clone(),
                task_queue: name.clone(),
            })
            .await?;
        shown.push(views::queue_json(&name, &described));
    }
    Ok(reply(json!({ "queues": shown })))
}
