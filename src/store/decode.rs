//! Decoding a claimed row into the envelope. Per row and leniently: only the row id must decode
//! (a bigint identity, always fine). Any other column that cannot become part of an event gets
//! a placeholder and marks that row invalid (`field <column>: <problem>`), so the dispatcher
//! fails it in its aggregate's order; the claim itself never fails on a value.
//!
//! Timestamps are read from their wire bytes rather than through sqlx's chrono decoding, which
//! panics on `infinity` and `-infinity` (and on finite values past chrono's range, year
//! 262 143, which Postgres accepts up to 294 276). So are the other columns where they have
//! the schema's own types ([`FromWire`]); a column an operator gave another type goes through
//! sqlx, with the same result or error as ever.

use super::columns::{ClaimColumns, ProbeColumns};
use super::{Claimed, Cursor, Prev, RowStatus};
use crate::envelope::{parse_headers, Event};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgRow, PgValueFormat, PgValueRef};
use sqlx::{Row, ValueRef};

/// What the claim says of a row besides its envelope (see `claim_sql_where`).
pub(super) struct ClaimMeta {
    /// What the row counts against the claim's byte budget: its payload (as far as the cap,
    /// past which it is not fetched) and its headers.
    pub size: i64,
    /// Due at `-infinity`: never retried, deferred, held or scheduled.
    pub fresh: bool,
    /// The transaction that wrote it (a 32-bit xid); `None` if unreadable, which has the row
    /// probed.
    pub written_by: Option<i64>,
    /// `_waiting_idx` holds something.
    pub waiting: bool,
}

/// Reads the claim's own columns of a row. Unreadable values take the cautious side: a
/// row counts its cap, is probed, and the waiting index is taken as non-empty.
pub(super) fn claim_meta(row: &PgRow, at: &ClaimColumns, payload_cap: i64) -> ClaimMeta {
    let payload = nullable::<i64>(row, at.payload_size).map_or(payload_cap, |n| n.min(payload_cap));
    let headers = nullable::<i64>(row, at.headers_size).unwrap_or(0);
    ClaimMeta {
        size: payload.saturating_add(headers),
        fresh: matches!(
            timestamp(row, at.next_attempt_at),
            Ok(Some(Ts::NegInfinity))
        ),
        written_by: nullable::<i64>(row, at.written_by),
        waiting: nullable::<bool>(row, at.waiting) != Some(false),
    }
}

/// Decodes one row of the predecessor probe: the claimed row's id, and its predecessor (or
/// why that could not be read, as a reason naming the field).
pub(super) fn decode_prev(
    row: &PgRow,
    at: &ProbeColumns,
) -> Result<(i64, Result<Prev, String>), sqlx::Error> {
    let id: i64 = row.try_get(at.claimed_id)?;
    let prev = (|| {
        let prev_id: i64 = row
            .try_get(at.prev_id)
            .map_err(|e| format!("field prev_id: {}", undecodable(e)))?;
        let text: String = row
            .try_get(at.prev_status)
            .map_err(|e| format!("field prev_status: {}", undecodable(e)))?;
        let status = RowStatus::parse(&text).ok_or_else(|| {
            format!("field prev_status: {text:?} is not pending, failed or published")
        })?;
        Ok(Prev {
            id: prev_id,
            status,
            next_attempt_at: cursor_time(timestamp(row, at.prev_next_attempt_at)),
        })
    })();
    Ok((id, prev))
}

