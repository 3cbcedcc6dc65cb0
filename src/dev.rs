//! A local PKI and identity provider for development: `ringfence dev init` creates, in
//! `<data-dir>/dev-pki/`, a CA, a server certificate for localhost, one client
//! certificate per directory `Service` (SPIFFE URI SAN), and a token-signing key with
//! its JWKS; `ringfence dev token` mints an employee token. `serve --dev` uses them.
//!
//! Everything here is for development: the CA key sits next to the server's data.
//! Production deployments bring their own CA and identity provider.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType,
};
use sha2::{Digest, Sha256};

use crate::identity::tls::TlsFiles;
use crate::identity::token::TokenConfig;

/// Subdirectory of the data directory holding the development PKI.
pub const DEV_PKI_DIR: &str = "dev-pki";
/// Trust domain of development certificates.
pub const DEV_TRUST_DOMAIN: &str = "ringfence.dev";
/// Issuer of development tokens.
pub const DEV_ISSUER: &str = "https://idp.ringfence.dev";
/// Audience of development tokens.
pub const DEV_AUDIENCE: &str = "ringfence";
/// Validity of development certificates.
const CERT_DAYS: i64 = 365;

/// Errors of the development PKI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Certificate or key generation failed.
    #[error("cannot generate {what}: {reason}")]
    Generate {
        /// What was being generated.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A file cannot be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn generate(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |error| Error::Generate {
        what: what.to_owned(),
        reason: error.to_string(),
    }
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: zeroize::Zeroizing<String>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: zeroize::Zeroizing<String>,
}

/// What a client certificate should say.
#[derive(Debug, Clone, Default)]
pub struct ClientCert<'a> {
    /// Common name.
    pub common_name: &'a str,
    /// URI SANs (e.g. a SPIFFE ID).
    pub uris: &'a [String],
    /// DNS SANs.
    pub dns: &'a [String],
    /// Validity (not before, not after); default: from now for a year.
    pub validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
}

fn validity_from_now() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::minutes(5),
        now + time::Duration::days(CERT_DAYS),
    )
}

