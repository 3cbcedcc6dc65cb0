//! Shared fixtures of the integration tests: a real server on 127.0.0.1:0 and a real
//! tonic client that names its caller with the development identity headers.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod system_tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringfence::pb;
use ringfence::pb::ringfence_client::RingfenceClient;
use ringfence::server::{self, Running};
use ringfence::{ServeConfig, identity};
use tonic::transport::Channel;

pub fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

pub struct TestServer {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config: ServeConfig,
}

impl TestServer {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir().join(server::LOG_DIR)
    }

    pub async fn client(&self) -> RingfenceClient<Channel> {
        RingfenceClient::connect(format!("http://{}", self.running.local_addr))
            .await
            .unwrap()
    }

    /// The metrics endpoint's answer to `GET path`: status line and body.
    pub async fn http_get(&self, method: &str, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let address = self.running.metrics_addr.expect("metrics are served");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: ringfence\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    /// The metrics exposition (OpenMetrics text).
    pub async fn scrape(&self) -> String {
        let (head, body) = self.http_get("GET", "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.running.local_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Every decision log entry, parsed, its fields one by one (`fields`, as
    /// `audit query --expand-fields` prints them). A line the writer is still writing
    /// (no newline yet) is left for the next look.
    pub fn log_entries(&self) -> Vec<serde_json::Value> {
        let mut segments: Vec<_> = std::fs::read_dir(self.log_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
            .collect();
        segments.sort();
        segments
            .iter()
            .flat_map(|path| {
                std::fs::read_to_string(path)
                    .unwrap()
                    .split_inclusive('\n')
                    .filter(|line| line.ends_with('\n'))
                    .map(|line| {
                        let mut entry = serde_json::from_str(line.trim_end()).unwrap();
                        ringfence::audit::expand_fields(&mut entry);
                        entry
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Raw bytes of every segment.
    pub fn log_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(self.log_dir()).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    }
}

pub fn test_config(dir: &Path) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        policies: shipped_policies(),
        auth: ringfence::config::Auth::DangerTrustIdentityHeaders,
        allow_development_master_key: true,
        create_missing_keys: true,
        // Tests choose: the proof guard has tests of its own (grpc::proofs).
        proof: ringfence::policy::ProofGuard::off(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServeConfig::defaults()
    }
}

/// The value of one series of an exposition, e.g.
/// `ringfence_log_write_failures_total` or `ringfence_key_current_version{jurisdiction="US"}`
/// (labels in the order the server writes them).
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

pub async fn start() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let running = server::start(config.clone()).await.unwrap();
    TestServer {
        running,
        dir,
        config,
    }
}

pub async fn start_with(gate: Arc<ringfence::Gatekeeper>, dir: tempfile::TempDir) -> TestServer {
    let config = test_config(dir.path());
    let running = server::start_with(gate, &config).await.unwrap();
    TestServer {
        running,
        dir,
        config,
    }
}

/// Wraps a message with the development identity headers.
pub fn as_caller<T>(message: T, service: &str, employee: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(identity::SERVICE_HEADER, service.parse().unwrap());
    if let Some(employee) = employee {
        request
            .metadata_mut()
            .insert(identity::EMPLOYEE_HEADER, employee.parse().unwrap());
    }
    request
}

/// The 20 fields of the catalog's `user_profile`, with recognisable values.
pub const PROFILE_FIELDS: [&str; 20] = [
    "user_handle",
    "display_name",
    "avatar_url",
    "locale",
    "time_zone",
    "email",
    "phone",
    "date_of_birth",
    "home_address",
    "postal_code",
    "city",
    "last_login_ip",
    "device_ids",
    "precise_location",
    "contacts_hash",
    "watch_history",
    "payment_token",
    "government_id",
    "tax_id",
    "legal_hold_notes",
];

pub fn secret_value(record_id: &str, field: &str) -> Vec<u8> {
    format!("SECRET-{record_id}-{field}-value").into_bytes()
}

pub fn profile(record_id: &str, jurisdiction: &str) -> pb::EncryptRecordRequest {
    pb::EncryptRecordRequest {
        subject_id: String::new(),
        record_type: "user_profile".to_owned(),
        record_id: record_id.to_owned(),
        jurisdiction: jurisdiction.to_owned(),
        fields: PROFILE_FIELDS
            .iter()
            .map(|field| pb::PlainField {
                name: (*field).to_owned(),
                value: secret_value(record_id, field),
            })
            .collect(),
    }
}

/// Encrypts a profile as the jurisdiction's signup service.
pub async fn encrypt_profile(
    client: &mut RingfenceClient<Channel>,
    record_id: &str,
    jurisdiction: &str,
) -> pb::EncryptedRecord {
    let service = format!("{}-signup", jurisdiction.to_lowercase());
    encrypted_record(
        client,
        as_caller(profile(record_id, jurisdiction), &service, None),
    )
    .await
}

/// Sends an encrypt request (whatever authenticates it) and returns the record.
pub async fn encrypted_record(
    client: &mut RingfenceClient<Channel>,
    request: tonic::Request<pb::EncryptRecordRequest>,
) -> pb::EncryptedRecord {
    client
        .encrypt_record(request)
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap()
}

pub fn decrypt_request(
    record: pb::EncryptedRecord,
    fields: &[&str],
    purpose: &str,
    ticket: &str,
) -> pb::DecryptRecordRequest {
    pb::DecryptRecordRequest {
        record: Some(record),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        purpose: purpose.to_owned(),
        ticket: ticket.to_owned(),
    }
}

pub fn outcome<'a>(
    response: &'a pb::DecryptRecordResponse,
    field: &str,
) -> &'a pb::field_outcome::Outcome {
    response
        .fields
        .iter()
        .find(|f| f.name == field)
        .and_then(|f| f.outcome.as_ref())
        .unwrap_or_else(|| panic!("no outcome for {field}"))
}

pub fn ciphertext_mut<'a>(record: &'a mut pb::EncryptedRecord, field: &str) -> &'a mut Vec<u8> {
    &mut record
        .fields
        .iter_mut()
        .find(|f| f.name == field)
        .unwrap()
        .ciphertext
}

/// Copies the shipped policy directory, test suites included, to `to`.
pub fn copy_policies(to: &Path) {
    copy_dir(&shipped_policies(), to);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

/// Replaces a file the way editors do: write a temporary file, then rename it over.
pub fn replace_file(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp-edit");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// Starts a server on a private copy of the shipped policies (returned as the second
/// value) so a test can edit them.
pub async fn start_with_own_policies() -> (TestServer, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let config = ServeConfig {
        policies: policies.clone(),
        ..test_config(dir.path())
    };
    let running = server::start(config.clone()).await.unwrap();
    (
        TestServer {
            running,
            dir,
            config,
        },
        policies,
    )
}

/// A client that connects with mutual TLS: trusts `ca_pem` for the server (named
/// `localhost`) and presents `client` (certificate and key PEM) when given.
pub async fn mtls_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<RingfenceClient<Channel>, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RingfenceClient::new(channel))
}

/// Wraps a message with an employee token.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        identity::AUTHORIZATION_HEADER,
        format!("Bearer {token}").parse().unwrap(),
    );
    request
}

