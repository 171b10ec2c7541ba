//! The outbox's SQL: connecting, claiming, marking, enqueueing, migrating, counting.
//!
//! Every statement the relay runs is built here once, from the configured (validated) schema
//! and table names, and each one stays on an index at any backlog size; the shape of each
//! query is explained next to it.
//!
//! # How a claim lives and dies
//! A claim is a transaction: [`Store::claim`] opens it and locks due pending rows with
//! `FOR UPDATE SKIP LOCKED`; the relay publishes them while the transaction is open and
//! [`Store::finish`] writes every verdict and commits. No claim column is ever written, so a
//! claim costs no extra row version, and a relay that dies (kill -9, lost connection, host
//! gone) releases its claims the moment Postgres ends its session: the rows are pending again,
//! unchanged, for any relay. `idle_in_transaction_session_timeout` bounds a relay that hangs
//! instead of dying.

mod decode;
pub mod enqueue;
pub mod migrate;
pub mod ops;
pub mod partitions;

use crate::config::{redact_url, DatabaseConfig};
use crate::envelope::Event;
use chrono::{DateTime, Utc};
use decode::decode_claimed;
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use enqueue::{NewEvent, Outbox};

/// A database failure, classified.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The cause is in the text and deliberately not the error's source (not even by the
    // field's name): error chains would print it again, twice with sqlx's I/O errors.
    #[error("database {what}: {cause}")]
    Sql {
        what: &'static str,
        cause: sqlx::Error,
    },
    #[error("database URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("{0}")]
    Schema(String),
    /// A task running store work panicked or was cancelled.
    #[error("database task {0}")]
    Task(String),
    /// No answer within the client's own bound: the server's statement_timeout never fired, so
    /// the connection itself is gone quiet (a black-holed network, a frozen server). The
    /// connection is dropped with the work; an open claim is then lost, its rows pending again
    /// once Postgres ends the session.
    #[error("database {what}: no answer within {after:?}")]
    TimedOut { what: &'static str, after: Duration },
}

impl StoreError {
    fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |cause| StoreError::Sql { what, cause }
    }

    /// Whether trying again later may succeed: lost connections, restarts, timeouts,
    /// serialization failures and deadlocks. Everything else needs a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sql { cause, .. } => match cause {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => {
                    let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                    code == "40001"
                        || code == "40P01"
                        || code == "55P03"
                        || code == "57014"
                        || code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53")
                }
                _ => false,
            },
            StoreError::TimedOut { .. } => true,
            StoreError::Url { .. } | StoreError::Schema(_) | StoreError::Task(_) => false,
        }
    }
}

/// The configured names, validated as lowercase identifiers (safe to put into SQL text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub schema: String,
    pub table: String,
}

impl Names {
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Names {
            schema: schema.into(),
            table: table.into(),
        }
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The LISTEN/NOTIFY channel: `schema.table`, shortened with a hash past Postgres' 63 bytes.
    pub fn channel(&self) -> String {
        let full = self.qualified();
        if full.len() <= 63 {
            return full;
        }
        format!("{}_{:016x}", &full[..46], fnv1a(full.bytes()))
    }

    /// The first key of this outbox's advisory locks for one purpose (partition ownership,
    /// claim fences, relay membership): stable across processes and versions, positive, and
    /// different per outbox, so several outboxes share a database without meeting.
    pub fn lock_space(&self, purpose: &str) -> i32 {
        let key = self.qualified().into_bytes().into_iter().chain([0u8]);
        (fnv1a(key.chain(purpose.bytes())) & 0x7fff_ffff) as i32
    }

    /// Replaces the placeholders of a migration or statement template.
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{{schema}}", &self.schema)
            .replace("{{table}}", &self.table)
            .replace("{{channel}}", &self.channel())
    }
}

/// FNV-1a, 64 bits: a hash that is the same in every process and version (Rust's own hasher
/// is neither), for names derived from the outbox's name.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A row's status column.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const FAILED: &str = "failed";
    pub const PUBLISHED: &str = "published";
}

/// The `next_attempt_at` of a row held behind a failed predecessor: it waits until the
/// predecessor is replayed or purged, which releases it.
pub const HELD_UNTIL: &str = "9999-12-31T00:00:00Z";

pub fn held_until() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(HELD_UNTIL)
        .expect("constant is a valid timestamp")
        .with_timezone(&Utc)
}

/// The nearest earlier unfinished row of the same aggregate, as the claim saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prev {
    pub id: i64,
    pub status: String,
    pub next_attempt_at: DateTime<Utc>,
}

/// One claimed row.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Shared from the start: decoded on the claim's task straight into its final place, so
    /// the relay's loop never moves the envelope again.
    pub event: Arc<Event>,
    /// Set when a column could not be decoded into the envelope (bad headers JSON).
    pub invalid: Option<String>,
    pub prev: Option<Prev>,
}

/// Why a row is deferred, and until when.
#[derive(Debug, Clone)]
pub enum DeferUntil {
    /// Its predecessor is in flight elsewhere: look again after `relay.blocked_retry`.
    Soon,
    /// Wait as long as the predecessor does: until its retry time, or (failed predecessor)
    /// until it is replayed or purged. Applied only if the predecessor is still as seen.
    Predecessor(Prev),
}

/// Every verdict of one claim, written in one transaction by [`Store::finish`].
#[derive(Debug, Default)]
pub struct Marks {
    pub published: Vec<i64>,
    /// (row, counts as a publish attempt, reason)
    pub failed: Vec<(i64, bool, String)>,
    /// (row, delay in seconds, reason, counts as a publish attempt)
    pub retry: Vec<(i64, f64, String, bool)>,
    pub deferred: Vec<(i64, DeferUntil)>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.published.is_empty()
            && self.failed.is_empty()
            && self.retry.is_empty()
            && self.deferred.is_empty()
    }
}

