//! Envelope format, AEAD and key derivation: pure functions, no I/O, no policy.
//!
//! Byte layouts are specified in `docs/crypto.md`; this module is the reference
//! implementation of that document. Nothing here logs, and no type here prints secrets.
//!
//! - AES-256-GCM (NIST SP 800-38D) with a fresh 96-bit nonce from the OS RNG per field.
//! - HKDF-SHA256 (RFC 5869): the PRK of each (jurisdiction, key version) root key is
//!   extracted once; every record gets its own AES key, expanded with an `info` that names
//!   the purpose, jurisdiction, key version, record type and record id. One AES key thus
//!   serves one record's fields only, far below the 2^32 random-nonce limit of SP 800-38D.
//! - Envelope format 2 also names the root key's id and the record's data subject, and
//!   its record key mixes in that subject's random secret ([`SubjectSecret`]): destroying
//!   the secret (shredding) leaves no key that opens the subject's fields.

mod envelope;
mod wrapping;

pub use envelope::{Envelope, MIN_ENVELOPE_LEN, RecordKey};
pub use wrapping::{KeyId, LegacyKeyWrapper, SEALED_KEY_LEN, SEALED_SUBJECT_LEN, WrappingKey};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use rand::TryRng;
use sha2::Sha256;
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType, SubjectId};

/// First two bytes of every envelope.
pub const ENVELOPE_MAGIC: [u8; 2] = *b"RF";
/// The envelope format this code writes: key id and data subject in the header, the
/// subject's secret in the record key.
pub const ENVELOPE_VERSION: u8 = 2;
/// The first envelope format (no key id, no subject); still read, never written.
pub const ENVELOPE_VERSION_1: u8 = 1;
/// AES-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Length of root, master and derived keys in bytes.
pub const KEY_LEN: usize = 32;

/// HKDF salt used when extracting the PRK of a root key.
pub const ROOT_KEY_SALT: &[u8] = b"ringfence/v1 root-key";
/// HKDF salt used when extracting the key-wrapping key from the master key.
pub const MASTER_KEY_SALT: &[u8] = b"ringfence/v1 master-key";
const RECORD_KEY_LABEL: &[u8] = b"ringfence/v1 record-key";
const SUBJECT_RECORD_SALT: &[u8] = b"ringfence/v2 subject-record-key";
const RECORD_KEY_LABEL_V2: &[u8] = b"ringfence/v2 record-key";
const SUBJECT_SEAL_LABEL: &[u8] = b"ringfence/v2 subject-secret-seal";
const SUBJECT_STORE_CHECK_LABEL: &[u8] = b"ringfence/v2 subject-store-check";
const KEY_WRAP_LABEL: &[u8] = b"ringfence/v1 keyring-wrap";
const ROOT_KEY_AAD_LABEL: &[u8] = b"ringfence/v1 root-key-seal";
const JURISDICTION_WRAP_LABEL: &[u8] = b"ringfence/v2 jurisdiction-wrapping-key";
const SEAL_KEY_LABEL: &[u8] = b"ringfence/v2 root-key-seal";
const METADATA_MAC_LABEL: &[u8] = b"ringfence/v2 keyring-mac";
const KEY_ID_LABEL: &[u8] = b"ringfence/v2 key-id";
/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 16;

/// Errors of this module. Callers see a single opaque integrity error for any
/// authentication failure; the variants exist for the server log and for tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes are not structurally an envelope (wrong magic, version or length).
    #[error("ciphertext is not a ringfence envelope: {0}")]
    Malformed(&'static str),
    /// Authentication failed: the data was altered, truncated or moved.
    #[error("integrity check failed")]
    Integrity,
    /// The OS random number generator failed.
    #[error("the operating system random number generator failed")]
    Random,
    /// A value is too long to be encoded.
    #[error("{0} is too long to encode")]
    TooLong(&'static str),
}

/// A 256-bit secret (a root key or a master key). Zeroized on drop; never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Self([0u8; KEY_LEN]);
        rand::rngs::SysRng
            .try_fill_bytes(&mut key.0)
            .map_err(|_| Error::Random)?;
        Ok(key)
    }

    /// Takes ownership of key bytes; the caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key bytes, for sealing and derivation only.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The random secret material of one data subject in one jurisdiction, mixed into
