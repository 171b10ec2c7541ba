//! `[database]`: where the outbox is, how to reach it, and TLS.

use super::secrets::{is_postgres_scheme, percent_decode, url_parts};
use super::value::{invalid, non_zero, validate_identifier, ConfigError, Dur, Secret};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub schema: String,
    pub table: String,
    pub max_connections: u32,
    pub connect_timeout: Dur,
    pub statement_timeout: Dur,
    /// TLS: "" (the URL's sslmode, else prefer; on a loopback host with no TLS setting at all,
    /// plaintext where the server takes it), disable, prefer, require, verify-ca or
    /// verify-full.
    pub ssl_mode: String,
    /// PEM file of the CA(s) that sign the server's certificate; "" = the URL's sslrootcert,
    /// else the system's store.
    pub ssl_root_cert: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/postgres"),
            schema: "outbox".into(),
            table: "outbox".into(),
            max_connections: 0,
            connect_timeout: Dur::secs(5),
            statement_timeout: Dur::secs(30),
            ssl_mode: String::new(),
            ssl_root_cert: String::new(),
        }
    }
}

/// Why a Postgres connection failed, in the terms of the settings that fix it, when the
/// driver's or the server's words alone leave it unclear.
pub fn connection_hint(error: &str) -> Option<&'static str> {
    let e = error;
    if e.contains("no encryption") {
        Some(
            "the server accepts only TLS connections from here: set sslmode=require, \
             verify-ca or verify-full (database.ssl_mode or the URL's sslmode)",
        )
    } else if e.contains("UnknownIssuer") || e.contains("BadSignature") {
        Some(
            "the server's certificate is not signed by a trusted CA: give the CA that signed \
             it in database.ssl_root_cert (or the URL's sslrootcert)",
        )
    } else if e.contains("NotValidForName") || e.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host of database.url: connect by a \
             name the certificate lists (verify-full checks it, and so does verify-ca with \
             this driver, sqlx 0.8 on rustls 0.23.24 or later: sqlx issue #3793)",
        )
    } else if e.contains("server does not support TLS") {
        Some(
            "the server has TLS off: turn ssl on in the server or set sslmode to disable or \
             prefer",
        )
    } else {
        None
    }
}

/// What `ssl_mode` may be.
const SSL_MODES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];

/// The query parameters of a Postgres URL the driver understands.
const URL_PARAMS: [&str; 20] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "connect_timeout",
    "target_session_attrs",
];

/// TLS to Postgres as configured: `database.ssl_mode` and `database.ssl_root_cert`, else the
/// URL's `sslmode` and `sslrootcert`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseTls {
    /// None: the driver's default (`PGSSLMODE`, else prefer).
    pub mode: Option<String>,
    pub root_cert: Option<String>,
    /// The URL names a client certificate or key (`sslcert`, `sslkey`).
    pub client_cert: bool,
}

impl DatabaseConfig {
    /// The TLS settings from the keys and the URL together (validated: they do not disagree).
    pub fn tls(&self) -> DatabaseTls {
        let mut from_url = DatabaseTls::default();
        if let Some(p) = url_parts(self.url.expose()) {
            for (k, v) in p.query {
                match percent_decode(k, true).as_str() {
                    "sslmode" | "ssl-mode" => from_url.mode = Some(percent_decode(v, true)),
                    "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                        from_url.root_cert = Some(percent_decode(v, true))
                    }
                    "sslcert" | "ssl-cert" | "sslkey" | "ssl-key" => from_url.client_cert = true,
                    _ => {}
                }
            }
        }
        let key = |s: &str| (!s.is_empty()).then(|| s.to_string());
        DatabaseTls {
            mode: key(&self.ssl_mode).or(from_url.mode),
            root_cert: key(&self.ssl_root_cert).or(from_url.root_cert),
            client_cert: from_url.client_cert,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_url()?;
        validate_identifier("database.schema", &self.schema, 63)?;
        // Index and trigger names append up to 23 characters to the table name.
        validate_identifier("database.table", &self.table, 40)?;
        non_zero(&[
            ("database.statement_timeout", self.statement_timeout),
            ("database.connect_timeout", self.connect_timeout),
        ])
    }

