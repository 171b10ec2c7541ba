-- Fresh events are due at -infinity instead of at their transaction's start time: the claim
-- index, (next_attempt_at, id, part), then orders them by id, which is the order of an
-- aggregate's events. (With now(), a transaction that started earlier but wrote later, after
-- waiting on a producer's lock, sorted its event ahead of an earlier one.) Rows the relay
-- reschedules (retries, deferrals, holds) and rows a producer schedules get a real time, so
-- they sort after every fresh row, as before.
ALTER TABLE {{schema}}.{{table}} ALTER COLUMN next_attempt_at SET DEFAULT '-infinity';

-- The unfinished rows that are not fresh: retried, deferred, held, failed or scheduled. A
-- claimed row needs the backward probe for its nearest unfinished predecessor only when its
-- aggregate has such a row before it (or it is itself one, or it was written after the claims'
-- walk began); everywhere else the claim order is the aggregate order. Fresh rows never enter
-- this index, so it stays as small as the trouble is.
CREATE INDEX {{table}}_waiting_idx ON {{schema}}.{{table}} (aggregate_id, id)
    WHERE status <> 'published' AND next_attempt_at <> '-infinity';
