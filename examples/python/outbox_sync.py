"""A business write and its outbox events in one transaction, with psycopg 3 (sync).

    python3 examples/python/outbox_sync.py

Settings come from the environment: DATABASE_URL, OUTBOX_SCHEMA and OUTBOX_TABLE (default
outbox.outbox), EXAMPLE_TOPIC_PREFIX (default shop), EXAMPLE_RUN_ID (default a fresh uuid;
every event carries it, so a test can find exactly this run's events) and TRACEPARENT.

The events, the same in every example: OrderPlaced (JSON, through the enqueue function), three
OrderLineAdded (JSON, one executemany for the batch), OrderPaid (protobuf bytes).
"""

import json
import os
import secrets
import uuid

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

# The protobuf encoding of OrderPaid {currency: "EUR", amount_cents: 9950, refunded: false}.
# bytea takes any bytes, NUL included.
ORDER_PAID_PROTO = bytes.fromhex("0a0345555210de4d1800")


def current_traceparent() -> str:
    """The W3C traceparent of the writer's current span.

    No tracer is installed here, so it comes from TRACEPARENT, else a made-up valid one. With
    OpenTelemetry it is the current span's context:
        carrier = {}; opentelemetry.propagate.inject(carrier); carrier["traceparent"]
    """
    return os.environ.get("TRACEPARENT") or f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def main() -> None:
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    schema = os.environ.get("OUTBOX_SCHEMA", "outbox")
    table = os.environ.get("OUTBOX_TABLE", "outbox")
    prefix = os.environ.get("EXAMPLE_TOPIC_PREFIX", "shop")
    run_id = os.environ.get("EXAMPLE_RUN_ID") or str(uuid.uuid4())
    traceparent = current_traceparent()

    outbox = sql.Identifier(schema, table)
    enqueue = sql.Identifier(schema, f"{table}_enqueue")
    orders = sql.Identifier(schema, "example_orders")
    order_id = f"order-{run_id}"
    headers = Jsonb({"run-id": run_id, "tenant": "acme"})

    with psycopg.connect(url, autocommit=True) as conn:
        # The business table; a real service has its own.
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, run_id text NOT NULL,"
                " status text NOT NULL, total numeric NOT NULL,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(orders)
        )

        # Everything below commits together or not at all: the relay sees the events only
        # once the order is written.
        with conn.transaction():
            conn.execute(
                sql.SQL("INSERT INTO {} (id, run_id, status, total) VALUES (%s, %s, 'placed', 99.5)").format(orders),
                (order_id, run_id),
            )

            # One JSON event in one call; the function returns the event id.
            placed_id = conn.execute(
                sql.SQL(
                    "SELECT {}(%s, %s, 'OrderPlaced', %s, aggregate_type => 'Order',"
                    " headers => %s, traceparent => %s, correlation_id => %s)"
                ).format(enqueue),
                (f"{prefix}.orders.placed", order_id, Jsonb({"order_id": order_id, "total": 99.5}),
                 headers, traceparent, run_id),
            ).fetchone()[0]

            # A batch: executemany sends the rows in one pipeline (one round trip); they get
            # ids, their publishing order, in the order given.
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {} (event_id, topic, aggregate_id, aggregate_type, event_type,"
                        " payload, headers, content_type, traceparent, correlation_id)"
                        " VALUES (%s, %s, %s, 'Order', 'OrderLineAdded', %s, %s,"
                        " 'application/json', %s, %s)"
                    ).format(outbox),
                    [
                        (uuid.uuid4(), f"{prefix}.orders.line_added", order_id,
                         json.dumps({"order_id": order_id, "line": n, "sku": f"sku-{n}", "qty": n}).encode(),
                         headers, traceparent, run_id)
                        for n in (1, 2, 3)
                    ],
                )

            conn.execute(
                sql.SQL("UPDATE {} SET status = 'paid', updated_at = now() WHERE id = %s").format(orders),
                (order_id,),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (event_id, topic, aggregate_id, aggregate_type, event_type,"
                    " payload, headers, content_type, traceparent, correlation_id)"
                    " VALUES (%s, %s, %s, 'Order', 'OrderPaid', %s, %s, 'application/x-protobuf', %s, %s)"
                ).format(outbox),
                (uuid.uuid4(), f"{prefix}.orders.paid", order_id, ORDER_PAID_PROTO, headers,
                 traceparent, run_id),
            )

    print(f"run {run_id}: order {order_id} and 5 events committed (first event {placed_id})")


if __name__ == "__main__":
    main()
