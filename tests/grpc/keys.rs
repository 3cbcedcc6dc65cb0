//! Key administration over gRPC (`ringfence.v1.KeyAdmin`): live rotation under load,
//! retire / unretire / destroy with per-field kinds, refusals, all of it logged. The
//! servers run in the development identity mode (mutual TLS and bound employee
//! tokens): the shipped policies grant key administration to proven identities only.

use super::*;
use pb::key_admin_client::KeyAdminClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

type Client = pb::ringfence_client::RingfenceClient<tonic::transport::Channel>;

/// Clients of a development-mode server: us-signup, the support tool with alice's
/// token, and the key console with kim's (a US key administrator).
struct Callers {
    signup: Client,
    support: Client,
    alice: String,
    admin: KeyAdminClient<tonic::transport::Channel>,
    kim: String,
}

impl Callers {
    async fn of(server: &TestServer) -> Self {
        Self {
            signup: Client::new(server.dev_channel("us-signup").await),
            support: Client::new(server.dev_channel("us-support-tool").await),
            alice: server.dev_token("alice", "us-support-tool"),
            admin: KeyAdminClient::new(server.dev_channel("us-key-console").await),
            kim: server.dev_token("kim", "us-key-console"),
        }
    }

    /// A request of kim through the key console.
    fn as_key_admin<T>(&self, message: T) -> tonic::Request<T> {
        with_token(message, &self.kim)
    }

    async fn encrypt(&mut self, id: &str) -> pb::EncryptedRecord {
        encrypted_record(&mut self.signup, tonic::Request::new(profile(id, "US"))).await
    }

    /// Decrypts `fields` of `record` as alice (US gatekeeper engineer) for support.
    async fn alice_reads(
        &mut self,
        record: pb::EncryptedRecord,
        fields: &[&str],
    ) -> pb::DecryptRecordResponse {
        self.support
            .decrypt_record(with_token(
                decrypt_request(record, fields, "support", "SUP-1"),
                &self.alice,
            ))
            .await
            .unwrap()
            .into_inner()
    }
}

fn rotate(jurisdiction: &str) -> pb::RotateKeyRequest {
    pb::RotateKeyRequest {
        jurisdiction: jurisdiction.to_owned(),
        purpose: "scheduled-rotation".to_owned(),
        ticket: "KEY-1".to_owned(),
    }
}

fn retire(below: u32) -> pb::RetireKeysRequest {
    pb::RetireKeysRequest {
        jurisdiction: "US".to_owned(),
        below,
        purpose: String::new(),
        ticket: "KEY-2".to_owned(),
    }
}

/// The key version an envelope names.
fn version_of(record: &pb::EncryptedRecord, field: &str) -> u32 {
    let bytes = &record
        .fields
        .iter()
        .find(|f| f.name == field)
        .unwrap()
        .ciphertext;
    ringfence::crypto::Envelope::parse(bytes)
        .unwrap()
        .key_version
        .get()
}

