#!/usr/bin/env bash
# The relay's main job on the embedded default, for a first look: makes sure a local Postgres
# is up, creates the outbox, writes sample events the way any service would (plain SQL), and
# runs the relay with the stdout backend until the outbox is drained. Events appear on stdout,
# one JSON line each; the relay's log goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

ensure_postgres
if ! have psql; then
  echo "== installing psql (Debian's postgresql-client), to write the sample events" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi
ensure_protoc
echo "== building outbox-relay" >&2
cargo build --release --quiet
RELAY=target/release/outbox-relay
DB_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

echo "== outbox-relay migrate" >&2
"$RELAY" --database-url "$DB_URL" migrate

echo "== writing sample events (plain INSERT and the enqueue function)" >&2
psql "$DB_URL" -q -v ON_ERROR_STOP=1 <<'SQL'
BEGIN;
-- A service's business write and its events, in one transaction.
INSERT INTO outbox.outbox (event_id, topic, aggregate_id, aggregate_type, event_type, payload, content_type, headers)
SELECT gen_random_uuid(), 'orders.created', 'order-' || g, 'order', 'OrderCreated',
       convert_to(json_build_object('order_id', g, 'total', g * 10)::text, 'UTF8'),
       'application/json', '{"tenant": "demo"}'
FROM generate_series(1, 5) g;
COMMIT;
SELECT outbox.outbox_enqueue('orders.shipped', 'order-1', 'OrderShipped', '{"carrier": "post"}');
-- A row no broker would deliver: the relay marks it failed with the reason and goes on.
INSERT INTO outbox.outbox (event_id, topic, aggregate_id, event_type, payload)
VALUES (gen_random_uuid(), 'orders créés', 'order-' || substr(md5(random()::text), 1, 6), 'OrderCreated', '\x7b7d');
SQL

echo "== outbox-relay run --drain (stdout backend)" >&2
"$RELAY" --database-url "$DB_URL" run --drain

echo "== outbox-relay status, then failed (failed rows keep their reason)" >&2
"$RELAY" --database-url "$DB_URL" status
"$RELAY" --database-url "$DB_URL" failed
