//! Connecting: the pool, its sessions' settings, TLS (plaintext on loopback where nothing
//! asks for TLS), and replacing sessions whose prepared claim went stale.

use super::{Names, Store, StoreError};
use crate::config::{redact_url, DatabaseConfig, DatabaseTls};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    pub(super) fn note(&self, e: &StoreError) {
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

impl Store {
    /// Connects a pool. The URL's password is never logged.
    pub async fn connect(db: &DatabaseConfig, session: &Session) -> Result<Store, StoreError> {
        let (opts, tls) = connect_options(db)?;
        let opts = session_options(opts, db, session);
        let (opts, plaintext_loopback) = plaintext_on_loopback(opts, &tls, db, session).await;
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

    /// The server's version, and whether this session is encrypted and with what, as the
    /// server sees it (`pg_stat_ssl`), for `check`.
    pub(crate) async fn session_tls(&self) -> Result<(String, bool, Option<String>), sqlx::Error> {
        sqlx::query_as(
            "SELECT current_setting('server_version'), s.ssl, s.version \
             FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Sessions go in plaintext because the host is a loopback one and no TLS setting was
    /// given (see `tls_left_to_us`).
    pub fn plaintext_loopback(&self) -> bool {
        self.plaintext_loopback
    }
}

/// The URL's options with the TLS settings applied, and the TLS settings themselves.
fn connect_options(db: &DatabaseConfig) -> Result<(PgConnectOptions, DatabaseTls), StoreError> {
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
    if tls.root_cert.is_some() && matches!(opts.get_ssl_mode(), sqlx::postgres::PgSslMode::Require)
    {
        opts = opts.ssl_mode(sqlx::postgres::PgSslMode::VerifyCa);
    }
    Ok((opts, tls))
}

/// The session's name and settings: the statement timeout, the planner knobs that keep every
/// statement on its index, the idle-in-transaction bound.
fn session_options(
    mut opts: PgConnectOptions,
    db: &DatabaseConfig,
    session: &Session,
) -> PgConnectOptions {
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
    opts
}

/// Plaintext when the host is a loopback one, no TLS setting was given and the server takes a
/// plaintext session (see [`tls_left_to_us`]); said once in the log.
async fn plaintext_on_loopback(
    mut opts: PgConnectOptions,
    tls: &DatabaseTls,
    db: &DatabaseConfig,
    session: &Session,
) -> (PgConnectOptions, bool) {
    // A Unix socket never carries TLS, whatever the host says.
    let plaintext_loopback = if opts.get_socket().is_none() && tls_left_to_us(tls, opts.get_host())
    {
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
    (opts, plaintext_loopback)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
