//! Data subjects over gRPC: shredding a subject (`KeyAdmin.ShredSubject`) makes every
//! field of it fail with `KIND_SHREDDED` in every key version, for every request that
//! starts after the call returns, while other subjects decrypt; rewrapping
//! (`RewrapRecord`, `RewrapRecords`) moves fields to the current version and format 2
//! inside the service, never returning plaintext. Development identity mode (mutual
//! TLS and bound tokens), as the shipped policies require for administration.

use super::*;
use pb::key_admin_client::KeyAdminClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

type Client = pb::ringfence_client::RingfenceClient<tonic::transport::Channel>;

struct Callers {
    signup: Client,
    support: Client,
    alice: String,
    rewrap_job: Client,
    admin: KeyAdminClient<tonic::transport::Channel>,
    kim: String,
}

impl Callers {
    async fn of(server: &TestServer) -> Self {
        Self {
            signup: Client::new(server.dev_channel("us-signup").await),
            support: Client::new(server.dev_channel("us-support-tool").await),
            alice: server.dev_token("alice", "us-support-tool"),
            rewrap_job: Client::new(server.dev_channel("us-rewrap-job").await),
            admin: KeyAdminClient::new(server.dev_channel("us-key-console").await),
            kim: server.dev_token("kim", "us-key-console"),
        }
    }

    /// Encrypts a US profile `id` for `subject` (`None`: the record's own id).
    async fn encrypt(&mut self, id: &str, subject: Option<&str>) -> pb::EncryptedRecord {
        let mut message = profile(id, "US");
        message.subject_id = subject.unwrap_or_default().to_owned();
        encrypted_record(&mut self.signup, tonic::Request::new(message)).await
    }

    async fn alice_reads(&mut self, record: pb::EncryptedRecord) -> pb::DecryptRecordResponse {
        self.support
            .decrypt_record(with_token(
                decrypt_request(record, &[], "support", "SUP-1"),
                &self.alice,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn shred(&mut self, subject: &str) -> Result<pb::ShredSubjectResponse, tonic::Status> {
        let request = with_token(shred_request(subject), &self.kim);
        self.admin
            .shred_subject(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn rotate(&mut self) {
        let request = with_token(
            pb::RotateKeyRequest {
                jurisdiction: "US".to_owned(),
                purpose: String::new(),
                ticket: "KEY-9".to_owned(),
            },
            &self.kim,
        );
        self.admin.rotate_key(request).await.unwrap();
    }

    async fn rewrap(&mut self, record: pb::EncryptedRecord) -> pb::RewrapRecordResponse {
        self.rewrap_job
            .rewrap_record(tonic::Request::new(rewrap_request(record)))
            .await
            .unwrap()
            .into_inner()
    }
}

fn shred_request(subject: &str) -> pb::ShredSubjectRequest {
    pb::ShredSubjectRequest {
        subject_id: subject.to_owned(),
        jurisdictions: vec!["US".to_owned()],
        purpose: "erasure-request".to_owned(),
        ticket: "DSR-1".to_owned(),
    }
}

fn rewrap_request(record: pb::EncryptedRecord) -> pb::RewrapRecordRequest {
    pb::RewrapRecordRequest {
        record: Some(record),
        purpose: "key-migration".to_owned(),
        ticket: "MIG-1".to_owned(),
    }
}

/// Fields alice may read of a US profile (public, pii, sensitive: 16 of 20).
fn readable(answer: &pb::DecryptRecordResponse) -> Vec<&pb::FieldOutcome> {
    answer
        .fields
        .iter()
        .filter(|field| !matches!(field.outcome, Some(Outcome::Denied(_))))
        .collect()
}

fn envelope_of<'r>(record: &'r pb::EncryptedRecord, field: &str) -> &'r [u8] {
    &record
        .fields
        .iter()
        .find(|f| f.name == field)
        .unwrap()
        .ciphertext
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_subject_fails_with_kind_shredded_in_every_version_and_others_still_decrypt() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let first = callers.encrypt("u-c1", Some("carol")).await;
    assert_eq!(first.subject_id, "carol");
    callers.rotate().await;
    let second = callers.encrypt("u-c2", Some("carol")).await;
    let other = callers.encrypt("u-d1", None).await;
    assert_eq!(
        other.subject_id, "u-d1",
        "a record's default subject is its id"
    );
    for record in [&first, &second] {
        let answer = callers.alice_reads(record.clone()).await;
        assert_eq!(readable(&answer).len(), 16);
        assert!(
            readable(&answer)
                .iter()
                .all(|field| matches!(field.outcome, Some(Outcome::Plaintext(_))))
        );
    }

    // Refused shreds change nothing: alice is no key administrator, and a service
    // alone administers nothing.
    let alice_at_the_console = server.dev_token("alice", "us-key-console");
    let status = callers
        .admin
        .shred_subject(with_token(shred_request("carol"), &alice_at_the_console))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "DataSubjects::\"US\"");
    let mut job_admin = KeyAdminClient::new(server.dev_channel("us-rewrap-job").await);
    let status = job_admin
        .shred_subject(tonic::Request::new(shred_request("carol")))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "employees only");
    assert_eq!(
        readable(&callers.alice_reads(first.clone()).await).len(),
        16
    );

    let shredded = callers.shred("carol").await.unwrap();
    assert_eq!(shredded.jurisdictions.len(), 1);
    assert_eq!(
        (
            shredded.jurisdictions[0].jurisdiction.as_str(),
            shredded.jurisdictions[0].outcome.as_str()
        ),
        ("US", "shredded")
    );
    for record in [&first, &second] {
        let answer = callers.alice_reads(record.clone()).await;
        let fields = readable(&answer);
        assert_eq!(fields.len(), 16, "denials stay denials");
        for field in fields {
            let Some(Outcome::Error(error)) = &field.outcome else {
                panic!("{} should fail, got {:?}", field.name, field.outcome);
            };
            assert_eq!(
                error.kind(),
                pb::field_error::Kind::Shredded,
                "{}",
                field.name
            );
            assert!(error.message.contains("shredded"), "{}", error.message);
        }
    }
    let answer = callers.alice_reads(other.clone()).await;
    for field in PROFILE_FIELDS {
        if let Outcome::Plaintext(value) = outcome(&answer, field) {
            assert_eq!(value, &secret_value("u-d1", field));
        }
    }
    assert_eq!(
        readable(&answer)
            .iter()
            .filter(|f| matches!(f.outcome, Some(Outcome::Plaintext(_))))
            .count(),
        16
    );

    // Nothing is encrypted for carol again, and shredding again says so.
    let mut again = profile("u-c3", "US");
    again.subject_id = "carol".to_owned();
    let status = callers
        .signup
        .encrypt_record(tonic::Request::new(again))
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "shredded");
    let twice = callers.shred("carol").await.unwrap();
    assert_eq!(twice.jurisdictions[0].outcome, "already_shredded");