    /// The URL is a Postgres URL whose parameters the driver understands, agreeing with the
    /// TLS keys, and a CA file named anywhere holds a certificate.
    fn validate_url(&self) -> Result<(), ConfigError> {
        let (url_mode, url_root) = self.url_tls_params()?;
        self.validate_tls_keys(url_mode, url_root)?;
        self.validate_root_cert()
    }

    /// The URL's `sslmode` and `sslrootcert`, after checking that it is a Postgres URL with
    /// only parameters the driver understands.
    fn url_tls_params(&self) -> Result<(Option<String>, Option<String>), ConfigError> {
        let url = self.url.expose();
        let Some(p) = url_parts(url).filter(|p| is_postgres_scheme(p.scheme)) else {
            return Err(invalid(
                "database.url",
                "is not a postgres:// URL (its value is not shown: it may hold a password); \
                 write postgres://user:password@host:5432/database?sslmode=verify-full \
                 (libpq key=value strings are not understood)",
            ));
        };
        let mut url_mode = None;
        let mut url_root = None;
        for (k, v) in &p.query {
            let name = percent_decode(k, true);
            let known = URL_PARAMS.contains(&name.as_str())
                || (name.starts_with("options[") && name.ends_with(']'));
            if !known {
                return Err(invalid(
                    "database.url",
                    format!(
                        "query parameter {name:?} is not understood; known: {}",
                        URL_PARAMS.join(", ")
                    ),
                ));
            }
            match name.as_str() {
                "sslmode" | "ssl-mode" => url_mode = Some(percent_decode(v, true)),
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                    url_root = Some(percent_decode(v, true))
                }
                // libpq's, which the driver would ignore with a warning: the relay has its
                // own key, and silently different behaviour is worse than a refusal.
                "connect_timeout" | "target_session_attrs" => {
                    return Err(invalid(
                        "database.url",
                        format!(
                            "query parameter {name:?} is not supported{}",
                            if name == "connect_timeout" {
                                "; use database.connect_timeout"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
                _ => {}
            }
        }
        Ok((url_mode, url_root))
    }

    /// `ssl_mode` is a mode the driver has, and neither TLS key disagrees with the URL.
    fn validate_tls_keys(
        &self,
        url_mode: Option<String>,
        url_root: Option<String>,
    ) -> Result<(), ConfigError> {
        let mode_ok = |key: &str, m: &str| {
            if SSL_MODES.contains(&m) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!(
                        "sslmode {m:?} is not allowed; allowed: {} (\"allow\" is not \
                         supported by the driver)",
                        SSL_MODES.join(", ")
                    ),
                ))
            }
        };
        if let Some(m) = &url_mode {
            mode_ok("database.url", m)?;
        }
        if !self.ssl_mode.is_empty() {
            mode_ok("database.ssl_mode", &self.ssl_mode)?;
            if let Some(m) = url_mode.as_ref().filter(|m| **m != self.ssl_mode) {
                return Err(invalid(
                    "database.ssl_mode",
                    format!(
                        "is {:?} but database.url says sslmode={m}; set it in one place",
                        self.ssl_mode
                    ),
                ));
            }
        }
        if !self.ssl_root_cert.is_empty() {
            if let Some(r) = url_root.as_ref().filter(|r| **r != self.ssl_root_cert) {
                return Err(invalid(
                    "database.ssl_root_cert",
                    format!(
                        "is {:?} but database.url says sslrootcert={r}; set it in one place",
                        self.ssl_root_cert
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A CA file, named by the key or the URL, holds a PEM certificate and is used by a mode
    /// that checks the server.
    fn validate_root_cert(&self) -> Result<(), ConfigError> {
        let tls = self.tls();
        if let Some(root) = &tls.root_cert {
            let key = if self.ssl_root_cert.is_empty() {
                "database.url (sslrootcert)"
            } else {
                "database.ssl_root_cert"
            };
            match std::fs::read_to_string(root) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => {
                    return Err(invalid(
                        key,
                        format!("{root:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                    ))
                }
                Err(e) => return Err(invalid(key, format!("{root:?} cannot be read: {e}"))),
            }
            let mode = tls.mode.as_deref().unwrap_or("prefer");
            if !["require", "verify-ca", "verify-full"].contains(&mode) {
                return Err(invalid(
                    key,
                    format!(
                        "a CA file is used only with sslmode require, verify-ca or \
                         verify-full; sslmode is {mode}"
                    ),
                ));
            }
        }
        Ok(())
    }
}