/// Connection settings beyond the database section.
#[derive(Debug, Clone)]
pub struct Session {
    pub application_name: String,
    /// Ends a claim whose relay stopped talking to Postgres without dying.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Operator commands (`status`, `failed`, `replay`, ...): sequential scans stay off, but
    /// sorting a few failed rows for a listing is allowed.
    pub operator: bool,
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

/// The claim's select list, by position: the envelope's columns (0-14, see
/// `decode::decode_claimed`), then 15 the payload's size, 16 the headers' size, 17 the
/// writing transaction (a 32-bit xid) and 18 whether any row waits (see `claim_sql`).
fn claim_sql_where(t: &str, and: &str) -> String {
    format!(
        "SELECT id, event_id, topic, aggregate_id, aggregate_type, event_type, event_version, \
                CASE WHEN octet_length(payload) <= $2 THEN payload END AS payload, \
                headers, content_type, traceparent, correlation_id, occurred_at, attempts, \
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
         FOR UPDATE SKIP LOCKED"
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
        "SELECT u.id, p.id, p.status, p.next_attempt_at \
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

/// Whether a row written by transaction `written_by` needs its predecessor probe, given the
/// walk that began when `young` was the oldest transaction running (both 32-bit xids, as
/// Postgres compares them: modulo 2^32, within 2^31 of each other). Rows written by an older
/// transaction were committed before the walk began, so every earlier unfinished row of their
/// aggregate was visible to the walk when it passed its key. A frozen or bootstrap xid (below
/// 3) is older than anything running.
pub(crate) fn written_during_walk(written_by: i64, young: i64) -> bool {
    let (w, y) = (written_by as u32, young as u32);
    w >= 3 && (w.wrapping_sub(y) as i32) >= 0
}

/// How many partitions the aggregates are hashed into (`part` in the outbox table).
pub const PARTITIONS: i16 = 256;

/// Advisory lock purposes (see [`Names::lock_space`]).
pub const LOCK_PARTITION: &str = "partition";
pub const LOCK_FENCE: &str = "fence";
pub const LOCK_MEMBER: &str = "member";

/// The partitions a relay's claim may take rows from, and the relay's name they must still
/// carry in `<table>_partitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub owner: String,
    /// Sorted, distinct.
    pub parts: Vec<i16>,
}

/// Where a claim starts in the due index: after this (next_attempt_at, id).
pub type Cursor = (DateTime<Utc>, i64);

/// Where a claim stands in the claims' walk through the due index, which decides the rows
/// whose predecessor probe it may skip (see [`Store::probe_predecessors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// From the front: a new walk begins, with the oldest transaction running now.
    Front,
    /// Past the key the previous claim took last, in the walk that began with that xid.
    After(Cursor, i64),
    /// Every row gets its probe (rows locked by another claim may come back unchanged).
    ProbeAll(Option<Cursor>),
}

struct Statements {
    claim: String,
    claim_after: String,
    claim_share: String,
    claim_share_after: String,
    probe: String,
    fence: String,
    delete: String,
    keep_published: String,
    prune: String,
    fail: String,
    retry: String,
    defer: String,
    never_due: String,
}

impl Statements {
    fn new(n: &Names) -> Self {
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
            // The claim's half of the fence: a shared transaction lock per partition, which a
            // relay taking a partition over waits out (exclusively) before its first claim
            // there, so it never claims beside a claim of the previous owner still open.
            // `try`, so a partition being taken over is left out instead of waited for.
            // Also the oldest transaction running now, as a 32-bit xid: a front claim's start
            // of the walk (see the claim's probe condition).
            fence: "SELECT coalesce(array_agg(p ORDER BY p), '{}'), \
                      (SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::numeric \
                               % 4294967296)::bigint) \
                    FROM unnest($2::int2[]) p \
                    WHERE pg_try_advisory_xact_lock_shared($1, p::int)"
                .to_string(),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            // With a retention: the row stays, out of the claim and ordering indexes (both are
            // partial on unfinished rows) and into the published index, which pruning walks.
            keep_published: format!(
                "UPDATE {t} SET status = 'published', published_at = now() WHERE id = ANY($1)"
            ),
            // Oldest first on the published index, a batch at a time; SKIP LOCKED so relays
            // pruning at once split the work instead of queueing on each other.
            prune: format!(
                "DELETE FROM {t} WHERE id IN ( \
                   SELECT id FROM {t} WHERE status = 'published' AND published_at < $1 \
                   ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            // Rows no time ever reaches (`infinity`, or past the relay's hold marker: only a
            // producer writes those): a row that heads its aggregate fails naming the value;
            // one behind an unfinished earlier row is made due, so the relay orders it (and
            // holds it behind its failed predecessor). On the claim index, at its far end.
            never_due: format!(
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
            ),
            fail: format!(
                "UPDATE {t} SET status = 'failed', attempts = attempts + d.inc, \
                   last_error = d.err, next_attempt_at = now() \
                 FROM unnest($1::bigint[], $2::int[], $3::text[]) AS d(id, inc, err) \
                 WHERE {t}.id = d.id"
            ),
            retry: format!(
                "UPDATE {t} SET attempts = attempts + d.inc, last_error = d.err, \
                   next_attempt_at = now() + d.delay * interval '1 second' \
                 FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::int[]) \
                      AS d(id, delay, err, inc) \
                 WHERE {t}.id = d.id"
            ),
            // A deferral to the predecessor's time is applied only while the predecessor is
            // still as the claim saw it, checked under a share lock (SKIP LOCKED: never wait on
            // another relay). Replay and purge change the predecessor before releasing held
            // rows, in passes until one releases nothing (see `release_held`), so a hold either
            // sees their change (and defers briefly instead) or commits first and is released
            // by a later pass; a row is never held behind a predecessor that is already gone.
            defer: format!(
                "UPDATE {t} SET next_attempt_at = CASE WHEN ok.held \
                     THEN d.until ELSE now() + $5 * interval '1 second' END \
                 FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[]) \
                      AS d(id, prev, prev_status, until) \
                 CROSS JOIN LATERAL (SELECT EXISTS ( \
                     SELECT 1 FROM {t} p WHERE p.id = d.prev AND p.status = d.prev_status \
                       AND (p.status = 'failed' OR p.next_attempt_at = d.until) \
                     FOR SHARE SKIP LOCKED) AS held) ok \
                 WHERE {t}.id = d.id"
            ),
        }
    }
}

/// The outbox as the relay sees it.
pub struct Store {
    pool: PgPool,
    names: Names,
    stmts: Statements,
    /// Mark published rows instead of deleting them (`relay.published_retention` > 0).
    keep_published: bool,
    /// The longest a claim or a finish may wait for Postgres, whatever the network does.
    client_timeout: Duration,
    /// Payloads larger than this are not fetched (`relay.max_payload_bytes`).
    payload_cap: i64,
    /// A claim returns rows while their payloads and headers fit (`relay.batch_max_bytes`).
    batch_max_bytes: i64,
    /// How many rows a claim asks for at most: about what the byte budget held at the last
    /// claim's row sizes (see `claim_sql`).
    rows_that_fit: AtomicU32,
    /// Sessions go without TLS: a loopback host, no TLS setting given, and the server took a
    /// plaintext session at start-up (see [`tls_left_to_us`]).
    plaintext_loopback: bool,
    /// When a statement's cached plan went stale (see [`PlanReset`]).
    plans: Arc<PlanReset>,
}

/// A column the claim reads changed its type under running sessions: Postgres then refuses
/// every session's prepared claim ("cached plan must not change result type") until the
/// statement is prepared again. The session that hits it records the moment here, and the
/// pool (built by [`Store::connect`]) lets go of every session opened before it as it next
/// hands one out, so new sessions prepare the statements afresh: one failed claim, not one
/// per pooled session, and no restart.
#[derive(Debug, Default)]
pub struct PlanReset {
    /// When the last stale plan was seen.
    at: Mutex<Option<std::time::Instant>>,
}

impl PlanReset {
    /// Records a stale plan if `e` is one.
    fn note(&self, e: &StoreError) {
        if is_stale_plan(e) {
            *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
            tracing::warn!(
                "a column the claim reads changed its type: the database sessions opened \
                 before are replaced, and the claim is tried again"
            );
        }
    }