/// Decodes one claim row, each column where `at` found it.
pub(super) fn decode_claimed(
    row: &PgRow,
    at: &ClaimColumns,
    payload_cap: i64,
) -> Result<(Claimed, Cursor), sqlx::Error> {
    let id: i64 = match from_wire::<i64>(row, at.id) {
        Some(Some(id)) => id,
        _ => row.try_get(at.id)?,
    };
    let mut bad = Problems::default();
    // A payload over the cap is not fetched: the claim sends its size instead.
    let payload = match nullable::<i64>(row, at.payload_size) {
        Some(size) if size > payload_cap => {
            bad.add(
                "payload",
                format!(
                    "{size} bytes is more than the limit of {payload_cap} bytes \
                     (relay.max_payload_bytes)"
                ),
            );
            Vec::new()
        }
        _ => bad.required(row, at.payload, "payload"),
    };
    let headers = match jsonb(row, at.headers) {
        Ok(json) => match parse_headers(json.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                bad.add("headers", e);
                Vec::new()
            }
        },
        Err(e) => {
            bad.add("headers", e);
            Vec::new()
        }
    };
    let occurred_at = match timestamp(row, at.occurred_at) {
        Ok(Some(Ts::At(at))) => at,
        Ok(Some(other)) => {
            bad.add("occurred_at", other.problem());
            DateTime::UNIX_EPOCH
        }
        Ok(None) => {
            bad.add("occurred_at", "is null".into());
            DateTime::UNIX_EPOCH
        }
        Err(e) => {
            bad.add("occurred_at", e);
            DateTime::UNIX_EPOCH
        }
    };
    let event = Event {
        id,
        event_id: bad.required(row, at.event_id, "event_id"),
        topic: bad.required(row, at.topic, "topic"),
        aggregate_id: bad.required(row, at.aggregate_id, "aggregate_id"),
        aggregate_type: bad.optional(row, at.aggregate_type, "aggregate_type"),
        event_type: bad.required(row, at.event_type, "event_type"),
        event_version: bad.required(row, at.event_version, "event_version"),
        payload,
        headers,
        content_type: bad.optional(row, at.content_type, "content_type"),
        traceparent: bad.optional(row, at.traceparent, "traceparent"),
        correlation_id: bad.optional(row, at.correlation_id, "correlation_id"),
        occurred_at,
        attempts: bad.required(row, at.attempts, "attempts"),
    };
    // The claim's own key: only where the next claim starts. A row due at -infinity is
    // claimed like any other; its key becomes the earliest instant Postgres can take back.
    let key: Cursor = (cursor_time(timestamp(row, at.next_attempt_at)), id);
    Ok((
        Claimed {
            event: std::sync::Arc::new(event),
            invalid: bad.reason(),
            prev: None,
        },
        key,
    ))
}

/// A column's value read straight from its binary wire bytes, for the schema's own column
/// types: a claim decodes 19 columns per row, and sqlx's checks of each column's type against
/// every type it could decode from cost about as much as the decoding itself.
trait FromWire: Sized {
    /// The Postgres type the bytes are read as.
    const OID: u32;
    /// `None`: not a value of that type after all; sqlx's decoding says why.
    fn from_wire(bytes: &[u8]) -> Option<Self>;
}

impl FromWire for String {
    const OID: u32 = 25; // text
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

impl FromWire for i32 {
    const OID: u32 = 23; // integer
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        <[u8; 4]>::try_from(bytes).ok().map(i32::from_be_bytes)
    }
}

impl FromWire for i64 {
    const OID: u32 = 20; // bigint
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        <[u8; 8]>::try_from(bytes).ok().map(i64::from_be_bytes)
    }
}

impl FromWire for bool {
    const OID: u32 = 16; // boolean
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }
}

impl FromWire for uuid::Uuid {
    const OID: u32 = 2950; // uuid
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        uuid::Uuid::from_slice(bytes).ok()
    }
}

impl FromWire for Vec<u8> {
    const OID: u32 = 17; // bytea
    fn from_wire(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

/// Column `i` read from the wire: `Some(None)` for NULL, `Some(Some(v))` for a binary value
/// of `T`'s own type; `None` for anything else (another type, the text format, bytes that
/// are no such value), which the caller decodes through sqlx instead, for the same result
/// or the same error as ever.
fn from_wire<T: FromWire>(row: &PgRow, i: usize) -> Option<Option<T>> {
    let raw = row.try_get_raw(i).ok()?;
    if raw.is_null() {
        return Some(None);
    }
    if raw.format() != PgValueFormat::Binary || raw.type_info().oid().map(|o| o.0) != Some(T::OID) {
        return None;
    }
    T::from_wire(raw.as_bytes().ok()?).map(Some)
}

/// Column `i` as `T` (`None` for NULL): from the wire where it can be, else through sqlx,
/// whose error says why it cannot be.
fn read_column<'r, T>(row: &'r PgRow, i: usize) -> Result<Option<T>, sqlx::Error>
where
    T: FromWire + sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    match from_wire::<T>(row, i) {
        Some(v) => Ok(v),
        None => row.try_get::<Option<T>, _>(i),
    }
}

/// A nullable column of `T`; `None` if NULL or undecodable.
fn nullable<'r, T>(row: &'r PgRow, i: usize) -> Option<T>
where
    T: FromWire + sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    read_column(row, i).ok().flatten()
}