    // The log answers a data-subject access request: who read what of carol.
    let entries = server.log_entries();
    let filter = ringfence::audit::Filter {
        subject: Some("carol".to_owned()),
        ..Default::default()
    };
    let about: Vec<&serde_json::Value> = entries.iter().filter(|e| filter.matches(e)).collect();
    let kinds: Vec<&str> = about.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"encrypt") && kinds.contains(&"decrypt") && kinds.contains(&"key_admin"),
        "{kinds:?}"
    );
    assert!(about.iter().all(|e| e["record"]["record_id"] != "u-d1"));
    let shredded_reads = about
        .iter()
        .filter(|e| e["kind"] == "decrypt")
        .flat_map(|e| e["fields"].as_array().unwrap())
        .filter(|f| f["outcome"] == "shredded")
        .count();
    assert_eq!(
        shredded_reads, 32,
        "16 fields of two records after the shred"
    );
    let shred_entries: Vec<&&serde_json::Value> = about
        .iter()
        .filter(|e| e["kind"] == "key_admin" && e["action"] == "shred")
        .collect();
    assert!(shred_entries.iter().any(|e| {
        e["outcome"]
            .as_str()
            .unwrap()
            .starts_with("shredded: US shredded")
    }));
    assert!(shred_entries.iter().any(|e| e["outcome"] == "denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shred_under_load_holds_for_every_request_that_starts_after_it_returns() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let record = callers.encrypt("u-e1", Some("erin")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let stop = Arc::clone(&stop);
        let mut support = Client::new(server.dev_channel("us-support-tool").await);
        let alice = callers.alice.clone();
        let record = record.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let answer = support
                    .decrypt_record(with_token(
                        decrypt_request(record.clone(), &["email"], "support", "SUP-1"),
                        &alice,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let shredded = match outcome(&answer, "email") {
                    Outcome::Plaintext(_) => false,
                    Outcome::Error(error) => {
                        assert_eq!(error.kind(), pb::field_error::Kind::Shredded);
                        true
                    }
                    other => panic!("unexpected {other:?}"),
                };
                seen.push((started, shredded));
            }
            seen
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    callers.shred("erin").await.unwrap();
    let returned = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.unwrap());
    }
    assert!(
        seen.iter().any(|(_, shredded)| !shredded),
        "reads before the shred"
    );
    let after: Vec<bool> = seen
        .iter()
        .filter(|(started, _)| *started > returned)
        .map(|(_, shredded)| *shredded)
        .collect();
    assert!(!after.is_empty(), "requests ran after the shred");
    assert!(
        after.iter().all(|shredded| *shredded),
        "every request that started after the call returned finds the subject shredded"
    );
}

