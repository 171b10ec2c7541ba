//! The connection to the broker: made in the background until it succeeds (pulsar-rs then
//! reconnects by itself), with the configured authentication and TLS.

use super::config::{AuthMethod, PulsarConfig};
use pulsar::{Pulsar, TokioExecutor};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(super) type Client = Pulsar<TokioExecutor>;

/// The client as the background connector left it.
#[derive(Clone)]
pub(super) enum Conn {
    Connecting,
    Up(Client),
    Down(String),
}

/// Between connection attempts while the broker cannot be reached.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Connects in the background until it succeeds; pulsar-rs then reconnects by itself. Nothing
/// here is ever cancelled half-way but at shutdown: a pulsar-rs connect dropped midway can
/// leave its connection manager waiting forever on the half-made connection.
///
/// With several hosts in the service URL, each attempt takes the next one: a host that refuses
/// costs one attempt, one that does not answer up to three `connection_timeout`s (pulsar-rs'
/// own retries). Once connected, pulsar-rs keeps to that host for its
/// lookups (it reconnects to it, not to the others).
pub(super) async fn connector(cfg: PulsarConfig, tx: watch::Sender<Conn>, stop: CancellationToken) {
    let urls = cfg.service_urls();
    for url in urls.iter().cycle() {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = build_client(&cfg, url) => r,
        };
        match attempt {
            Ok(c) => {
                tx.send_replace(Conn::Up(c));
                return;
            }
            Err(why) => {
                tx.send_replace(Conn::Down(why));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
}

async fn build_client(cfg: &PulsarConfig, url: &str) -> Result<Client, String> {
    let mut b = Pulsar::builder(url, TokioExecutor)
        .with_connection_retry_options(pulsar::ConnectionRetryOptions {
            connection_timeout: cfg.connection_timeout.0,
            // The connector tries again; the client need not try for minutes.
            max_retries: 2,
            max_backoff: Duration::from_secs(1),
            ..Default::default()
        })
        .with_operation_retry_options(pulsar::OperationRetryOptions {
            // pulsar-rs gives each message this long for its receipt, resends included, and
            // each lookup and producer creation as long for an answer.
            operation_timeout: cfg.send_timeout.0,
            retry_delay: Duration::from_millis(500),
            max_retries: Some(3),
        })
        .with_outbound_channel_size(cfg.max_pending_messages as usize);
    match cfg.auth {
        AuthMethod::None => {}
        AuthMethod::Token => {
            let token = cfg.token.as_ref().map(|t| t.expose()).unwrap_or_default();
            b = b.with_auth(pulsar::Authentication {
                name: "token".into(),
                data: token.as_bytes().to_vec(),
            });
        }
        AuthMethod::Oauth2 => {
            let params = pulsar::authentication::oauth2::OAuth2Params {
                issuer_url: cfg.oauth2_issuer_url.clone().unwrap_or_default(),
                credentials_url: cfg
                    .oauth2_credentials_url
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default(),
                audience: cfg.oauth2_audience.clone(),
                scope: cfg.oauth2_scope.clone(),
            };
            b = b.with_auth_provider(
                pulsar::authentication::oauth2::OAuth2Authentication::client_credentials(params),
            );
        }
    }
    if let Some(ca) = &cfg.tls_ca_file {
        b = b
            .with_certificate_chain_file(ca)
            .map_err(|e| format!("tls_ca_file {ca:?}: {e}"))?;
    }
    if url.starts_with("pulsar+ssl://") {
        b = b
            .with_tls_hostname_verification_enabled(cfg.tls_hostname_verification)
            .with_allow_insecure_connection(cfg.tls_allow_insecure);
    }
    b.build().await.map_err(|e| {
        let why = format!("pulsar: cannot connect to {url}: {e}");
        // pulsar-rs reports a refused TLS handshake only as a "fatal error", as it does a
        // refused token or a closed connection (the cause goes to its log), so the reason
        // names what to check.
        if url.starts_with("pulsar+ssl://") && why.contains("fatal error") {
            format!(
                "{why} (over TLS, check the broker's certificate: signed by the CA in \
                 tls_ca_file, for the URL's host name unless tls_hostname_verification is \
                 off; else the credentials or the connection)"
            )
        } else {
            why
        }
    })
}