    /// Whether a session `age` old was opened before the last stale plan.
    fn predates(&self, age: Duration) -> bool {
        // A session at least as old as the time since then was opened before it.
        self.at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| age >= at.elapsed())
    }
}

/// Postgres refused a prepared statement because the types of its result changed since it
/// was prepared: SQLSTATE 0A000 raised where a cached plan is checked again
/// (`RevalidateCachedQuery`, which no translation of the message changes), or, where the
/// server does not say where, with that message.
fn is_stale_plan(e: &StoreError) -> bool {
    let StoreError::Sql {
        cause: sqlx::Error::Database(db),
        ..
    } = e
    else {
        return false;
    };
    if db.code().as_deref() != Some("0A000") {
        return false;
    }
    match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(pg) if pg.routine().is_some() => pg.routine() == Some("RevalidateCachedQuery"),
        _ => db
            .message()
            .contains("cached plan must not change result type"),
    }
}

/// Whether the TLS of the database's sessions is ours to choose: no TLS setting anywhere (the
/// keys; the URL's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`; `PGSSLMODE`,
/// `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`) and a loopback host (`localhost`, 127.0.0.0/8,
/// `::1`) over TCP. There TLS protects nothing when Postgres is the listener (the bytes
/// never leave the kernel, as over a Unix socket, where libpq does not encrypt either) and
/// costs the relay about 5 % of its CPU, and Postgres as much again; so the relay goes without
/// it, if the server agrees, and says so at start-up (a plain TCP forwarder on loopback to a
/// remote server is the case for setting `database.ssl_mode`).
fn tls_left_to_us(tls: &crate::config::DatabaseTls, host: &str) -> bool {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    tls.mode.is_none()
        && tls.root_cert.is_none()
        && !tls.client_cert
        && !["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"]
            .into_iter()
            .any(set)
        && is_loopback(host)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Does the server take a plaintext session with these settings? One connection, at most
/// `within` (and 2 s); any failure (TLS demanded by `pg_hba.conf`, the server away or not up
/// yet) keeps the default, `prefer`, so plaintext is used only where it was seen to work.
/// Decided once: sessions opened later use what was decided here.
async fn plaintext_accepted(opts: &PgConnectOptions, within: Duration) -> bool {
    use sqlx::Connection;
    let plain = opts.clone().ssl_mode(sqlx::postgres::PgSslMode::Disable);
    let within = within.min(Duration::from_secs(2));
    match tokio::time::timeout(within, sqlx::PgConnection::connect_with(&plain)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        _ => false,
    }
}

/// What a claim brought back.
pub struct Claim {
    pub tx: ClaimTx,
    pub rows: Vec<Claimed>,
    /// Where the next claim may start (the last key taken), if this one was full.
    pub next: Option<Cursor>,
    /// The byte budget cut the claim short: more rows are due at once (locked by this claim
    /// until it commits, so the next claim starts from the front).
    pub cut: bool,
    /// The oldest transaction running when this claim's walk began from the front (a 32-bit
    /// xid), for the claims that continue it.
    pub walk_xmin: Option<i64>,
}

/// One relay's row in `<table>_relays`, written every few seconds while it runs.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub instance: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub in_flight: i32,
    pub published: i64,
    pub failed: i64,
    /// Partitions owned now.
    pub partitions: i32,
}