/// A format-1 envelope of `field` of a US record, as servers before format 2 wrote
/// them, sealed with the server's own key version `version`.
fn format_1_envelope(server: &TestServer, record_id: &str, field: &str, version: u32) -> Vec<u8> {
    use ringfence::record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType};
    let data = server.data_dir();
    let master = ringfence::keys::load_master_key(
        None,
        None,
        &data,
        ringfence::keys::MasterKeyPolicy {
            allow_development: true,
            create_development: false,
        },
    )
    .unwrap();
    let keyring =
        ringfence::keys::Keyring::open(&data.join(ringfence::keys::KEYRING_FILE), &master).unwrap();
    let (jurisdiction, record_type, record_id, field) = (
        Jurisdiction::new("US").unwrap(),
        RecordType::new("user_profile").unwrap(),
        RecordId::new(record_id).unwrap(),
        FieldName::new(field).unwrap(),
    );
    let version = KeyVersion::new(version).unwrap();
    let scope = ringfence::crypto::RecordScope {
        jurisdiction: &jurisdiction,
        key_version: version,
        record_type: &record_type,
        record_id: &record_id,
    };
    let key = keyring
        .derivation_key(&jurisdiction, version)
        .unwrap()
        .record_key(&scope)
        .unwrap();
    let [nonce] = ringfence::crypto::fresh_nonces(1)
        .unwrap()
        .try_into()
        .unwrap();
    key.seal(
        &scope,
        &field,
        &nonce,
        &secret_value(record_id.as_str(), field.as_str()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_versions_and_formats_preserves_plaintext_and_never_returns_it() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    // A record whose fields span versions and formats: `email` format 1 under v1
    // (made as an old server would), `phone` format 2 under v1, the rest format 2
    // under v2 (the current version after a rotation).
    let v1 = callers.encrypt("u-r1", None).await;
    callers.rotate().await;
    let mut record = callers.encrypt("u-r1", None).await;
    record.subject_id = String::new();
    let email_v1 = format_1_envelope(&server, "u-r1", "email", 1);
    for field in &mut record.fields {
        match field.name.as_str() {
            "email" => field.ciphertext = email_v1.clone(),
            "phone" => field.ciphertext = envelope_of(&v1, "phone").to_vec(),
            _ => {}
        }
    }
    // The format-1 field still opens.
    let answer = callers.alice_reads(record.clone()).await;
    assert_eq!(
        plaintext(outcome(&answer, "email")),
        secret_value("u-r1", "email").as_slice()
    );

    // The rewrap job may not read what it rewraps.
    let job_reads = callers
        .rewrap_job
        .decrypt_record(tonic::Request::new(decrypt_request(
            record.clone(),
            &[],
            "key-migration",
            "MIG-1",
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(
        job_reads
            .fields
            .iter()
            .all(|f| matches!(f.outcome, Some(Outcome::Denied(_))))
    );

    let response = callers.rewrap(record.clone()).await;
    let rewrapped = response.record.clone().unwrap();
    assert_eq!(rewrapped.subject_id, "u-r1");
    {
        use prost::Message as _;
        let bytes = response.encode_to_vec();
        for field in PROFILE_FIELDS {
            let secret = secret_value("u-r1", field);
            assert!(
                !bytes
                    .windows(secret.len())
                    .any(|window| window == secret.as_slice()),
                "the rewrap answer carries the plaintext of {field}"
            );
        }
    }
    let outcome_of = |name: &str| {
        response
            .fields
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .outcome
            .clone()
            .unwrap()
    };
    use pb::field_rewrap::Outcome as Rewrap;
    assert_eq!(
        outcome_of("email"),
        Rewrap::Rewrapped(pb::Rewrapped {
            from_version: 1,
            to_version: 2,
            from_format: 1
        })
    );
    assert_eq!(
        outcome_of("phone"),
        Rewrap::Rewrapped(pb::Rewrapped {
            from_version: 1,
            to_version: 2,
            from_format: 2
        })
    );
    assert_eq!(
        outcome_of("display_name"),
        Rewrap::Unchanged(pb::Unchanged {})
    );
    assert_eq!(
        envelope_of(&rewrapped, "display_name"),
        envelope_of(&record, "display_name")
    );
    for field in PROFILE_FIELDS {
        let envelope = ringfence::crypto::Envelope::parse(envelope_of(&rewrapped, field)).unwrap();
        assert_eq!(
            (envelope.format, envelope.key_version.get()),
            (2, 2),
            "{field}"
        );
        assert_eq!(envelope.subject, Some("u-r1"));
    }
    // Plaintext preserved, read by an allowed principal.
    let answer = callers.alice_reads(rewrapped.clone()).await;
    for field in PROFILE_FIELDS {
        if let Outcome::Plaintext(value) = outcome(&answer, field) {
            assert_eq!(value, &secret_value("u-r1", field), "{field}");
        }
    }
    assert_eq!(readable(&answer).len(), 16);

    // A retired version is refused, field by field; the others still move.
    callers.rotate().await;
    let request = with_token(
        pb::RetireKeysRequest {
            jurisdiction: "US".to_owned(),
            below: 2,
            purpose: String::new(),
            ticket: "KEY-10".to_owned(),
        },
        &callers.kim,
    );
    callers.admin.retire_keys(request).await.unwrap();
    let mut mixed = rewrapped.clone();
    mixed
        .fields
        .iter_mut()
        .find(|f| f.name == "email")
        .unwrap()
        .ciphertext = email_v1;
    let response = callers.rewrap(mixed).await;
    let kind = |name: &str| {
        response
            .fields
            .iter()
            .find(|f| f.name == name)
            .unwrap()
            .outcome
            .clone()
            .unwrap()
    };
    match kind("email") {
        Rewrap::Error(error) => {
            assert_eq!(error.kind(), pb::field_error::Kind::RetiredKeyVersion);
        }
        other => panic!("email: {other:?}"),
    }
    assert!(matches!(
        kind("phone"),
        Rewrap::Rewrapped(pb::Rewrapped { to_version: 3, .. })
    ));

    // Logged: a `rewrap` entry per request, fields `rewrap` / `unchanged`.
    let entries = server.log_entries();
    let rewraps: Vec<&serde_json::Value> =
        entries.iter().filter(|e| e["kind"] == "rewrap").collect();
    assert_eq!(rewraps.len(), 2);
    let outcomes: Vec<&str> = rewraps[0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "rewrap").count(), 2);
    assert_eq!(outcomes.iter().filter(|o| **o == "unchanged").count(), 18);
    assert_eq!(rewraps[0]["principal"], "Service::\"us-rewrap-job\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_records_streams_per_record_statuses_and_parent_company_services_are_denied() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let good = callers.encrypt("u-s1", None).await;
    let mut broken = good.clone();
    broken.fields[0].ciphertext = b"not an envelope".to_vec();
    let requests = vec![
        rewrap_request(good.clone()),
        rewrap_request(broken),
        rewrap_request(good.clone()),
    ];
    let mut answers = callers
        .rewrap_job
        .rewrap_records(tonic::Request::new(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(answer) = answers.message().await.unwrap() {
        seen.push(answer);
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.iter().map(|a| a.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(seen[0].status.is_none() && seen[2].status.is_none());
    let status = seen[1].status.as_ref().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as u32);
    assert!(status.message.contains("record 1"), "{}", status.message);
    // Current already: every field unchanged.
    assert!(
        seen[0]
            .fields
            .iter()
            .all(|f| matches!(f.outcome, Some(pb::field_rewrap::Outcome::Unchanged(_))))
    );

    // A parent-company service rewraps nothing of the US.
    let mut analytics = Client::new(server.dev_channel("parentco-analytics").await);
    let response = analytics
        .rewrap_record(tonic::Request::new(rewrap_request(good)))
        .await
        .unwrap()
        .into_inner();
    assert!(response.fields.iter().all(|f| matches!(
        &f.outcome,
        Some(pb::field_rewrap::Outcome::Denied(denied))
            if denied.policy_ids.contains(&"parent-company-never-rewraps-us-data".to_owned())
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_missing_from_the_store_fails_as_unknown_and_rewrap_makes_no_new_secret() {
    // No cache: every request reads the store, as after a restart.
    let dir = tempfile::tempdir().unwrap();
    let config = ringfence::ServeConfig {
        auth: ringfence::config::Auth::Dev,
        subject_cache_entries: 0,
        ..test_config(dir.path())
    };
    let running = ringfence::server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut callers = Callers::of(&server).await;
    let record = callers.encrypt("u-z1", Some("zed")).await;
    // The store loses zed (restored from a backup older than zed's first record).
    let store = rusqlite::Connection::open(server.data_dir().join("subjects.db")).unwrap();
    let rows = |store: &rusqlite::Connection| -> i64 {
        store
            .query_row(
                "SELECT count(*) FROM subjects WHERE subject = 'zed'",
                [],
                |row| row.get(0),
            )
            .unwrap()
    };
    store
        .execute("DELETE FROM subjects WHERE subject = 'zed'", [])
        .unwrap();
    assert_eq!(rows(&store), 0);

    let answer = callers.alice_reads(record.clone()).await;
    let Outcome::Error(error) = outcome(&answer, "email") else {
        panic!("email should fail");
    };
    assert_eq!(error.kind(), pb::field_error::Kind::UnknownKeyVersion);
    assert!(error.message.contains("data subject"), "{}", error.message);

    // A rewrap must not paper over the loss with a new secret: restoring the old one
    // would then be impossible.
    let response = callers.rewrap(record).await;
    assert_eq!(response.fields.len(), 20);
    assert!(response.fields.iter().all(|f| matches!(
        &f.outcome,
        Some(pb::field_rewrap::Outcome::Error(error))
            if error.kind() == pb::field_error::Kind::UnknownKeyVersion
    )));
    assert_eq!(rows(&store), 0, "no secret was made for zed");
    let entries = server.log_entries();
    let logged: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "decrypt" || e["kind"] == "rewrap")
        .flat_map(|e| e["fields"].as_array().unwrap())
        .filter_map(|f| f["outcome"].as_str())
        .filter(|outcome| *outcome != "denied")
        .collect();
    assert!(!logged.is_empty());
    assert!(
        logged.iter().all(|outcome| *outcome == "unknown_subject"),
        "{logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_scope_is_checked_and_a_claimed_subject_of_format_1_reads_is_not_logged() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    // A jurisdiction the policies do not know is refused by name, never skipped;
    // more than 64 are refused; nothing is shredded either way.
    let record = callers.encrypt("u-q1", Some("quinn")).await;
    let mut request = shred_request("quinn");
    request.jurisdictions = vec!["US".to_owned(), "XX".to_owned()];
    let status = callers
        .admin
        .shred_subject(with_token(request, &callers.kim))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "XX");
    let mut request = shred_request("quinn");
    request.jurisdictions = (0..65).map(|n| format!("J{n}")).collect();
    let status = callers
        .admin
        .shred_subject(with_token(request, &callers.kim))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "64");
    assert!(matches!(
        outcome(&callers.alice_reads(record).await, "email"),
        Outcome::Plaintext(_)
    ));

    // A format-1 record read with a subject the caller merely claims: the entry names
    // no subject (nothing binds it), so `--subject` finds the read by record id.
    let mut old = callers.encrypt("u-q2", None).await;
    old.fields.retain(|f| f.name == "email");
    old.fields[0].ciphertext = format_1_envelope(&server, "u-q2", "email", 1);
    old.subject_id = "someone-else".to_owned();
    let answer = callers.alice_reads(old).await;
    assert_eq!(
        plaintext(outcome(&answer, "email")),
        secret_value("u-q2", "email").as_slice()
    );
    let entries = server.log_entries();
    let read = entries
        .iter()
        .find(|e| e["request_id"] == answer.request_id.as_str() && e["kind"] == "decrypt")
        .unwrap();
    assert!(read["record"].get("subject").is_none(), "{read}");
    let by_subject = ringfence::audit::Filter {
        subject: Some("u-q2".to_owned()),
        ..Default::default()
    };
    assert!(by_subject.matches(read));
    let claimed = ringfence::audit::Filter {
        subject: Some("someone-else".to_owned()),
        ..Default::default()
    };
    assert!(!claimed.matches(read));
}
