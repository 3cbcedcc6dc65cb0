//! The listener: TLS 1.3 with mandatory client certificates (mTLS) via rustls, or plain
//! TCP for the loopback-only development modes.
//!
//! ringfence performs the handshakes itself (instead of tonic's built-in TLS) so that
//! every failed handshake — no client certificate, one from another CA, an expired
//! one — is reported to the caller-supplied hook (the server writes it to the
//! decision log as an authentication failure), and so that the calling service's
//! identity is read from the verified certificate once per connection.
//!
//! Service identity: a URI SAN `spiffe://<trust-domain>/svc/<id>`, or failing that a
//! DNS SAN `<id>.svc.<trust-domain>`; `<id>` must then be a `Service` of the directory.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::record::is_directory_id;

mod lobby;
pub use lobby::Lobby;
mod revocation;

pub use lobby::{MAX_HANDSHAKES, MAX_SILENT_PER_SOURCE};
pub use revocation::{ClientVerifier, ListSummary, PeerChain};

/// Longest time a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a new connection may take to send its first byte (the ClientHello).
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Files of the server's TLS identity and the CA that issues client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificate(s) that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Revocation lists of the client CAs (PEM or DER), reloaded on change.
    pub client_crl: Option<PathBuf>,
}

/// What the TLS listener needs.
#[derive(Debug, Clone)]
pub struct Listener {
    /// rustls configuration (its client verifier is `verifier`).
    pub config: Arc<rustls::ServerConfig>,
    /// The client-certificate verifier, whose revocation lists reload.
    pub verifier: Arc<ClientVerifier>,
    /// Trust domain of the services named by client certificates.
    pub trust_domain: String,
}

/// Errors of TLS setup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A file is unreadable or holds no usable certificate or key.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (never key material).
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| Error::File {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::File {
            path: path.to_owned(),
            reason: format!("not PEM certificates: {error}"),
        })?;
    if certs.is_empty() {
        return Err(Error::File {
            path: path.to_owned(),
            reason: "no `-----BEGIN CERTIFICATE-----` block".to_owned(),
        });
    }
    Ok(certs)
}

/// The rustls server configuration: TLS 1.3 only, client certificates required and
/// verified against `files.client_ca` (and its revocation lists), ALPN `h2`; and its
/// client verifier.
pub fn server_config(
    files: &TlsFiles,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ClientVerifier>), Error> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|_| Error::File {
        path: files.key.clone(),
        reason: "no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned(),
    })?;
    let verifier = ClientVerifier::new(
        certificates(&files.client_ca)?,
        &files.client_ca,
        files.client_crl.clone(),
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| Error::Config(error.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|error| Error::Config(error.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session restores the stored client chain without
    // verifying it again (against the CA, expiry), so every connection makes a full
    // handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), verifier))
}

/// What the transport proved about a connection; put into every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The service named by the verified client certificate, or why there is none
    /// (`None` for plain TCP).
    pub service: Option<Result<String, String>>,
    /// The verified client certificate's SHA-256 thumbprint, base64url without
    /// padding: what a token's `cnf.x5t#S256` names (RFC 8705).
    pub certificate_thumbprint: Option<String>,
    /// When the verified client certificate expires (Unix seconds): requests on the
    /// connection after it are refused.
    pub certificate_not_after: Option<i64>,
    /// The verified chain, checked again after the revocation lists change.
    pub chain: Option<Arc<PeerChain>>,
}

/// When a certificate (DER) expires, in Unix seconds.
fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The RFC 8705 thumbprint of a certificate (DER): base64url(SHA-256), no padding.
pub fn certificate_thumbprint(der: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// The calling service named by a verified client certificate (DER).
pub fn service_identity(leaf: &[u8], trust_domain: &str) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| "the client certificate cannot be parsed".to_owned())?;
    let names = cert
        .subject_alternative_name()
        .map_err(|_| {
            "the client certificate's subject alternative names cannot be parsed".to_owned()
        })?
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let spiffe_prefix = format!("spiffe://{trust_domain}/svc/");
    let dns_suffix = format!(".svc.{trust_domain}");
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => {}
        [uri] => {
            return match uri.strip_prefix(&spiffe_prefix) {
                Some(id) if is_directory_id(id) => Ok(id.to_owned()),
                _ => Err(format!(
                    "the client certificate's SPIFFE ID `{}` is not of the form `{spiffe_prefix}<service>`",
                    crate::record::shown(uri)
                )),
            };
        }
        // SPIFFE allows exactly one URI SAN: several could name several services.
        _ => return Err("the client certificate has more than one URI SAN".to_owned()),
    }
    let services: Vec<&str> = names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => dns.strip_suffix(&dns_suffix),
            _ => None,
        })
        .filter(|id| is_directory_id(id))
        .collect();
    match services.as_slice() {
        [id] => Ok((*id).to_owned()),
        [] => Err(format!(
            "the client certificate names no service: it needs a URI SAN `{spiffe_prefix}<service>` or a DNS SAN `<service>{dns_suffix}`"
        )),
        _ => Err("the client certificate's DNS SANs name more than one service".to_owned()),
    }
}