/// The backlog in figures, as the monitor samples it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    /// Pending and due now (the rest wait for a retry or behind a failed predecessor).
    pub due: i64,
    pub failed: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// An open claim: the transaction holding the row locks.
pub type ClaimTx = Transaction<'static, Postgres>;

impl Store {
    /// Connects a pool. The URL's password is never logged.
    pub async fn connect(db: &DatabaseConfig, session: &Session) -> Result<Store, StoreError> {
        let url = db.url.expose();
        let mut opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::Url {
            url: redact_url(url),
            message: crate::config::redact_secrets(&e.to_string()),
        })?;
        let tls = db.tls();
        if let Some(mode) = &tls.mode {
            opts = opts.ssl_mode(mode.parse().map_err(|e: sqlx::Error| StoreError::Url {
                url: redact_url(url),
                message: e.to_string(),
            })?);
        }
        if !db.ssl_root_cert.is_empty() {
            opts = opts.ssl_root_cert(db.ssl_root_cert.as_str());
        }
        // As libpq: with a CA file, require verifies the chain too (the driver alone would
        // accept any certificate).
        if tls.root_cert.is_some()
            && matches!(opts.get_ssl_mode(), sqlx::postgres::PgSslMode::Require)
        {
            opts = opts.ssl_mode(sqlx::postgres::PgSslMode::VerifyCa);
        }
        opts = opts.application_name(&session.application_name);
        let mut params: Vec<(&str, String)> = vec![
            (
                "statement_timeout",
                format!("{}", db.statement_timeout.0.as_millis()),
            ),
            // Migrations' "already exists, skipping" notices are not news.
            ("client_min_messages", "warning".to_string()),
        ];
        // Every statement of the relay is meant to walk an index in its order and stop early.
        // With statistics from a near-empty table (the steady state) the planner prefers a
        // bitmap scan and a sort for the claim, which is cheap then and ruinous on a backlog
        // that built up before the next analyze. Plans must not depend on that.
        let knobs: &[&str] = if session.operator {
            &["enable_seqscan"]
        } else {
            &["enable_seqscan", "enable_bitmapscan", "enable_sort"]
        };
        for knob in knobs {
            params.push((knob, "off".to_string()));
        }
        if let Some(t) = session.idle_in_transaction_timeout {
            params.push((
                "idle_in_transaction_session_timeout",
                format!("{}", t.as_millis()),
            ));
        }
        opts = opts.options(params);
        // A Unix socket never carries TLS, whatever the host says.
        let plaintext_loopback =
            if opts.get_socket().is_none() && tls_left_to_us(&tls, opts.get_host()) {
                plaintext_accepted(&opts, db.connect_timeout.0).await
            } else {
                false
            };
        if plaintext_loopback {
            let why = "database: a loopback host and no TLS setting: sessions go without TLS \
                       (set database.ssl_mode to prefer or stricter to encrypt them, e.g. \
                       through a local forwarder to another host)";
            // Said once where the relay starts; an operator's command would repeat it each
            // time (`check` prints it instead).
            if session.operator {
                tracing::debug!(host = opts.get_host(), "{why}");
            } else {
                tracing::info!(host = opts.get_host(), "{why}");
            }
            opts = opts.ssl_mode(sqlx::postgres::PgSslMode::Disable);
        }
        let plans = Arc::new(PlanReset::default());
        let stale = plans.clone();
        let pool = PgPoolOptions::new()
            .max_connections(db.max_connections)
            .acquire_timeout(db.connect_timeout.0)
            .before_acquire(move |_, meta| {
                let keep = !stale.predates(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .connect_lazy_with(opts);
        let mut store = Store::with_pool(pool, Names::new(db.schema.clone(), db.table.clone()));
        store.plans = plans;
        // Past the server's own statement timeout (plus a connect), nothing will answer.
        store.client_timeout =
            db.statement_timeout.0 + db.connect_timeout.0 + Duration::from_secs(1);
        store.plaintext_loopback = plaintext_loopback;
        Ok(store)
    }

    /// A store on a pool of the caller's. Only [`Store::connect`]'s pool replaces sessions
    /// whose prepared claim went stale (see [`PlanReset`]).
    pub fn with_pool(pool: PgPool, names: Names) -> Store {
        let stmts = Statements::new(&names);
        Store {
            pool,
            names,
            stmts,
            keep_published: false,
            client_timeout: Duration::from_secs(60),
            payload_cap: 1024 * 1024,
            batch_max_bytes: 8 * 1024 * 1024,
            rows_that_fit: AtomicU32::new(u32::MAX),
            plaintext_loopback: false,
            plans: Arc::default(),
        }
    }

    /// Sessions go in plaintext because the host is a loopback one and no TLS setting was
    /// given (see [`tls_left_to_us`]).
    pub fn plaintext_loopback(&self) -> bool {
        self.plaintext_loopback
    }

    /// Bounds claims in bytes: payloads over `max_payload_bytes` are not fetched, and a claim
    /// returns rows while their payloads and headers fit in `batch_max_bytes` (at least one).
    pub fn bounded_in_bytes(mut self, max_payload_bytes: usize, batch_max_bytes: usize) -> Store {
        self.payload_cap = i64::try_from(max_payload_bytes).unwrap_or(i64::MAX);
        self.batch_max_bytes = i64::try_from(batch_max_bytes).unwrap_or(i64::MAX);
        self
    }

    /// Runs store work under the client's own bound (see [`StoreError::TimedOut`]).
    async fn bounded<T>(
        &self,
        what: &'static str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let after = self.client_timeout;
        let res = tokio::time::timeout(after, work)
            .await
            .unwrap_or(Err(StoreError::TimedOut { what, after }));
        if let Err(e) = &res {
            self.plans.note(e);
        }
        res
    }

    /// Keeps published rows (marked, with `published_at`) instead of deleting them; they are
    /// removed later by [`Store::prune_published`].
    pub fn keeping_published(mut self, keep: bool) -> Store {
        self.keep_published = keep;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The claim statement's text (`$1` = batch size), for EXPLAIN in tests and benchmarks.
    pub fn claim_statement(&self) -> &str {
        &self.stmts.claim
    }

    /// The claim statement with a cursor (`$2`, `$3`: the key to start after).
    pub fn claim_statement_after(&self) -> &str {
        &self.stmts.claim_after
    }

    /// Fails with a clear message when the outbox table has not been created or is behind.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        migrate::check(&self.pool, &self.names).await
    }

    /// Opens a claim: up to `limit` due pending rows, locked until [`Store::finish`] or until
    /// the transaction ends otherwise (which releases them unchanged).
    pub async fn claim(&self, limit: u32) -> Result<(ClaimTx, Vec<Claimed>), StoreError> {
        let (tx, rows, _) = self.claim_after(limit, None).await?;
        Ok((tx, rows))
    }

    /// As [`Store::claim`], starting past `cursor` in claim order; also returns the cursor
    /// for the next claim (the last key taken).
    pub async fn claim_after(
        &self,
        limit: u32,
        cursor: Option<Cursor>,
    ) -> Result<(ClaimTx, Vec<Claimed>, Option<Cursor>), StoreError> {
        self.bounded("claim", self.claim_after_unbounded(limit, cursor))
            .await
    }

    async fn claim_after_unbounded(
        &self,
        limit: u32,
        cursor: Option<Cursor>,
    ) -> Result<(ClaimTx, Vec<Claimed>, Option<Cursor>), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::sql("begin"))?;
        let sql = match cursor {
            None => &self.stmts.claim,
            Some(_) => &self.stmts.claim_after,
        };
        let mut q = sqlx::query(sql).bind(limit as i64).bind(self.payload_cap);
        if let Some((at, id)) = cursor {
            q = q.bind(at).bind(id);
        }
        // No walk to speak of: every row gets its probe.
        let taken = self.take_claim(&mut tx, q, None).await?;
        Ok((tx, taken.rows, taken.last))
    }

