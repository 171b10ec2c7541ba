//! The text of every statement the relay runs on its hot path and in its housekeeping, built
//! once per outbox from its (validated) names; the shape of each query is explained next to
//! it. Every one walks an index in its order and stops early, at any backlog size.

use super::Names;

pub(super) struct Statements {
    pub(super) claim: String,
    pub(super) claim_after: String,
    pub(super) claim_share: String,
    pub(super) claim_share_after: String,
    pub(super) probe: String,
    pub(super) fence: String,
    pub(super) delete: String,
    pub(super) keep_published: String,
    pub(super) prune: String,
    pub(super) fail: String,
    pub(super) retry: String,
    pub(super) defer: String,
    pub(super) never_due: String,
}

impl Statements {
    pub(super) fn new(n: &Names) -> Self {
        let t = n.qualified();
        Statements {
            // The claim walks the due index in (next_attempt_at, id) order and stops after
            // $1 rows it could lock: its cost is the batch plus rows other claims hold,
            // whatever the table's size. The probe finds, for the rows that need it, the
            // nearest unfinished predecessor on the aggregate index (see `claim_sql`).
            claim: claim_sql(&t, false),
            claim_after: claim_sql(&t, true),
            claim_share: claim_share_sql(&t, false),
            claim_share_after: claim_share_sql(&t, true),
            probe: probe_sql(&t),
            fence: FENCE_SQL.to_string(),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            keep_published: keep_published_sql(&t),
            prune: prune_sql(&t),
            never_due: never_due_sql(&t),
            fail: fail_sql(&t),
            retry: retry_sql(&t),
            defer: defer_sql(&t),
        }
    }
}

/// The claim: it walks the due index in (next_attempt_at, id) order and stops after $1 rows it
/// could lock; with a cursor (the last key the previous claim took) it starts past the keys
/// already taken, so it never re-walks rows in flight nor the dead entries that deletes leave
/// at the front of the index until vacuum. Its cost is the batch, whatever the table holds.
///
/// It is one flat index scan and nothing per row but the columns, because anything per row
/// in Postgres costs the claim more than the walk itself: a window for the byte budget and a
/// lateral probe (even behind a gate that is false) made it four times the plain loop's
/// SELECT. Both moved to the relay's side ([`Store::take_claim`]):
///
/// * Bytes are bounded as well as rows. A payload over $2 (`relay.max_payload_bytes`) is not
///   fetched at all (only its size, and the row fails naming it). The relay reads the rows as
///   they arrive and keeps them while the running size of payloads and headers stays under
///   `relay.batch_max_bytes` (the first row always); rows locked past the budget are read
///   and dropped as they arrive, and released unchanged when the claim commits. So that a
///   table of large payloads does not send a whole batch of them for a budget's worth, a
///   relay's next claim asks for as many rows as the budget holds at the last claim's sizes.
/// * The predecessor probe (the nearest unfinished earlier row of the aggregate, one backward
///   probe on the aggregate index) is a second statement in the same transaction, for the
///   rows that need it only (see [`Store::probe_predecessors`] on which those are). In a
///   healthy drain of a backlog none does, and the claim is the one statement.
///
/// `waiting` says whether `_waiting_idx` holds anything at all: a retry, deferral, hold or
/// failure anywhere. One look per claim (an InitPlan).
fn claim_sql(t: &str, cursor: bool) -> String {
    let after = if cursor {
        cursor_after(3, 4)
    } else {
        String::new()
    };
    claim_sql_where(t, &after)
}

/// Past the key (`$at`, `$id`) the previous claim took last. A fresh row's key is `-infinity`,
/// which comes back as Postgres' earliest finite time; any time before year 1 stands for it
/// again (so the walk never skips fresh rows; at worst it re-walks a few keys).
fn cursor_after(at: u8, id: u8) -> String {
    format!(
        "AND (next_attempt_at, id) > (CASE WHEN ${at} < '0001-01-01 00:00:00+00' \
              THEN '-infinity'::timestamptz ELSE ${at} END, ${id}) "
    )
}

