//! The names everything in the database is derived from (the outbox's schema and table, the
//! NOTIFY channel, advisory lock spaces), the row statuses, and the partitioning constants.

use chrono::{DateTime, Utc};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    Pending,
    Failed,
    Published,
}

impl RowStatus {
    /// As the column holds it (the table's CHECK constraint allows these three).
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Pending => "pending",
            RowStatus::Failed => "failed",
            RowStatus::Published => "published",
        }
    }

    /// The column's text; None for anything else (a table whose CHECK was dropped).
    pub(crate) fn parse(s: &str) -> Option<RowStatus> {
        [RowStatus::Pending, RowStatus::Failed, RowStatus::Published]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// The `next_attempt_at` of a row held behind a failed predecessor: it waits until the
/// predecessor is replayed or purged, which releases it.
pub const HELD_UNTIL: &str = "9999-12-31T00:00:00Z";

pub fn held_until() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(HELD_UNTIL)
        .expect("constant is a valid timestamp")
        .with_timezone(&Utc)
}

/// How many partitions the aggregates are hashed into (`part` in the outbox table).
pub const PARTITIONS: i16 = 256;

/// Advisory lock purposes (see [`Names::lock_space`]).
pub const LOCK_PARTITION: &str = "partition";
pub const LOCK_FENCE: &str = "fence";
pub const LOCK_MEMBER: &str = "member";

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn statuses_read_back_as_the_column_holds_them() {
        for st in [RowStatus::Pending, RowStatus::Failed, RowStatus::Published] {
            assert_eq!(RowStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(RowStatus::Failed.as_str(), "failed");
        assert_eq!(RowStatus::parse("Pending"), None);
        assert_eq!(RowStatus::parse("paused"), None);
    }
}