    /// As [`Store::claim_after`], for a relay that owns a share of the partitions: only rows
    /// of `share`'s partitions, and only while every one of them is still fenced for this
    /// claim (see `claim_share_sql`). Partitions whose fence is taken (another relay is taking
    /// them over) are left out of this claim.
    ///
    /// `walk` is where the claims' walk through the due index stands (see [`Walk`]).
    pub async fn claim_share(
        &self,
        limit: u32,
        walk: Walk,
        share: &Share,
    ) -> Result<Claim, StoreError> {
        self.bounded("claim", self.claim_share_unbounded(limit, walk, share))
            .await
    }

    async fn claim_share_unbounded(
        &self,
        limit: u32,
        walk: Walk,
        share: &Share,
    ) -> Result<Claim, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::sql("begin"))?;
        let (fenced, running): (Vec<i16>, Option<i64>) = sqlx::query_as(&self.stmts.fence)
            .bind(self.names.lock_space(LOCK_FENCE))
            .bind(&share.parts)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::sql("fence the claim's partitions"))?;
        let (Some(&lo), Some(&hi)) = (fenced.first(), fenced.last()) else {
            return Ok(Claim {
                tx,
                rows: Vec::new(),
                next: None,
                cut: false,
                walk_xmin: None,
            });
        };
        let (cursor, walk_xmin) = match walk {
            Walk::Front => (None, running),
            Walk::After(cursor, xmin) => (Some(cursor), Some(xmin)),
            Walk::ProbeAll(cursor) => (cursor, None),
        };
        let contiguous = (hi - lo + 1) as usize == fenced.len();
        let sql = if cursor.is_some() {
            &self.stmts.claim_share_after
        } else {
            &self.stmts.claim_share
        };
        let limit = self.rows_to_ask(limit);
        let mut q = sqlx::query(sql)
            .bind(limit as i64)
            .bind(self.payload_cap)
            .bind(&fenced)
            .bind(&share.owner)
            .bind(lo)
            .bind(hi)
            .bind(contiguous);
        if let Some((at, id)) = cursor {
            q = q.bind(at).bind(id);
        }
        let taken = self.take_claim(&mut tx, q, walk_xmin).await?;
        let next = if taken.rows.len() as u32 == limit {
            taken.last
        } else {
            None
        };
        Ok(Claim {
            tx,
            rows: taken.rows,
            next,
            cut: taken.cut,
            walk_xmin,
        })
    }

    /// A partitioned claim's row limit: `limit`, or fewer where the byte budget held fewer at
    /// the last claim's row sizes (the claim then tells it came back full by its `next`).
    fn rows_to_ask(&self, limit: u32) -> u32 {
        limit.min(self.rows_that_fit.load(Ordering::Relaxed)).max(1)
    }

    /// Runs a claim statement and takes its rows as they arrive, while they fit the byte
    /// budget (see `claim_sql`); then probes the predecessors of those that need it
    /// ([`Store::probe_predecessors`]). `young`: the oldest transaction running when the
    /// claims' walk began (`None`: every row is probed).
    async fn take_claim(
        &self,
        tx: &mut ClaimTx,
        claim: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        young: Option<i64>,
    ) -> Result<Taken, StoreError> {
        let mut taken = Taken::default();
        let mut bytes = 0i64;
        let mut probe: Vec<(usize, bool)> = Vec::new();
        let mut waiting = false;
        {
            let mut rows = claim.fetch(&mut **tx);
            while let Some(row) = rows.try_next().await.map_err(StoreError::sql("claim"))? {
                if taken.cut {
                    continue;
                }
                let meta = decode::claim_meta(&row, self.payload_cap);
                if !taken.rows.is_empty() && bytes >= self.batch_max_bytes {
                    // Locked past the budget: released unchanged at commit. The rest is read
                    // to its end and dropped, not left unread: a statement still sending
                    // would keep running (its timeout counting, the session's idle timeout
                    // not) through the whole publish, and an error in it would only surface
                    // at the finish.
                    taken.cut = true;
                    continue;
                }
                bytes = bytes.saturating_add(meta.size);
                let (c, key) = decode_claimed(&row, self.payload_cap)
                    .map_err(StoreError::sql("decode claimed row"))?;
                if taken.last.is_none_or(|l| key > l) {
                    taken.last = Some(key);
                }
                waiting |= meta.waiting;
                let must = !meta.fresh
                    || match (young, meta.written_by) {
                        (Some(y), Some(w)) => written_during_walk(w, y),
                        _ => true,
                    };
                if must || waiting {
                    probe.push((taken.rows.len(), must));
                }
                taken.rows.push(c);
            }
        }
        if let Some(per_row) = bytes.checked_div(taken.rows.len() as i64) {
            // As many rows of that size as the budget keeps (the last one starts under it):
            // rows alike come back as a full claim, which the next one continues.
            let per_row = per_row.max(1);
            let fit = self.batch_max_bytes.saturating_add(per_row - 1) / per_row;
            self.rows_that_fit
                .store(u32::try_from(fit).unwrap_or(u32::MAX), Ordering::Relaxed);
        }
        if !probe.is_empty() {
            self.probe_predecessors(tx, &mut taken.rows, &probe).await?;
        }
        Ok(taken)
    }

    /// Finds the nearest unfinished predecessor of the claimed rows `which` (index into
    /// `rows`, and whether the row is probed whatever `_waiting_idx` says), in the claim's
    /// transaction. A row needs it only where the claim order can have missed one; elsewhere
    /// the relay's own memory of the aggregate's rows is the whole story (`relay::dispatch`
    /// chains every row behind its aggregate's rows in memory, probed or not):
    ///
    /// * the row is not fresh (retried, deferred, held, scheduled): its key sorts it after every
    ///   fresh row, so a fresh predecessor may not have been walked yet;
    /// * it was written by a transaction at least as new as the oldest one running when the
    ///   claims' walk began from the front: only then can an earlier event of its aggregate
    ///   have committed *behind* the walk (a producer that writes an aggregate's events one
    ///   transaction after another), where the cursor would not see it;
    /// * its aggregate has a row that is not fresh before it: a retry, deferral, hold or
    ///   failure is waiting there. Only asked (one descent of `_waiting_idx` in the probe)
    ///   when the claim saw that index hold anything.
    ///
    /// Otherwise every earlier unfinished row of the aggregate is fresh and was visible to the
    /// walk when it passed its key: it is in this claim, in an earlier claim this relay still
    /// tracks, or done. The probe runs after the claim statement, on a later snapshot; what it
    /// sees in addition (an earlier row committed since) only holds the row back.
    async fn probe_predecessors(
        &self,
        tx: &mut ClaimTx,
        rows: &mut [Claimed],
        which: &[(usize, bool)],
    ) -> Result<(), StoreError> {
        let ids: Vec<i64> = which.iter().map(|&(i, _)| rows[i].event.id).collect();
        let must: Vec<bool> = which.iter().map(|&(_, m)| m).collect();
        let found = sqlx::query(&self.stmts.probe)
            .bind(&ids)
            .bind(&must)
            .fetch_all(&mut **tx)
            .await
            .map_err(StoreError::sql("probe predecessors"))?;
        let at: HashMap<i64, usize> = which.iter().map(|&(i, _)| (rows[i].event.id, i)).collect();
        for row in &found {
            let (id, prev) =
                decode::decode_prev(row).map_err(StoreError::sql("decode predecessor"))?;
            let Some(&i) = at.get(&id) else { continue };
            match prev {
                Ok(p) => rows[i].prev = Some(p),
                // Without it this row's order cannot be known; it stays unpublished (failed,
                // with the reason) rather than risk overtaking its predecessor.
                Err(reason) => {
                    let r = &mut rows[i].invalid;
                    *r = Some(match r.take() {
                        Some(before) => format!("{before}; {reason}"),
                        None => reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// The predecessor probe's statement (see `probe_sql`), for EXPLAIN in tests.
    pub fn probe_statement(&self) -> &str {
        &self.stmts.probe
    }

    /// The partitioned claim's statement (see `claim_share_sql`), for EXPLAIN in tests.
    pub fn claim_share_statement(&self) -> &str {
        &self.stmts.claim_share
    }

    /// Writes the verdicts of a claim and commits it. Rows without a verdict are released
    /// unchanged.
    pub async fn finish(
        &self,
        tx: ClaimTx,
        marks: &Marks,
        blocked_retry: Duration,
    ) -> Result<(), StoreError> {
        self.bounded(
            "record a claim's results",
            self.finish_unbounded(tx, marks, blocked_retry),
        )
        .await
    }

    async fn finish_unbounded(
        &self,
        mut tx: ClaimTx,
        marks: &Marks,
        blocked_retry: Duration,
    ) -> Result<(), StoreError> {
        if !marks.published.is_empty() {
            let sql = if self.keep_published {
                &self.stmts.keep_published
            } else {
                &self.stmts.delete
            };
            sqlx::query(sql)
                .bind(&marks.published)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("mark published"))?;
        }
        // Failures before deferrals: a deferral in this same transaction then sees its
        // predecessor already failed and holds the row behind it.
        if !marks.failed.is_empty() {
            let ids: Vec<i64> = marks.failed.iter().map(|f| f.0).collect();
            let inc: Vec<i32> = marks.failed.iter().map(|f| f.1 as i32).collect();
            let err: Vec<&str> = marks.failed.iter().map(|f| f.2.as_str()).collect();
            sqlx::query(&self.stmts.fail)
                .bind(&ids)
                .bind(&inc)
                .bind(&err)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("mark failed"))?;
        }
        if !marks.retry.is_empty() {
            let ids: Vec<i64> = marks.retry.iter().map(|f| f.0).collect();
            let delay: Vec<f64> = marks.retry.iter().map(|f| f.1).collect();
            let err: Vec<&str> = marks.retry.iter().map(|f| f.2.as_str()).collect();
            let inc: Vec<i32> = marks.retry.iter().map(|f| f.3 as i32).collect();
            sqlx::query(&self.stmts.retry)
                .bind(&ids)
                .bind(&delay)
                .bind(&err)
                .bind(&inc)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("schedule retry"))?;
        }
        if !marks.deferred.is_empty() {
            let mut ids = Vec::with_capacity(marks.deferred.len());
            let mut prev = Vec::with_capacity(marks.deferred.len());
            let mut prev_status = Vec::with_capacity(marks.deferred.len());
            let mut until = Vec::with_capacity(marks.deferred.len());
            for (id, d) in &marks.deferred {
                ids.push(*id);
                match d {
                    DeferUntil::Soon => {
                        prev.push(0i64);
                        prev_status.push("none");
                        until.push(Utc::now());
                    }
                    DeferUntil::Predecessor(p) => {
                        prev.push(p.id);
                        prev_status.push(p.status.as_str());
                        until.push(if p.status == status::FAILED {
                            held_until()
                        } else {
                            p.next_attempt_at
                        });
                    }
                }
            }
            sqlx::query(&self.stmts.defer)
                .bind(&ids)
                .bind(&prev)
                .bind(&prev_status)
                .bind(&until)
                .bind(blocked_retry.as_secs_f64())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::sql("defer blocked rows"))?;
        }
        tx.commit().await.map_err(StoreError::sql("commit"))
    }

    /// Settles pending rows that would never come due (a producer set `next_attempt_at` to
    /// `infinity` or past the hold marker), `batch` at a time until none is left: (failed,
    /// made due). See `Statements::never_due`.
    pub async fn settle_never_due(&self, batch: u32) -> Result<(u64, u64), StoreError> {
        let (mut failed, mut due) = (0, 0);
        loop {
            let behind: Vec<bool> = sqlx::query_scalar(&self.stmts.never_due)
                .bind(held_until())
                .bind(batch as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::sql("settle rows that are never due"))?;
            let n = behind.iter().filter(|b| **b).count() as u64;
            due += n;
            failed += behind.len() as u64 - n;
            if behind.len() < batch as usize {
                return Ok((failed, due));
            }
        }
    }

    /// Deletes kept published rows older than `older_than`, `batch` at a time, until none is
    /// left; returns how many went.
    pub async fn prune_published(
        &self,
        older_than: Duration,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            let n = sqlx::query(&self.stmts.prune)
                .bind(cutoff)
                .bind(batch as i64)
                .execute(&self.pool)
                .await
                .map_err(StoreError::sql("prune published rows"))?
                .rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// The backlog's figures: pending (and due) with the oldest pending event from one
    /// index-only scan of the claim index, failed from the failed index.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let t = self.names.qualified();
        let (pending, due, oldest): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE next_attempt_at <= now()), \
                    min(occurred_at) FILTER (WHERE isfinite(occurred_at)) \
             FROM {t} WHERE status = 'pending'"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::sql("count the backlog"))?;
        let failed: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {t} WHERE status = 'failed'"))
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::sql("count failed events"))?;
        Ok(Backlog {
            pending,
            due,
            failed,
            oldest_pending: oldest,
        })
    }

    /// Writes this relay's row in `<table>_relays` (see `outbox-relay status`).
    pub async fn heartbeat(&self, h: &Heartbeat) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO {}_relays AS r \
               (instance, host, pid, version, started_at, seen_at, in_flight, published, failed, \
                partitions) \
             VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9) \
             ON CONFLICT (instance) DO UPDATE SET host = $2, pid = $3, version = $4, \
               started_at = $5, seen_at = now(), in_flight = $6, published = $7, failed = $8, \
               partitions = $9",
            self.names.qualified()
        ))
        .bind(&h.instance)
        .bind(&h.host)
        .bind(h.pid)
        .bind(&h.version)
        .bind(h.started_at)
        .bind(h.in_flight)
        .bind(h.published)
        .bind(h.failed)
        .bind(h.partitions)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(StoreError::sql("write the relay heartbeat"))
    }

    /// Removes this relay's row when it stops.
    pub async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "DELETE FROM {}_relays WHERE instance = $1",
            self.names.qualified()
        ))
        .bind(instance)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(StoreError::sql("remove the relay heartbeat"))
    }

    /// Opens one connection outside the pool, so a failure names its cause (connection
    /// refused, authentication, TLS) where the pool would only say it timed out.
    pub async fn probe(&self) -> Result<(), StoreError> {
        use sqlx::Connection;
        let opts = self.pool.connect_options();
        let after = self.pool.options().get_acquire_timeout();
        let conn = tokio::time::timeout(after, sqlx::PgConnection::connect_with(&opts))
            .await
            .map_err(|_| StoreError::TimedOut {
                what: "connect",
                after,
            })?
            .map_err(StoreError::sql("connect"))?;
        let _ = conn.close().await;
        Ok(())
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::sql("ping"))
    }

    /// Pending rows, counted up to `cap` so the count stays cheap on any backlog.
    pub async fn count_pending(&self, cap: i64) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} WHERE status = 'pending' LIMIT $1) t",
            self.names.qualified()
        );
        sqlx::query_scalar(&sql)
            .bind(cap)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::sql("count pending"))
    }

    /// Puts failed events back to pending (attempts reset) and releases the events of their
    /// aggregates that were held behind them; returns how many events were replayed. The
    /// by-id case of [`Store::replay`].
    pub async fn replay_failed(&self, event_ids: &[uuid::Uuid]) -> Result<u64, StoreError> {
        let filter = ops::Filter {
            event_ids: event_ids.to_vec(),
            ..Default::default()
        };
        Ok(self.replay(ops::Target::Failed, &filter).await?.events)
    }

    /// Releases events held behind a failed predecessor in the given aggregates.
    ///
    /// In passes until one releases nothing. A relay may be holding a row behind a *held*
    /// predecessor at this very moment: its hold checked the predecessor (still held, under a
    /// share lock) before this transaction reached it, so a pass waits for that hold to commit
    /// and then releases the predecessor, but the pass's snapshot, taken before the hold
    /// committed, does not see the newly held row. The next pass does. Holds checked after a
    /// pass locked their predecessor see the lock and defer briefly instead of holding, so the
    /// passes end.
    pub(crate) async fn release_held(
        &self,
        tx: &mut ClaimTx,
        aggregates: &[String],
    ) -> Result<u64, StoreError> {
        let mut aggs = aggregates.to_vec();
        aggs.sort();
        aggs.dedup();
        let sql = format!(
            "UPDATE {} SET next_attempt_at = now() \
             WHERE aggregate_id = ANY($1) AND status = 'pending' AND next_attempt_at = $2",
            self.names.qualified()
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(&aggs)
                .bind(held_until())
                .execute(&mut **tx)
                .await
                .map_err(StoreError::sql("release held events"))?
                .rows_affected();
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Asks Postgres to wake listeners now (after a replay, say).
    pub async fn notify(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.names.channel())
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::sql("notify"))
    }
}

