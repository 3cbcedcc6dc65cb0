//! Client-certificate verification that may change while the server runs: the
//! certificate revocation lists (CRLs) of `--client-crl`, reloaded on change and on
//! SIGHUP, and a second look at a connection's chain after each reload. Owns the rustls
//! client verifier; may not touch identity, tokens or the decision log.
//!
//! Revocation is checked for every certificate of a chain: each CA that issues client
//! certificates (or intermediates) needs its CRL in the file, and a certificate whose
//! issuer has none there is refused (unknown status fails closed). A list past its
//! `nextUpdate` still applies; loading one is warned about.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use x509_parser::num_bigint::BigUint;

use super::Error;

/// What one loaded revocation list says, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSummary {
    /// The issuing CA (RFC 4514 name).
    pub issuer: String,
    /// The list's CRL number, in decimal, when it has one.
    pub number: Option<String>,
    /// When the issuer promised the next list (Unix seconds), when it says.
    pub next_update: Option<i64>,
    /// How many certificates the list revokes.
    pub revoked: usize,
}

/// One parsed list.
struct List {
    der: CertificateRevocationListDer<'static>,
    issuer: Vec<u8>,
    number: Option<BigUint>,
    summary: ListSummary,
}

/// The verifier in use and the lists it was built from.
struct Current {
    verifier: Arc<dyn ClientCertVerifier>,
    lists: Arc<[List]>,
    /// SHA-256 of the file the lists came from: an unchanged file is not reloaded.
    digest: [u8; 32],
}

/// The client-certificate verifier of the TLS listener: WebPKI against the client CAs,
/// with the CRLs of one file, replaced as a whole by [`ClientVerifier::reload`].
pub struct ClientVerifier {
    roots: Arc<RootCertStore>,
    /// The client CA certificates (DER), to check a list's signature when it is loaded.
    root_certificates: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    crl_path: Option<PathBuf>,
    current: RwLock<Current>,
    /// Bumped after every swap of `current`: a connection checked against an older
    /// generation is checked again.
    generation: AtomicU64,
    reloading: Mutex<()>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("crl_path", &self.crl_path)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn crl_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Largest revocation list file read.
pub const MAX_CRL_FILE_BYTES: u64 = 64 << 20;

/// The bytes of the revocation list file, refusing one over [`MAX_CRL_FILE_BYTES`].
fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|error| crl_error(path, error.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CRL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| crl_error(path, error.to_string()))?;
    if bytes.len() as u64 > MAX_CRL_FILE_BYTES {
        return Err(crl_error(
            path,
            format!("larger than {} MiB: not read", MAX_CRL_FILE_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// The CRLs in a file's bytes: PEM (`-----BEGIN X509 CRL-----` blocks) or one DER list.
fn read_lists(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let pem = bytes.windows(10).any(|window| window == b"-----BEGIN");
    if !pem && bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())]);
    }
    let lists = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| crl_error(path, format!("not PEM revocation lists: {error}")))?;
    if lists.is_empty() {
        return Err(crl_error(
            path,
            "no `-----BEGIN X509 CRL-----` block, and not a DER revocation list",
        ));
    }
    Ok(lists)
}

