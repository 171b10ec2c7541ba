//! Postgres over TLS, through the binary: a private server with a certificate of a test CA,
//! and `migrate` / `check` with each sslmode. Certificates come from the `openssl` command.

mod common;

use common::certs::test_ca;
use common::{is_root, output_text as text, relay_bin, PrivatePostgres};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct TlsPostgres {
    pg: PrivatePostgres,
    /// Holds `ca.crt` (signed the server's certificate) and `other.crt` (did not).
    certs: tempfile::TempDir,
}

impl TlsPostgres {
    /// A private server with TLS on that accepts TCP connections only over TLS.
    fn start() -> TlsPostgres {
        Self::start_with_hba(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
    }

    /// A private server with TLS on that accepts TCP connections with or without it.
    fn start_either() -> TlsPostgres {
        Self::start_with_hba(
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
        )
    }

    fn start_with_hba(hba: &str) -> TlsPostgres {
        let pg = PrivatePostgres::start();
        let certs = test_ca();
        let data = pg.dir.path().join("data");
        for f in ["server.crt", "server.key"] {
            std::fs::copy(certs.path().join(f), data.join(f)).unwrap();
        }
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        conf.push_str("\nssl = on\n");
        std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
        // The server refuses a key others can read; as root, the server runs as postgres.
        chmod_600(&data.join("server.key"));
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(st.success());
        }
        pg.stop_server();
        pg.start_server();
        TlsPostgres { pg, certs }
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.certs.path().join(format!("{name}.crt"))
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres{query}",
            self.pg.port
        )
    }
}

