//! What one fuzz input does, for every target. The targets in `fuzz_targets/` are
//! one-line calls of these functions, and `tests/fuzz_corpus.rs` includes this file to
//! replay every committed corpus and crash input through the same functions under an
//! ordinary `cargo test`. Each function must answer any bytes without panicking.
//!
//! Text inputs that are not UTF-8 are skipped, as `libfuzzer-sys` does for `&str`
//! targets: the entry points they feed take `&str`.
#![forbid(unsafe_code)]
// Only the scratch files of the harness itself may fail loudly.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prost::Message as _;
use ringfence::identity::token;
use ringfence::{audit, crypto, dev, gatekeeper, pb, policy};

/// Any bytes given as a ciphertext: envelope parsing (formats 1 and 2), then opening
/// what parses with a fixed root key (and, for format 2, a fixed subject secret under
/// the subject and key id the header names): every header check and the AEAD.
pub fn envelope(data: &[u8]) {
    use ringfence::record::{FieldName, RecordId, RecordType};
    let Ok(envelope) = crypto::Envelope::parse(data) else {
        return;
    };
    let root = crypto::DerivationKey::from_root(&crypto::SecretKey::from_bytes([7; 32]));
    let (Ok(record_type), Ok(record_id), Ok(field)) = (
        RecordType::new("user_profile"),
        RecordId::new("u-42"),
        FieldName::new("email"),
    ) else {
        return;
    };
    let scope = crypto::RecordScope {
        jurisdiction: &envelope.jurisdiction,
        key_version: envelope.key_version,
        record_type: &record_type,
        record_id: &record_id,
    };
    let subject = envelope
        .subject
        .and_then(|subject| ringfence::record::SubjectId::new(subject).ok());
    let key = match (&subject, &envelope.key_id) {
        (Some(subject), Some(key_id)) => root.subject_record_key(
            &scope,
            &crypto::SubjectScope {
                subject,
                secret: &crypto::SubjectSecret::from_bytes([9; 32]),
                key_id,
            },
        ),
        _ => root.record_key(&scope),
    };
    if let Ok(key) = key {
        let _ = key.open(&scope, &field, &envelope);
    }
}

/// Any text as `policies/fields.toml`.
pub fn field_catalog(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::FieldCatalog::parse(text);
    }
}

/// Any text as one decision log line.
pub fn log_line(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = audit::split_line(line);
    }
}

/// A request as the gRPC service receives it: the first byte picks the message type,
/// the rest is its protobuf encoding. Decoding, then the service's `TryFrom` checks.
pub fn request(data: &[u8]) {
    let Some((kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            let _ = pb::EncryptRecordRequest::decode(bytes).map(gatekeeper::PlainRecord::try_from);
        }
        1 => {
            let _ =
                pb::DecryptRecordRequest::decode(bytes).map(gatekeeper::DecryptRequest::try_from);
        }
        2 => {
            let _ = pb::AuthorizeRequest::decode(bytes).map(gatekeeper::AuthorizeRequest::try_from);
        }
        3 => {
            let _ = pb::RewrapRecordRequest::decode(bytes).map(gatekeeper::RewrapRequest::try_from);
        }
        _ => {
            let _ = pb::EncryptedRecord::decode(bytes).map(gatekeeper::SealedRecord::try_from);
        }
    }
}

/// Most segments one `audit_segment` input is split into.
const MAX_SEGMENTS: usize = 8;

/// A decision log directory as `audit verify` reads it: the input, split at form feeds
/// (which a log line never contains raw), gives consecutive segment files.
pub fn audit_segment(data: &[u8]) {
    AUDIT_DIR.with(|dir| {
        let dir = dir.path();
        for entry in fs::read_dir(dir).expect("scratch log directory is readable") {
            let path = entry.expect("scratch log directory is readable").path();
            fs::remove_file(&path).expect("scratch segment can be removed");
        }
        for (number, segment) in (1..).zip(data.split(|&b| b == b'\x0c').take(MAX_SEGMENTS)) {
            fs::write(audit::segment_path(dir, number), segment)
                .expect("scratch segment is written");
        }
        let _ = audit::verify(dir);
    });
}

/// Any text as the token of `authorization: Bearer <token>`, against a verifier with a
/// fixed key set (`fuzz/data/jwks.json`) and the development issuer and audience.
pub fn token(data: &[u8]) {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = verifier().verify(token);
    }
}

/// Any text as a policy test suite (`policies/tests/*.yaml`).
pub fn policy_suite(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::suite::Suite::parse("fuzz", Path::new("fuzz.yaml"), text);
    }
}

fn verifier() -> &'static token::TokenVerifier {
    static VERIFIER: OnceLock<token::TokenVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let scratch = Scratch::new("jwks");
        let jwks = scratch.path().join("jwks.json");
        fs::write(&jwks, include_str!("../data/jwks.json")).expect("scratch JWKS is written");
        token::TokenVerifier::load(token::TokenConfig {
            jwks,
            issuer: dev::DEV_ISSUER.to_owned(),
            audience: dev::DEV_AUDIENCE.to_owned(),
            leeway: Duration::from_secs(30),
            accept_unbound: false,
        })
        .expect("the fixed JWKS loads")
    })
}

thread_local! {
    static AUDIT_DIR: Scratch = Scratch::new("log");
}

/// A directory of this process under the system temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringfence-fuzz-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("scratch directory is created");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
