//! A local PKI and identity provider for development: `ringfence dev init` creates, in
//! `<data-dir>/dev-pki/`, a CA, a server certificate for localhost, one client
//! certificate per directory `Service` (SPIFFE URI SAN), and a token-signing key with
//! its JWKS; `ringfence dev token` mints an employee token. `serve --dev` uses them.
//!
//! Everything here is for development: the CA key sits next to the server's data.
//! Production deployments bring their own CA and identity provider.

mod ca;
mod token;

pub use ca::{Ca, ClientCert, Issued, certificate_serial, spiffe_id};
pub use token::{TokenClaims, TokenSigner};

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
        crate::fsutil::create_private_dir(&self.dir.join("clients"))
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
