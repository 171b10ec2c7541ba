-- Relays divide the aggregates, not the rows: every row belongs to one of 256 partitions, a
-- hash of its aggregate id, and each running relay claims only rows of partitions it owns.
-- One aggregate's events are therefore always in one relay's hands, and keeping their order
-- is that relay's own business (no cross-relay predecessor waits, no deferral writes).

-- Computed by Postgres on insert: producers write nothing new. hashtext is immutable, so the
-- same aggregate lands in the same partition from any client, forever.
ALTER TABLE {{schema}}.{{table}}
    ADD COLUMN part smallint GENERATED ALWAYS AS ((hashtext(aggregate_id) & 255)::smallint) STORED;

-- The claim index gains the partition as its last key column: a claim restricted to a range
-- of partitions checks it inside the index, so rows of other relays' partitions cost a skipped
-- index entry each, never a heap visit or a lock attempt. The order stays (next_attempt_at, id).
DROP INDEX {{schema}}.{{table}}_due_idx;
CREATE INDEX {{table}}_due_idx ON {{schema}}.{{table}} (next_attempt_at, id, part)
    INCLUDE (topic, occurred_at)
    WHERE status = 'pending';

-- Who owns which partition. The truth of ownership is a session advisory lock held by the
-- owner's ownership session (released by Postgres itself when that session ends); this table
-- is the fence a claim reads (a claim takes rows of a partition only while the row names its
-- relay) and what `status` shows. `epoch` counts changes of owner.
CREATE TABLE {{schema}}.{{table}}_partitions (
    part   smallint    PRIMARY KEY CHECK (part BETWEEN 0 AND 255),
    owner  text,
    epoch  bigint      NOT NULL DEFAULT 0,
    since  timestamptz
);
INSERT INTO {{schema}}.{{table}}_partitions (part) SELECT g FROM generate_series(0, 255) g;

ALTER TABLE {{schema}}.{{table}}_relays ADD COLUMN partitions integer NOT NULL DEFAULT 0;
