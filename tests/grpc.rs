//! End-to-end tests of the gRPC service: a real server on 127.0.0.1:0 and a real tonic
//! client, for every guarantee of docs/architecture.md that crosses the wire.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatekeeper_engineer_reads_us_fields_for_a_stated_purpose() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-1", "US").await;
    assert_eq!(record.fields.len(), 20);
    for field in &record.fields {
        let value = secret_value("u-1", &field.name);
        assert!(
            !field
                .ciphertext
                .windows(value.len())
                .any(|w| w == value.as_slice()),
            "plaintext visible in ciphertext of {}",
            field.name
        );
    }

    let response = client
        .decrypt_record(as_caller(
            decrypt_request(record.clone(), &[], "support", "INC-42"),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.record_id, "u-1");
    assert_eq!(response.fields.len(), 20);
    assert_eq!(
        plaintext(outcome(&response, "email")),
        secret_value("u-1", "email")
    );
    assert_eq!(
        plaintext(outcome(&response, "display_name")),
        secret_value("u-1", "display_name")
    );
    assert_eq!(
        plaintext(outcome(&response, "device_ids")),
        secret_value("u-1", "device_ids")
    );
    let restricted = denied(outcome(&response, "government_id"));
    assert!(restricted.policy_ids.is_empty());
    assert_eq!(restricted.reason, "no policy permits this access");

    // Without a stated purpose the same engineer reads public fields only.
    let response = client
        .decrypt_record(as_caller(
            decrypt_request(record, &["email", "display_name"], "", ""),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.fields.len(), 2);
    denied(outcome(&response, "email"));
    plaintext(outcome(&response, "display_name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_company_staff_get_every_us_field_denied() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-2", "US").await;
    for employee in ["bob", "carol"] {
        let response = client
            .decrypt_record(as_caller(
                decrypt_request(record.clone(), &[], "legal-request", "L-1"),
                "us-support-tool",
                Some(employee),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.fields.len(), 20);
        for field in &response.fields {
            let denial = denied(field.outcome.as_ref().unwrap());
            assert_eq!(
                denial.policy_ids,
                ["parent-company-never-reads-us"],
                "{employee} {}",
                field.name
            );
            assert_eq!(denial.reason, "denied by policy");
        }
    }
    // A parent-company service cannot read US data either, even with a US engineer behind it.
    let response = client
        .decrypt_record(as_caller(
            decrypt_request(record, &["email"], "support", "INC-1"),
            "parentco-analytics",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        denied(outcome(&response, "email")).policy_ids,
        ["parent-company-services-never-read-us"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_fields_and_other_jurisdictions() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "s-1", "SG").await;
    let response = client
        .decrypt_record(as_caller(
            decrypt_request(
                record.clone(),
                &["display_name", "email", "last_login_ip"],
                "support",
                "",
            ),
            "sg-signup",
            Some("mei"),
        ))
        .await
        .unwrap()
        .into_inner();
    plaintext(outcome(&response, "display_name"));
    plaintext(outcome(&response, "email"));
    denied(outcome(&response, "last_login_ip"));
    // The US gatekeeper engineer has no business with SG pii.
    let response = client
        .decrypt_record(as_caller(
            decrypt_request(record, &["display_name", "email"], "support", "INC-1"),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    plaintext(outcome(&response, "display_name"));
    denied(outcome(&response, "email"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_moved_ciphertexts_fail_integrity_and_are_logged() {
    let server = start().await;
    let mut client = server.client().await;
    let original = encrypt_profile(&mut client, "u-3", "US").await;
    let ask = |record: pb::EncryptedRecord, fields: &[&str]| {
        as_caller(
            decrypt_request(record, fields, "support", "INC-7"),
            "us-support-tool",
            Some("alice"),
        )
    };

    // One flipped bit in the body of one field; the other field is unaffected.
    let mut flipped = original.clone();
    let body = ciphertext_mut(&mut flipped, "email");
    let last = body.len() - 1;
    body[last] ^= 0x01;
    let response = client
        .decrypt_record(ask(flipped, &["email", "phone"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_kind(outcome(&response, "email")),
        pb::field_error::Kind::Integrity
    );
    assert_eq!(
        plaintext(outcome(&response, "phone")),
        secret_value("u-3", "phone")
    );

    // Two fields' ciphertexts swapped.
    let mut swapped = original.clone();
    let email = ciphertext_mut(&mut swapped, "email").clone();
    let phone = std::mem::replace(ciphertext_mut(&mut swapped, "phone"), email);
    *ciphertext_mut(&mut swapped, "email") = phone;
    let response = client
        .decrypt_record(ask(swapped, &["email", "phone"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_kind(outcome(&response, "email")),
        pb::field_error::Kind::Integrity
    );
    assert_eq!(
        error_kind(outcome(&response, "phone")),
        pb::field_error::Kind::Integrity
    );

    // Moved to another record.
    let mut moved = original.clone();
    moved.record_id = "u-4".to_owned();
    let response = client
        .decrypt_record(ask(moved, &["email"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_kind(outcome(&response, "email")),
        pb::field_error::Kind::Integrity
    );

    // Presented as an SG record to someone SG policy lets read pii.
    let mut rehomed = original.clone();
    rehomed.jurisdiction = "SG".to_owned();
    let response = client
        .decrypt_record(as_caller(
            decrypt_request(rehomed, &["email"], "support", ""),
            "sg-signup",
            Some("mei"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_kind(outcome(&response, "email")),
        pb::field_error::Kind::Integrity
    );

    // A key version the server does not hold (header bytes 4+len("US")..+4).
    let mut future_version = original.clone();
    ciphertext_mut(&mut future_version, "email")[6..10].copy_from_slice(&99u32.to_be_bytes());
    let response = client
        .decrypt_record(ask(future_version, &["email"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        error_kind(outcome(&response, "email")),
        pb::field_error::Kind::UnknownKeyVersion
    );

    // A denied field is never decrypted: tampering it changes nothing about the answer.
    let mut tampered_denied = original.clone();
    let body = ciphertext_mut(&mut tampered_denied, "government_id");
    let last = body.len() - 1;
    body[last] ^= 0x01;
    let response = client
        .decrypt_record(ask(tampered_denied, &["government_id"]))
        .await
        .unwrap()
        .into_inner();
    denied(outcome(&response, "government_id"));

    // Each failed attempt is in the log: AEAD failures found while decrypting get a
    // follow-up `integrity_failure` entry; a jurisdiction mismatch is caught before.
    let entries = server.log_entries();
    let follow_ups: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "integrity_failure")
        .collect();
    assert_eq!(follow_ups.len(), 3, "flip, swap, move");
    assert_eq!(follow_ups[1]["fields"].as_array().unwrap().len(), 2);
    let mut failed_requests: Vec<&str> = entries
        .iter()
        .filter(|e| {
            e["fields"]
                .as_array()
                .is_some_and(|fields| fields.iter().any(|f| f["outcome"] == "integrity_failure"))
        })
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    failed_requests.dedup();
    assert_eq!(failed_requests.len(), 4, "flip, swap, move, rehome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_chained_entry_and_no_plaintext() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-5", "US").await;
    for employee in ["alice", "bob", "lena"] {
        client
            .decrypt_record(as_caller(
                decrypt_request(record.clone(), &[], "support", "INC-9"),
                "us-support-tool",
                Some(employee),
            ))
            .await
            .unwrap();
    }
    let authorize = pb::AuthorizeRequest {
        record_type: "user_profile".to_owned(),
        record_id: "u-5".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![],
        purpose: "support".to_owned(),
        ticket: "INC-9".to_owned(),
    };
    let answer = client
        .authorize(as_caller(authorize, "us-support-tool", Some("alice")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.fields.len(), 20);
    let email = answer.fields.iter().find(|f| f.name == "email").unwrap();
    assert!(email.allowed && email.denied.is_none());
    let tax = answer.fields.iter().find(|f| f.name == "tax_id").unwrap();
    assert!(!tax.allowed);
    assert_eq!(
        tax.denied.as_ref().unwrap().reason,
        "no policy permits this access"
    );

    let all = server.log_entries();
    for (index, entry) in all.iter().enumerate() {
        assert_eq!(entry["seq"], index as u64 + 1);
    }
    // The keys this server created first (one `key_event` each, never key bytes), then
    // a checkpoint vouching for their generations; signed checkpoints are interleaved
    // by time; the rest is one entry per request.
    let first_request = all.iter().position(|e| e["kind"] == "encrypt").unwrap();
    let before: Vec<&serde_json::Value> = all[..first_request]
        .iter()
        .filter(|e| e["kind"] != "checkpoint")
        .collect();
    assert_eq!(before.len(), 3, "{before:?}");
    for (entry, jurisdiction) in before.into_iter().zip(["US", "SG", "EU"]) {
        assert_eq!(entry["kind"], "key_event", "{entry}");
        assert_eq!(entry["key_event"]["operation"], "init");
        assert_eq!(entry["key_event"]["jurisdiction"], jurisdiction);
        assert_eq!(entry["key_event"]["generation"], 1);
        assert_eq!(entry["key_event"]["key_id"].as_str().unwrap().len(), 32);
    }
    let last = &all[first_request - 1];
    assert_eq!(
        last["kind"], "checkpoint",
        "a checkpoint follows the key events"
    );
    assert_eq!(
        last["checkpoint"]["key_generations"],
        serde_json::json!({"EU": 1, "SG": 1, "US": 1})
    );
    let entries: Vec<serde_json::Value> = all
        .iter()
        .filter(|e| e["kind"] != "checkpoint" && e["kind"] != "key_event")
        .cloned()
        .collect();
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["encrypt", "decrypt", "decrypt", "decrypt", "authorize"]
    );
    let snapshot_hash = ringfence::policy::PolicySnapshot::load(&shipped_policies())
        .unwrap()
        .hash()
        .to_owned();
    for entry in &entries {
        assert_eq!(entry["policy_set"], snapshot_hash.as_str());
        assert_eq!(entry["record"]["record_id"], "u-5");
    }
    let alice = &entries[1];
    assert_eq!(alice["principal"], "Employee::\"alice\"");
    assert_eq!(alice["service"], "us-support-tool");
    assert_eq!(alice["purpose"], "support");
    assert_eq!(alice["ticket"], "INC-9");
    assert_eq!(alice["fields"].as_array().unwrap().len(), 20);
    let email = alice["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "email")
        .unwrap();
    assert_eq!(email["decision"], "allow");
    assert_eq!(email["policies"][0], "us-gatekeeper-engineers-read-us");
    assert_eq!(email["key_version"], 1);
    assert_eq!(email["classification"], "pii");
    let bob_email = entries[2]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "email")
        .unwrap();
    assert_eq!(bob_email["decision"], "deny");
    assert_eq!(bob_email["policies"][0], "parent-company-never-reads-us");

    let report = ringfence::audit::verify(&server.log_dir()).unwrap();
    assert_eq!(report.entries, all.len() as u64);
    let bytes = server.log_bytes();
    for field in PROFILE_FIELDS {
        let secret = secret_value("u-5", field);
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
            "plaintext of {field} in log"
        );
    }
    let keyring = std::fs::read_to_string(server.data_dir().join("keyring.json")).unwrap();
    let sealed: serde_json::Value = serde_json::from_str(&keyring).unwrap();
    let sealed_us = sealed["jurisdictions"]["US"]["versions"][0]["sealed"]
        .as_str()
        .unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains(sealed_us));
}

async fn status_of<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    result.expect_err("expected an error status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_precise_statuses() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-6", "US").await;

    let mut cases: Vec<(pb::EncryptRecordRequest, Code, &str)> = Vec::new();
    let mut empty_id = profile("", "US");
    empty_id.record_id.clear();
    cases.push((empty_id, Code::InvalidArgument, "record_id"));
    let mut unknown_type = profile("u-7", "US");
    unknown_type.record_type = "order".to_owned();
    cases.push((
        unknown_type,
        Code::InvalidArgument,
        "unknown record type `order`",
    ));
    let mut unknown_field = profile("u-7", "US");
    unknown_field.fields[0].name = "shoe_size".to_owned();
    cases.push((
        unknown_field,
        Code::InvalidArgument,
        "unknown field `shoe_size`",
    ));
    let mut bad_name = profile("u-7", "US");
    bad_name.fields[0].name = "Email!".to_owned();
    cases.push((bad_name, Code::InvalidArgument, "invalid field name"));
    let mut duplicate = profile("u-7", "US");
    duplicate.fields[1].name = duplicate.fields[0].name.clone();
    cases.push((duplicate, Code::InvalidArgument, "appears more than once"));
    let mut no_fields = profile("u-7", "US");
    no_fields.fields.clear();
    cases.push((no_fields, Code::InvalidArgument, "no fields"));
    cases.push((
        profile("u-7", "BR"),
        Code::InvalidArgument,
        "jurisdiction `BR` is not configured",
    ));
    cases.push((
        profile("u-7", "us"),
        Code::InvalidArgument,
        "invalid jurisdiction",
    ));
    let mut huge = profile("u-7", "US");
    huge.fields[0].value = vec![7; 1024 * 1024 + 1];
    cases.push((huge, Code::InvalidArgument, "the limit is 1048576 bytes"));
    for (request, code, needle) in cases {
        let status = status_of(
            client
                .encrypt_record(as_caller(request, "us-signup", None))
                .await,
        )
        .await;
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }

    // Policy says no: a US service writing SG records.
    let status = status_of(
        client
            .encrypt_record(as_caller(profile("s-9", "SG"), "us-signup", None))
            .await,
    )
    .await;
    assert_status(&status, Code::PermissionDenied, "`email`");

    let decrypt_cases: Vec<(pb::DecryptRecordRequest, Code, &str)> = vec![
        (
            pb::DecryptRecordRequest::default(),
            Code::InvalidArgument,
            "`record` is required",
        ),
        (
            {
                let mut garbage = record.clone();
                *ciphertext_mut(&mut garbage, "email") =
                    b"not an envelope at all, just bytes".to_vec();
                decrypt_request(garbage, &["email"], "support", "INC-1")
            },
            Code::InvalidArgument,
            "field `email`: ciphertext is not a ringfence envelope",
        ),
        (
            decrypt_request(record.clone(), &["nickname"], "support", "INC-1"),
            Code::InvalidArgument,
            "field `nickname` is not in the record",
        ),
        (
            decrypt_request(record.clone(), &["email", "email"], "support", "INC-1"),
            Code::InvalidArgument,
            "appears more than once",
        ),
        (
            decrypt_request(record.clone(), &["email"], &"p".repeat(129), ""),
            Code::InvalidArgument,
            "invalid purpose",
        ),
        (
            decrypt_request(record.clone(), &["email"], "support", "a\nb"),
            Code::InvalidArgument,
            "control characters",
        ),
    ];
    for (request, code, needle) in decrypt_cases {
        let status = status_of(
            client
                .decrypt_record(as_caller(request, "us-support-tool", Some("alice")))
                .await,
        )
        .await;
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    let rejected: Vec<_> = server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "the mangled envelope is logged");
    assert!(
        rejected[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("field `email`")
    );

    // Larger than the server's message limit: refused by the transport, server unharmed.
    let mut oversized = profile("u-8", "US");
    for field in &mut oversized.fields {
        field.value = vec![1; 512 * 1024];
    }
    let status = status_of(
        client
            .encrypt_record(as_caller(oversized, "us-signup", None))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    encrypt_profile(&mut client, "u-8", "US").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_authentication_only() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-9", "US").await;
    let request = || decrypt_request(record.clone(), &["email"], "support", "INC-1");

    let status = status_of(client.decrypt_record(tonic::Request::new(request())).await).await;
    assert_status(&status, Code::Unauthenticated, "x-ringfence-service");

    let status = status_of(
        client
            .decrypt_record(as_caller(request(), "us-support-tool", Some("mallory")))
            .await,
    )
    .await;
    assert_status(&status, Code::Unauthenticated, "unknown principal");
    let status = status_of(
        client
            .decrypt_record(as_caller(request(), "rogue-service", Some("alice")))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);

    // Two employee headers: refused rather than guessing which one counts.
    let mut doubled = as_caller(request(), "us-support-tool", Some("bob"));
    doubled.metadata_mut().append(
        ringfence::identity::EMPLOYEE_HEADER,
        "alice".parse().unwrap(),
    );
    let status = status_of(client.decrypt_record(doubled).await).await;
    assert_eq!(status.code(), Code::Unauthenticated);

    let unauthenticated: Vec<_> = server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "unauthenticated")
        .collect();
    assert_eq!(
        unauthenticated.len(),
        4,
        "every refusal is logged: missing header, unknown principal, unknown service, repeated header"
    );
    assert!(
        unauthenticated[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("missing `x-ringfence-service`")
    );
    assert_eq!(unauthenticated[1]["principal"], "Employee::\"mallory\"");
    assert!(
        unauthenticated[3]["outcome"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_identity_mode_every_request_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.auth = ringfence::config::Auth::None;
    let running = ringfence::server::start(config).await.unwrap();
    let mut client = ringfence::pb::ringfence_client::RingfenceClient::connect(format!(
        "http://{}",
        running.local_addr
    ))
    .await
    .unwrap();
    let status = status_of(
        client
            .encrypt_record(as_caller(profile("u-1", "US"), "us-signup", None))
            .await,
    )
    .await;
    assert_status(&status, Code::Unauthenticated, "no caller authentication");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_stream_answers_in_order_and_a_bad_record_gets_its_own_status() {
    let server = start().await;
    let mut client = server.client().await;
    let mut records = Vec::new();
    for n in 0..40 {
        records.push(encrypt_profile(&mut client, &format!("b-{n}"), "US").await);
    }
    let requests: Vec<_> = records
        .iter()
        .map(|record| {
            decrypt_request(
                record.clone(),
                &["email", "tax_id"],
                "fraud-investigation",
                "F-1",
            )
        })
        .collect();
    let stream = tokio_stream::iter(requests.clone());
    let mut answers = client
        .decrypt_records(as_caller(stream, "us-support-tool", Some("alice")))
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(answer) = answers.message().await.unwrap() {
        assert_eq!(answer.record_id, format!("b-{count}"));
        assert_eq!(answer.index, count as u64);
        assert!(answer.status.is_none());
        assert_eq!(
            plaintext(outcome(&answer, "email")),
            secret_value(&answer.record_id, "email")
        );
        denied(outcome(&answer, "tax_id"));
        count += 1;
    }
    assert_eq!(count, 40);

    let mut with_bad = requests[..5].to_vec();
    with_bad[3].record.as_mut().unwrap().record_id.clear();
    let mut answers = client
        .decrypt_records(as_caller(
            tokio_stream::iter(with_bad),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    // The bad record is answered with its own status, and the stream goes on: every
    // record after it is answered (and only answered records are logged as read).
    let mut seen = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        seen.push(answer);
    }
    assert_eq!(seen.len(), 5);
    for (index, answer) in seen.iter().enumerate() {
        assert_eq!(answer.index, index as u64);
        if index == 3 {
            let status = answer.status.as_ref().unwrap();
            assert_eq!(status.code, Code::InvalidArgument as u32);
            assert!(
                status.message.starts_with("record 3: "),
                "{}",
                status.message
            );
            assert!(answer.fields.is_empty() && answer.request_id.is_empty());
        } else {
            assert!(answer.status.is_none());
            assert_eq!(answer.record_id, format!("b-{index}"));
        }
    }
    let decrypts = server
        .log_entries()
        .iter()
        .filter(|e| e["kind"] == "decrypt")
        .count();
    assert_eq!(decrypts, 40 + 4, "one decrypt entry per answered record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_logged_but_never_handed_to_the_transport_get_a_follow_up() {
    let server = start().await;
    let mut client = server.client().await;
    let mut records = Vec::new();
    for n in 0..10 {
        records.push(encrypt_profile(&mut client, &format!("d-{n}"), "US").await);
    }
    let requests: Vec<_> = (0..200)
        .map(|n| {
            decrypt_request(
                records[n % 10].clone(),
                &["email", "tax_id"],
                "fraud-investigation",
                "F-2",
            )
        })
        .collect();
    let mut answers = client
        .decrypt_records(as_caller(
            tokio_stream::iter(requests),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();
    // The client walks away after one answer.
    drop(answers);
    drop(client);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let entries = server.log_entries();
    let decrypted: std::collections::BTreeSet<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "decrypt")
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let undelivered: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "undelivered")
        .collect();
    assert!(
        !undelivered.is_empty(),
        "answers queued when the client left"
    );
    for entry in &undelivered {
        // A follow-up of a logged decision, naming only what would have been read.
        assert!(
            decrypted.contains(entry["request_id"].as_str().unwrap()),
            "{entry}"
        );
        let fields: Vec<&str> = entry["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["email"], "{entry}");
        assert_eq!(entry["fields"][0]["classification"], "pii");
        assert!(
            entry["outcome"]
                .as_str()
                .unwrap()
                .starts_with("undelivered: ")
        );
    }
    let followed: std::collections::BTreeSet<&str> = undelivered
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        followed.len(),
        undelivered.len(),
        "one follow-up per answer"
    );
    // At most the answers the transport took stand as read.
    assert!(decrypted.len() - followed.len() >= 1);
    assert!(decrypted.len() - followed.len() < decrypted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ringfence.v1.Ringfence".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ringfence.v1.Ringfence"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
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
    let gate = std::sync::Arc::new(ringfence::Gatekeeper::new(
        keyring,
        policies,
        log,
        Default::default(),
    ));
    Some(start_with(gate, dir).await)
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_log_fails_closed_with_unavailable() {
    // Segments 2 and 4 are /dev/full: the encrypt fails in 2; the decrypt recovers
    // into 3, rotates into 4 and fails again; the next request succeeds in 6.
    let Some(server) = start_with_full_segments(&[2, 4]).await else {
        return;
    };
    let mut client = server.client().await;

    let status = status_of(
        client
            .encrypt_record(as_caller(profile("u-1", "US"), "us-signup", None))
            .await,
    )
    .await;
    assert_status(
        &status,
        Code::Unavailable,
        "nothing was encrypted or decrypted",
    );

    let fake = pb::EncryptedRecord {
        record_type: "user_profile".to_owned(),
        record_id: "u-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![pb::EncryptedField {
            name: "email".to_owned(),
            ciphertext: [&b"RF\x01\x02US\x00\x00\x00\x01"[..], &[0u8; 28]].concat(),
        }],
    };
    let status = status_of(
        client
            .decrypt_record(as_caller(
                decrypt_request(fake, &[], "support", "INC-1"),
                "us-support-tool",
                Some("alice"),
            ))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable);

    // Health follows the log.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ringfence.v1.Ringfence".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    // The status call says why.
    let now = client
        .get_status(as_caller(pb::GetStatusRequest {}, "us-support-tool", None))
        .await
        .unwrap()
        .into_inner();
    assert!(!now.decision_log_healthy);
    assert!(
        now.decision_log_problem.contains("No space left on device"),
        "{now:?}"
    );
    assert!(now.decision_log_failed_commits >= 2, "{now:?}");

    // Writes succeed again (segment 5 is a regular file): service resumes by itself.
    encrypt_profile(&mut client, "u-2", "US").await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ringfence.v1.Ringfence".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let report = ringfence::audit::verify(&server.log_dir()).unwrap();
    assert_eq!(report.entries, 1, "only the acknowledged encrypt");
    assert_eq!(report.failed_segments.len(), 2);
    let now = client
        .get_status(as_caller(pb::GetStatusRequest {}, "us-support-tool", None))
        .await
        .unwrap()
        .into_inner();
    assert!(
        now.decision_log_healthy && now.decision_log_problem.is_empty(),
        "{now:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_take_effect_without_restart_and_bad_edits_are_refused() {
    let (server, policies) = start_with_own_policies().await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    assert_eq!(before.last_reload.as_ref().unwrap().trigger, "startup");
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!(hash, before.policy_set);
    assert_eq!(allowed, [true; 4]);

    // A valid edit: legal loses the restricted fields, no restart.
    let us = policies.join("us-data.cedar");
    let original = std::fs::read_to_string(&us).unwrap();
    replace_file(&us, &without_legal_policy(&original));
    let after = wait_for_status(&mut client, |s| s.policy_set != before.policy_set).await;
    assert_eq!(after.reloads_succeeded, 1);
    assert_eq!(after.last_reload.as_ref().unwrap().trigger, "file-change");
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!(hash, after.policy_set);
    assert_eq!(allowed, [false; 4]);

    // A bad edit is refused with its diagnostics; the running set keeps serving.
    replace_file(
        &us,
        &format!("{original}\npermit (principal, action, resource) when {{ oops }};\n"),
    );
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 1).await;
    let last = refused.last_reload.unwrap();
    assert!(!last.succeeded);
    assert!(
        last.diagnostics.iter().any(|d| d.contains("us-data.cedar")),
        "{:?}",
        last.diagnostics
    );
    assert_eq!(refused.policy_set, after.policy_set);
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!((hash, allowed), (after.policy_set.clone(), vec![false; 4]));

    // Test suites are not part of the set: editing them reloads nothing.
    std::fs::write(policies.join("tests/extra.yaml"), "cases: []\n").unwrap();
    tokio::time::sleep(ringfence::reload::SETTLE * 4).await;
    assert_eq!(status(&mut client).await.reloads_failed, 1);

    // Each decision log entry names the set that decided it.
    let sets: Vec<String> = server
        .log_entries()
        .iter()
        .filter(|entry| entry["kind"] == "authorize")
        .map(|entry| entry["policy_set"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        sets,
        [
            before.policy_set.clone(),
            after.policy_set.clone(),
            after.policy_set.clone()
        ]
    );
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_reloads_see_the_old_set_or_the_new_one_never_a_mix() {
    let (server, policies) = start_with_own_policies().await;
    let us = policies.join("us-data.cedar");
    let with_legal = std::fs::read_to_string(&us).unwrap();
    let without_legal = without_legal_policy(&with_legal);
    let mut client = server.client().await;
    let hash_with = status(&mut client).await.policy_set;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut askers = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        let stop = std::sync::Arc::clone(&stop);
        askers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push(lena_reads_restricted(&mut client).await);
            }
            seen
        }));
    }
    let mut hash_without = String::new();
    for round in 0..3 {
        replace_file(&us, &without_legal);
        let changed = wait_for_status(&mut client, |s| s.policy_set != hash_with).await;
        hash_without = changed.policy_set;
        replace_file(&us, &with_legal);
        wait_for_status(&mut client, |s| s.policy_set == hash_with).await;
        assert_eq!(status(&mut client).await.reloads_succeeded, 2 * (round + 1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut counts = [0usize; 2];
    for asker in askers {
        for (hash, allowed) in asker.await.unwrap() {
            if hash == hash_with {
                assert_eq!(
                    allowed, [true; 4],
                    "a mix under the set with the legal policy"
                );
                counts[0] += 1;
            } else {
                assert_eq!(hash, hash_without, "an unknown policy set");
                assert_eq!(allowed, [false; 4], "a mix under the set without it");
                counts[1] += 1;
            }
        }
    }
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both sets must have answered: {counts:?}"
    );
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_size_limit_is_refused_and_logged_as_undelivered() {
    use prost::Message as _;
    // One 3,000-byte email: the decrypt request (ciphertext = plaintext + 38 bytes)
    // fits the limit, the answer (with request id and policy set hash) does not.
    let value = vec![b'x'; 3000];
    let sealed = pb::EncryptedRecord {
        record_type: "user_profile".to_owned(),
        record_id: "big-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![pb::EncryptedField {
            name: "email".to_owned(),
            ciphertext: vec![0; value.len() + 38],
        }],
    };
    let request_len = decrypt_request(sealed, &["email"], "support", "INC-1").encoded_len();
    // Encrypted by a server with the default limit (its answer, the ciphertext, is the
    // larger one), then read through one with the tight limit on the same data.
    let writer = start().await;
    let mut client = writer.client().await;
    let record = encrypted_record(
        &mut client,
        as_caller(
            pb::EncryptRecordRequest {
                record_type: "user_profile".to_owned(),
                record_id: "big-1".to_owned(),
                jurisdiction: "US".to_owned(),
                fields: vec![pb::PlainField {
                    name: "email".to_owned(),
                    value: value.clone(),
                }],
            },
            "us-signup",
            None,
        ),
    )
    .await;
    let TestServer { running, dir, .. } = writer;
    running.stop().await.unwrap();
    let config = ringfence::ServeConfig {
        max_message_bytes: request_len + 8,
        ..test_config(dir.path())
    };
    let running = ringfence::server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut client = server.client().await;
    let request = decrypt_request(record, &["email"], "support", "INC-1");
    assert_eq!(request.encoded_len(), request_len);
    let status = client
        .decrypt_record(as_caller(request, "us-support-tool", Some("alice")))
        .await
        .unwrap_err();
    assert_status(&status, Code::OutOfRange, "message limit");
    let entries = server.log_entries();
    let decrypt = entries.iter().find(|e| e["kind"] == "decrypt").unwrap();
    let follow_up = entries.iter().find(|e| e["kind"] == "undelivered").unwrap();
    assert_eq!(follow_up["request_id"], decrypt["request_id"]);
    assert!(
        follow_up["outcome"]
            .as_str()
            .unwrap()
            .contains("over the message size limit")
    );
    assert_eq!(follow_up["action"], "decrypt");
    // The same for an encryption whose answer (the ciphertexts) is over the limit.
    let status = client
        .encrypt_record(as_caller(
            pb::EncryptRecordRequest {
                record_type: "user_profile".to_owned(),
                record_id: "big-2".to_owned(),
                jurisdiction: "US".to_owned(),
                fields: vec![pb::PlainField {
                    name: "email".to_owned(),
                    value,
                }],
            },
            "us-signup",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let entries = server.log_entries();
    let encrypt = entries
        .iter()
        .find(|e| e["kind"] == "encrypt" && e["record"]["record_id"] == "big-2")
        .unwrap();
    let follow_up = entries
        .iter()
        .find(|e| e["kind"] == "undelivered" && e["request_id"] == encrypt["request_id"])
        .unwrap();
    assert_eq!(follow_up["action"], "encrypt");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decryption_that_fails_after_its_decisions_are_logged_is_logged_as_undelivered() {
    // The encrypt lands in segment 2, the decrypt entry in 3; the integrity follow-up
    // of the tampered field fails in 4 (/dev/full), so the call fails after the log
    // already says alice read the other fields.
    let Some(server) = start_with_full_segments(&[4]).await else {
        return;
    };
    let mut client = server.client().await;
    let mut record = encrypt_profile(&mut client, "u-1", "US").await;
    let email = ciphertext_mut(&mut record, "email");
    let last = email.len() - 1;
    email[last] ^= 1;
    let status = status_of(
        client
            .decrypt_record(as_caller(
                decrypt_request(record, &["email", "phone"], "support", "INC-1"),
                "us-support-tool",
                Some("alice"),
            ))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Reading /dev/full never ends: take the sealed segment out before reading.
    std::fs::remove_file(ringfence::audit::segment_path(&server.log_dir(), 4)).unwrap();
    let entries = server.log_entries();
    let decrypt = entries.iter().find(|e| e["kind"] == "decrypt").unwrap();
    let opened: Vec<&str> = decrypt["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["outcome"] == "decrypt")
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(opened, ["email", "phone"]);
    let follow_up = entries
        .iter()
        .find(|e| e["kind"] == "undelivered" && e["request_id"] == decrypt["request_id"])
        .unwrap_or_else(|| panic!("no undelivered entry in {entries:#?}"));
    let named: Vec<&str> = follow_up["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(named, opened);
    assert_eq!(follow_up["principal"], decrypt["principal"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_callers_is_limited_per_source_and_hides_no_one_else() {
    use ringfence::failures::PER_SOURCE_PER_SECOND;
    let server = start().await;
    let mut client = server.client().await;
    let ask = || pb::AuthorizeRequest {
        record_type: "user_profile".to_owned(),
        record_id: "u-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec!["email".to_owned()],
        purpose: "support".to_owned(),
        ticket: "INC-1".to_owned(),
    };
    // A removed service whose certificate (here: header) still works.
    let started = std::time::Instant::now();
    for n in 0..100 {
        let status = status_of(
            client
                .authorize(as_caller(ask(), "gone-service", None))
                .await,
        )
        .await;
        assert_status(&status, Code::Unauthenticated, "gone-service");
        assert!(
            status.message().contains("not in the directory"),
            "{status:?}"
        );
        if n == 50 {
            // Someone else fails in the middle of the flood.
            let status = status_of(
                client
                    .authorize(as_caller(ask(), "us-support-tool", Some("mallory")))
                    .await,
            )
            .await;
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
    }
    let windows = started.elapsed().as_secs() + 1;
    // Status is for directory services only.
    let status = status_of(
        client
            .get_status(as_caller(pb::GetStatusRequest {}, "gone-service", None))
            .await,
    )
    .await;
    assert_status(&status, Code::Unauthenticated, "gone-service");
    assert!(
        status.message().contains("not in the directory"),
        "{status:?}"
    );

    let unauthenticated = |server: &TestServer| -> Vec<serde_json::Value> {
        server
            .log_entries()
            .into_iter()
            .filter(|e| e["kind"] == "unauthenticated")
            .collect()
    };
    let entries = unauthenticated(&server);
    let flood = entries
        .iter()
        .filter(|e| e["service"] == "gone-service")
        .count() as u64;
    assert!(
        (1..=u64::from(PER_SOURCE_PER_SECOND) * (windows + 1)).contains(&flood),
        "{flood} of 101 logged in about {windows} s"
    );
    let mallory = entries
        .iter()
        .find(|e| e["principal"] == "Employee::\"mallory\"")
        .unwrap_or_else(|| panic!("the other caller's failure is hidden: {entries:#?}"));
    assert_eq!(mallory["service"], "us-support-tool");
    assert!(
        mallory["outcome"]
            .as_str()
            .unwrap()
            .contains("unknown principal")
    );
    // Every failure is written or counted: after a quiet second, the next entry
    // written carries the count of all held back.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let status = status_of(
        client
            .authorize(as_caller(ask(), "gone-service", None))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);
    let entries = unauthenticated(&server);
    let counted: u64 = entries
        .iter()
        .map(|entry| {
            let outcome = entry["outcome"].as_str().unwrap();
            1 + outcome
                .split_once("; ")
                .and_then(|(_, rest)| rest.split_once(" more authentication failures"))
                .map(|(count, _)| count.parse::<u64>().unwrap())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(counted, 103, "100 + mallory + status + the last one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_bulk_client_holds_only_its_own_share_and_is_cut_off() {
    use ringfence::config::StreamLimits;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.streams = StreamLimits {
        max_per_caller: 4,
        send_timeout: Duration::from_secs(2),
    };
    let running = ringfence::server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut client = server.client().await;
    // Large answers: the transport's own buffer (which counts as delivered: up to
    // 400 KiB per stream) takes only a few of them.
    let mut large = profile("u-1", "US");
    for field in &mut large.fields {
        if field.name == "email" {
            field.value = vec![b'x'; 512 * 1024];
        }
    }
    let record = encrypted_record(&mut client, as_caller(large, "us-signup", None)).await;
    let requests = |count: usize, ticket: &'static str| {
        let record = record.clone();
        tokio_stream::iter(
            (0..count).map(move |_| decrypt_request(record.clone(), &["email"], "support", ticket)),
        )
    };

    // A client that never takes an answer: its flow-control window is zero.
    let stalled_channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.running.local_addr))
            .unwrap()
            .initial_stream_window_size(0)
            .connect()
            .await
            .unwrap();
    let mut stalled = pb::ringfence_client::RingfenceClient::new(stalled_channel);
    let mut held = Vec::new();
    for _ in 0..4 {
        let response = stalled
            .decrypt_records(as_caller(
                requests(300, "INC-1"),
                "us-support-tool",
                Some("alice"),
            ))
            .await
            .unwrap();
        held.push(response);
    }
    let status = stalled
        .decrypt_records(as_caller(
            requests(1, "INC-1"),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "--max-streams-per-caller");

    // Another caller is not held up.
    let mut other = server.client().await;
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        let mut answers = other
            .decrypt_records(as_caller(
                requests(5, "INC-2"),
                "us-support-tool",
                Some("bob"),
            ))
            .await
            .unwrap()
            .into_inner();
        let mut count = 0;
        while let Some(answer) = answers.message().await.unwrap() {
            assert!(answer.status.is_none(), "{answer:?}");
            count += 1;
        }
        count
    })
    .await
    .expect("another caller's stream was held up by a stalled one");
    assert_eq!(answered, 5);

    // The stalled caller read no more records than its pool holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled_reads = |entries: &[serde_json::Value]| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e["kind"] == "decrypt" && e["ticket"] == "INC-1")
            .map(|e| e["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let read = stalled_reads(&server.log_entries()).len();
    let pool = ringfence::service::CALLER_RECORDS_IN_FLIGHT;
    assert!(
        (1..=pool + 4).contains(&read),
        "{read} records read by stalled streams"
    );

    // After the send timeout the stalled streams end: what they made and did not hand
    // over is logged as undelivered, and their share is free again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let entries = server.log_entries();
    let read = stalled_reads(&entries);
    let undelivered: std::collections::BTreeSet<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "undelivered")
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let followed = read
        .iter()
        .filter(|id| undelivered.contains(id.as_str()))
        .count();
    eprintln!(
        "stalled streams: {} answers made, {followed} logged as undelivered",
        read.len()
    );
    // The transport's own buffer holds a few answers per stream (they count as
    // delivered; how many varies); the others a stalled stream made are followed up
    // (service::tests checks that exactly, with a transport that takes none).
    assert!(
        followed >= 1,
        "{followed} of {} stalled answers logged as undelivered",
        read.len()
    );
    let mut again = server.client().await;
    let mut answers = again
        .decrypt_records(as_caller(
            requests(3, "INC-3"),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(answer) = answers.message().await.unwrap() {
        assert!(answer.status.is_none(), "{answer:?}");
        count += 1;
    }
    assert_eq!(count, 3);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_an_idle_stream() {
    use std::time::Duration;
    let server = start().await;
    let mut client = server.client().await;
    // A stream whose client sends nothing and never closes its side.
    let (_keep_open, requests) = tokio::sync::mpsc::channel::<pb::DecryptRecordRequest>(1);
    let _idle = client
        .decrypt_records(as_caller(
            tokio_stream::wrappers::ReceiverStream::new(requests),
            "us-support-tool",
            Some("alice"),
        ))
        .await
        .unwrap();
    let TestServer { running, dir, .. } = server;
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.stop()).await;
    assert!(
        stopped.is_ok(),
        "shutdown waited for the idle stream for a minute"
    );
    stopped.unwrap().unwrap();
    drop(dir);
}
