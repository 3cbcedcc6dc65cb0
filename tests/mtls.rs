//! Caller identity as deployed: mutual TLS for services (certificates generated here
//! with rcgen), signed employee tokens (JWKS), and every way of getting them wrong.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_certificate_and_an_employee_token_decrypt() {
    let fx = Fixture::start().await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let mut support = fx.service("us-support-tool").await;
    let response = support
        .decrypt_record(with_token(
            decrypt_request(record.clone(), &["email", "tax_id"], "support", "INC-1"),
            &fx.token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        outcome(&response, "email"),
        Outcome::Plaintext(p) if p == &secret_value("u-1", "email")
    ));
    assert!(matches!(outcome(&response, "tax_id"), Outcome::Denied(_)));

    // The parent company's employee, through the same service: denied by policy.
    let bob = support
        .decrypt_record(with_token(
            decrypt_request(record, &["email"], "support", "INC-1"),
            &fx.token("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(&bob, "email"), Outcome::Denied(_)));

    let entries = fx.server.log_entries();
    let requests: Vec<_> = entries
        .iter()
        .filter(|entry| entry["kind"] != "checkpoint" && entry["kind"] != "key_event")
        .collect();
    assert_eq!(requests[0]["principal"], "Service::\"us-signup\"");
    assert_eq!(requests[0]["authentication"], "mtls");
    assert_eq!(requests[1]["principal"], "Employee::\"alice\"");
    assert_eq!(requests[1]["service"], "us-support-tool");
    assert_eq!(requests[1]["authentication"], "mtls+token");
    assert_eq!(requests[2]["principal"], "Employee::\"bob\"");
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_fail_the_handshake_and_are_logged() {
    let fx = Fixture::start().await;
    let addr = fx.server.running.local_addr;
    let other_ca = Ca::generate("another CA").unwrap();
    let foreign = service_cert(&other_ca, &spiffe("us-support-tool"), &[]);
    let now = time::OffsetDateTime::now_utc();
    let expired = fx
        .ca
        .client_cert(&ClientCert {
            common_name: "expired",
            uris: &spiffe("us-support-tool"),
            dns: &[],
            validity: Some((
                now - time::Duration::days(30),
                now - time::Duration::days(1),
            )),
        })
        .unwrap();
    let attempts: [(&str, Option<&Issued>, &str); 3] = [
        ("no client certificate", None, "peer sent no certificates"),
        (
            "certificate from another CA",
            Some(&foreign),
            "UnknownIssuer",
        ),
        ("expired certificate", Some(&expired), "certificate expired"),
    ];
    for (what, cert, reason) in attempts {
        let client = mtls_client(
            addr,
            fx.ca.cert_pem(),
            cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
        )
        .await;
        // TLS 1.3 reports a refused client certificate after the handshake, on first use.
        if let Ok(mut client) = client {
            let status = client
                .authorize(tonic::Request::new(authorize()))
                .await
                .expect_err(what);
            assert_ne!(status.code(), Code::Ok, "{what}");
        }
        // Logged (once per attempt; the client may try more than once).
        let mut logged = false;
        for _ in 0..100 {
            if fx.server.log_entries().iter().any(|entry| {
                entry["kind"] == "unauthenticated"
                    && entry["outcome"].as_str().unwrap().contains(reason)
            }) {
                logged = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(logged, "{what}: not logged");
    }
    let outcomes: Vec<String> = fx
        .unauthenticated(3)
        .await
        .iter()
        .map(|entry| entry["outcome"].as_str().unwrap().to_owned())
        .collect();
    for outcome in &outcomes {
        assert!(outcome.starts_with("TLS handshake failed"), "{outcome}");
        assert!(outcome.contains("(from 127.0.0.1:"), "{outcome}");
    }
    // Nothing was decided for anyone.
    assert!(fx.server.log_entries().iter().all(|entry| {
        ["unauthenticated", "checkpoint", "key_event"].contains(&entry["kind"].as_str().unwrap())
    }));
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_comes_from_the_certificate_san() {
    let fx = Fixture::start().await;
    // DNS SAN fallback.
    let mut by_dns = fx
        .client(&service_cert(
            &fx.ca,
            &[],
            &["us-support-tool.svc.example.org".to_owned()],
        ))
        .await;
    let answer = by_dns
        .authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.fields[0].allowed);

    let cases: Vec<(Vec<String>, Vec<String>, &str)> = vec![
        (
            vec!["spiffe://other.org/svc/us-support-tool".to_owned()],
            vec![],
            "is not of the form `spiffe://example.org/svc/<service>`",
        ),
        (
            vec![],
            vec!["us-support-tool.example.org".to_owned()],
            "names no service",
        ),
        (vec![], vec![], "names no service"),
        (
            [spiffe("us-support-tool"), spiffe("us-signup")].concat(),
            vec![],
            "more than one URI SAN",
        ),
        (spiffe("nobody"), vec![], "unknown service `nobody`"),
    ];
    for (uris, dns, expected) in cases {
        let mut client = fx.client(&service_cert(&fx.ca, &uris, &dns)).await;
        // A token bound to the service the certificate claims, where it names one.
        let mut claims = fx.claims("alice");
        if expected.contains("nobody") {
            claims.azp = Some("nobody".to_owned());
        }
        let token = fx.signer.sign(&claims).unwrap();
        let status = refused(&mut client, with_token(authorize(), &token)).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{uris:?} {dns:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    let logged = fx.unauthenticated(5).await;
    assert!(
        logged[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("client certificate refused")
    );
    // Every refusal carries the client address, the unknown service's too.
    for entry in &logged {
        let outcome = entry["outcome"].as_str().unwrap();
        assert!(outcome.contains("(from 127.0.0.1:"), "{outcome}");
    }
    assert!(
        logged.iter().any(|entry| entry["outcome"]
            .as_str()
            .unwrap()
            .contains("unknown service `nobody`")),
        "{logged:?}"
    );
    fx.server.running.stop().await.unwrap();
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employee_tokens_are_verified_and_every_failure_is_logged() {
    let fx = Fixture::start().await;
    let mut support = fx.service("us-support-tool").await;
    let good = fx.token("alice");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[1] =
        b64(&serde_json::json!({"sub": "lena", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}));
    let payload_swapped = parts.join(".");
    let other_signer = TokenSigner::generate().unwrap();
    let header = |alg: &str| b64(&serde_json::json!({"alg": alg, "typ": "JWT"}));
    let claims =
        b64(&serde_json::json!({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}));
    let with = |change: &dyn Fn(&mut TokenClaims)| {
        let mut claims = fx.claims("alice");
        change(&mut claims);
        fx.signer.sign(&claims).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad signature", payload_swapped, "signature is invalid"),
        (
            "unknown key",
            other_signer.sign(&fx.claims("alice")).unwrap(),
            "unknown key",
        ),
        (
            "wrong issuer",
            with(&|c| c.iss = "https://evil.example".into()),
            "issuer",
        ),
        (
            "wrong audience",
            with(&|c| c.aud = "someone-else".into()),
            "audience",
        ),
        ("expired", with(&|c| c.exp = now - 3600), "expired"),
        (
            "not yet valid",
            with(&|c| c.nbf = now + 3600),
            "not valid yet",
        ),
        (
            "alg none",
            format!("{}.{claims}.", header("none")),
            "malformed",
        ),
        (
            "HS256 with the public key",
            format!("{}.{claims}.c2ln", header("HS256")),
            "not allowed",
        ),
        ("not a JWT", "garbage".to_owned(), "malformed"),
    ];
    for (what, token, expected) in &cases {
        let status = refused(&mut support, with_token(authorize(), token)).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(
            status.message().contains(expected),
            "{what}: {}",
            status.message()
        );
        // Key material never appears in the message.
        assert!(
            !status.message().contains(&fx.signer.jwks()[20..40]),
            "{what}"
        );
    }
    // A subject that is not in the directory.
    let status = refused(&mut support, with_token(authorize(), &fx.token("mallory"))).await;
    assert_status(&status, Code::Unauthenticated, "unknown principal");

    // Naming someone else in headers while authenticated is refused, not obeyed.
    let mut spoof = with_token(authorize(), &good);
    spoof.metadata_mut().insert(
        ringfence::identity::EMPLOYEE_HEADER,
        "lena".parse().unwrap(),
    );
    let status = refused(&mut support, spoof).await;
    assert!(
        status.message().contains("identity headers"),
        "{}",
        status.message()
    );
    let status = refused(
        &mut support,
        as_caller(authorize(), "us-support-tool", Some("lena")),
    )
    .await;
    assert!(
        status.message().contains("identity headers"),
        "{}",
        status.message()
    );
    let mut basic = tonic::Request::new(authorize());
    basic
        .metadata_mut()
        .insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    let status = refused(&mut support, basic).await;
    assert!(status.message().contains("Bearer"), "{}", status.message());

    let logged = fx.unauthenticated(cases.len() + 4).await;
    assert_eq!(logged.len(), cases.len() + 4);
    for (entry, (what, _, expected)) in logged.iter().zip(&cases) {
        let outcome = entry["outcome"].as_str().unwrap();
        assert!(outcome.contains(expected), "{what}: {outcome}");
    }
    // The unknown employee's entry names the service and carries the client address.
    let unknown = logged
        .iter()
        .find(|entry| {
            entry["outcome"]
                .as_str()
                .unwrap()
                .contains("unknown principal")
        })
        .expect("the unknown principal was not logged");
    assert!(
        unknown["outcome"]
            .as_str()
            .unwrap()
            .contains("(from 127.0.0.1:"),
        "{unknown}"
    );
    assert_eq!(unknown["service"], "us-support-tool", "{unknown}");
    // The good token still works.
    let answer = support
        .authorize(with_token(authorize(), &good))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.fields[0].allowed);
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_is_picked_up_without_restart() {
    let fx = Fixture::start().await;
    let mut support = fx.service("us-support-tool").await;
    let next = TokenSigner::generate().unwrap();
    let new_token = next.sign(&fx.claims("alice")).unwrap();
    let status = refused(&mut support, with_token(authorize(), &new_token)).await;
    assert!(
        status.message().contains("unknown key"),
        "{}",
        status.message()
    );
    replace_file(&fx.jwks, &next.jwks());
    let mut accepted = false;
    for _ in 0..100 {
        if support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the new key was never loaded");
    // The old key is gone with the old JWKS.
    let status = refused(&mut support, with_token(authorize(), &fx.token("alice"))).await;
    assert!(
        status.message().contains("unknown key"),
        "{}",
        status.message()
    );
    // A file that does not parse (caught mid-write) is refused; the keys in use stay.
    replace_file(&fx.jwks, "{\"keys\": [");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
    );
    // A set that parses but holds no usable key revokes every token, cached ones
    // included (as an empty set does).
    replace_file(
        &fx.jwks,
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    );
    let mut revoked = false;
    for _ in 0..100 {
        if let Err(status) = support.authorize(with_token(authorize(), &new_token)).await {
            assert!(
                status.message().contains("unknown key"),
                "{}",
                status.message()
            );
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revoked, "the emptied JWKS was never loaded");
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires_or_the_keys_are_reloaded() {
    use tokio_stream::wrappers::ReceiverStream;
    let fx = Fixture::start().await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let mut support = fx.service("us-support-tool").await;
    let ask = || decrypt_request(record.clone(), &["email"], "support", "INC-1");

    // A token that expires, leeway included, two seconds from now.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = fx.claims("alice");
    claims.exp = now - 28;
    let short = fx.signer.sign(&claims).unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut answers = support
        .decrypt_records(with_token(ReceiverStream::new(receiver), &short))
        .await
        .unwrap()
        .into_inner();
    sender.send(ask()).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(first.status.is_none(), "{first:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    sender.send(ask()).await.unwrap();
    let status = answers.message().await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "expired");

    // The identity provider's keys are reloaded (here: the same keys, written again).
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut answers = support
        .decrypt_records(with_token(
            ReceiverStream::new(receiver),
            &fx.token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    sender.send(ask()).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(first.status.is_none(), "{first:?}");
    replace_file(&fx.jwks, &fx.signer.jwks());
    let mut ended = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sender.send(ask()).await.is_err() {
            break;
        }
        match answers.message().await {
            Ok(Some(answer)) => assert!(answer.status.is_none(), "{answer:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let status = ended.expect("the stream outlived a reload of the keys");
    assert_status(&status, Code::Unauthenticated, "reloaded");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_floods_do_not_lock_out_real_clients() {
    use std::net::{IpAddr, SocketAddr};
    use tokio::io::AsyncReadExt as _;
    use tokio::time::Instant;
    // 1,600 flood sockets, their server ends and the lobby's duplicates.
    let limit = open_files_limit();
    if limit < 8192 {
        assert!(
            std::env::var_os("RINGFENCE_REQUIRE_SYSTEM_TOOLS").is_none(),
            "open files limit {limit} is below 8192: raise it (`ulimit -n 8192`; scripts/test does)"
        );
        eprintln!("SKIPPED: open files limit {limit} is below 8192 (scripts/test raises it)");
        return;
    }
    let fx = Fixture::start().await;
    let addr = fx.server.running.local_addr;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Connections that never send a byte; each one closed is reopened at once.
    let mut flood = Vec::new();
    for (source, count) in [("127.0.0.2", 1000), ("127.0.0.1", 600)] {
        let source: IpAddr = source.parse().unwrap();
        for _ in 0..count {
            flood.push(tokio::spawn(async move {
                let mut opened = 0u64;
                while Instant::now() < deadline {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    let connected = match socket.bind(SocketAddr::new(source, 0)) {
                        Ok(()) => socket.connect(addr).await.ok(),
                        Err(_) => None,
                    };
                    let Some(mut stream) = connected else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    opened += 1;
                    let mut byte = [0u8; 1];
                    let _ = tokio::time::timeout_at(deadline, stream.read(&mut byte)).await;
                }
                opened
            }));
        }
    }
    // A real client from 127.0.0.1 connects anew and calls every second.
    let mut calls = 0;
    while Instant::now() + Duration::from_secs(1) < deadline {
        let call = async {
            let mut client = fx.service("us-support-tool").await;
            client
                .get_status(tonic::Request::new(pb::GetStatusRequest {}))
                .await
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("call {calls} hung during the flood"))
            .unwrap_or_else(|status| panic!("call {calls} failed during the flood: {status:?}"));
        calls += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut opened = 0;
    for task in flood {
        opened += task.await.unwrap();
    }
    assert!(calls >= 15, "{calls} calls");
    assert!(
        opened > 1600,
        "the flood never had a socket closed and reopened: {opened}"
    );
}

/// The RFC 8705 thumbprint of a PEM certificate.
fn thumbprint(cert_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    ringfence::identity::tls::certificate_thumbprint(der.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employee_tokens_are_bound_to_the_service_that_presents_them() {
    let fx = Fixture::start().await;
    let support_cert = service_cert(&fx.ca, &spiffe("us-support-tool"), &[]);
    let mut support = fx.client(&support_cert).await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let ask = || decrypt_request(record.clone(), &["email"], "support", "INC-1");
    let sign = |change: &dyn Fn(&mut TokenClaims)| {
        let mut claims = fx.claims("alice");
        change(&mut claims);
        fx.signer.sign(&claims).unwrap()
    };

    // alice's token for us-support-tool, presented by us-signup: refused.
    let status = signup
        .decrypt_record(with_token(ask(), &fx.token("alice")))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::Unauthenticated,
        "bound to service `us-support-tool` (azp)",
    );
    // A token bound to nothing: refused by default.
    let unbound = sign(&|claims| claims.azp = None);
    let status = support
        .decrypt_record(with_token(ask(), &unbound))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unauthenticated, "not bound to a service");
    // Bound to the presenting certificate: accepted, and `cnf` wins over an `azp`
    // naming another service.
    let to_certificate = sign(&|claims| {
        claims.azp = Some("us-signup".to_owned());
        claims.cnf = Some(serde_json::json!({"x5t#S256": thumbprint(&support_cert.cert_pem)}));
    });
    let answer = support
        .decrypt_record(with_token(ask(), &to_certificate))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        outcome(&answer, "email"),
        Outcome::Plaintext(p) if p == &secret_value("u-1", "email")
    ));
    // The same service with another certificate cannot use it.
    let mut other_support = fx.service("us-support-tool").await;
    let status = other_support
        .decrypt_record(with_token(ask(), &to_certificate))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("another client certificate"),
        "{status:?}"
    );
    let entries: Vec<_> = fx
        .server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "decrypt")
        .collect();
    assert_eq!(entries.len(), 1, "only the bound token read: {entries:#?}");
    assert_eq!(entries[0]["authentication"], "mtls+token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_tokens_are_accepted_only_when_allowed_and_each_use_is_logged() {
    let fx = Fixture::start_with(true).await;
    let mut support = fx.service("us-support-tool").await;
    let mut claims = fx.claims("alice");
    claims.azp = None;
    let unbound = fx.signer.sign(&claims).unwrap();
    support
        .authorize(with_token(authorize(), &unbound))
        .await
        .unwrap();
    // Bound tokens keep their binding.
    let mut signup = fx.service("us-signup").await;
    let status = signup
        .authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap_err();
    assert!(status.message().contains("bound to service"), "{status:?}");
    let entries = fx.server.log_entries();
    let authorized: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "authorize")
        .collect();
    assert_eq!(authorized.len(), 1);
    assert_eq!(authorized[0]["authentication"], "mtls+unbound-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_makes_a_full_handshake() {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt as _;
    let fx = Fixture::start().await;
    let cert = service_cert(&fx.ca, &spiffe("us-support-tool"), &[]);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(fx.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    // A client that keeps sessions to resume them (rustls' default).
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    for attempt in 0..3 {
        let tcp = tokio::net::TcpStream::connect(fx.server.running.local_addr)
            .await
            .unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // Take what the server sends after the handshake (session tickets, if any).
        let mut buffer = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buffer)).await;
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "connection {attempt} resumed a session: its certificate was not verified again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_during_a_connection_is_refused_from_then_on() {
    let fx = Fixture::start().await;
    let now = time::OffsetDateTime::now_utc();
    let uris = spiffe("us-support-tool");
    let short = fx
        .ca
        .client_cert(&ClientCert {
            common_name: "short-lived",
            uris: &uris,
            dns: &[],
            validity: Some((
                now - time::Duration::minutes(5),
                now + time::Duration::seconds(3),
            )),
        })
        .unwrap();
    let mut client = fx.client(&short).await;
    client
        .authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = refused(&mut client, with_token(authorize(), &fx.token("alice"))).await;
    assert_status(
        &status,
        Code::Unauthenticated,
        "expired since this connection was made",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_swap_of_the_jwks_is_picked_up() {
    let fx = Fixture::start_full(false, true, false).await;
    let mut support = fx.service("us-support-tool").await;
    let next = TokenSigner::generate().unwrap();
    let new_token = next.sign(&fx.claims("alice")).unwrap();
    let status = refused(&mut support, with_token(authorize(), &new_token)).await;
    assert!(status.message().contains("unknown key"), "{status:?}");
    // What the kubelet does: write a new version directory, point a new link at it,
    // rename the link over `..data`. `jwks.json` itself never changes.
    let mount = fx.jwks.parent().unwrap();
    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    std::fs::write(mount.join("..v2/jwks.json"), next.jwks()).unwrap();
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        if support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the swapped JWKS was never loaded");
    let status = refused(&mut support, with_token(authorize(), &fx.token("alice"))).await;
    assert!(status.message().contains("unknown key"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_on_new_and_open_connections() {
    let fx = Fixture::start_full(false, false, true).await;
    let crl = fx.crl.clone().unwrap();
    let uris = spiffe("us-support-tool");
    let revoked = service_cert(&fx.ca, &uris, &[]);
    let kept = service_cert(&fx.ca, &uris, &[]);
    let mut open = fx.client(&revoked).await;
    open.authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap();
    // A stream opened before the revocation, by the service on its own (no token
    // that could end it instead).
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let revoked_signup = service_cert(&fx.ca, &spiffe("us-signup"), &[]);
    let mut streaming = fx.client(&revoked_signup).await;
    let ask = || decrypt_request(record.clone(), &["display_name"], "", "");
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut answers = streaming
        .decrypt_records(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    sender.send(ask()).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(first.status.is_none(), "{first:?}");

    // Published as an issuer does: a new file renamed over the old one.
    let serial = ringfence::dev::certificate_serial(revoked.cert_pem.as_bytes()).unwrap();
    let stream_serial =
        ringfence::dev::certificate_serial(revoked_signup.cert_pem.as_bytes()).unwrap();
    let next = crl.with_extension("new");
    std::fs::write(
        &next,
        fx.ca.revocation_list(&[serial, stream_serial], 2).unwrap(),
    )
    .unwrap();
    std::fs::rename(&next, &crl).unwrap();
    let mut status = None;
    for _ in 0..100 {
        match open
            .authorize(with_token(authorize(), &fx.token("alice")))
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(refusal) => {
                status = Some(refusal);
                break;
            }
        }
    }
    let status = status.expect("the open connection was never checked against the new list");
    assert_status(&status, Code::Unauthenticated, "Revoked");
    assert!(
        status.message().contains("since this connection was made"),
        "{status:?}"
    );
    // The open stream decrypts no further record.
    sender.send(ask()).await.unwrap();
    let status = answers.message().await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "Revoked");

    // A new connection with it fails its handshake, which is logged.
    if let Ok(mut client) = mtls_client(
        fx.server.running.local_addr,
        fx.ca.cert_pem(),
        Some((revoked.cert_pem.as_str(), revoked.key_pem.as_str())),
    )
    .await
    {
        client
            .authorize(with_token(authorize(), &fx.token("alice")))
            .await
            .expect_err("a revoked certificate made a new connection");
    }
    let mut logged = false;
    for _ in 0..100 {
        logged = fx.server.log_entries().iter().any(|entry| {
            entry["kind"] == "unauthenticated"
                && entry["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("TLS handshake failed: invalid peer certificate: Revoked")
        });
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged, "the refused handshake was not logged");
    // Other certificates of the same CA still work.
    fx.client(&kept)
        .await
        .authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap();
    fx.server.running.stop().await.unwrap();
}