fn error_message(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Error(error) => &error.message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_load_is_live_atomic_and_fails_no_request() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let old = callers.encrypt("u-old").await;
    assert_eq!(version_of(&old, "email"), 1);

    // 16 clients encrypt and decrypt until told to stop; every request must succeed,
    // and each records the key version it got and when it started.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..16 {
        let stop = Arc::clone(&stop);
        let failures = Arc::clone(&failures);
        let mut signup = Client::new(server.dev_channel("us-signup").await);
        let mut support = Client::new(server.dev_channel("us-support-tool").await);
        let alice = callers.alice.clone();
        let old = old.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let id = format!("u-{worker}-{round}");
                let started = std::time::Instant::now();
                let encrypted = signup
                    .encrypt_record(tonic::Request::new(profile(&id, "US")))
                    .await;
                let Ok(encrypted) = encrypted else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let record = encrypted.into_inner().record.unwrap();
                let versions: std::collections::BTreeSet<u32> = PROFILE_FIELDS
                    .iter()
                    .map(|field| version_of(&record, field))
                    .collect();
                // Never half a change: one version for every field of a record.
                assert_eq!(versions.len(), 1, "{versions:?}");
                seen.push((started, *versions.first().unwrap()));
                for (record, id) in [(record, id.as_str()), (old.clone(), "u-old")] {
                    let answer = support
                        .decrypt_record(with_token(
                            decrypt_request(record, &["email", "phone"], "support", "SUP-1"),
                            &alice,
                        ))
                        .await;
                    match answer {
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            for field in ["email", "phone"] {
                                assert_eq!(
                                    plaintext(outcome(&answer, field)),
                                    secret_value(id, field).as_slice()
                                );
                            }
                        }
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            seen
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let request = callers.as_key_admin(rotate("US"));
    let rotated = callers
        .admin
        .rotate_key(request)
        .await
        .unwrap()
        .into_inner();
    let returned = std::time::Instant::now();
    assert_eq!(rotated.events.len(), 1);
    let event = &rotated.events[0];
    assert_eq!((event.operation.as_str(), event.version), ("rotate", 2));
    let ring = rotated.key_ring.unwrap();
    assert_eq!((ring.current, ring.versions.len()), (2, 2));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.unwrap());
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request may fail");
    assert!(seen.iter().any(|(_, version)| *version == 1));
    let after: Vec<u32> = seen
        .iter()
        .filter(|(started, _)| *started > returned)
        .map(|(_, version)| *version)
        .collect();
    assert!(!after.is_empty(), "requests ran after the rotation");
    assert!(
        after.iter().all(|version| *version == 2),
        "every request that started after the call returned uses the new version"
    );
    // New and old ciphertexts decrypt.
    let new = callers.encrypt("u-new").await;
    assert_eq!(version_of(&new, "email"), 2);
    for (record, id) in [(new, "u-new"), (old, "u-old")] {
        let answer = callers.alice_reads(record, &["email"]).await;
        assert_eq!(
            plaintext(outcome(&answer, "email")),
            secret_value(id, "email").as_slice()
        );
    }

    // The log: the decision, then the key event under the same request id, then a
    // checkpoint that vouches for the new generation.
    let entries = server.log_entries();
    let position = |kind: &str| {
        entries
            .iter()
            .position(|e| e["kind"] == kind && e["request_id"] == rotated.request_id)
            .unwrap_or_else(|| panic!("no {kind} entry for the rotation"))
    };
    let (decided, changed) = (position("key_admin"), position("key_event"));
    assert!(decided < changed);
    assert_eq!(entries[decided]["principal"], "Employee::\"kim\"");
    assert_eq!(entries[decided]["action"], "rotate_key");
    assert_eq!(entries[decided]["outcome"], "allowed");
    assert_eq!(
        entries[decided]["key_admin"]["key_rings"][0]["policies"][0],
        "us-key-admins-manage-us-keys"
    );
    assert_eq!(entries[changed]["key_event"]["version"], 2);
    assert_eq!(entries[changed]["ticket"], "KEY-1");
    assert!(
        entries[changed..]
            .iter()
            .any(|e| e["kind"] == "checkpoint" && e["checkpoint"]["key_generations"]["US"] == 2),
        "a checkpoint vouches for the new generation"
    );
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_and_destroyed_versions_fail_per_field_and_destruction_survives_a_restart() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let kim = callers.kim.clone();
    macro_rules! with_kim {
        ($message:expr) => {
            with_token($message, &kim)
        };
    }
    // The same record written under version 1, then again under version 2: a record
    // whose fields are sealed under two versions.
    let first = callers.encrypt("u-7").await;
    let request = with_kim!(rotate("US"));
    callers.admin.rotate_key(request).await.unwrap();
    let second = callers.encrypt("u-7").await;
    let mut mixed = second.clone();
    *ciphertext_mut(&mut mixed, "email") = first
        .fields
        .iter()
        .find(|f| f.name == "email")
        .unwrap()
        .ciphertext
        .clone();
    assert_eq!(
        (version_of(&mixed, "email"), version_of(&mixed, "phone")),
        (1, 2)
    );

    // The current version cannot be retired.
    let status = status_of(callers.admin.retire_keys(with_kim!(retire(3))).await).await;
    assert_status(&status, Code::FailedPrecondition, "version 2 is current");

    let retired = callers
        .admin
        .retire_keys(with_kim!(retire(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.events.len(), 1);
    assert_eq!(retired.events[0].operation, "retire");
    let answer = callers
        .alice_reads(mixed.clone(), &["email", "phone"])
        .await;
    assert_eq!(
        error_kind(outcome(&answer, "email")),
        pb::field_error::Kind::RetiredKeyVersion
    );
    assert!(error_message(outcome(&answer, "email")).contains("key version 1"));
    assert_eq!(
        plaintext(outcome(&answer, "phone")),
        secret_value("u-7", "phone").as_slice(),
        "the other fields are unaffected"
    );
    let entries = server.log_entries();
    let logged = entries
        .iter()
        .find(|e| e["request_id"] == answer.request_id && e["kind"] == "decrypt")
        .unwrap();
    let email = logged["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "email")
        .unwrap();
    assert_eq!(email["outcome"], "retired_key_version");
    assert_eq!(email["key_version"], 1);

    // Unretire: it decrypts again.
    callers
        .admin
        .unretire_keys(with_kim!(pb::UnretireKeysRequest {
            jurisdiction: "US".to_owned(),
            from: 1,
            purpose: String::new(),
            ticket: "KEY-3".to_owned(),
        }))
        .await
        .unwrap();
    let answer = callers.alice_reads(mixed.clone(), &["email"]).await;
    assert_eq!(
        plaintext(outcome(&answer, "email")),
        secret_value("u-7", "email").as_slice()
    );

    // Destroy needs retirement first, then is permanent.
    let destroy = |purpose: &str| {
        with_kim!(pb::DestroyKeysRequest {
            jurisdiction: "US".to_owned(),
            below: 2,
            purpose: purpose.to_owned(),
            ticket: "KEY-4".to_owned(),
        })
    };
    let status = status_of(callers.admin.destroy_keys(destroy("key-destruction")).await).await;
    assert_status(
        &status,
        Code::FailedPrecondition,
        "retire versions below 2 first",
    );
    callers
        .admin
        .retire_keys(with_kim!(retire(2)))
        .await
        .unwrap();
    // The shipped policy wants the purpose said out loud.
    let status = status_of(callers.admin.destroy_keys(destroy("cleanup")).await).await;
    assert_status(&status, Code::PermissionDenied, "destroy_key");
    let destroyed = callers
        .admin
        .destroy_keys(destroy("key-destruction"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(destroyed.events[0].operation, "destroy");
    let states: Vec<i32> = destroyed
        .key_ring
        .unwrap()
        .versions
        .iter()
        .map(|v| v.state)
        .collect();
    assert_eq!(
        states,
        [
            pb::key_version::State::Destroyed as i32,
            pb::key_version::State::Active as i32
        ]
    );
    let status = status_of(
        callers
            .admin
            .unretire_keys(with_kim!(pb::UnretireKeysRequest {
                jurisdiction: "US".to_owned(),
                from: 1,
                purpose: String::new(),
                ticket: "KEY-5".to_owned(),
            }))
            .await,
    )
    .await;
    assert_status(&status, Code::FailedPrecondition, "destroyed");

    // Across a restart: still destroyed, and not on disk.
    let TestServer {
        running,
        dir,
        config,
    } = server;
    running.stop().await.unwrap();
    let keyring = std::fs::read_to_string(config.data_dir.join("keyring.json")).unwrap();
    let keyring: serde_json::Value = serde_json::from_str(&keyring).unwrap();
    assert!(
        keyring["jurisdictions"]["US"]["versions"][0]
            .get("sealed")
            .is_none()
    );
    let running = ringfence::server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut callers = Callers::of(&server).await;
    let answer = callers.alice_reads(mixed, &["email", "phone"]).await;
    assert_eq!(
        error_kind(outcome(&answer, "email")),
        pb::field_error::Kind::DestroyedKeyVersion
    );
    assert_eq!(
        plaintext(outcome(&answer, "phone")),
        secret_value("u-7", "phone").as_slice()
    );
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_administration_without_a_permit_is_refused_and_logged() {
    let server = start_dev().await;
    let callers = Callers::of(&server).await;
    let keyring = std::fs::read(server.data_dir().join("keyring.json")).unwrap();
    let console = server.dev_channel("us-key-console").await;
    let support = server.dev_channel("us-support-tool").await;
    // A reader of US data, a parent-company engineer, the key console acting alone,
    // and the key administrator through another service.
    for (channel, employee, needle) in [
        (
            &console,
            Some(("alice", "us-key-console")),
            "no policy permits it",
        ),
        (
            &console,
            Some(("bob", "us-key-console")),
            "parent-company-never-administers-us-keys",
        ),
        (&console, None, "employees only"),
        (
            &support,
            Some(("kim", "us-support-tool")),
            "no policy permits it",
        ),
    ] {
        let request = match employee {
            Some((employee, service)) => {
                with_token(rotate("US"), &server.dev_token(employee, service))
            }
            None => tonic::Request::new(rotate("US")),
        };
        let status = status_of(
            KeyAdminClient::new(channel.clone())
                .rotate_key(request)
                .await,
        )
        .await;
        assert_status(&status, Code::PermissionDenied, needle);
    }
    let list = pb::ListKeysRequest {
        jurisdiction: String::new(),
        purpose: String::new(),
        ticket: "KEY-1".to_owned(),
    };
    let status = status_of(
        KeyAdminClient::new(console.clone())
            .list_keys(with_token(
                list.clone(),
                &server.dev_token("alice", "us-key-console"),
            ))
            .await,
    )
    .await;
    assert_status(&status, Code::PermissionDenied, "view_keys");
    assert_eq!(
        std::fs::read(server.data_dir().join("keyring.json")).unwrap(),
        keyring,
        "nothing changed"
    );
    let entries = server.log_entries();
    let refused: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "key_admin")
        .collect();
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused[..2].iter().all(|e| e["outcome"] == "denied"));
    assert_eq!(
        refused[1]["key_admin"]["key_rings"][0]["policies"][0],
        "parent-company-never-administers-us-keys"
    );
    assert_eq!(refused[2]["principal"], "Service::\"us-key-console\"");
    assert_eq!(refused[2]["key_admin"]["key_rings"][0]["decision"], "deny");
    assert!(
        refused[2]["outcome"]
            .as_str()
            .unwrap()
            .contains("employees only")
    );
    assert!(
        entries
            .iter()
            .filter(|e| e["kind"] == "key_event")
            .all(|e| e["key_event"]["operation"] == "init"),
        "no key changed"
    );

    // The key administrator lists what they may view: US only.
    let mut admin = callers.admin.clone();
    let listed = admin
        .list_keys(callers.as_key_admin(list))
        .await
        .unwrap()
        .into_inner();
    let jurisdictions: Vec<&str> = listed
        .key_rings
        .iter()
        .map(|r| r.jurisdiction.as_str())
        .collect();
    assert_eq!(jurisdictions, ["US"]);
    server.running.stop().await.unwrap();

    // Identity claimed in headers (the danger mode) never administers keys, whoever
    // it names: the shipped policies want a certificate and a bound token.
    let server = start().await;
    let status = status_of(
        KeyAdminClient::new(server.channel().await)
            .rotate_key(as_caller(rotate("US"), "us-key-console", Some("kim")))
            .await,
    )
    .await;
    assert_status(&status, Code::PermissionDenied, "no policy permits it");
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keyring_refuses_a_change_and_a_failed_save_stops_further_changes() {
    let server = start_dev().await;
    let mut callers = Callers::of(&server).await;
    let first = callers.encrypt("u-9").await;

    // Another writer holds the keyring lock (an offline `keys` command waiting for
    // the log): the change is refused as busy after its patience, nothing changed.
    let holder = ringfence::keys::lock(&server.data_dir(), "a test holding the keyring").unwrap();
    let request = callers.as_key_admin(rotate("US"));
    let status = status_of(callers.admin.rotate_key(request).await).await;
    assert_status(
        &status,
        Code::Unavailable,
        "another key change holds the keyring",
    );
    drop(holder);

    // The keyring file cannot be replaced (a directory stands in its place): the save
    // fails, the server keeps the keys it had, says so in the log, and refuses further
    // live changes until a restart reads the file again.
    let keyring = server.data_dir().join("keyring.json");
    let saved = std::fs::read(&keyring).unwrap();
    std::fs::remove_file(&keyring).unwrap();
    std::fs::create_dir_all(keyring.join("in-the-way")).unwrap();
    let request = callers.as_key_admin(rotate("US"));
    let status = status_of(callers.admin.rotate_key(request).await).await;
    assert_status(&status, Code::Internal, "the key change failed");
    let entries = server.log_entries();
    let outcomes: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "key_admin")
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert_eq!(outcomes[outcomes.len() - 2], "allowed", "{outcomes:?}");
    assert!(
        outcomes[outcomes.len() - 1].starts_with("failed: "),
        "{outcomes:?}"
    );
    let request = callers.as_key_admin(rotate("US"));
    let status = status_of(callers.admin.rotate_key(request).await).await;
    assert_status(
        &status,
        Code::FailedPrecondition,
        "key changes are disabled until the server restarts",
    );
    // Records are still served with the keys the server had.
    let record = callers.encrypt("u-10").await;
    assert_eq!(version_of(&record, "email"), 1);
    let answer = callers.alice_reads(first, &["email"]).await;
    assert_eq!(
        plaintext(outcome(&answer, "email")),
        secret_value("u-9", "email").as_slice()
    );
    std::fs::remove_dir_all(&keyring).unwrap();
    std::fs::write(&keyring, saved).unwrap();
    server.running.stop().await.unwrap();
}