/// every record key of that subject (format 2). Zeroized on drop; never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SubjectSecret([u8; KEY_LEN]);

impl SubjectSecret {
    /// A fresh secret from the operating system's RNG.
    pub fn generate() -> Result<Self, Error> {
        SecretKey::generate().map(|key| Self(*key.expose()))
    }

    /// Takes ownership of secret bytes (known-answer tests, unsealing).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for SubjectSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectSecret(<redacted>)")
    }
}

/// Appends `value` with a 2-byte big-endian length prefix (the `lp16` of docs/crypto.md).
pub fn put_lp16(out: &mut Vec<u8>, value: &[u8]) -> Result<(), Error> {
    let len = u16::try_from(value.len()).map_err(|_| Error::TooLong("a length-prefixed value"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// HKDF-Extract (RFC 5869 section 2.2).
pub fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
    let (mut prk, _) = Hkdf::<Sha256>::extract(Some(salt), ikm);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    out.copy_from_slice(&prk);
    prk.as_mut_slice().zeroize();
    out
}

/// HKDF-Expand (RFC 5869 section 2.3) from a PRK into `okm`.
pub fn hkdf_expand(prk: &[u8], info: &[u8], okm: &mut [u8]) -> Result<(), Error> {
    let hkdf = Hkdf::<Sha256>::from_prk(prk).map_err(|_| Error::TooLong("HKDF PRK"))?;
    hkdf.expand(info, okm)
        .map_err(|_| Error::TooLong("HKDF output"))
}

/// Fills one fresh nonce per field with a single call to the OS RNG.
pub fn fresh_nonces(count: usize) -> Result<Vec<[u8; NONCE_LEN]>, Error> {
    let mut bytes = vec![0u8; count.saturating_mul(NONCE_LEN)];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|_| Error::Random)?;
    Ok(bytes
        .chunks_exact(NONCE_LEN)
        .map(|chunk| {
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(chunk);
            nonce
        })
        .collect())
}

/// The data subject of a format-2 record: the id, the secret and the id of the root
/// key version, all bound into the record key and the envelope header.
#[derive(Debug, Clone, Copy)]
pub struct SubjectScope<'a> {
    /// The subject's id.
    pub subject: &'a SubjectId,
    /// The subject's secret in the record's jurisdiction.
    pub secret: &'a SubjectSecret,
    /// The key id of the root key version ([`DerivationKey::key_id`]).
    pub key_id: &'a KeyId,
}

/// Where a record lives: everything its key and its fields' associated data bind to.
#[derive(Debug, Clone, Copy)]
pub struct RecordScope<'a> {
    /// The record's jurisdiction.
    pub jurisdiction: &'a Jurisdiction,
    /// The root key version the record key derives from.
    pub key_version: KeyVersion,
    /// The record's type.
    pub record_type: &'a RecordType,
    /// The record's id.
    pub record_id: &'a RecordId,
}

/// The extracted PRK of one root key version: the input of every record key under it.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DerivationKey {
    prk: [u8; KEY_LEN],
}

impl fmt::Debug for DerivationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivationKey(<redacted>)")
    }
}

impl DerivationKey {
    /// Extracts the PRK of a root key: `HKDF-Extract(ROOT_KEY_SALT, root)`.
    pub fn from_root(root: &SecretKey) -> Self {
        Self {
            prk: *hkdf_extract(ROOT_KEY_SALT, root.expose()),
        }
    }

    /// The key id of this root key as (`jurisdiction`, `version`): a one-way check value,
    /// `HKDF-Expand(PRK, lp16("ringfence/v2 key-id") || lp16(J) || u32be(v), 16)`. It
    /// names the key without revealing it, survives re-sealing, and differs for the same
    /// key under another jurisdiction or version, so a swapped key is caught by its id.
    pub fn key_id(&self, jurisdiction: &Jurisdiction, version: KeyVersion) -> Result<KeyId, Error> {
        let mut info = Vec::with_capacity(64);
        put_lp16(&mut info, KEY_ID_LABEL)?;
        put_lp16(&mut info, jurisdiction.as_str().as_bytes())?;
        info.extend_from_slice(&version.get().to_be_bytes());
        let mut id = [0u8; KEY_ID_LEN];
        hkdf_expand(&self.prk, &info, &mut id)?;
        Ok(KeyId(id))
    }

