//! Applies the embedded migrations (migrations/*.sql, in sqlx's file format) to the configured
//! schema and table.
//!
//! The files use `{{schema}}`/`{{table}}` placeholders, so one database can hold several
//! outboxes; each outbox records what was applied in its own `<table>_migrations` table.
//! A session advisory lock keyed on the outbox name makes concurrent `migrate` runs (several
//! relays starting at once) take turns.

use super::{Names, StoreError};
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgPool};

/// The migrations embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

fn table(names: &Names) -> String {
    format!("{}.{}_migrations", names.schema, names.table)
}

fn lock_key(names: &Names) -> String {
    format!("outbox-relay migrate {}", names.qualified())
}

/// Applies every migration not yet applied; returns the versions applied now.
pub async fn run(pool: &PgPool, names: &Names) -> Result<Vec<i64>, StoreError> {
    let sql_err = |what| move |cause| StoreError::Sql { what, cause };
    let mut conn = pool.acquire().await.map_err(sql_err("connect"))?;
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(lock_key(names))
        .execute(&mut *conn)
        .await
        .map_err(sql_err("take the migration lock"))?;
    let result = async {
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s}; \
             CREATE TABLE IF NOT EXISTS {m} ( \
               version bigint PRIMARY KEY, description text NOT NULL, \
               checksum bytea NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
            s = names.schema,
            m = table(names)
        ))
        .execute(&mut *conn)
        .await
        .map_err(sql_err("create the migrations table"))?;
        let applied: Vec<(i64, Vec<u8>)> =
            sqlx::query_as(&format!("SELECT version, checksum FROM {}", table(names)))
                .fetch_all(&mut *conn)
                .await
                .map_err(sql_err("read applied migrations"))?;
        let mut now = Vec::new();
        for m in MIGRATOR.iter() {
            if m.migration_type.is_down_migration() {
                continue;
            }
            if let Some((_, sum)) = applied.iter().find(|(v, _)| *v == m.version) {
                if sum.as_slice() != &*m.checksum {
                    return Err(StoreError::Schema(format!(
                        "migration {} ({}) was changed after it was applied to {}",
                        m.version,
                        m.description,
                        names.qualified()
                    )));
                }
                continue;
            }
            let mut tx = conn.begin().await.map_err(sql_err("begin migration"))?;
            sqlx::raw_sql(&names.render(&m.sql))
                .execute(&mut *tx)
                .await
                .map_err(|source| {
                    StoreError::Schema(format!(
                        "migration {} ({}) failed on {}: {source}",
                        m.version,
                        m.description,
                        names.qualified()
                    ))
                })?;
            sqlx::query(&format!(
                "INSERT INTO {} (version, description, checksum) VALUES ($1, $2, $3)",
                table(names)
            ))
            .bind(m.version)
            .bind(&*m.description)
            .bind(&*m.checksum)
            .execute(&mut *tx)
            .await
            .map_err(sql_err("record migration"))?;
            tx.commit().await.map_err(sql_err("commit migration"))?;
            now.push(m.version);
        }
        Ok(now)
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(lock_key(names))
        .execute(&mut *conn)
        .await;
    result
}

/// Checks that every embedded migration has been applied.
pub async fn check(pool: &PgPool, names: &Names) -> Result<(), StoreError> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table(names))
        .fetch_one(pool)
        .await
        .map_err(|cause| StoreError::Sql {
            what: "look up the outbox",
            cause,
        })?;
    if exists.is_none() {
        return Err(StoreError::Schema(format!(
            "the outbox {} does not exist in this database; run `outbox-relay migrate`",
            names.qualified()
        )));
    }
    let applied: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {}", table(names)))
        .fetch_all(pool)
        .await
        .map_err(|cause| StoreError::Sql {
            what: "read applied migrations",
            cause,
        })?;
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::Schema(format!(
            "the outbox {} lacks migrations {}; run `outbox-relay migrate`",
            names.qualified(),
            missing.join(", ")
        )));
    }
    Ok(())
}