impl Ca {
    /// A fresh CA with a P-256 key.
    pub fn generate(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("CA key"))?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity_from_now();
        let cert = params
            .self_signed(&key)
            .map_err(generate("CA certificate"))?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(generate("CA key from PEM"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(generate("CA from PEM"))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: zeroize::Zeroizing::new(key_pem.to_owned()),
            issuer,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A revocation list (PEM) of this CA revoking the certificates with `serials`
    /// (big-endian, no sign byte), numbered `number`, valid for 30 days.
    pub fn revocation_list(&self, serials: &[Vec<u8>], number: u64) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc();
        let revoked: Vec<_> = serials.iter().map(|serial| (serial.clone(), now)).collect();
        self.revocation_list_since(&revoked, number)
    }

    /// A revocation list (PEM) revoking each serial as of its time.
    pub fn revocation_list_since(
        &self,
        revoked: &[(Vec<u8>, time::OffsetDateTime)],
        number: u64,
    ) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(30),
            crl_number: number.into(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, since)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: *since,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(generate("revocation list"))
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server_cert(&self, names: &[&str]) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("server key"))?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .map_err(generate("server certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ringfence");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity_from_now();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("server certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A client certificate.
    pub fn client_cert(&self, spec: &ClientCert<'_>) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("client key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name);
        for uri in spec.uris {
            let uri = uri.as_str().try_into().map_err(generate("a URI SAN"))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        for dns in spec.dns {
            let dns = dns.as_str().try_into().map_err(generate("a DNS SAN"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = spec.validity.unwrap_or_else(validity_from_now);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("client certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// The serial number of a PEM certificate (big-endian, no sign byte), as a revocation
/// list names it.
pub fn certificate_serial(cert_pem: &[u8]) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
    Some(cert.serial.to_bytes_be())
}

/// The SPIFFE ID of a service in a trust domain.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}

/// An Ed25519 token-signing key: the development identity provider.
pub struct TokenSigner {
    key_pem: zeroize::Zeroizing<String>,
    public_raw: Vec<u8>,
    key_id: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Claims of a minted token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenClaims {
    /// Employee id.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// The service the token is issued to: only it may present the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
    /// Proof-of-possession confirmation, e.g. `{"x5t#S256": "<thumbprint>"}` (RFC 8705).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

impl TokenSigner {
    /// A fresh key.
    pub fn generate() -> Result<Self, Error> {
        let failed = |reason: String| Error::Generate {
            what: "token signing key".to_owned(),
            reason,
        };
        let seed = crate::keyfile::generate_ed25519().map_err(failed)?;
        Self::from_pem(&crate::keyfile::ed25519_pem(&seed))
    }

    /// A key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(pem).map_err(generate("token signing key from PEM"))?;
        if key.algorithm() != &PKCS_ED25519 {
            return Err(Error::Generate {
                what: "token signing key".to_owned(),
                reason: "not an Ed25519 key".to_owned(),
            });
        }
        let public_raw = key.public_key_raw().to_vec();
        let key_id = hex::encode(Sha256::digest(&public_raw).get(..8).unwrap_or_default());
        Ok(Self {
            key_pem: zeroize::Zeroizing::new(pem.to_owned()),
            public_raw,
            key_id,
        })
    }

    /// The private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The JWKS holding this key's public half.
    pub fn jwks(&self) -> String {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public_raw);
        serde_json::json!({
            "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA", "use": "sig"}]
        })
        .to_string()
    }

    /// Signs `claims` (EdDSA, with this key's `kid`).
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, Error> {
        let key =
            jsonwebtoken::EncodingKey::from_ed_pem(self.key_pem.as_bytes()).map_err(|error| {
                Error::Generate {
                    what: "token".to_owned(),
                    reason: error.to_string(),
                }
            })?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &key).map_err(|error| Error::Generate {
            what: "token".to_owned(),
            reason: error.to_string(),
        })
    }

    /// A development token for `employee`, to be presented by `service` only (`azp`),
    /// valid for `ttl` from now.
    pub fn mint(
        &self,
        employee: &str,
        service: &str,
        ttl: time::Duration,
    ) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.sign(&TokenClaims {
            sub: employee.to_owned(),
            iss: DEV_ISSUER.to_owned(),
            aud: DEV_AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + ttl.whole_seconds(),
            azp: Some(service.to_owned()),
            cnf: None,
        })
    }
}

/// The files of a development PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `<data-dir>/dev-pki`.
    pub dir: PathBuf,
}

impl DevPki {
    /// The development PKI of a data directory (whether or not it exists yet).
    pub fn of(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(DEV_PKI_DIR),
        }
    }

    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// Client certificate of a service.
    pub fn client_cert(&self, service: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{service}.pem"))
    }

    /// Client key of a service.
    pub fn client_key(&self, service: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{service}-key.pem"))
    }

    /// Token-signing key (the development identity provider).
    pub fn token_key(&self) -> PathBuf {
        self.dir.join("token-signing-key.pem")
    }

    /// Revocation list of the development CA (created empty by `init`).
    pub fn client_crl(&self) -> PathBuf {
        self.dir.join("client-crl.pem")
    }

    /// The TLS files `serve --dev` uses.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server-key.pem"),
            client_ca: self.ca_cert(),
            client_crl: Some(self.client_crl()),
        }
    }

