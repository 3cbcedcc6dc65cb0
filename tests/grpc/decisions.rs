//! Who may read what: the example policies end to end.

use super::*;

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
