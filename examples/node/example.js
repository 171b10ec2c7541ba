// @ts-check
// A business write and its outbox events in one transaction, with node-postgres (pg).
//
//   cd examples/node && npm ci && node example.js
//
// Settings come from the environment: DATABASE_URL, OUTBOX_SCHEMA and OUTBOX_TABLE (default
// outbox.outbox), EXAMPLE_TOPIC_PREFIX (default shop), EXAMPLE_RUN_ID (default a fresh uuid;
// every event carries it, so a test can find exactly this run's events) and TRACEPARENT.
//
// The events, the same in every example: OrderPlaced (JSON, through the enqueue function),
// three OrderLineAdded (JSON, one INSERT for the batch), OrderPaid (protobuf bytes).
//
// Plain JavaScript checked by TypeScript (`npm run typecheck`): the row's types are in
// outbox.d.ts.

import { randomBytes, randomUUID } from "node:crypto";
import pg from "pg";

/** @typedef {import("./outbox.js").NewOutboxEvent} NewOutboxEvent */

// The protobuf encoding of OrderPaid {currency: "EUR", amount_cents: 9950, refunded: false}.
// bytea takes any bytes, NUL included.
const ORDER_PAID_PROTO = Buffer.from("0a0345555210de4d1800", "hex");

/**
 * The W3C traceparent of the writer's current span. No tracer is installed here, so it comes
 * from TRACEPARENT, else a made-up valid one. With OpenTelemetry it is the active context:
 *   const carrier = {}; propagation.inject(context.active(), carrier); carrier.traceparent
 */
function currentTraceparent() {
  return (
    process.env.TRACEPARENT ||
    `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`
  );
}

/**
 * Writes events in one statement; they get ids, their publishing order, in the order given.
 * unnest keeps one statement (and one round trip) whatever the batch size.
 * @param {pg.ClientBase} client
 * @param {string} table the quoted, qualified outbox table
 * @param {NewOutboxEvent[]} events
 */
async function insertEvents(client, table, events) {
  const col = (/** @type {(e: NewOutboxEvent) => unknown} */ f) => events.map(f);
  await client.query(
    `INSERT INTO ${table} (event_id, topic, aggregate_id, aggregate_type, event_type,
       event_version, payload, headers, content_type, traceparent, correlation_id)
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
       $6::int[], $7::bytea[], $8::jsonb[], $9::text[], $10::text[], $11::text[])`,
    [
      col((e) => e.event_id),
      col((e) => e.topic),
      col((e) => e.aggregate_id),
      col((e) => e.aggregate_type ?? null),
      col((e) => e.event_type),
      col((e) => e.event_version ?? 1),
      col((e) => e.payload),
      col((e) => (e.headers ? JSON.stringify(e.headers) : null)),
      col((e) => e.content_type ?? null),
      col((e) => e.traceparent ?? null),
      col((e) => e.correlation_id ?? null),
    ],
  );
}

async function main() {
  const env = process.env;
  const schema = env.OUTBOX_SCHEMA || "outbox";
  const tableName = env.OUTBOX_TABLE || "outbox";
  const prefix = env.EXAMPLE_TOPIC_PREFIX || "shop";
  const runId = env.EXAMPLE_RUN_ID || randomUUID();
  const traceparent = currentTraceparent();
  const orderId = `order-${runId}`;
  const headers = { "run-id": runId, tenant: "acme" };

  const client = new pg.Client({
    connectionString: env.DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres",
  });
  await client.connect();
  const q = (/** @type {string} */ name) => client.escapeIdentifier(name);
  const table = `${q(schema)}.${q(tableName)}`;
  const enqueue = `${q(schema)}.${q(`${tableName}_enqueue`)}`;
  const orders = `${q(schema)}.example_orders`;
  let placedId;
  try {
    // The business table; a real service has its own.
    await client.query(
      `CREATE TABLE IF NOT EXISTS ${orders} (id text PRIMARY KEY, run_id text NOT NULL,
         status text NOT NULL, total numeric NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now())`,
    );

    // Everything up to COMMIT is one transaction on this one client (a pool would hand out
    // a client with pool.connect() for the same): the relay sees the events only once the
    // order is written.
    await client.query("BEGIN");
    try {
      await client.query(
        `INSERT INTO ${orders} (id, run_id, status, total) VALUES ($1, $2, 'placed', 99.5)`,
        [orderId, runId],
      );

      // One JSON event in one call; the function returns the event id.
      const placed = await client.query(
        `SELECT ${enqueue}($1, $2, 'OrderPlaced', $3::jsonb, aggregate_type => 'Order',
           headers => $4::jsonb, traceparent => $5, correlation_id => $6) AS event_id`,
        [
          `${prefix}.orders.placed`,
          orderId,
          JSON.stringify({ order_id: orderId, total: 99.5 }),
          JSON.stringify(headers),
          traceparent,
          runId,
        ],
      );
      placedId = placed.rows[0].event_id;

      /** @type {NewOutboxEvent[]} */
      const lines = [1, 2, 3].map((n) => ({
        event_id: randomUUID(),
        topic: `${prefix}.orders.line_added`,
        aggregate_id: orderId,
        aggregate_type: "Order",
        event_type: "OrderLineAdded",
        payload: Buffer.from(JSON.stringify({ order_id: orderId, line: n, sku: `sku-${n}`, qty: n })),
        headers,
        content_type: "application/json",
        traceparent,
        correlation_id: runId,
      }));
      await insertEvents(client, table, lines);

      await client.query(
        `UPDATE ${orders} SET status = 'paid', updated_at = now() WHERE id = $1`,
        [orderId],
      );
      await insertEvents(client, table, [
        {
          event_id: randomUUID(),
          topic: `${prefix}.orders.paid`,
          aggregate_id: orderId,
          aggregate_type: "Order",
          event_type: "OrderPaid",
          payload: ORDER_PAID_PROTO,
          headers,
          content_type: "application/x-protobuf",
          traceparent,
          correlation_id: runId,
        },
      ]);
      await client.query("COMMIT");
    } catch (e) {
      await client.query("ROLLBACK");
      throw e;
    }
  } finally {
    await client.end();
  }
  console.log(`run ${runId}: order ${orderId} and 5 events committed (first event ${placedId})`);
}

await main();
