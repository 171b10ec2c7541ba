-- Operations: what `status`, `failed`, `replay`, `purge`, the backlog gauges and the pruning of
-- kept published rows read, each on an index at any table size.

-- The claim index carries each pending row's topic and occurrence time, so the backlog per
-- topic and the oldest pending event come from one index-only scan of the backlog itself.
DROP INDEX {{schema}}.{{table}}_due_idx;
CREATE INDEX {{table}}_due_idx ON {{schema}}.{{table}} (next_attempt_at, id)
    INCLUDE (topic, occurred_at)
    WHERE status = 'pending';

-- Failed rows: per aggregate (the aggregates they hold back, replay and purge by aggregate)
-- with the topic at hand for counts and filters.
CREATE INDEX {{table}}_failed_idx ON {{schema}}.{{table}} (aggregate_id, id)
    INCLUDE (topic)
    WHERE status = 'failed';

-- Published rows kept for a retention (relay.published_retention): pruned oldest first in
-- batches, counted per topic, replayed by time range.
CREATE INDEX {{table}}_published_idx ON {{schema}}.{{table}} (published_at)
    INCLUDE (topic)
    WHERE status = 'published';

-- The relays working on this outbox: each one writes its row every few seconds while it runs
-- and deletes it when it stops. `status` shows the rows seen recently; a relay that died leaves
-- a row that simply stops being seen.
CREATE TABLE {{schema}}.{{table}}_relays (
    instance    text        PRIMARY KEY,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    version     text        NOT NULL,
    started_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL,
    in_flight   integer     NOT NULL DEFAULT 0,
    published   bigint      NOT NULL DEFAULT 0,
    failed      bigint      NOT NULL DEFAULT 0
);
