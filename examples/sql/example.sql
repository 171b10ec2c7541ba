-- A business write and its outbox events in one transaction, from psql:
--
--   psql "$DATABASE_URL" -f examples/sql/example.sql
--
-- Settings come from the environment (psql 15 or later reads them with \getenv): OUTBOX_SCHEMA
-- and OUTBOX_TABLE (default outbox.outbox), EXAMPLE_TOPIC_PREFIX (default shop),
-- EXAMPLE_RUN_ID (default a fresh uuid; every event carries it, so a test can find exactly
-- this run's events) and TRACEPARENT.
--
-- The events, the same in every example: OrderPlaced (JSON, through the enqueue function),
-- three OrderLineAdded (JSON, one INSERT for the batch), OrderPaid (protobuf bytes).

\set ON_ERROR_STOP on
\set QUIET on

\getenv schema OUTBOX_SCHEMA
\if :{?schema}
\else
  \set schema outbox
\endif
\getenv table OUTBOX_TABLE
\if :{?table}
\else
  \set table outbox
\endif
\getenv prefix EXAMPLE_TOPIC_PREFIX
\if :{?prefix}
\else
  \set prefix shop
\endif
\getenv run_id EXAMPLE_RUN_ID
\if :{?run_id}
\else
  SELECT gen_random_uuid()::text AS run_id \gset
\endif
-- psql has no tracer. An application passes the traceparent of its current span as a
-- parameter; here it comes from TRACEPARENT, else a made-up but valid one (version 00, random
-- trace and span ids, sampled).
\getenv traceparent TRACEPARENT
\if :{?traceparent}
\else
  SELECT '00-' || md5(random()::text) || '-' || left(md5(random()::text), 16) || '-01'
      AS traceparent \gset
\endif
\set enqueue :table '_enqueue'
\set order_id 'order-' :run_id

-- The business table; a real service has its own.
CREATE TABLE IF NOT EXISTS :"schema".example_orders (
    id         text PRIMARY KEY,
    run_id     text NOT NULL,
    status     text NOT NULL,
    total      numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

BEGIN;

INSERT INTO :"schema".example_orders (id, run_id, status, total)
VALUES (:'order_id', :'run_id', 'placed', 99.5);

-- One JSON event in one call. The function sets content_type application/json and returns
-- the event id.
SELECT :"schema".:"enqueue"(
    :'prefix' || '.orders.placed', :'order_id', 'OrderPlaced',
    jsonb_build_object('order_id', :'order_id', 'total', 99.5),
    aggregate_type => 'Order',
    headers        => jsonb_build_object('run-id', :'run_id', 'tenant', 'acme'),
    traceparent    => :'traceparent',
    correlation_id => :'run_id') AS placed_event_id \gset

-- A batch in one statement. The relay publishes an aggregate's events in id order, and ids
-- are drawn in the order the SELECT produces its rows, hence the ORDER BY.
INSERT INTO :"schema".:"table"
    (event_id, topic, aggregate_id, aggregate_type, event_type, payload, headers,
     content_type, traceparent, correlation_id)
SELECT gen_random_uuid(), :'prefix' || '.orders.line_added', :'order_id', 'Order',
       'OrderLineAdded',
       convert_to(jsonb_build_object('order_id', :'order_id', 'line', n, 'sku', 'sku-' || n,
                                     'qty', n)::text, 'UTF8'),
       jsonb_build_object('run-id', :'run_id', 'tenant', 'acme'),
       'application/json', :'traceparent', :'run_id'
FROM generate_series(1, 3) AS n
ORDER BY n;

UPDATE :"schema".example_orders SET status = 'paid', updated_at = now()
WHERE id = :'order_id';

-- A binary payload: the protobuf encoding of OrderPaid {currency: "EUR", amount_cents: 9950,
-- refunded: false}. bytea takes any bytes, NUL included.
INSERT INTO :"schema".:"table"
    (event_id, topic, aggregate_id, aggregate_type, event_type, payload, headers,
     content_type, traceparent, correlation_id)
VALUES (gen_random_uuid(), :'prefix' || '.orders.paid', :'order_id', 'Order', 'OrderPaid',
        '\x0a0345555210de4d1800'::bytea,
        jsonb_build_object('run-id', :'run_id', 'tenant', 'acme'),
        'application/x-protobuf', :'traceparent', :'run_id');

COMMIT;

\echo run :run_id: order :order_id and 5 events committed (first event :placed_event_id)
