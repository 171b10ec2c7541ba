-- The outbox table and its public insertion contract.
--
-- {{schema}}, {{table}} and {{channel}} are replaced by the relay's configured, validated names
-- before this runs (`outbox-relay migrate`).
--
-- Producers INSERT rows inside their own business transactions. They set event_id, topic,
-- aggregate_id, event_type and payload; the other envelope columns are optional. The columns
-- after "relay-owned" belong to the relay: producers leave them to their defaults.

CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE {{schema}}.{{table}} (
    -- The order of events: per aggregate, events are published in id order. Always generated,
    -- so a producer cannot put an event before one that is already written.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    topic           text        NOT NULL,
    aggregate_id    text        NOT NULL,
    aggregate_type  text,
    event_type      text        NOT NULL,
    event_version   integer     NOT NULL DEFAULT 1,
    payload         bytea       NOT NULL,
    headers         jsonb,
    content_type    text,
    traceparent     text,
    correlation_id  text,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- relay-owned
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    published_at    timestamptz,
    CONSTRAINT {{table}}_event_id_key UNIQUE (event_id),
    CONSTRAINT {{table}}_status_check CHECK (status IN ('pending', 'failed', 'published'))
) WITH (
    -- Rows live briefly: claimed within milliseconds, deleted when published. Vacuum early and
    -- without throttling so dead tuples never pile up ahead of the claim index.
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- The claim index: due pending rows in claim order. Partial, so it holds only the backlog and
-- a claim walks exactly the rows it takes (plus rows other batches hold locked), at any table
-- size.
CREATE INDEX {{table}}_due_idx ON {{schema}}.{{table}} (next_attempt_at, id)
    WHERE status = 'pending';

-- The ordering index: unfinished rows per aggregate. A claim looks up each row's predecessor
-- here (one probe per row) to keep one event per aggregate in flight.
CREATE INDEX {{table}}_aggregate_idx ON {{schema}}.{{table}} (aggregate_id, id)
    WHERE status <> 'published';

-- Wake the relay within milliseconds of a commit. One notification per INSERT statement, and
-- Postgres folds identical notifications of one transaction into one. Producers with very high
-- commit rates can turn this off (ALTER TABLE ... DISABLE TRIGGER {{table}}_notify); the relay
-- then finds rows by its poll interval.
CREATE FUNCTION {{schema}}.{{table}}_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{{channel}}', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER {{table}}_notify AFTER INSERT ON {{schema}}.{{table}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.{{table}}_notify();

-- Enqueue one event with a JSON payload in one call, from any language:
--   SELECT {{schema}}.{{table}}_enqueue('orders.created', 'order-42', 'OrderCreated',
--                                        '{"total": 10}');
-- Returns the event id (generated unless given).
CREATE FUNCTION {{schema}}.{{table}}_enqueue(
    topic          text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    aggregate_type text    DEFAULT NULL,
    event_version  integer DEFAULT 1,
    headers        jsonb   DEFAULT NULL,
    traceparent    text    DEFAULT NULL,
    correlation_id text    DEFAULT NULL,
    event_id       uuid    DEFAULT gen_random_uuid()
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO {{schema}}.{{table}}
        (event_id, topic, aggregate_id, aggregate_type, event_type, event_version, payload,
         headers, content_type, traceparent, correlation_id)
    VALUES
        ($10, $1, $2, $5, $3, $6, convert_to($4::text, 'UTF8'), $7, 'application/json', $8, $9)
    RETURNING event_id
$$;