    /// The AES-256-GCM key of one format-1 record (docs/crypto.md, "Record keys"):
    /// root key only, so it can be derived again as long as the root key exists.
    pub fn record_key(&self, scope: &RecordScope<'_>) -> Result<RecordKey, Error> {
        let info = record_key_info(scope)?;
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hkdf_expand(&self.prk, &info, okm.as_mut_slice())?;
        let cipher =
            Aes256Gcm::new_from_slice(okm.as_slice()).map_err(|_| Error::TooLong("key"))?;
        Ok(RecordKey {
            cipher,
            subject: None,
        })
    }

    /// The AES-256-GCM key of one format-2 record (docs/crypto.md, "Record keys,
    /// format 2"): `PRK_S = HKDF-Extract("ringfence/v2 subject-record-key", PRK_root ||
    /// secret)`, then `HKDF-Expand(PRK_S, info2, 32)` with `info2 = lp16("ringfence/v2
    /// record-key") || lp16(J) || u32be(v) || lp16(subject) || lp16(record_type) ||
    /// lp16(record_id)`. Both the root key and the subject's secret are needed: without
    /// the secret the key cannot be derived again.
    pub fn subject_record_key(
        &self,
        scope: &RecordScope<'_>,
        subject: &SubjectScope<'_>,
    ) -> Result<RecordKey, Error> {
        let mut ikm = Zeroizing::new([0u8; 2 * KEY_LEN]);
        let (root, secret) = ikm.split_at_mut(KEY_LEN);
        root.copy_from_slice(&self.prk);
        secret.copy_from_slice(&subject.secret.0);
        let prk = hkdf_extract(SUBJECT_RECORD_SALT, ikm.as_slice());
        let info = subject_record_key_info(scope, subject.subject)?;
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hkdf_expand(prk.as_slice(), &info, okm.as_mut_slice())?;
        let cipher =
            Aes256Gcm::new_from_slice(okm.as_slice()).map_err(|_| Error::TooLong("key"))?;
        Ok(RecordKey {
            cipher,
            subject: Some((subject.subject.clone(), *subject.key_id)),
        })
    }
}

/// `info` of a format-2 record key (see [`DerivationKey::subject_record_key`]).
pub fn subject_record_key_info(
    scope: &RecordScope<'_>,
    subject: &SubjectId,
) -> Result<Vec<u8>, Error> {
    let mut info = Vec::with_capacity(96 + scope.record_id.as_str().len() + subject.as_str().len());
    put_lp16(&mut info, RECORD_KEY_LABEL_V2)?;
    put_lp16(&mut info, scope.jurisdiction.as_str().as_bytes())?;
    info.extend_from_slice(&scope.key_version.get().to_be_bytes());
    put_lp16(&mut info, subject.as_str().as_bytes())?;
    put_lp16(&mut info, scope.record_type.as_str().as_bytes())?;
    put_lp16(&mut info, scope.record_id.as_str().as_bytes())?;
    Ok(info)
}

/// `info` of a record key: `lp16(label) || lp16(jurisdiction) || u32be(version) ||
/// lp16(record_type) || lp16(record_id)`.
pub fn record_key_info(scope: &RecordScope<'_>) -> Result<Vec<u8>, Error> {
    let mut info = Vec::with_capacity(96 + scope.record_id.as_str().len());
    put_lp16(&mut info, RECORD_KEY_LABEL)?;
    put_lp16(&mut info, scope.jurisdiction.as_str().as_bytes())?;
    info.extend_from_slice(&scope.key_version.get().to_be_bytes());
    put_lp16(&mut info, scope.record_type.as_str().as_bytes())?;
    put_lp16(&mut info, scope.record_id.as_str().as_bytes())?;
    Ok(info)
}

#[cfg(test)]
mod tests;
