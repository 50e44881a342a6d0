//! The main job, end to end on the embedded default: an in-process server on a temporary SQLite
//! store, one worker, and an order workflow with several activities, a retry, a durable timer and
//! a signal. Run it with `cargo run --example quickstart`.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tether::activity::{ActivityContext, ActivityError};
use tether::client::{ActivityOptions, Client, RetryPolicy, WorkflowOptions};
use tether::server::{LocalServer, ServerConfig};
use tether::worker::{Worker, WorkerOptions};
use tether::workflow::{WorkflowContext, WorkflowError};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    item: String,
    quantity: u32,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    order: String,
    charge_id: String,
    tracking: String,
    approved_by: String,
}

fn say(ctx: &ActivityContext, what: &str) {
    println!(
        "  [activity] {:<18} attempt {} on worker {}: {what}",
        ctx.info().activity_type,
        ctx.info().attempt,
        ctx.info().worker_identity
    );
}

async fn reserve_inventory(ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    say(
        &ctx,
        &format!("reserved {} x {}", order.quantity, order.item),
    );
    Ok(format!("rsv-{}", order.id))
}

async fn charge_card(ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    if ctx.info().attempt == 1 {
        say(&ctx, "payment gateway timed out (retryable)");
        return Err(
            ActivityError::retryable("payment gateway timed out").with_type("GatewayTimeout")
        );
    }
    say(&ctx, &format!("charged {} cents", order.amount_cents));
    Ok(format!("ch-{}-{}", order.id, ctx.info().attempt))
}

async fn ship(ctx: ActivityContext, order: Order) -> Result<String, ActivityError> {
    say(&ctx, "handed to the carrier");
    Ok(format!("TRK-{}", order.id.to_uppercase()))
}

async fn order_workflow(ctx: WorkflowContext, order: Order) -> Result<Receipt, WorkflowError> {
    let quick = ActivityOptions::default()
        .start_to_close(Duration::from_secs(10))
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(200),
            maximum_attempts: 5,
            ..Default::default()
        });
    let _reservation: String = ctx
        .execute_activity("reserve_inventory", &order, quick.clone())
        .await?;
    let charge_id: String = ctx
        .execute_activity("charge_card", &order, quick.clone())
        .await?;
    // A durable timer: the cooling-off period survives worker and server restarts.
    ctx.sleep(Duration::from_secs(1)).await;
    // Wait for a person (here: the client below) to approve shipping.
    let approved_by: String = ctx.signal_channel("approve").recv().await?;
    let tracking: String = ctx.execute_activity("ship", &order, quick).await?;
    Ok(Receipt {
        order: order.id,
        charge_id,
        tracking,
        approved_by,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let data = tempfile::Builder::new()
        .prefix("tether-quickstart-")
        .tempdir()?;
    let server = LocalServer::start("127.0.0.1:0", data.path(), ServerConfig::default()).await?;
    println!(
        "server: {} (SQLite store in {}, fsync on every commit)",
        server.url(),
        data.path().display()
    );

    let client = Client::connect(server.url()).await?;
    let mut worker = Worker::new(
        client.clone(),
        WorkerOptions::new("orders").identity("worker-1"),
    );
    worker
        .register_activity("reserve_inventory", reserve_inventory)
        .register_activity("charge_card", charge_card)
        .register_activity("ship", ship)
        .register_workflow("order", order_workflow);
    let worker = worker.start()?;
    println!("worker: worker-1 polling task queue \"orders\"");

    let order = Order {
        id: "o-1001".into(),
        item: "espresso machine".into(),
        quantity: 1,
        amount_cents: 34_900,
    };
    let handle = client
        .start_workflow(
            "order",
            &order,
            WorkflowOptions::new("order-o-1001", "orders"),
        )
        .await?;
    println!("started workflow order-o-1001 (run {})", handle.run_id);

    // Approve once the workflow is waiting for it: after the timer fired.
    loop {
        let history = handle.history().await?;
        if history.iter().any(|e| e.kind_name() == "TimerFired") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("client: sending signal approve(\"manager@example.com\")");
    handle.signal("approve", "manager@example.com").await?;

    let receipt: Receipt = handle.result().await?;
    println!("workflow completed: {receipt:?}");

    println!("history:");
    for event in handle.history().await? {
        println!("  {:>3} {}", event.event_id, event.kind_name());
    }
    let described = handle.describe().await?;
    println!(
        "status: {}, workflow task failures: {}",
        tether::api::pb::ExecutionStatus::try_from(described.info.unwrap_or_default().status)
            .unwrap_or_default()
            .short_name(),
        described.workflow_task_failures
    );
    worker.shutdown().await;
    server.stop().await?;
    Ok(())
}