/// The claim of a relay that owns a share of the partitions (`$1`, `$2` as in `claim_sql`):
/// `$3` its partitions (sorted, fenced), `$4` its name, `$5`/`$6` the lowest and highest of
/// them, `$7` whether they are every partition in between; with a cursor, `$8`/`$9` the key
/// to start after.
///
/// The range is checked inside the claim index (`part` is its last key column), so rows of
/// other relays' partitions cost a skipped index entry; the exact set is a filter only when
/// the share is not one range (while partitions move). The same holds in the ownership check,
/// where a 256-element `ANY` over 256 rows cost a sixth of the claim. That uncorrelated
/// subquery runs once: the claim takes nothing unless every partition still names this relay in
/// `<table>_partitions`, which is how a relay whose ownership session died (and whose
/// partitions another relay may have taken over) is fenced out. See
/// [`crate::relay::ownership`].
fn claim_share_sql(t: &str, cursor: bool) -> String {
    let after = if cursor {
        cursor_after(8, 9)
    } else {
        String::new()
    };
    let share = format!(
        "AND part BETWEEN $5 AND $6 AND ($7 OR part = ANY($3)) \
         AND (SELECT count(*) FROM {t}_partitions \
              WHERE part BETWEEN $5 AND $6 AND ($7 OR part = ANY($3)) AND owner = $4) \
             = cardinality($3::int2[]) {after}"
    );
    claim_sql_where(t, &share)
}

/// The oldest pending event's time, for the backlog gauge and `status`: over the times a
/// client can read. Postgres takes years up to 294 276; sqlx's chrono decoding panics past
/// chrono's last year (262 142), which one such row alone would bring to the aggregate.
pub(super) const OLDEST_OCCURRED_AT: &str = "min(occurred_at) FILTER (WHERE isfinite(occurred_at) \
     AND occurred_at < '262143-01-01 00:00:00+00')";

/// The envelope's columns, in the one list every statement that reads a whole event selects
/// (the claim, `inspect`); what reads them back finds each by name.
const ENVELOPE_COLUMNS: [&str; 14] = [
    "id",
    "event_id",
    "topic",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "event_version",
    "payload",
    "headers",
    "content_type",
    "traceparent",
    "correlation_id",
    "occurred_at",
    "attempts",
];

/// The envelope's select list, with `<expression> AS <column>` for each column `instead` names.
pub(super) fn envelope_select(instead: &[(&str, &str)]) -> String {
    let columns: Vec<String> = ENVELOPE_COLUMNS
        .iter()
        .map(|&c| match instead.iter().find(|(name, _)| *name == c) {
            Some((_, expression)) => format!("{expression} AS {c}"),
            None => c.to_string(),
        })
        .collect();
    columns.join(", ")
}

/// The claim's select list: the envelope's columns (a payload past the cap `$2` is not
/// fetched), then the row's retry time, the payload's and the headers' sizes, the writing
/// transaction (a 32-bit xid) and whether any row waits (see `claim_sql`); all read back by
/// name (`columns::ClaimColumns`).
fn claim_sql_where(t: &str, and: &str) -> String {
    format!(
        "SELECT {envelope}, \
                next_attempt_at, octet_length(payload)::bigint AS payload_size, \
                coalesce(pg_column_size(headers), 0)::bigint AS headers_size, \
                xmin::text::bigint AS written_by, \
                (SELECT EXISTS (SELECT 1 FROM {t} x \
                                WHERE x.status <> 'published' \
                                  AND x.next_attempt_at <> '-infinity')) AS waiting \
         FROM {t} \
         WHERE status = 'pending' AND next_attempt_at <= now() {and}\
         ORDER BY next_attempt_at, id \
         LIMIT $1 \
         FOR UPDATE SKIP LOCKED",
        envelope = envelope_select(&[(
            "payload",
            "CASE WHEN octet_length(payload) <= $2 THEN payload END"
        )]),
    )
}

/// The predecessor probe of the claimed rows `$1` (with `$2`: probe it whatever `_waiting_idx`
/// says): each one's nearest unfinished earlier row of its aggregate, one backward probe on
/// the aggregate index. A row not marked `must` is probed only if its aggregate has a row
/// waiting before it (one descent of the small `_waiting_idx`; the gate does not depend on
/// the probed rows, so it is a one-time filter per row). Rows without a predecessor do not
/// come back. The aggregate is the row's own, read by id: not the relay's decoding of it.
fn probe_sql(t: &str) -> String {
    format!(
        "SELECT u.id AS claimed_id, p.id AS prev_id, p.status AS prev_status, \
                p.next_attempt_at AS prev_next_attempt_at \
         FROM unnest($1::bigint[], $2::bool[]) AS u(id, must) \
         JOIN {t} k ON k.id = u.id \
         CROSS JOIN LATERAL ( \
           SELECT p.id, p.status, p.next_attempt_at FROM {t} p \
           WHERE (u.must \
                  OR EXISTS (SELECT 1 FROM {t} w \
                             WHERE w.aggregate_id = k.aggregate_id AND w.id < k.id \
                               AND w.status <> 'published' \
                               AND w.next_attempt_at <> '-infinity')) \
             AND p.aggregate_id = k.aggregate_id AND p.id < k.id \
             AND p.status <> 'published' \
           ORDER BY p.id DESC LIMIT 1) p"
    )
}

