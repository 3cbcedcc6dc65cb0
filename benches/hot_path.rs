//! Criterion benches of the in-process hot path: decide + log + decrypt a 20-field
//! record, and its parts. The decision log lives on tmpfs (/dev/shm) when available so
//! that the numbers are CPU, not disk latency; `examples/loadgen.rs` measures the whole
//! server over gRPC with real fsyncs.
//!
//!     cargo bench --bench hot_path
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use ringfence::audit::DecisionLog;
use ringfence::crypto::{DerivationKey, RecordScope, SecretKey, fresh_nonces};
use ringfence::gatekeeper::{DecryptRequest, Limits, PlainRecord, RecordRef};
use ringfence::identity::Caller;
use ringfence::keys::Keyring;
use ringfence::policy::{Action, PolicyStore, Principal, RequestFacts};
use ringfence::record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType, StatedPurpose};
use ringfence::{Gatekeeper, ServeConfig};
use zeroize::Zeroizing;

mod common;

use common::profile_fields;

fn scratch_dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn record_ref(id: &str) -> RecordRef {
    RecordRef {
        record_type: RecordType::new("user_profile").unwrap(),
        record_id: RecordId::new(id).unwrap(),
        jurisdiction: Jurisdiction::new("US").unwrap(),
    }
}

/// What the bench's decisions are about: alice through the US support tool.
fn facts_for<'a>(principal: &'a Principal, stated: &'a StatedPurpose) -> RequestFacts<'a> {
    RequestFacts {
        principal,
        service: "us-support-tool",
        authentication: "bench",
        stated,
        request_time: 1_790_000_000,
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = scratch_dir();
    let policies_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = Arc::new(PolicyStore::load(&policies_dir).unwrap());
    let keyring = Keyring::create_unlogged(
        &dir.path().join("keyring.json"),
        &ringfence::keys::LocalMasterKey::generate().unwrap(),
        &ServeConfig::defaults().jurisdictions,
    )
    .unwrap();
    let (log, _) = runtime
        .block_on(async { DecisionLog::open_with(&dir.path().join("log"), signed_log_options()) })
        .unwrap();
    let subjects = ringfence::subjects::Subjects::open(
        dir.path(),
        &keyring,
        ringfence::subjects::DEFAULT_CACHE_ENTRIES,
    )
    .unwrap();
    let gate = Gatekeeper::new(
        keyring,
        Arc::new(subjects),
        Arc::clone(&policies),
        log,
        Limits::default(),
    );

    let signup = Caller {
        service: "us-signup".to_owned(),
        employee: None,
        method: "bench",
        lease: None,
        certificate: None,
    };
    let alice = Caller {
        service: "us-support-tool".to_owned(),
        employee: Some("alice".to_owned()),
        method: "bench",
        lease: None,
        certificate: None,
    };
    let plain = PlainRecord {
        subject: None,
        record: record_ref("user-00000001"),
        fields: profile_fields()
            .iter()
            .map(|f| {
                (
                    FieldName::new(f).unwrap(),
                    Zeroizing::new(format!("{f}: a realistic value of some length").into_bytes()),
                )
            })
            .collect(),
    };
    let sealed = runtime
        .block_on(gate.encrypt_record(&signup, plain))
        .unwrap()
        .record;
    let tickets = AtomicU64::new(0);

    let mut group = c.benchmark_group("decrypt_record_20_fields");
    group
        .sample_size(30)
        .measurement_time(std::time::Duration::from_secs(4));
    group.bench_function("decisions_cached", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = DecryptRequest {
                record: sealed.clone(),
                wanted: Vec::new(),
                stated: StatedPurpose::new("support", "INC-1").unwrap(),
            };
            gate.decrypt_record(&alice, request).await.unwrap()
        })
    });
    group.bench_function("fresh_ticket_each_request", |b| {
        b.to_async(&runtime).iter(|| async {
            let ticket = format!("INC-{}", tickets.fetch_add(1, Ordering::Relaxed));
            let request = DecryptRequest {
                record: sealed.clone(),
                wanted: Vec::new(),
                stated: StatedPurpose::new("support", &ticket).unwrap(),
            };
            gate.decrypt_record(&alice, request).await.unwrap()
        })
    });
    group.finish();

    let snapshot = policies.current();
    let fields: Vec<FieldName> = profile_fields()
        .iter()
        .map(|f| FieldName::new(f).unwrap())
        .collect();
    let principal = Principal::Employee("alice".to_owned());
    let us = Jurisdiction::new("US").unwrap();
    let record_type = RecordType::new("user_profile").unwrap();
    let mut group = c.benchmark_group("decide_20_fields");
    group.bench_function("one_cedar_evaluation_per_field", |b| {
        let stated = StatedPurpose::new("support", "INC-1").unwrap();
        let facts = facts_for(&principal, &stated);
        b.iter(|| {
            snapshot
                .decide_each(Action::Decrypt, &facts, &us, &record_type, &fields)
                .unwrap()
        })
    });
    group.bench_function("classes_fresh_ticket", |b| {
        b.iter(|| {
            let ticket = format!("INC-{}", tickets.fetch_add(1, Ordering::Relaxed));
            let stated = StatedPurpose::new("support", &ticket).unwrap();
            let facts = facts_for(&principal, &stated);
            snapshot
                .decide(Action::Decrypt, &facts, &us, &record_type, &fields)
                .unwrap()
        })
    });
    group.bench_function("classes_cached", |b| {
        let stated = StatedPurpose::new("support", "INC-1").unwrap();
        let facts = facts_for(&principal, &stated);
        b.iter(|| {
            snapshot
                .decide(Action::Decrypt, &facts, &us, &record_type, &fields)
                .unwrap()
        })
    });
    group.finish();

    let root = DerivationKey::from_root(&SecretKey::generate().unwrap());
    let record = record_ref("user-00000002");
    let scope = RecordScope {
        jurisdiction: &record.jurisdiction,
        key_version: KeyVersion::FIRST,
        record_type: &record.record_type,
        record_id: &record.record_id,
    };
    let field = FieldName::new("email").unwrap();
    let key = root.record_key(&scope).unwrap();
    let nonce = fresh_nonces(1).unwrap()[0];
    let value = vec![0x42u8; 64];
    let envelope = key.seal(&scope, &field, &nonce, &value).unwrap();
    let mut group = c.benchmark_group("crypto");
    group.bench_function("derive_record_key", |b| {
        b.iter(|| root.record_key(&scope).unwrap())
    });
    group.bench_function("seal_64_byte_field", |b| {
        b.iter(|| key.seal(&scope, &field, &nonce, &value).unwrap())
    });
    group.bench_function("open_64_byte_field", |b| {
        b.iter(|| {
            let parsed = ringfence::crypto::Envelope::parse(&envelope).unwrap();
            key.open(&scope, &field, &parsed).unwrap()
        })
    });
    group.bench_function("fresh_nonces_20_one_syscall", |b| {
        b.iter(|| fresh_nonces(20).unwrap())
    });
    group.finish();
}

