//! Where each column a statement's reader needs sits in its result, found by name once per
//! statement (on its first row): the select lists may put their columns in any order, and each
//! row is then read by position at no cost per row.

use sqlx::postgres::PgRow;
use sqlx::{Column, Row};

/// Where each column the claim's decoder reads sits in the result, found by name once per
/// claim (on its first row), so each row is then read by position at no extra cost and the
/// select list (`statements::claim_sql_where`) may put them in any order.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClaimColumns {
    pub(super) id: usize,
    pub(super) event_id: usize,
    pub(super) topic: usize,
    pub(super) aggregate_id: usize,
    pub(super) aggregate_type: usize,
    pub(super) event_type: usize,
    pub(super) event_version: usize,
    pub(super) payload: usize,
    pub(super) headers: usize,
    pub(super) content_type: usize,
    pub(super) traceparent: usize,
    pub(super) correlation_id: usize,
    pub(super) occurred_at: usize,
    pub(super) attempts: usize,
    pub(super) next_attempt_at: usize,
    pub(super) payload_size: usize,
    pub(super) headers_size: usize,
    pub(super) written_by: usize,
    pub(super) waiting: usize,
}

impl ClaimColumns {
    /// The positions in `row`'s result; an error names a column the statement does not select.
    pub(super) fn of(row: &PgRow) -> Result<Self, sqlx::Error> {
        let at = |name: &str| row.try_column(name).map(|c| c.ordinal());
        Ok(ClaimColumns {
            id: at("id")?,
            event_id: at("event_id")?,
            topic: at("topic")?,
            aggregate_id: at("aggregate_id")?,
            aggregate_type: at("aggregate_type")?,
            event_type: at("event_type")?,
            event_version: at("event_version")?,
            payload: at("payload")?,
            headers: at("headers")?,
            content_type: at("content_type")?,
            traceparent: at("traceparent")?,
            correlation_id: at("correlation_id")?,
            occurred_at: at("occurred_at")?,
            attempts: at("attempts")?,
            next_attempt_at: at("next_attempt_at")?,
            payload_size: at("payload_size")?,
            headers_size: at("headers_size")?,
            written_by: at("written_by")?,
            waiting: at("waiting")?,
        })
    }

    /// The positions found on a claim's first row, kept in `kept` for its other rows.
    pub(super) fn kept(kept: &mut Option<Self>, row: &PgRow) -> Result<Self, sqlx::Error> {
        match kept {
            Some(at) => Ok(*at),
            None => Ok(*kept.insert(Self::of(row)?)),
        }
    }
}

/// Where the predecessor probe's columns sit in its result, found by name once per probe.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProbeColumns {
    pub(super) claimed_id: usize,
    pub(super) prev_id: usize,
    pub(super) prev_status: usize,
    pub(super) prev_next_attempt_at: usize,
}

impl ProbeColumns {
    pub(super) fn of(row: &PgRow) -> Result<Self, sqlx::Error> {
        let at = |name: &str| row.try_column(name).map(|c| c.ordinal());
        Ok(ProbeColumns {
            claimed_id: at("claimed_id")?,
            prev_id: at("prev_id")?,
            prev_status: at("prev_status")?,
            prev_next_attempt_at: at("prev_next_attempt_at")?,
        })
    }
}
