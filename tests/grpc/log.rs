//! The decision log as the server writes it: one entry per request, follow-ups, failing closed.

use super::*;

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
    // As stored, alice's entry groups its 20 fields (format 3): by outcome and
    // determining policies, named under their classification, each field once.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains(alice["request_id"].as_str().unwrap()))
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(stored["format"], 3);
    assert!(stored.get("fields").is_none());
    let groups = stored["field_groups"].as_array().unwrap();
    let named: Vec<&str> = groups
        .iter()
        .flat_map(|group| group["fields"].as_object().unwrap().values())
        .flat_map(|names| names.as_array().unwrap())
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(named.len(), 20);
    assert_eq!(
        named.iter().collect::<std::collections::HashSet<_>>().len(),
        20
    );
    // Public fields, pii and sensitive ones, the restricted ones denied: three groups.
    assert_eq!(groups.len(), 3, "{line}");
    assert!(
        line.len() < 1_400,
        "{} bytes, where format 2 wrote 3,567: {line}",
        line.len()
    );
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
        subject_id: String::new(),
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

    // Both failed writes are counted, and the segment sealed after the first.
    let exposition = server.scrape().await;
    assert_eq!(
        metric_value(&exposition, "ringfence_log_write_failures_total"),
        Some(2.0),
        "{exposition}"
    );
    assert!(
        metric_value(&exposition, "ringfence_log_sealed_segments_total") >= Some(1.0),
        "{exposition}"
    );

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_size_limit_is_refused_and_logged_as_undelivered() {
    use prost::Message as _;
    // One 3,000-byte email of subject `b`: the decrypt request (a format-2 envelope:
    // plaintext + 57 bytes of header, key id, subject, nonce and tag; every field, so
    // no field list) fits the limit, the answer (with request id and policy set hash)
    // does not.
    let value = vec![b'x'; 3000];
    let sealed = pb::EncryptedRecord {
        subject_id: String::new(),
        record_type: "user_profile".to_owned(),
        record_id: "big-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![pb::EncryptedField {
            name: "email".to_owned(),
            ciphertext: vec![0; value.len() + 57],
        }],
    };
    let request_len = decrypt_request(sealed, &[], "support", "INC-1").encoded_len();
    // Encrypted by a server with the default limit (its answer, the ciphertext, is the
    // larger one), then read through one with the tight limit on the same data.
    let writer = start().await;
    let mut client = writer.client().await;
    let record = encrypted_record(
        &mut client,
        as_caller(
            pb::EncryptRecordRequest {
                subject_id: "b".to_owned(),
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
    let mut config = ringfence::ServeConfig {
        max_message_bytes: request_len + 2,
        ..test_config(dir.path())
    };
    // A field limit over the message limit is refused at start (`serve` lowers its
    // default to the message limit).
    config.limits.max_field_bytes = config.max_message_bytes;
    let running = ringfence::server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut client = server.client().await;
    let record = pb::EncryptedRecord {
        subject_id: String::new(),
        ..record
    };
    let request = decrypt_request(record, &[], "support", "INC-1");
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
                subject_id: String::new(),
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