fn chmod_600(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn relay(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(relay_bin());
    c.current_dir(dir.path())
        .args(["--database-url", url, "--schema", "tls_test"])
        .args(args)
        // A failed handshake must not wait out a long pool timeout.
        .env("RELAY__DATABASE__CONNECT_TIMEOUT", "3s");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run the relay binary")
}

/// migrate, then check: both succeed and check reports an encrypted session.
fn assert_connects(url: &str, env: &[(&str, &str)], what: &str) {
    let out = migrate_and_check(url, env, what);
    assert!(
        out.contains("ok       database") && out.contains("TLSv1."),
        "{what}: check does not report TLS:\n{out}"
    );
}

/// migrate, then check; both must succeed. Returns check's output.
fn migrate_and_check(url: &str, env: &[(&str, &str)], what: &str) -> String {
    let o = relay(url, &["migrate"], env);
    assert!(o.status.success(), "{what}: migrate: {}", text(&o));
    let o = relay(url, &["check"], env);
    assert!(o.status.success(), "{what}: check: {}", text(&o));
    text(&o)
}

/// On a loopback host with no TLS setting the relay goes without TLS where the server takes
/// that, and with it (sslmode prefer, as libpq) where the server demands it; any TLS setting
/// given is followed as it is.
#[test]
fn a_loopback_session_goes_without_tls_only_where_nothing_asks_for_it() {
    let _w = common::watchdog(
        "a_loopback_session_goes_without_tls_only_where_nothing_asks_for_it",
        std::time::Duration::from_secs(300),
    );
    let either = TlsPostgres::start_either();
    for host in ["127.0.0.1", "localhost"] {
        let out = migrate_and_check(&either.url(host, ""), &[], host);
        assert!(
            out.contains("no TLS: a loopback host and no sslmode given"),
            "{host}: the session should be plaintext:\n{out}"
        );
    }
    // Asked for, TLS is used on loopback as anywhere.
    assert_connects(
        &either.url("127.0.0.1", "?sslmode=prefer"),
        &[],
        "prefer in the URL",
    );
    assert_connects(
        &either.url("127.0.0.1", ""),
        &[("RELAY__DATABASE__SSL_MODE", "prefer")],
        "prefer as the key",
    );
    assert_connects(
        &either.url("127.0.0.1", ""),
        &[("PGSSLMODE", "prefer")],
        "prefer in PGSSLMODE",
    );
    // A server that takes only TLS from here: the relay falls back to prefer at start-up.
    let only_tls = TlsPostgres::start();
    assert_connects(
        &only_tls.url("127.0.0.1", ""),
        &[],
        "TLS demanded by the server",
    );
    let o = relay(&only_tls.url("127.0.0.1", ""), &["status"], &[]);
    assert!(o.status.success(), "status over the fallback: {}", text(&o));
}

/// check fails on the database with `expect` in its output (the reason and the hint).
fn assert_refused(url: &str, env: &[(&str, &str)], expect: &[&str], what: &str) {
    let o = relay(url, &["check"], env);
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
    let out = text(&o);
    for e in expect {
        assert!(out.contains(e), "{what}: no {e:?} in:\n{out}");
    }
}

#[test]
fn postgres_over_tls_with_each_sslmode() {
    let _w = common::watchdog(
        "postgres_over_tls_with_each_sslmode",
        std::time::Duration::from_secs(300),
    );
    let pg = TlsPostgres::start();
    let ca = pg.cert("ca");
    let other = pg.cert("other");
    let ca = ca.to_str().unwrap();
    let other = other.to_str().unwrap();

    // require: encrypted, nothing verified (any certificate, any name).
    assert_connects(&pg.url("127.0.0.1", "?sslmode=require"), &[], "require");
    // verify-ca with the right CA.
    assert_connects(
        &pg.url("localhost", &format!("?sslmode=verify-ca&sslrootcert={ca}")),
        &[],
        "verify-ca",
    );
    // Known limit: libpq's verify-ca ignores the host name, but sqlx 0.8.6 on rustls 0.23.24+
    // checks it too (sqlx issue #3793, fixed after 0.8.6). Fail-closed, with a hint naming
    // it; when the driver is upgraded this connects and the assertion is to be flipped.
    assert_refused(
        &pg.url("127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}")),
        &[],
        &["not valid for name", "sqlx issue #3793"],
        "verify-ca by IP (driver limit)",
    );
    // verify-full by the name in the certificate, settings as keys instead of the URL's.
    assert_connects(
        &pg.url("localhost", ""),
        &[
            ("RELAY__DATABASE__SSL_MODE", "verify-full"),
            ("RELAY__DATABASE__SSL_ROOT_CERT", ca),
        ],
        "verify-full by name",
    );

    // verify-full by a name the certificate does not carry.
    assert_refused(
        &pg.url(
            "127.0.0.1",
            &format!("?sslmode=verify-full&sslrootcert={ca}"),
        ),
        &[],
        &["not valid for name", "does not name the host"],
        "verify-full, wrong host",
    );
    // verify-ca with a CA that did not sign the server's certificate.
    assert_refused(
        &pg.url(
            "127.0.0.1",
            &format!("?sslmode=verify-ca&sslrootcert={other}"),
        ),
        &[],
        &["UnknownIssuer", "not signed by a trusted CA"],
        "verify-ca, wrong CA",
    );
    // require with a CA file verifies the chain, as libpq does.
    assert_refused(
        &pg.url("localhost", ""),
        &[
            ("RELAY__DATABASE__SSL_MODE", "require"),
            ("RELAY__DATABASE__SSL_ROOT_CERT", other),
        ],
        &["UnknownIssuer"],
        "require with a CA file, wrong CA",
    );
    // No TLS towards a server that takes only TLS: the server's reason and what to set.
    assert_refused(
        &pg.url("127.0.0.1", "?sslmode=disable"),
        &[],
        &["no encryption", "sslmode=require"],
        "disable against hostssl",
    );
    // The same failure reported by a command that stops on it (migrate).
    let o = relay(&pg.url("127.0.0.1", "?sslmode=disable"), &["migrate"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no encryption"), "{}", text(&o));
}

#[test]
fn tls_settings_are_checked_at_start_up_naming_the_key() {
    let url = "postgres://postgres@127.0.0.1:1/postgres";
    let o = relay(
        url,
        &["check"],
        &[("RELAY__DATABASE__SSL_MODE", "verify-everything")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("database.ssl_mode") && text(&o).contains("verify-everything"),
        "{}",
        text(&o)
    );
    let o = relay(
        url,
        &["check"],
        &[
            ("RELAY__DATABASE__SSL_MODE", "verify-full"),
            ("RELAY__DATABASE__SSL_ROOT_CERT", "/nonexistent/ca.crt"),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("database.ssl_root_cert") && text(&o).contains("/nonexistent/ca.crt"),
        "{}",
        text(&o)
    );
    let o = relay(
        &format!("{url}?sslmode=prefer&sslrootcert=/etc/hostname"),
        &["check"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no PEM certificate"), "{}", text(&o));
}