    fn ca(&self) -> Result<Ca, Error> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|error| Error::File {
                path: path.to_owned(),
                reason: error.to_string(),
            })
        };
        Ca::from_pem(&read(&self.ca_cert())?, &read(&self.ca_key())?)
    }

    /// The serials the revocation list revokes (with their revocation times) and its
    /// CRL number (none and 0 when there is no list yet).
    #[allow(clippy::type_complexity)]
    fn revoked(&self) -> Result<(Vec<(Vec<u8>, time::OffsetDateTime)>, u64), Error> {
        let path = self.client_crl();
        let pem = match std::fs::read(&path) {
            Ok(pem) => pem,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), 0));
            }
            Err(error) => {
                return Err(Error::File {
                    path,
                    reason: error.to_string(),
                });
            }
        };
        let unreadable = |reason: String| Error::File {
            path: path.clone(),
            reason,
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
            .map_err(|error| unreadable(format!("not PEM: {error}")))?;
        let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)
            .map_err(|error| unreadable(format!("not a revocation list: {error}")))?;
        let number = match crl.crl_number() {
            None => 0,
            Some(number) => u64::try_from(number)
                .map_err(|_| unreadable(format!("CRL number {number} is beyond 64 bits")))?,
        };
        let serials = crl
            .iter_revoked_certificates()
            .map(|revoked| {
                (
                    revoked.serial().to_bytes_be(),
                    revoked.revocation_date.to_datetime(),
                )
            })
            .collect();
        Ok((serials, number))
    }

    /// Revokes the client certificate of `service`: its serial joins the revocation
    /// list (with the next CRL number) and its certificate and key are deleted, so that
    /// `init` issues new ones. Returns the revoked serial (hex).
    pub fn revoke(&self, service: &str) -> Result<String, Error> {
        let path = self.client_cert(service);
        let pem = std::fs::read(&path).map_err(|error| Error::File {
            path: path.clone(),
            reason: format!("{error} (no current certificate of `{service}` to revoke)"),
        })?;
        let serial = certificate_serial(&pem).ok_or_else(|| Error::File {
            path: path.clone(),
            reason: "not a PEM certificate".to_owned(),
        })?;
        // One `dev revoke` at a time: each reads, extends and renumbers the list.
        let lock = self.dir.join("client-crl.lock");
        let _one_at_a_time =
            crate::fsutil::LockFile::acquire(&lock, &crate::fsutil::describe_process("dev revoke"))
                .map_err(|error| Error::File {
                    path: lock.clone(),
                    reason: error.to_string(),
                })?;
        let (mut revoked, number) = self.revoked()?;
        if !revoked.iter().any(|(known, _)| *known == serial) {
            revoked.push((serial.clone(), time::OffsetDateTime::now_utc()));
        }
        let number = number.checked_add(1).ok_or_else(|| Error::File {
            path: self.client_crl(),
            reason: "its CRL number cannot grow further".to_owned(),
        })?;
        let list = self.ca()?.revocation_list_since(&revoked, number)?;
        crate::fsutil::write_private_file(&self.client_crl(), list.as_bytes()).map_err(
            |error| Error::File {
                path: self.client_crl(),
                reason: error.to_string(),
            },
        )?;
        for file in [path, self.client_key(service)] {
            std::fs::remove_file(&file).map_err(|error| Error::File {
                path: file.clone(),
                reason: error.to_string(),
            })?;
        }
        Ok(serial.iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// The token settings `serve --dev` uses.
    pub fn token_config(&self) -> TokenConfig {
        TokenConfig {
            jwks: self.dir.join("jwks.json"),
            issuer: DEV_ISSUER.to_owned(),
            audience: DEV_AUDIENCE.to_owned(),
            leeway: std::time::Duration::from_secs(30),
            accept_unbound: false,
        }
    }

    /// The token signer, if `init` ran.
    pub fn token_signer(&self) -> Result<TokenSigner, Error> {
        let path = self.token_key();
        let pem = std::fs::read_to_string(&path).map_err(|error| Error::File {
            path: path.clone(),
            reason: format!("{error} (run `ringfence dev init` first)"),
        })?;
        TokenSigner::from_pem(&pem)
    }

    /// Creates whatever is missing: CA, server certificate, a client certificate per
    /// service, token key and JWKS. Existing files are kept. Returns what was created.
    pub fn init(&self, services: &[String]) -> Result<Vec<PathBuf>, Error> {
        let mut created = Vec::new();
        let file_error = |path: &Path, error: String| Error::File {
            path: path.to_owned(),
            reason: error,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(self.dir.join("clients"))
            .map_err(|error| file_error(&self.dir, error.to_string()))?;
        let write_public = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|error| file_error(path, error.to_string()))
        };
        let write_private = |path: &Path, text: &str| {
            crate::fsutil::write_private_file(path, text.as_bytes())
                .map_err(|error| file_error(path, error.to_string()))
        };

        let ca = if self.ca_cert().exists() {
            self.ca()?
        } else {
            let ca = Ca::generate("ringfence development CA")?;
            write_private(&self.ca_key(), &ca.key_pem)?;
            write_public(&self.ca_cert(), ca.cert_pem())?;
            created.push(self.ca_cert());
            ca
        };
        if !self.client_crl().exists() {
            write_public(&self.client_crl(), &ca.revocation_list(&[], 1)?)?;
            created.push(self.client_crl());
        }
        let tls = self.tls_files();
        if !tls.cert.exists() {
            let server = ca.server_cert(&["localhost", "127.0.0.1", "::1"])?;
            write_private(&tls.key, &server.key_pem)?;
            write_public(&tls.cert, &server.cert_pem)?;
            created.push(tls.cert);
        }
        for service in services {
            if !crate::record::is_directory_id(service) {
                // Not usable in a SPIFFE ID or a file name; such a service cannot use mTLS.
                continue;
            }
            let path = self.client_cert(service);
            if path.exists() {
                continue;
            }
            let client = ca.client_cert(&ClientCert {
                common_name: service,
                uris: &[spiffe_id(DEV_TRUST_DOMAIN, service)],
                ..ClientCert::default()
            })?;
            write_private(&self.client_key(service), &client.key_pem)?;
            write_public(&path, &client.cert_pem)?;
            created.push(path);
        }
        let signer = if self.token_key().exists() {
            self.token_signer()?
        } else {
            let signer = TokenSigner::generate()?;
            write_private(&self.token_key(), signer.key_pem())?;
            created.push(self.token_key());
            signer
        };
        let jwks = self.token_config().jwks;
        if std::fs::read_to_string(&jwks).ok() != Some(signer.jwks()) {
            write_public(&jwks, &signer.jwks())?;
            created.push(jwks);
        }
        Ok(created)
    }
}
