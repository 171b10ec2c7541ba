//! A TLS front for pulsar-lite, which has no TLS of its own: it terminates TLS with a
//! certificate of a test CA (for `localhost` only) and forwards each connection to the broker.
//! Its lookup answers are rewritten as a Pulsar proxy's are ("proxy through the service URL",
//! with the front's own `pulsar+ssl://` address), so every connection the client makes,
//! lookups and producers alike, goes through the front and over TLS.

use super::certs::test_ca;
use prost013::Message as _;
use pulsar::message::proto::{base_command, BaseCommand};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TlsFront {
    pub port: u16,
    /// `ca.crt` signed the front's certificate; `other.crt` did not.
    pub certs: tempfile::TempDir,
    /// Connections that completed a TLS handshake.
    pub handshakes: Arc<AtomicUsize>,
}

impl TlsFront {
    /// A front on a port of its own, forwarding to `broker` (`host:port`, plaintext).
    pub async fn start(broker: &str) -> TlsFront {
        let certs = test_ca();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs.path().join("server.crt"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(certs.path().join("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let (broker, counted) = (broker.to_string(), handshakes.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, broker, counted) =
                    (acceptor.clone(), broker.clone(), counted.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(server) = TcpStream::connect(&broker).await else {
                        return;
                    };
                    forward(tls, server, port).await;
                });
            }
        });
        TlsFront {
            port,
            certs,
            handshakes,
        }
    }

    pub fn url(&self, host: &str) -> String {
        format!("pulsar+ssl://{host}:{}", self.port)
    }

    pub fn cert(&self, name: &str) -> String {
        self.certs.path().join(name).display().to_string()
    }
}

/// The client's bytes go to the broker as they are; the broker's come back frame by frame,
/// lookup answers rewritten.
async fn forward<C>(client: C, server: TcpStream, port: u16)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        let _ = server_tx.shutdown().await;
    });
    // A frame: 4 bytes of total size, then 4 bytes of command size and the command.
    loop {
        let mut size = [0u8; 4];
        if server_rx.read_exact(&mut size).await.is_err() {
            break;
        }
        let mut frame = vec![0u8; u32::from_be_bytes(size) as usize];
        if server_rx.read_exact(&mut frame).await.is_err() {
            break;
        }
        let out = rewrite_lookup(&frame, port).unwrap_or_else(|| {
            let mut whole = size.to_vec();
            whole.extend_from_slice(&frame);
            whole
        });
        if client_tx.write_all(&out).await.is_err() {
            break;
        }
    }
    up.abort();
}

/// A lookup answer as the front's own: through the service URL, at the front's TLS address.
fn rewrite_lookup(frame: &[u8], port: u16) -> Option<Vec<u8>> {
    let cmd_size = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?) as usize;
    // Only a bare command: a frame with a payload after it is no lookup answer.
    if frame.len() != 4 + cmd_size {
        return None;
    }
    let mut cmd = BaseCommand::decode(&frame[4..]).ok()?;
    if cmd.r#type != base_command::Type::LookupResponse as i32 {
        return None;
    }
    let answer = cmd.lookup_topic_response.as_mut()?;
    answer.broker_service_url_tls = Some(format!("pulsar+ssl://localhost:{port}"));
    answer.proxy_through_service_url = Some(true);
    let body = cmd.encode_to_vec();
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}