/// Appends per second with group commit, on disk (real fdatasync), for 1, 8 and 64
/// concurrent writers: one entry per request, as in the service.
fn log_appends(c: &mut Criterion) {
    use ringfence::audit::{Entry, RecordEntry};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (log, _) = runtime
        .block_on(async { DecisionLog::open_with(&dir.path().join("log"), signed_log_options()) })
        .unwrap();
    let entry = Entry {
        time: "2026-11-23T00:00:00Z".to_owned(),
        request_time: 1_790_000_000,
        request_id: "0123456789abcdef0123456789abcdef".to_owned(),
        kind: "decrypt".to_owned(),
        service: Some("us-support-tool".to_owned()),
        principal: Some("Employee::\"alice\"".to_owned()),
        authentication: "bench".to_owned(),
        action: Some("decrypt".to_owned()),
        purpose: "support".to_owned(),
        ticket: "INC-1".to_owned(),
        record: Some(RecordEntry {
            subject: None,
            record_type: "user_profile".to_owned(),
            record_id: "user-00000001".to_owned(),
            jurisdiction: "US".to_owned(),
        }),
        policy_set: Some("ab".repeat(32)),
        fields: Vec::new(),
        outcome: "decided".to_owned(),
        checkpoint: None,
        key_event: None,
        unsigned_tail: None,
        key_admin: None,
    };
    let mut group = c.benchmark_group("decision_log_append_on_disk");
    group
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(5))
        .throughput(criterion::Throughput::Elements(1));
    for writers in [1u64, 8, 64] {
        group.bench_function(format!("{writers}_writers"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = std::time::Instant::now();
                    let mut tasks = Vec::new();
                    for writer in 0..writers {
                        let log = log.clone();
                        let entry = entry.clone();
                        // Spread `iters` appends over the writers.
                        let count = iters / writers + u64::from(writer < iters % writers);
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..count {
                                log.append(entry.clone()).await.unwrap();
                            }
                        }));
                    }
                    for task in tasks {
                        task.await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, log_appends);
criterion_main!(benches);

/// The server's log configuration: checkpoints signed once a second.
fn signed_log_options() -> ringfence::audit::LogOptions {
    ringfence::audit::LogOptions {
        signer: Some(ringfence::audit::CheckpointSigner::from_seed(&[1u8; 32])),
        ..ringfence::audit::LogOptions::default()
    }
}