/// What could not be decoded, column by column.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, column: &str, problem: String) {
        self.0.push(format!("field {column}: {problem}"));
    }

    fn reason(self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("; "))
    }

    /// A NOT NULL column: its value, or a placeholder and a problem.
    fn required<'r, T>(&mut self, row: &'r PgRow, i: usize, column: &str) -> T
    where
        T: FromWire + sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Default,
    {
        match read_column::<T>(row, i) {
            Ok(Some(v)) => v,
            Ok(None) => {
                self.add(column, "is null".into());
                T::default()
            }
            Err(e) => {
                self.add(column, undecodable(e));
                T::default()
            }
        }
    }

    fn optional<'r, T>(&mut self, row: &'r PgRow, i: usize, column: &str) -> Option<T>
    where
        T: FromWire + sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        read_column::<T>(row, i).unwrap_or_else(|e| {
            self.add(column, undecodable(e));
            None
        })
    }
}

/// sqlx's text for a column decode error, without its "error occurred while decoding column
/// N:" prefix (the reason names the column itself).
fn undecodable(e: sqlx::Error) -> String {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => format!("cannot be decoded: {source}"),
        other => format!("cannot be decoded: {other}"),
    }
}

/// A `jsonb` (or `json`) column as JSON. serde_json refuses what Postgres accepts in two ways:
/// numbers beyond f64 (`1e400`) and nesting deeper than 128 levels; both are reported.
fn jsonb(row: &PgRow, i: usize) -> Result<Option<serde_json::Value>, String> {
    let raw = row
        .try_get_raw(i)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if raw.is_null() {
        return Ok(None);
    }
    let format = raw.format();
    let bytes = raw.as_bytes().map_err(|e| format!("cannot be read: {e}"))?;
    json_from_wire(format, bytes).map(Some)
}

/// The JSON text of a jsonb value as sent by Postgres: in binary, a version byte (1) first.
pub(crate) fn json_from_wire(
    format: PgValueFormat,
    bytes: &[u8],
) -> Result<serde_json::Value, String> {
    let text = match (format, bytes.split_first()) {
        (PgValueFormat::Binary, Some((1, rest))) => rest,
        (PgValueFormat::Binary, Some((v, _))) => {
            return Err(format!("jsonb wire format version {v} is not supported"))
        }
        (PgValueFormat::Binary, None) => return Err("an empty jsonb value".into()),
        (PgValueFormat::Text, _) => bytes,
    };
    serde_json::from_slice(text).map_err(|e| {
        format!(
            "is JSON the relay cannot read ({e}); numbers must fit a 64-bit float and nesting \
             may be at most 128 levels deep"
        )
    })
}

/// A timestamptz as Postgres has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ts {
    At(DateTime<Utc>),
    Infinity,
    NegInfinity,
    /// Finite, but past what chrono represents (Postgres goes to 294276 AD).
    Beyond(i64),
}

impl Ts {
    fn problem(self) -> String {
        match self {
            Ts::At(_) => "is fine".into(),
            Ts::Infinity => "infinity is not a point in time; write a real timestamp".into(),
            Ts::NegInfinity => "-infinity is not a point in time; write a real timestamp".into(),
            Ts::Beyond(us) => format!(
                "{us} microseconds after 2000-01-01 is past the year 262142, the latest the \
                 relay can represent"
            ),
        }
    }
}

/// Microseconds from the Unix epoch to Postgres' epoch, 2000-01-01.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The earliest timestamptz Postgres accepts (4714-11-24 BC): `-infinity` stands for it where
/// a time goes back to Postgres as a parameter (chrono's own minimum is out of its range).
pub(crate) fn pg_min_time() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(-4713, 11, 24)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A time for the claim cursor or a predecessor's retry time: infinities become the extremes
/// Postgres still accepts as a parameter, so a claim or a deferral never fails on them.
fn cursor_time(ts: Result<Option<Ts>, String>) -> DateTime<Utc> {
    match ts {
        Ok(Some(Ts::At(at))) => at.max(pg_min_time()),
        Ok(Some(Ts::NegInfinity)) => pg_min_time(),
        Ok(Some(Ts::Infinity | Ts::Beyond(_))) | Ok(None) | Err(_) => DateTime::<Utc>::MAX_UTC,
    }
}

fn timestamp(row: &PgRow, i: usize) -> Result<Option<Ts>, String> {
    let raw = row
        .try_get_raw(i)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if raw.is_null() {
        return Ok(None);
    }
    ts_from_wire(raw).map(Some)
}

