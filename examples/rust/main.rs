//! A business write and its outbox events in one transaction, with the crate's
//! `Outbox::enqueue` on an sqlx transaction:
//!
//! ```sh
//! cargo run --example rust
//! ```
//!
//! Settings come from the environment: DATABASE_URL, OUTBOX_SCHEMA and OUTBOX_TABLE (default
//! outbox.outbox), EXAMPLE_TOPIC_PREFIX (default shop), EXAMPLE_RUN_ID (default a fresh uuid;
//! every event carries it, so a test can find exactly this run's events) and TRACEPARENT.
//!
//! The events, the same in every example: OrderPlaced (JSON), three OrderLineAdded (JSON, one
//! batch), OrderPaid (protobuf bytes). Where the other examples call the SQL enqueue function,
//! `NewEvent::json` does the same here, with the whole envelope in reach.

use outbox_relay::store::{NewEvent, Outbox};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

/// The protobuf encoding of OrderPaid {currency: "EUR", amount_cents: 9950, refunded: false}.
/// bytea takes any bytes, NUL included.
const ORDER_PAID_PROTO: &[u8] = b"\x0a\x03EUR\x10\xde\x4d\x18\x00";

fn env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The W3C traceparent of the writer's current span. No tracer runs in this example, so it
/// comes from TRACEPARENT, else a made-up valid one. With `tracing-opentelemetry` it is the
/// current span's context, injected with
/// `TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier)`.
fn current_traceparent() -> String {
    std::env::var("TRACEPARENT").unwrap_or_else(|_| {
        let trace = uuid::Uuid::new_v4().simple().to_string();
        let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
        format!("00-{trace}-{span}-01")
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    // Checks the names (lowercase identifiers), so they are safe to put into SQL text below.
    let outbox = Outbox::new(
        &env("OUTBOX_SCHEMA", "outbox"),
        &env("OUTBOX_TABLE", "outbox"),
    )?;
    let prefix = env("EXAMPLE_TOPIC_PREFIX", "shop");
    let run_id = env("EXAMPLE_RUN_ID", &uuid::Uuid::new_v4().to_string());
    let traceparent = current_traceparent();
    let order_id = format!("order-{run_id}");
    let orders = format!("{}.example_orders", outbox.names().schema);

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    // The business table; a real service has its own.
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {orders} (id text PRIMARY KEY, run_id text NOT NULL, \
         status text NOT NULL, total numeric NOT NULL, \
         updated_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&pool)
    .await?;

    // Every event of this order carries the same envelope fields.
    let envelope = |mut e: NewEvent| {
        e.aggregate_type = Some("Order".into());
        e.headers = Some(json!({"run-id": run_id, "tenant": "acme"}));
        e.traceparent = Some(traceparent.clone());
        e.correlation_id = Some(run_id.clone());
        e
    };

    // Everything up to the commit is one transaction: the relay sees the events only once the
    // order is written, and a failure (or a dropped `tx`) leaves neither.
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {orders} (id, run_id, status, total) VALUES ($1, $2, 'placed', 99.5)"
    ))
    .bind(&order_id)
    .bind(&run_id)
    .execute(&mut *tx)
    .await?;

    let placed = envelope(NewEvent::json(
        format!("{prefix}.orders.placed"),
        &order_id,
        "OrderPlaced",
        &json!({"order_id": order_id, "total": 99.5}),
    )?);
    let placed_id = placed.event_id;
    outbox.enqueue(&mut tx, &[placed]).await?;

    // A batch is one statement; the events get ids (their publishing order) in slice order.
    let lines = (1..=3)
        .map(|n| {
            NewEvent::json(
                format!("{prefix}.orders.line_added"),
                &order_id,
                "OrderLineAdded",
                &json!({"order_id": order_id, "line": n, "sku": format!("sku-{n}"), "qty": n}),
            )
            .map(envelope)
        })
        .collect::<Result<Vec<_>, _>>()?;
    outbox.enqueue(&mut tx, &lines).await?;

    sqlx::query(&format!(
        "UPDATE {orders} SET status = 'paid', updated_at = now() WHERE id = $1"
    ))
    .bind(&order_id)
    .execute(&mut *tx)
    .await?;
    let mut paid = envelope(NewEvent::new(
        format!("{prefix}.orders.paid"),
        &order_id,
        "OrderPaid",
        ORDER_PAID_PROTO,
    ));
    paid.content_type = Some("application/x-protobuf".into());
    outbox.enqueue(&mut tx, &[paid]).await?;

    tx.commit().await?;
    println!("run {run_id}: order {order_id} and 5 events committed (first event {placed_id})");
    Ok(())
}