/// Whether `domain` can be a trust domain: a DNS name (lowercase letters, digits, `-`
/// and `.`, no empty labels).
pub fn valid_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// One accepted connection.
pub enum Conn {
    /// Plain TCP (loopback development modes only).
    Plain(TcpStream, PeerInfo),
    /// TLS with a verified client certificate.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(stream, _) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream, _) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream, _) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream, _) => stream.is_write_vectored(),
            Conn::Tls(stream, _) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream, _) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream, _) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream, _) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Called with the client's address and the reason of every failed handshake.
pub type FailureHook = Arc<dyn Fn(SocketAddr, String) + Send + Sync>;

/// Accepts connections from `listener`: plain when `tls` is `None`, else TLS
/// handshakes (concurrently, each bounded by [`HANDSHAKE_TIMEOUT`]) whose failures go to
/// `on_failure`. The stream ends when the server stops polling it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Listener>,
    on_failure: FailureHook,
    lobby: lobby::Lobby,
) -> ReceiverStream<io::Result<Conn>> {
    let (sender, receiver) = mpsc::channel::<io::Result<Conn>>(64);
    let acceptor = tls.map(|tls| {
        (
            tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config)),
            Arc::new(tls),
        )
    });
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = sender.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Resource exhaustion (EMFILE etc.): back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small request/response frames must not wait for Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            let Some((acceptor, tls)) = &acceptor else {
                let peer = PeerInfo {
                    remote: Some(remote),
                    service: None,
                    certificate_thumbprint: None,
                    certificate_not_after: None,
                    chain: None,
                };
                if sender.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                    return;
                }
                continue;
            };
            let (acceptor, tls) = (acceptor.clone(), Arc::clone(tls));
            let (sender, hook) = (sender.clone(), Arc::clone(&on_failure));
            // A duplicate descriptor lets the lobby peek for a ClientHello that
            // arrived before the handshake task ran.
            let probe = std::os::fd::AsFd::as_fd(&stream)
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from);
            let entered = lobby.enter(remote, probe, move |ticket| {
                tokio::spawn(handshake(
                    stream, remote, ticket, acceptor, tls, sender, hook,
                ))
                .abort_handle()
            });
            match entered {
                Ok(evicted) => {
                    for lobby::Evicted(evicted) in evicted {
                        on_failure(
                            evicted,
                            format!(
                                "connection closed before its ClientHello to make room: the oldest silent connection of its address (at most {MAX_SILENT_PER_SOURCE}) or of all ({MAX_HANDSHAKES} handshakes) goes first"
                            ),
                        );
                    }
                }
                Err(()) => on_failure(
                    remote,
                    format!(
                        "connection closed: {MAX_HANDSHAKES} TLS handshakes already in progress, all past their ClientHello"
                    ),
                ),
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// One connection's way through the lobby: its first byte within
/// [`CLIENT_HELLO_TIMEOUT`], then the TLS handshake within [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    stream: TcpStream,
    remote: SocketAddr,
    ticket: lobby::Ticket,
    acceptor: tokio_rustls::TlsAcceptor,
    tls: Arc<Listener>,
    sender: mpsc::Sender<io::Result<Conn>>,
    on_failure: FailureHook,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(read)) if read > 0 => {
            if !ticket.heard() {
                return;
            }
        }
        // Closed or broken before a byte: nothing to report.
        Ok(_) => return,
        Err(_) => {
            return on_failure(
                remote,
                format!(
                    "connection closed: no ClientHello within {} s",
                    CLIENT_HELLO_TIMEOUT.as_secs()
                ),
            );
        }
    }
    // Taken before the handshake: a reload during it makes the first request look again.
    let generation = tls.verifier.generation();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return on_failure(remote, format!("TLS handshake failed: {error}"));
        }
        Err(_) => {
            return on_failure(
                remote,
                format!(
                    "TLS handshake not completed within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            );
        }
    };
    // Through the lobby: the place goes to the next connection.
    drop(ticket);
    let certificates = stream.get_ref().1.peer_certificates();
    let leaf = certificates.and_then(|chain| chain.first());
    let service = leaf
        .map(|leaf| service_identity(leaf.as_ref(), &tls.trust_domain))
        .unwrap_or_else(|| Err("no client certificate".to_owned()));
    let peer = PeerInfo {
        remote: Some(remote),
        service: Some(service),
        certificate_thumbprint: leaf.map(|leaf| certificate_thumbprint(leaf.as_ref())),
        certificate_not_after: leaf.and_then(|leaf| not_after(leaf.as_ref())),
        chain: certificates.map(|chain| Arc::new(PeerChain::new(chain.to_vec(), generation))),
    };
    let _ = sender.send(Ok(Conn::Tls(Box::new(stream), peer))).await;
}