fn ts_from_wire(raw: PgValueRef<'_>) -> Result<Ts, String> {
    let format = raw.format();
    match format {
        PgValueFormat::Binary => {
            let bytes = raw.as_bytes().map_err(|e| format!("cannot be read: {e}"))?;
            ts_from_binary(bytes)
        }
        PgValueFormat::Text => {
            let text = raw.as_str().map_err(|e| format!("cannot be read: {e}"))?;
            match text {
                "infinity" => Ok(Ts::Infinity),
                "-infinity" => Ok(Ts::NegInfinity),
                _ => <DateTime<Utc> as sqlx::Decode<sqlx::Postgres>>::decode(raw)
                    .map(Ts::At)
                    .map_err(|e| format!("cannot be decoded: {e}")),
            }
        }
    }
}

/// A binary timestamptz: microseconds since 2000-01-01 UTC, `i64::MAX` and `i64::MIN` being
/// infinity and -infinity.
pub(crate) fn ts_from_binary(bytes: &[u8]) -> Result<Ts, String> {
    let micros = <[u8; 8]>::try_from(bytes)
        .map(i64::from_be_bytes)
        .map_err(|_| format!("a timestamp of {} bytes, expected 8", bytes.len()))?;
    Ok(match micros {
        i64::MAX => Ts::Infinity,
        i64::MIN => Ts::NegInfinity,
        us => us
            .checked_add(PG_EPOCH_UNIX_MICROS)
            .and_then(DateTime::<Utc>::from_timestamp_micros)
            .map_or(Ts::Beyond(us), Ts::At),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn infinities_and_the_extremes_decode_without_panicking() {
        assert_eq!(ts_from_binary(&i64::MAX.to_be_bytes()), Ok(Ts::Infinity));
        assert_eq!(ts_from_binary(&i64::MIN.to_be_bytes()), Ok(Ts::NegInfinity));
        assert_eq!(
            ts_from_binary(&0i64.to_be_bytes()),
            Ok(Ts::At("2000-01-01T00:00:00Z".parse().unwrap()))
        );
        // 294276-12-31, the last day Postgres takes, is past chrono.
        let late: i64 = 9_223_371_331_199_999_999;
        assert!(matches!(
            ts_from_binary(&late.to_be_bytes()),
            Ok(Ts::Beyond(_))
        ));
        assert!(ts_from_binary(&[1, 2, 3]).is_err());
        assert!(Ts::Infinity.problem().contains("infinity"));
    }

    #[test]
    fn the_cursor_stands_in_for_infinities_with_times_postgres_accepts() {
        assert_eq!(cursor_time(Ok(Some(Ts::NegInfinity))), pg_min_time());
        assert_eq!(
            cursor_time(Ok(Some(Ts::Infinity))),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(pg_min_time().to_rfc3339(), "-4713-11-24T00:00:00+00:00");
    }

    #[test]
    fn jsonb_that_serde_refuses_is_a_reason() {
        let bin = |s: &str| [&[1u8][..], s.as_bytes()].concat();
        let e = json_from_wire(PgValueFormat::Binary, &bin(r#"{"a": 1e400}"#)).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let e = json_from_wire(PgValueFormat::Binary, &bin(&deep)).unwrap_err();
        assert!(e.contains("recursion limit"), "{e}");
        assert!(json_from_wire(PgValueFormat::Binary, &[2, b'1']).is_err());
        assert!(json_from_wire(PgValueFormat::Binary, &[]).is_err());
        assert_eq!(
            json_from_wire(PgValueFormat::Text, b"{}").unwrap(),
            serde_json::json!({})
        );
    }

    proptest! {
        // 2000 cases each: every 8-byte value and any bytes decode to a value or a reason.
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_timestamp_bytes_decode_or_give_a_reason(us in any::<i64>(), junk in proptest::collection::vec(any::<u8>(), 0..12)) {
            let ts = ts_from_binary(&us.to_be_bytes()).unwrap();
            let t = cursor_time(Ok(Some(ts)));
            prop_assert!(t >= pg_min_time());
            let _ = ts_from_binary(&junk);
        }

        #[test]
        fn any_jsonb_bytes_decode_or_give_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = json_from_wire(PgValueFormat::Binary, &bytes);
            let _ = json_from_wire(PgValueFormat::Text, &bytes);
        }
    }
}
