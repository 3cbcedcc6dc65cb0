//! The README's worked example: against a server started with
//! `cargo run --release -- serve --danger-trust-identity-headers`, encrypt a US user
//! profile as the US signup service, then ask for it as three different people.
//!
//!     cargo run --release --example walkthrough [-- http://127.0.0.1:50051]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use ringfence::pb;
use ringfence::pb::field_outcome::Outcome;
use ringfence::pb::ringfence_client::RingfenceClient;

fn as_caller<T>(message: T, service: &str, employee: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-ringfence-service", service.parse().unwrap());
    if let Some(employee) = employee {
        request
            .metadata_mut()
            .insert("x-ringfence-employee", employee.parse().unwrap());
    }
    request
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let mut client = RingfenceClient::connect(address).await?;

    let fields = [
        ("display_name", "Ada L."),
        ("email", "ada@example.com"),
        ("last_login_ip", "203.0.113.7"),
        ("government_id", "123-45-6789"),
    ];
    let encrypted = client
        .encrypt_record(as_caller(
            pb::EncryptRecordRequest {
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
            },
            "us-signup",
            None,
        ))
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
        let answer = client
            .decrypt_record(as_caller(
                pb::DecryptRecordRequest {
                    record: Some(record.clone()),
                    fields: Vec::new(),
                    purpose: purpose.to_owned(),
                    ticket: ticket.to_owned(),
                },
                service,
                Some(who),
            ))
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
