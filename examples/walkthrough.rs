//! The README's worked example: against a server started with
//! `cargo run --release -- serve --dev`, encrypt a US user profile as the US signup
//! service, then ask for it as three different people. Each service connects with its
//! own client certificate from the development PKI (mutual TLS); each person is named
//! by a signed employee token minted by the development identity provider.
//!
//!     cargo run --release --example walkthrough [-- 127.0.0.1:50051 ringfence-data]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use ringfence::dev::DevPki;
use ringfence::pb;
use ringfence::pb::field_outcome::Outcome;
use ringfence::pb::ringfence_client::RingfenceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A client that authenticates as `service` with its development certificate.
async fn connect_as(
    address: &str,
    pki: &DevPki,
    service: &str,
) -> Result<RingfenceClient<Channel>, Box<dyn std::error::Error>> {
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).map_err(|error| {
            format!(
                "{}: {error} (`cargo run --release -- dev init` creates what is missing)",
                path.display()
            )
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(pki.ca_cert())?))
        .identity(Identity::from_pem(
            read(pki.client_cert(service))?,
            read(pki.client_key(service))?,
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RingfenceClient::new(channel))
}

/// A request carrying `employee`'s token (`authorization: Bearer ...`).
fn for_employee<T>(
    message: T,
    pki: &DevPki,
    employee: &str,
    service: &str,
) -> Result<tonic::Request<T>, Box<dyn std::error::Error>> {
    let token = pki
        .token_signer()?
        .mint(employee, service, time::Duration::minutes(5))?;
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:50051".to_owned());
    let data_dir = args.next().unwrap_or_else(|| "ringfence-data".to_owned());
    let pki = DevPki::of(Path::new(&data_dir));
    let mut client = connect_as(&address, &pki, "us-signup").await?;

    let fields = [
        ("display_name", "Ada L."),
        ("email", "ada@example.com"),
        ("last_login_ip", "203.0.113.7"),
        ("government_id", "123-45-6789"),
    ];
    let encrypted = client
        .encrypt_record(tonic::Request::new(pb::EncryptRecordRequest {
            subject_id: String::new(),
            record_type: "user_profile".to_owned(),
            record_id: "user-1001".to_owned(),
            jurisdiction: "US".to_owned(),
            fields: fields
                .iter()
                .map(|(name, value)| pb::PlainField {
                    name: (*name).to_owned(),
                    value: value.as_bytes().to_vec(),
                })
                .collect(),
        }))
        .await?
        .into_inner();
    let record = encrypted.record.expect("a record");
    println!("encrypted user-1001 (request {}):", encrypted.request_id);
    for field in &record.fields {
        println!(
            "  {:<14} {} bytes, starts {}",
            field.name,
            field.ciphertext.len(),
            hex_prefix(&field.ciphertext)
        );
    }

    for (who, service, purpose, ticket) in [
        ("alice", "us-support-tool", "support", "INC-1234"),
        ("alice", "us-support-tool", "", ""),
        ("bob", "us-support-tool", "support", "INC-1234"),
    ] {
        let mut client = connect_as(&address, &pki, service).await?;
        let answer = client
            .decrypt_record(for_employee(
                pb::DecryptRecordRequest {
                    record: Some(record.clone()),
                    fields: Vec::new(),
                    purpose: purpose.to_owned(),
                    ticket: ticket.to_owned(),
                },
                &pki,
                who,
                service,
            )?)
            .await?
            .into_inner();
        println!(
            "\n{who} via {service}, purpose {purpose:?}, ticket {ticket:?} (request {}):",
            answer.request_id
        );
        for field in answer.fields {
            let shown = match field.outcome {
                Some(Outcome::Plaintext(bytes)) => {
                    format!("plaintext {:?}", String::from_utf8_lossy(&bytes))
                }
                Some(Outcome::Denied(denied)) if denied.policy_ids.is_empty() => {
                    format!("denied: {}", denied.reason)
                }
                Some(Outcome::Denied(denied)) => format!(
                    "denied: {} ({})",
                    denied.reason,
                    denied.policy_ids.join(", ")
                ),
                Some(Outcome::Error(error)) => format!("error: {}", error.message),
                None => "no outcome".to_owned(),
            };
            println!("  {:<14} {shown}", field.name);
        }
    }
    println!(
        "\nEvery request above is in ringfence-data/log/; check it with `cargo run --release -- audit verify`."
    );
    Ok(())
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(12).map(|b| format!("{b:02x}")).collect()
}