/// Asserts that `status` has `code` and a message naming `needle`.
#[track_caller]
pub fn assert_status(status: &tonic::Status, code: tonic::Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "the message does not name `{needle}`: {status:?}"
    );
}

/// A server in the development identity mode (`serve --dev`): mutual TLS with the
/// development PKI it creates in its data directory, and employee tokens.
pub async fn start_dev() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        auth: ringfence::config::Auth::Dev,
        ..test_config(dir.path())
    };
    let running = server::start(config.clone()).await.unwrap();
    TestServer {
        running,
        dir,
        config,
    }
}

impl TestServer {
    /// A channel authenticated as `service` with its development client certificate.
    pub async fn dev_channel(&self, service: &str) -> Channel {
        let pki = ringfence::dev::DevPki::of(&self.data_dir());
        let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(pki.ca_cert())))
            .identity(tonic::transport::Identity::from_pem(
                read(pki.client_cert(service)),
                read(pki.client_key(service)),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.running.local_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A development token of `employee`, bound to `service`.
    pub fn dev_token(&self, employee: &str, service: &str) -> String {
        ringfence::dev::DevPki::of(&self.data_dir())
            .token_signer()
            .unwrap()
            .mint(employee, service, time::Duration::minutes(5))
            .unwrap()
    }
}
