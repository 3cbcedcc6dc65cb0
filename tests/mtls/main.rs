//! Caller identity as deployed: mutual TLS for services (certificates generated here
//! with rcgen), signed employee tokens (JWKS), and every way of getting them wrong.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use ringfence::config::Auth;
use ringfence::dev::{Ca, ClientCert, Issued, TokenClaims, TokenSigner};
use ringfence::identity::tls::TlsFiles;
use ringfence::identity::token::TokenConfig;
use ringfence::pb;
use ringfence::pb::field_outcome::Outcome;
use tonic::Code;

const TRUST_DOMAIN: &str = "example.org";
const ISSUER: &str = "https://idp.example.org";
const AUDIENCE: &str = "ringfence";

struct Fixture {
    server: TestServer,
    ca: Ca,
    signer: TokenSigner,
    jwks: PathBuf,
    /// The `--client-crl` file, when the fixture has one.
    crl: Option<PathBuf>,
}

fn service_cert(ca: &Ca, uris: &[String], dns: &[String]) -> Issued {
    ca.client_cert(&ClientCert {
        common_name: "test client",
        uris,
        dns,
        validity: None,
    })
    .unwrap()
}

fn spiffe(service: &str) -> Vec<String> {
    vec![ringfence::dev::spiffe_id(TRUST_DOMAIN, service)]
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With `--danger-accept-unbound-tokens` when `accept_unbound`.
    async fn start_with(accept_unbound: bool) -> Self {
        Self::start_full(accept_unbound, false, false).await
    }

    /// With the JWKS mounted as Kubernetes mounts a Secret when `kubernetes`:
    /// `jwks.json -> ..data/jwks.json`, `..data -> ..<version>/`; with a revocation
    /// list file (revoking nothing yet) when `crl`.
    async fn start_full(accept_unbound: bool, kubernetes: bool, crl: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let ca = Ca::generate("test CA").unwrap();
        let server_cert = ca.server_cert(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(pki.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(pki.join("server.pem"), &server_cert.cert_pem).unwrap();
        std::fs::write(pki.join("server-key.pem"), server_cert.key_pem.as_str()).unwrap();
        let crl = crl.then(|| {
            let path = pki.join("crl.pem");
            std::fs::write(&path, ca.revocation_list(&[], 1).unwrap()).unwrap();
            path
        });
        let signer = TokenSigner::generate().unwrap();
        let jwks = if kubernetes {
            let mount = dir.path().join("secret");
            std::fs::create_dir_all(mount.join("..v1")).unwrap();
            std::fs::write(mount.join("..v1/jwks.json"), signer.jwks()).unwrap();
            std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/jwks.json", mount.join("jwks.json")).unwrap();
            mount.join("jwks.json")
        } else {
            let jwks = pki.join("jwks.json");
            std::fs::write(&jwks, signer.jwks()).unwrap();
            jwks
        };
        let config = ringfence::ServeConfig {
            auth: Auth::Mtls {
                tls: TlsFiles {
                    cert: pki.join("server.pem"),
                    key: pki.join("server-key.pem"),
                    client_ca: pki.join("ca.pem"),
                    client_crl: crl.clone(),
                },
                trust_domain: TRUST_DOMAIN.to_owned(),
                tokens: Some(TokenConfig {
                    jwks: jwks.clone(),
                    issuer: ISSUER.to_owned(),
                    audience: AUDIENCE.to_owned(),
                    leeway: Duration::from_secs(30),
                    accept_unbound,
                }),
            },
            ..test_config(dir.path())
        };
        let running = ringfence::server::start(config.clone()).await.unwrap();
        Fixture {
            server: TestServer {
                running,
                dir,
                config,
            },
            ca,
            signer,
            jwks,
            crl,
        }
    }

    async fn client(
        &self,
        cert: &Issued,
    ) -> pb::ringfence_client::RingfenceClient<tonic::transport::Channel> {
        mtls_client(
            self.server.running.local_addr,
            self.ca.cert_pem(),
            Some((cert.cert_pem.as_str(), cert.key_pem.as_str())),
        )
        .await
        .unwrap()
    }

    async fn service(
        &self,
        service: &str,
    ) -> pb::ringfence_client::RingfenceClient<tonic::transport::Channel> {
        self.client(&service_cert(&self.ca, &spiffe(service), &[]))
            .await
    }

    /// As [`Fixture::service`], the connection error returned instead of a panic.
    async fn try_service(
        &self,
        service: &str,
    ) -> Result<
        pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
        tonic::transport::Error,
    > {
        let cert = service_cert(&self.ca, &spiffe(service), &[]);
        mtls_client(
            self.server.running.local_addr,
            self.ca.cert_pem(),
            Some((cert.cert_pem.as_str(), cert.key_pem.as_str())),
        )
        .await
    }

    /// Claims of a token for `subject`, bound (`azp`) to us-support-tool.
    fn claims(&self, subject: &str) -> TokenClaims {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        TokenClaims {
            sub: subject.to_owned(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + 600,
            azp: Some("us-support-tool".to_owned()),
            cnf: None,
        }
    }

    fn token(&self, subject: &str) -> String {
        self.signer.sign(&self.claims(subject)).unwrap()
    }

    /// Entries of kind `unauthenticated`, once at least `count` are there (handshake
    /// failures are logged asynchronously).
    async fn unauthenticated(&self, count: usize) -> Vec<serde_json::Value> {
        for _ in 0..100 {
            let entries: Vec<_> = self
                .server
                .log_entries()
                .into_iter()
                .filter(|entry| entry["kind"] == "unauthenticated")
                .collect();
            if entries.len() >= count {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {count} authentication failures logged");
    }
}

fn authorize() -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        record_type: "user_profile".into(),
        record_id: String::new(),
        jurisdiction: "US".into(),
        fields: vec!["email".into()],
        purpose: "support".into(),
        ticket: "INC-1".into(),
    }
}

async fn refused(
    client: &mut pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
    request: tonic::Request<pb::AuthorizeRequest>,
) -> tonic::Status {
    client
        .authorize(request)
        .await
        .expect_err("expected a refusal")
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

/// The soft limit on open files of this process.
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The RFC 8705 thumbprint of a PEM certificate.
fn thumbprint(cert_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    ringfence::identity::tls::certificate_thumbprint(der.as_ref())
}

mod certificates;
mod tokens;