/// A claim's rows as taken: the last key among them (the next claim's cursor) and whether the
/// byte budget cut the claim short (it locked rows it did not return).
#[derive(Default)]
struct Taken {
    rows: Vec<Claimed>,
    last: Option<Cursor>,
    cut: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Postgres' `age(written_by) <= age(young)`: modulo 2^32, frozen rows always old.
    #[test]
    fn a_row_is_young_if_written_since_the_walk_began() {
        assert!(written_during_walk(1000, 1000));
        assert!(written_during_walk(1001, 1000));
        assert!(!written_during_walk(999, 1000));
        // Across the wrap of the 32-bit counter.
        assert!(written_during_walk(5, u32::MAX as i64 - 5));
        assert!(!written_during_walk(u32::MAX as i64 - 5, 5));
        // Frozen (2) and bootstrap (1) xids are older than anything running.
        assert!(!written_during_walk(2, u32::MAX as i64 - 5));
        assert!(!written_during_walk(1, 3));
    }

    #[test]
    fn only_loopback_hosts_without_a_tls_setting_are_ours_to_choose() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "db.example.com",
            "10.0.0.5",
            "::2",
            "/var/run/postgresql",
            "",
            "localhost.evil",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
        let tls = |mode: Option<&str>, root: Option<&str>| crate::config::DatabaseTls {
            mode: mode.map(String::from),
            root_cert: root.map(String::from),
            client_cert: false,
        };
        let with_cert = crate::config::DatabaseTls {
            client_cert: true,
            ..tls(None, None)
        };
        assert!(!tls_left_to_us(&with_cert, "127.0.0.1"));
        assert!(!tls_left_to_us(&tls(Some("prefer"), None), "127.0.0.1"));
        assert!(!tls_left_to_us(&tls(Some("disable"), None), "127.0.0.1"));
        assert!(!tls_left_to_us(&tls(None, Some("/ca.crt")), "127.0.0.1"));
        assert!(!tls_left_to_us(&tls(None, None), "db.example.com"));
        if std::env::var_os("PGSSLMODE").is_none() && std::env::var_os("PGSSLROOTCERT").is_none() {
            assert!(tls_left_to_us(&tls(None, None), "127.0.0.1"));
        }
    }

    #[test]
    fn channel_fits_postgres_identifier_limit() {
        let short = Names::new("outbox", "outbox");
        assert_eq!(short.channel(), "outbox.outbox");
        let long = Names::new("s".repeat(63), "t".repeat(40));
        assert!(long.channel().len() <= 63);
        assert_ne!(
            long.channel(),
            Names::new("s".repeat(63), "u".repeat(40)).channel()
        );
    }

    #[test]
    fn render_replaces_every_placeholder() {
        let n = Names::new("a", "b");
        assert_eq!(n.render("{{schema}}.{{table}} {{channel}}"), "a.b a.b");
    }
}