/// The claim's half of the fence: a shared transaction lock per partition, which a
/// relay taking a partition over waits out (exclusively) before its first claim
/// there, so it never claims beside a claim of the previous owner still open.
/// `try`, so a partition being taken over is left out instead of waited for.
/// Also the oldest transaction running now, as a 32-bit xid: a front claim's start
/// of the walk (see the claim's probe condition).
const FENCE_SQL: &str = "SELECT coalesce(array_agg(p ORDER BY p), '{}'), \
                          (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::numeric \
                                   % 4294967296)::bigint) \
                        FROM unnest($2::int2[]) p \
                        WHERE pg_try_advisory_xact_lock_shared($1, p::int)";

/// With a retention: the row stays, out of the claim and ordering indexes (both are
/// partial on unfinished rows) and into the published index, which pruning walks.
fn keep_published_sql(t: &str) -> String {
    format!("UPDATE {t} SET status = 'published', published_at = now() WHERE id = ANY($1)")
}

/// Fails rows, each with its reason; `inc` counts the publish attempt or not.
fn fail_sql(t: &str) -> String {
    format!(
        "UPDATE {t} SET status = 'failed', attempts = attempts + d.inc, \
           last_error = d.err, next_attempt_at = now() \
         FROM unnest($1::bigint[], $2::int[], $3::text[]) AS d(id, inc, err) \
         WHERE {t}.id = d.id"
    )
}

/// Schedules rows again after their delay, with the reason.
fn retry_sql(t: &str) -> String {
    format!(
        "UPDATE {t} SET attempts = attempts + d.inc, last_error = d.err, \
           next_attempt_at = now() + d.delay * interval '1 second' \
         FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::int[]) \
              AS d(id, delay, err, inc) \
         WHERE {t}.id = d.id"
    )
}

/// A deferral to the predecessor's time is applied only while the predecessor is
/// still as the claim saw it, checked under a share lock (SKIP LOCKED: never wait on
/// another relay). Replay and purge change the predecessor before releasing held
/// rows, in passes until one releases nothing (see `release_held`), so a hold either
/// sees their change (and defers briefly instead) or commits first and is released
/// by a later pass; a row is never held behind a predecessor that is already gone.
fn defer_sql(t: &str) -> String {
    format!(
        "UPDATE {t} SET next_attempt_at = CASE WHEN ok.held \
             THEN d.until ELSE now() + $5 * interval '1 second' END \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[]) \
              AS d(id, prev, prev_status, until) \
         CROSS JOIN LATERAL (SELECT EXISTS ( \
             SELECT 1 FROM {t} p WHERE p.id = d.prev AND p.status = d.prev_status \
               AND (p.status = 'failed' OR p.next_attempt_at = d.until) \
             FOR SHARE SKIP LOCKED) AS held) ok \
         WHERE {t}.id = d.id"
    )
}

/// Oldest first on the published index, a batch at a time; SKIP LOCKED so relays
/// pruning at once split the work instead of queueing on each other.
fn prune_sql(t: &str) -> String {
    format!(
        "DELETE FROM {t} WHERE id IN ( \
           SELECT id FROM {t} WHERE status = 'published' AND published_at < $1 \
           ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
    )
}

/// Rows no time ever reaches (`infinity`, or past the relay's hold marker: only a
/// producer writes those): a row that heads its aggregate fails naming the value;
/// one behind an unfinished earlier row is made due, so the relay orders it (and
/// holds it behind its failed predecessor). On the claim index, at its far end.
fn never_due_sql(t: &str) -> String {
    format!(
        "WITH c AS ( \
           SELECT o.id, EXISTS ( \
               SELECT 1 FROM {t} p WHERE p.aggregate_id = o.aggregate_id \
                 AND p.id < o.id AND p.status <> 'published') AS behind \
           FROM {t} o WHERE o.status = 'pending' AND o.next_attempt_at > $1 \
           ORDER BY o.next_attempt_at, o.id LIMIT $2 FOR UPDATE OF o SKIP LOCKED) \
         UPDATE {t} SET \
           status = CASE WHEN c.behind THEN 'pending' ELSE 'failed' END, \
           last_error = CASE WHEN c.behind THEN {t}.last_error ELSE \
             'field next_attempt_at: ' || {t}.next_attempt_at::text || \
             ' is never due; allowed: a time before ' || $1::text || \
             ' (leave it to its default to publish at once)' END, \
           next_attempt_at = now() \
         FROM c WHERE {t}.id = c.id RETURNING c.behind"
    )
}
