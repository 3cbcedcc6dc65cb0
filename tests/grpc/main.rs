//! End-to-end tests of the gRPC service: a real server on 127.0.0.1:0 and a real tonic
//! client, for every guarantee of docs/architecture.md that crosses the wire.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../common/mod.rs"]
mod common;

use common::*;
use ringfence::pb;
use ringfence::pb::field_outcome::Outcome;
use tonic::Code;

fn plaintext(outcome: &Outcome) -> &[u8] {
    match outcome {
        Outcome::Plaintext(bytes) => bytes,
        other => panic!("expected plaintext, got {other:?}"),
    }
}

fn denied(outcome: &Outcome) -> &pb::Denied {
    match outcome {
        Outcome::Denied(denied) => denied,
        other => panic!("expected denied, got {other:?}"),
    }
}

fn error_kind(outcome: &Outcome) -> pb::field_error::Kind {
    match outcome {
        Outcome::Error(error) => error.kind(),
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn status_of<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    result.expect_err("expected an error status")
}

/// A server whose decision log rotates before every commit (and every recovery), with
/// the given segments on /dev/full, where every write fails (`None` without /dev/full).
#[cfg(unix)]
async fn start_with_full_segments(segments: &[u64]) -> Option<TestServer> {
    use ringfence::audit::{DecisionLog, segment_path};
    use ringfence::keys::Keyring;
    use ringfence::policy::PolicyStore;

    if !std::path::Path::new("/dev/full").exists() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let jurisdictions = ringfence::ServeConfig::defaults().jurisdictions;
    let keyring = Keyring::create_unlogged(
        &dir.path().join("data/keyring.json"),
        &ringfence::keys::LocalMasterKey::generate().unwrap(),
        &jurisdictions,
    )
    .unwrap();
    let log_dir = dir.path().join("data/log");
    let (log, _) = DecisionLog::open_with_segment_size(&log_dir, 0).unwrap();
    for segment in segments {
        std::os::unix::fs::symlink("/dev/full", segment_path(&log_dir, *segment)).unwrap();
    }
    let policies = std::sync::Arc::new(PolicyStore::load(&shipped_policies()).unwrap());
    let subjects =
        ringfence::subjects::Subjects::open(&dir.path().join("data"), &keyring, 1024).unwrap();
    let gate = std::sync::Arc::new(ringfence::Gatekeeper::new(
        keyring,
        std::sync::Arc::new(subjects),
        policies,
        log,
        Default::default(),
    ));
    Some(start_with(gate, dir).await)
}

/// Asks whether lena (US legal) may read every US profile field for a legal request:
/// the shipped set allows the restricted fields, a set without `us-legal-reads-restricted`
/// denies them. Returns (policy set hash, restricted fields allowed).
async fn lena_reads_restricted(
    client: &mut pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
) -> (String, Vec<bool>) {
    let ask = pb::AuthorizeRequest {
        record_type: "user_profile".into(),
        record_id: String::new(),
        jurisdiction: "US".into(),
        fields: vec![
            "payment_token".into(),
            "government_id".into(),
            "tax_id".into(),
            "legal_hold_notes".into(),
        ],
        purpose: "legal-request".into(),
        ticket: "LEGAL-7".into(),
    };
    let answer = client
        .authorize(as_caller(ask, "us-support-tool", Some("lena")))
        .await
        .unwrap()
        .into_inner();
    (
        answer.policy_set,
        answer.fields.iter().map(|field| field.allowed).collect(),
    )
}

async fn status(
    client: &mut pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
) -> pb::GetStatusResponse {
    client
        .get_status(as_caller(pb::GetStatusRequest {}, "us-support-tool", None))
        .await
        .unwrap()
        .into_inner()
}

/// Polls the server's status until `done` holds (the watcher reloads after a short
/// quiet period), failing after 20 seconds.
async fn wait_for_status(
    client: &mut pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
    done: impl Fn(&pb::GetStatusResponse) -> bool,
) -> pb::GetStatusResponse {
    for _ in 0..400 {
        let now = status(client).await;
        if done(&now) {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "status never reached the expected state: {:?}",
        status(client).await
    );
}

fn without_legal_policy(text: &str) -> String {
    let start = text.find("@id(\"us-legal-reads-restricted\")").unwrap();
    let end = start + text[start..].find("};").unwrap() + 2;
    format!("{}{}", &text[..start], &text[end..])
}

mod decisions;
mod keys;
mod log;
mod metrics;
mod proofs;
mod reload;
mod requests;
mod streams;
mod subjects;
