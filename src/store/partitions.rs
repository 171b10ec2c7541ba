//! The ownership session: the one connection through which a relay joins the relays working on
//! an outbox and owns partitions. Every statement here runs outside any transaction, so holding
//! ownership never holds back vacuum.
//!
//! Three kinds of session advisory lock, each in this outbox's own key space
//! ([`Names::lock_space`]):
//! * member (`pid` of this session): held while the relay is a member; the members are read
//!   from `pg_locks`, so a relay that dies stops being a member the moment Postgres ends its
//!   session, with nothing to expire.
//! * partition `p`: held while this relay owns `p`; released by Postgres the same way.
//! * fence `p`: never kept. Claims hold it *shared* for their transaction; a relay taking `p`
//!   over takes it exclusively once (and lets go at once) before it claims there, which it
//!   can only do when no claim of a previous owner is still open on `p`.

use super::{Names, Store, StoreError, LOCK_FENCE, LOCK_MEMBER, LOCK_PARTITION};
use sqlx::{ConnectOptions, Connection, PgConnection};

pub struct OwnerSession {
    conn: PgConnection,
    names: Names,
    owner: String,
    pid: i32,
}

fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    StoreError::sql(what)
}

impl OwnerSession {
    /// Opens a connection of its own (beside the pool, with the pool's settings) and joins as
    /// a member named `owner`.
    pub async fn join(store: &Store, owner: &str) -> Result<OwnerSession, StoreError> {
        let opts = store.pool().connect_options();
        let mut conn = opts
            .as_ref()
            .clone()
            .connect()
            .await
            .map_err(sql("open the ownership session"))?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .map_err(sql("read the ownership session's pid"))?;
        let names = store.names().clone();
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(names.lock_space(LOCK_MEMBER))
            .bind(pid)
            .execute(&mut conn)
            .await
            .map_err(sql("join the relays"))?;
        Ok(OwnerSession {
            conn,
            names,
            owner: owner.to_string(),
            pid,
        })
    }

    /// This session's member key (its backend pid).
    pub fn member(&self) -> i32 {
        self.pid
    }

    /// The members now, by key, sorted: every session holding a member lock of this outbox.
    pub async fn members(&mut self) -> Result<Vec<i32>, StoreError> {
        sqlx::query_scalar(
            "SELECT coalesce(array_agg(objid::int8::int4 ORDER BY objid), '{}') FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND classid = $1::int8::oid \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(self.names.lock_space(LOCK_MEMBER) as i64)
        .fetch_one(&mut self.conn)
        .await
        .map_err(sql("list the relays"))
    }

    /// Takes the partitions of `parts` that nobody owns; records this relay as their owner
    /// (a new epoch each) and returns them. They may not be claimed before [`Self::fence`]
    /// lets them through.
    pub async fn acquire(&mut self, parts: &[i16]) -> Result<Vec<i16>, StoreError> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let got: Vec<i16> = sqlx::query_scalar(
            "SELECT coalesce(array_agg(p ORDER BY p), '{}') FROM unnest($2::int2[]) p \
             WHERE pg_try_advisory_lock($1, p::int)",
        )
        .bind(self.names.lock_space(LOCK_PARTITION))
        .bind(parts)
        .fetch_one(&mut self.conn)
        .await
        .map_err(sql("take partitions"))?;
        if !got.is_empty() {
            sqlx::query(&format!(
                "UPDATE {}_partitions SET owner = $1, epoch = epoch + 1, since = now() \
                 WHERE part = ANY($2)",
                self.names.qualified()
            ))
            .bind(&self.owner)
            .bind(&got)
            .execute(&mut self.conn)
            .await
            .map_err(sql("record partition owners"))?;
        }
        Ok(got)
    }

    /// Of `parts` (owned, recorded), those no claim of a previous owner still holds: these
    /// may be claimed from now on.
    pub async fn fence(&mut self, parts: &[i16]) -> Result<Vec<i16>, StoreError> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "SELECT coalesce(array_agg(p ORDER BY p), '{}') FROM unnest($2::int2[]) p \
             WHERE CASE WHEN pg_try_advisory_lock($1, p::int) \
                        THEN pg_advisory_unlock($1, p::int) ELSE false END",
        )
        .bind(self.names.lock_space(LOCK_FENCE))
        .bind(parts)
        .fetch_one(&mut self.conn)
        .await
        .map_err(sql("fence partitions"))
    }

    /// Gives partitions up: no claim of this relay may hold rows of them any more.
    pub async fn release(&mut self, parts: &[i16]) -> Result<(), StoreError> {
        if parts.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "UPDATE {}_partitions SET owner = NULL, since = now() \
             WHERE part = ANY($1) AND owner = $2",
            self.names.qualified()
        ))
        .bind(parts)
        .bind(&self.owner)
        .execute(&mut self.conn)
        .await
        .map_err(sql("record released partitions"))?;
        sqlx::query("SELECT pg_advisory_unlock($1, p::int) FROM unnest($2::int2[]) p")
            .bind(self.names.lock_space(LOCK_PARTITION))
            .bind(parts)
            .execute(&mut self.conn)
            .await
            .map_err(sql("release partitions"))?;
        Ok(())
    }

    /// Stops being a member (the others start taking this relay's share over as it lets go
    /// of its partitions).
    pub async fn leave(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(self.names.lock_space(LOCK_MEMBER))
            .bind(self.pid)
            .execute(&mut self.conn)
            .await
            .map(|_| ())
            .map_err(sql("leave the relays"))
    }

    /// Ends the session: whatever it still holds is released by Postgres.
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}