/// Parses and checks the lists of `path`: each is a well-formed X.509 CRL, no issuer
/// has two, and a list issued by one of the client CAs carries that CA's signature.
fn load_lists(
    path: &Path,
    bytes: &[u8],
    root_certificates: &[CertificateDer<'_>],
) -> Result<Vec<List>, Error> {
    let mut lists: Vec<List> = Vec::new();
    for (index, der) in read_lists(path, bytes)?.into_iter().enumerate() {
        let which = index + 1;
        let list = {
            let (rest, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|error| {
                crl_error(path, format!("list {which} is not an X.509 CRL: {error}"))
            })?;
            if !rest.is_empty() {
                return Err(crl_error(
                    path,
                    format!("list {which} has bytes after its end"),
                ));
            }
            let issuer = crl.issuer().to_string();
            // A list of a client CA (a trust anchor) is checked here; one of an
            // intermediate CA is checked by the handshakes that use it. One list per
            // name: two client CAs of one name (a key rollover) cannot both be served.
            let mut refused = None;
            for root in root_certificates {
                let Ok((_, ca)) = x509_parser::parse_x509_certificate(root.as_ref()) else {
                    continue;
                };
                if ca.subject().as_raw() != crl.issuer().as_raw() {
                    continue;
                }
                match crl.verify_signature(ca.public_key()) {
                    Ok(()) => {
                        refused = None;
                        break;
                    }
                    Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {
                        refused = Some("its signature algorithm is not supported");
                    }
                    Err(_) => {
                        refused = Some("it is not signed by the client CA of that name");
                    }
                }
            }
            if let Some(reason) = refused {
                return Err(crl_error(
                    path,
                    format!("the list of `{issuer}` is refused: {reason}"),
                ));
            }
            let next_update = crl.next_update().map(|time| time.timestamp());
            let number = crl.crl_number().cloned();
            List {
                issuer: crl.issuer().as_raw().to_vec(),
                summary: ListSummary {
                    issuer,
                    number: number.as_ref().map(ToString::to_string),
                    next_update,
                    revoked: crl.iter_revoked_certificates().count(),
                },
                number,
                der: der.clone(),
            }
        };
        if let Some(earlier) = lists.iter().find(|earlier| earlier.issuer == list.issuer) {
            return Err(crl_error(
                path,
                format!(
                    "two lists from `{}`: keep only the newest",
                    earlier.summary.issuer
                ),
            ));
        }
        lists.push(list);
    }
    Ok(lists)
}

impl ClientVerifier {
    /// A verifier for client certificates chaining to `root_certificates` (read from
    /// `client_ca`), with the revocation lists of `crl_path` when given.
    pub fn new(
        root_certificates: Vec<CertificateDer<'static>>,
        client_ca: &Path,
        crl_path: Option<PathBuf>,
    ) -> Result<Arc<Self>, Error> {
        let mut roots = RootCertStore::empty();
        for ca in &root_certificates {
            roots.add(ca.clone()).map_err(|error| Error::File {
                path: client_ca.to_owned(),
                reason: format!("unusable CA certificate: {error}"),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (lists, digest): (Arc<[List]>, _) = match &crl_path {
            Some(path) => {
                let bytes = read_file(path)?;
                let lists = load_lists(path, &bytes, &root_certificates)?;
                warn_about(path, &lists);
                for root in &root_certificates {
                    let Ok((_, ca)) = x509_parser::parse_x509_certificate(root.as_ref()) else {
                        continue;
                    };
                    if !lists
                        .iter()
                        .any(|list| list.issuer == ca.subject().as_raw())
                    {
                        tracing::warn!(
                            crl = %path.display(),
                            ca = %ca.subject(),
                            "no revocation list of this client CA: every certificate it issued is refused (revocation status unknown)"
                        );
                    }
                }
                (lists.into(), digest(&bytes))
            }
            None => (Arc::from([]), [0; 32]),
        };
        let verifier = build(&roots, &provider, &lists, crl_path.as_deref())?;
        Ok(Arc::new(Self {
            hints: roots.subjects(),
            roots,
            root_certificates,
            provider,
            crl_path,
            current: RwLock::new(Current {
                verifier,
                lists,
                digest,
            }),
            generation: AtomicU64::new(1),
            reloading: Mutex::new(()),
        }))
    }

    /// The revocation list file, when there is one.
    pub fn crl_path(&self) -> Option<&Path> {
        self.crl_path.as_deref()
    }

    /// The lists in use.
    pub fn lists(&self) -> Vec<ListSummary> {
        self.snapshot()
            .1
            .iter()
            .map(|list| list.summary.clone())
            .collect()
    }

    /// The current generation: a connection verified at this generation needs no
    /// second look until the next reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> (Arc<dyn ClientCertVerifier>, Arc<[List]>, [u8; 32]) {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (
            Arc::clone(&current.verifier),
            Arc::clone(&current.lists),
            current.digest,
        )
    }

    /// Reads the revocation list file again and puts its lists in use; returns them.
    /// Nothing changes when the file cannot be read or checked, or when it would take
    /// back a revocation: a list of a CA in use is missing, or has a lower CRL number
    /// than the one in use, or the same number with other contents, or no number where
    /// the one in use has one. An unchanged file changes nothing either (open
    /// connections are not checked again for it). Reloads run one at a time.
    pub fn reload(&self) -> Result<Vec<ListSummary>, Error> {
        let Some(path) = &self.crl_path else {
            return Ok(Vec::new());
        };
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bytes = read_file(path)?;
        let (_, old, old_digest) = self.snapshot();
        let digest = digest(&bytes);
        if digest == old_digest {
            warn_about(path, &old);
            return Ok(old.iter().map(|list| list.summary.clone()).collect());
        }
        let lists = load_lists(path, &bytes, &self.root_certificates)?;
        for earlier in old.iter() {
            let going_back = |why: String| {
                Err(crl_error(
                    path,
                    format!(
                        "the list of `{}` {why}: refusing a change that could un-revoke certificates",
                        earlier.summary.issuer
                    ),
                ))
            };
            let Some(list) = lists.iter().find(|list| list.issuer == earlier.issuer) else {
                return going_back("is missing from the new file".to_owned());
            };
            match (&earlier.number, &list.number) {
                (Some(earlier_number), Some(number)) if number < earlier_number => {
                    return going_back(format!(
                        "has CRL number {number}, older than the {earlier_number} in use"
                    ));
                }
                (Some(earlier_number), Some(number))
                    if number == earlier_number && list.der != earlier.der =>
                {
                    return going_back(format!(
                        "has the CRL number {number} of the list in use but other contents"
                    ));
                }
                (Some(earlier_number), None) => {
                    return going_back(format!(
                        "has no CRL number, where the list in use has {earlier_number}"
                    ));
                }
                _ => {}
            }
        }
        warn_about(path, &lists);
        let lists: Arc<[List]> = lists.into();
        let verifier = build(&self.roots, &self.provider, &lists, Some(path))?;
        let summaries = lists.iter().map(|list| list.summary.clone()).collect();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Current {
            verifier,
            lists,
            digest,
        };
        // After the swap: whoever sees the new generation also sees the new verifier.
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(summaries)
    }

    /// Checks a connection's chain again when the lists changed since it was last
    /// checked. Once refused, a connection stays refused.
    pub fn recheck(&self, chain: &PeerChain) -> Result<(), String> {
        if let Some(reason) = chain.refused.get() {
            return Err(reason.clone());
        }
        let generation = self.generation();
        if chain.checked.load(Ordering::Acquire) >= generation {
            return Ok(());
        }
        let (verifier, _, _) = self.snapshot();
        let Some((leaf, intermediates)) = chain.certificates.split_first() else {
            return Err("no client certificate".to_owned());
        };
        match verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
            Ok(_) => {
                chain.checked.fetch_max(generation, Ordering::AcqRel);
                Ok(())
            }
            Err(error) => {
                let reason = format!(
                    "the client certificate no longer verifies since this connection was made ({error}): reconnect with a valid one"
                );
                Err(chain.refused.get_or_init(|| reason).clone())
            }
        }
    }
}

/// Warns about lists past their `nextUpdate`.
fn warn_about(path: &Path, lists: &[List]) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for list in lists {
        if list.summary.next_update.is_some_and(|next| next < now) {
            tracing::warn!(
                crl = %path.display(),
                issuer = list.summary.issuer,
                "the revocation list is past its nextUpdate: it still applies, but certificates revoked since are not known here; publish a fresh one"
            );
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn build(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    lists: &[List],
    path: Option<&Path>,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(roots),
        Arc::clone(provider),
    )
    .with_crls(lists.iter().map(|list| list.der.clone()))
    .build()
    .map_err(|error| match path {
        Some(path) => crl_error(path, format!("revocation lists refused: {error}")),
        None => Error::Config(error.to_string()),
    })
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.snapshot()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.snapshot().0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.snapshot().0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connection's client certificate chain as its handshake verified it, and the
/// verifier generation it was last found valid at.
#[derive(Debug)]
pub struct PeerChain {
    certificates: Vec<CertificateDer<'static>>,
    checked: AtomicU64,
    refused: OnceLock<String>,
}

impl PeerChain {
    /// The chain a handshake verified at `generation` (taken before the handshake).
    pub fn new(certificates: Vec<CertificateDer<'static>>, generation: u64) -> Self {
        Self {
            certificates,
            checked: AtomicU64::new(generation),
            refused: OnceLock::new(),
        }
    }
}

impl PartialEq for PeerChain {
    fn eq(&self, other: &Self) -> bool {
        self.certificates == other.certificates
    }
}

impl Eq for PeerChain {}

#[cfg(test)]
mod tests;
