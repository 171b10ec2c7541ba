//! What the operator commands share: the event filter flags, the database connection for
//! operators, and aligned tables.

use crate::config::{parse_duration, Config};
use crate::store::ops::Filter;
use crate::store::{Session, Store};
use anyhow::Context;
use chrono::{DateTime, Utc};

/// Which events: every flag narrows the selection; none selects every event of the status.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// An event id (repeatable)
    #[arg(long = "event-id", value_name = "UUID")]
    pub event_ids: Vec<uuid::Uuid>,
    /// A topic, or a pattern with * and ?
    #[arg(long, value_name = "PATTERN")]
    pub topic: Option<String>,
    /// An aggregate id
    #[arg(long, value_name = "ID")]
    pub aggregate: Option<String>,
    /// Events that occurred at or after: RFC 3339 (2026-11-24T10:00:00Z) or a time ago (2h, 30m, 1d)
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    pub since: Option<DateTime<Utc>>,
    /// Events that occurred before: RFC 3339 or a time ago
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    pub until: Option<DateTime<Utc>>,
    /// Events whose last error contains this text (case-insensitive)
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            event_ids: self.event_ids.clone(),
            topic: self.topic.clone(),
            aggregate_id: self.aggregate.clone(),
            since: self.since,
            until: self.until,
            error: self.error.clone(),
        }
    }
}

/// A time: RFC 3339, or a duration meaning that long ago.
pub fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    match parse_duration(s) {
        Ok(d) => chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| Utc::now().checked_sub_signed(d))
            .ok_or_else(|| format!("{s:?} is too long ago")),
        Err(_) => Err(format!(
            "{s:?} is not a time: write RFC 3339 (2026-11-24T10:00:00Z) or a time ago (30m, 2h, 1d)"
        )),
    }
}

/// The outbox for an operator command: connected, its schema checked.
pub async fn operator_store(cfg: &Config, command: &str) -> anyhow::Result<Store> {
    let session = Session {
        application_name: format!("outbox-relay {command}"),
        idle_in_transaction_timeout: None,
        operator: true,
    };
    let store = Store::connect(&cfg.database, &session).await?;
    store
        .check_schema()
        .await
        .context("the outbox is not ready")?;
    Ok(store)
}

/// Left-aligned columns, two spaces apart, no borders: easy on the eye and on `awk`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(headers.to_vec())
        .add_rows(rows.iter().cloned());
    let last = headers.len().saturating_sub(1);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// At most `n` characters, with an ellipsis when cut.
pub fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// A time as `2026-11-24 10:00:00`.
pub fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_left_aligned_columns_two_spaces_apart() {
        let rows = vec![
            vec!["orders".to_string(), "12".to_string(), "ok".to_string()],
            vec![
                "billing.invoices".to_string(),
                "3".to_string(),
                String::new(),
            ],
        ];
        assert_eq!(
            table(&["TOPIC", "PENDING", "NOTE"], &rows),
            "TOPIC             PENDING  NOTE\n\
             orders            12       ok\n\
             billing.invoices  3\n"
        );
        assert_eq!(table(&["TOPIC", "N"], &[]), "TOPIC  N\n");
    }
}
