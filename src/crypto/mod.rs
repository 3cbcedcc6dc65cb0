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

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use rand::TryRng;
use sha2::Sha256;
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType};

/// First two bytes of every envelope.
pub const ENVELOPE_MAGIC: [u8; 2] = *b"RF";
/// The envelope format this code writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
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

    /// The AES-256-GCM key of one record (docs/crypto.md, "Record keys").
    pub fn record_key(&self, scope: &RecordScope<'_>) -> Result<RecordKey, Error> {
        let info = record_key_info(scope)?;
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hkdf_expand(&self.prk, &info, okm.as_mut_slice())?;
        let cipher =
            Aes256Gcm::new_from_slice(okm.as_slice()).map_err(|_| Error::TooLong("key"))?;
        Ok(RecordKey { cipher })
    }
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

/// A parsed (not yet authenticated) envelope borrowed from its bytes.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// Jurisdiction named in the header (authenticated only by [`RecordKey::open`]).
    pub jurisdiction: Jurisdiction,
    /// Key version named in the header (authenticated only by [`RecordKey::open`]).
    pub key_version: KeyVersion,
    header: &'a [u8],
    nonce: [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: [u8; TAG_LEN],
}

/// Smallest possible envelope: magic, version, 1-byte jurisdiction, version, nonce, tag.
pub const MIN_ENVELOPE_LEN: usize = 2 + 1 + 1 + 1 + 4 + NONCE_LEN + TAG_LEN;

impl<'a> Envelope<'a> {
    /// Parses the header of an envelope; authenticates nothing.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.len() < MIN_ENVELOPE_LEN {
            return Err(Error::Malformed("too short"));
        }
        let (magic, rest) = bytes.split_at(2);
        if magic != ENVELOPE_MAGIC {
            return Err(Error::Malformed("wrong magic bytes"));
        }
        let (&version, rest) = rest.split_first().ok_or(Error::Malformed("too short"))?;
        if version != ENVELOPE_VERSION {
            return Err(Error::Malformed("unsupported format version"));
        }
        let (&jurisdiction_len, rest) = rest.split_first().ok_or(Error::Malformed("too short"))?;
        let jurisdiction_len = usize::from(jurisdiction_len);
        if jurisdiction_len == 0 || jurisdiction_len > Jurisdiction::MAX_LEN {
            return Err(Error::Malformed("bad jurisdiction length"));
        }
        let jurisdiction = rest
            .get(..jurisdiction_len)
            .ok_or(Error::Malformed("too short"))?;
        let jurisdiction = std::str::from_utf8(jurisdiction)
            .ok()
            .and_then(|code| Jurisdiction::new(code).ok())
            .ok_or(Error::Malformed("bad jurisdiction code"))?;
        let rest = rest
            .get(jurisdiction_len..)
            .ok_or(Error::Malformed("too short"))?;
        if rest.len() < 4 + NONCE_LEN + TAG_LEN {
            return Err(Error::Malformed("too short"));
        }
        let (version_bytes, rest) = rest.split_at(4);
        let mut version = [0u8; 4];
        version.copy_from_slice(version_bytes);
        let key_version = KeyVersion::new(u32::from_be_bytes(version))
            .ok_or(Error::Malformed("key version zero"))?;
        let (nonce_bytes, rest) = rest.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(nonce_bytes);
        let (ciphertext, tag_bytes) = rest.split_at(rest.len() - TAG_LEN);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(tag_bytes);
        let header_len = bytes.len() - ciphertext.len() - TAG_LEN;
        let header = bytes
            .get(..header_len)
            .ok_or(Error::Malformed("too short"))?;
        Ok(Self {
            jurisdiction,
            key_version,
            header,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// Envelope header: `"RF" || 0x01 || u8 len || jurisdiction || u32be(key version) || nonce`.
fn envelope_header(
    jurisdiction: &Jurisdiction,
    key_version: KeyVersion,
    nonce: &[u8; NONCE_LEN],
    capacity: usize,
) -> Result<Vec<u8>, Error> {
    let code = jurisdiction.as_str().as_bytes();
    let code_len = u8::try_from(code.len()).map_err(|_| Error::TooLong("jurisdiction"))?;
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(&ENVELOPE_MAGIC);
    out.push(ENVELOPE_VERSION);
    out.push(code_len);
    out.extend_from_slice(code);
    out.extend_from_slice(&key_version.get().to_be_bytes());
    out.extend_from_slice(nonce);
    Ok(out)
}

/// Associated data of a field: `header || lp16(record_type) || lp16(record_id) ||
/// lp16(field_name)`. The header already carries jurisdiction and key version.
fn field_aad(header: &[u8], scope: &RecordScope<'_>, field: &FieldName) -> Result<Vec<u8>, Error> {
    let mut aad = Vec::with_capacity(header.len() + 8 + 64 + scope.record_id.as_str().len());
    aad.extend_from_slice(header);
    put_lp16(&mut aad, scope.record_type.as_str().as_bytes())?;
    put_lp16(&mut aad, scope.record_id.as_str().as_bytes())?;
    put_lp16(&mut aad, field.as_str().as_bytes())?;
    Ok(aad)
}

/// The AES-256-GCM key of one record. The cipher state is zeroized on drop.
pub struct RecordKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKey(<redacted>)")
    }
}

impl RecordKey {
    /// Encrypts one field into an envelope under `nonce`, which must never repeat
    /// under this key (use [`fresh_nonces`]).
    pub fn seal(
        &self,
        scope: &RecordScope<'_>,
        field: &FieldName,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let capacity =
            2 + 1 + 1 + Jurisdiction::MAX_LEN + 4 + NONCE_LEN + plaintext.len() + TAG_LEN;
        let mut envelope = envelope_header(scope.jurisdiction, scope.key_version, nonce, capacity)?;
        let header_len = envelope.len();
        let aad = field_aad(&envelope, scope, field)?;
        envelope.extend_from_slice(plaintext);
        let body = envelope
            .get_mut(header_len..)
            .ok_or(Error::Malformed("too short"))?;
        let nonce: Nonce<Aes256Gcm> = (*nonce).into();
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce, &aad, body.into())
            .map_err(|_| Error::TooLong("plaintext"))?;
        envelope.extend_from_slice(&tag);
        Ok(envelope)
    }

    /// Authenticates and decrypts one field. Any mismatch of bytes, field, record,
    /// record type, jurisdiction or key version is [`Error::Integrity`].
    pub fn open(
        &self,
        scope: &RecordScope<'_>,
        field: &FieldName,
        envelope: &Envelope<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        if &envelope.jurisdiction != scope.jurisdiction || envelope.key_version != scope.key_version
        {
            return Err(Error::Integrity);
        }
        let aad = field_aad(envelope.header, scope, field)?;
        let mut plaintext = Zeroizing::new(envelope.ciphertext.to_vec());
        let nonce: Nonce<Aes256Gcm> = envelope.nonce.into();
        let tag: Tag<Aes256Gcm> = envelope.tag.into();
        self.cipher
            .decrypt_inout_detached(&nonce, &aad, plaintext.as_mut_slice().into(), &tag)
            .map_err(|_| Error::Integrity)?;
        Ok(plaintext)
    }
}

/// The public name of one root key version (see [`DerivationKey::key_id`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }

    /// Parses 32 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(Self(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The wrapping key of one jurisdiction: seals that jurisdiction's root keys at rest
/// and authenticates its keyring metadata (docs/crypto.md, "Key hierarchy").
///
/// `WK_J` (32 bytes) comes from a master key source; two keys are expanded from it,
/// one per use: an AES-256-GCM sealing key and an HMAC-SHA256 metadata key.
pub struct WrappingKey {
    jurisdiction: Jurisdiction,
    seal: Aes256Gcm,
    mac: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappingKey({}, <redacted>)", self.jurisdiction)
    }
}

impl WrappingKey {
    /// `WK_J = HKDF-Expand(HKDF-Extract(MASTER_KEY_SALT, master),
    /// lp16("ringfence/v2 jurisdiction-wrapping-key") || lp16(J), 32)`.
    pub fn derive(master: &SecretKey, jurisdiction: &Jurisdiction) -> Result<Self, Error> {
        let prk = hkdf_extract(MASTER_KEY_SALT, master.expose());
        let mut info = Vec::with_capacity(64);
        put_lp16(&mut info, JURISDICTION_WRAP_LABEL)?;
        put_lp16(&mut info, jurisdiction.as_str().as_bytes())?;
        let mut wrapping = Zeroizing::new([0u8; KEY_LEN]);
        hkdf_expand(prk.as_slice(), &info, wrapping.as_mut_slice())?;
        Self::from_wrapping_key(&SecretKey::from_bytes(*wrapping), jurisdiction)
    }

    /// Builds the sealing and metadata keys from a jurisdiction's 32-byte wrapping key
    /// (uniformly random, so usable as an HKDF PRK, RFC 5869 section 3.3).
    pub fn from_wrapping_key(
        wrapping: &SecretKey,
        jurisdiction: &Jurisdiction,
    ) -> Result<Self, Error> {
        let expand = |label: &[u8]| -> Result<Zeroizing<[u8; KEY_LEN]>, Error> {
            let mut info = Vec::with_capacity(48);
            put_lp16(&mut info, label)?;
            let mut okm = Zeroizing::new([0u8; KEY_LEN]);
            hkdf_expand(wrapping.expose(), &info, okm.as_mut_slice())?;
            Ok(okm)
        };
        let seal_key = expand(SEAL_KEY_LABEL)?;
        let seal =
            Aes256Gcm::new_from_slice(seal_key.as_slice()).map_err(|_| Error::TooLong("key"))?;
        Ok(Self {
            jurisdiction: jurisdiction.clone(),
            seal,
            mac: expand(METADATA_MAC_LABEL)?,
        })
    }

    /// The jurisdiction this key belongs to.
    pub fn jurisdiction(&self) -> &Jurisdiction {
        &self.jurisdiction
    }

    fn aad(&self, version: KeyVersion, key_id: &KeyId) -> Result<Vec<u8>, Error> {
        let mut aad = Vec::with_capacity(64);
        put_lp16(&mut aad, SEAL_KEY_LABEL)?;
        put_lp16(&mut aad, self.jurisdiction.as_str().as_bytes())?;
        aad.extend_from_slice(&version.get().to_be_bytes());
        aad.extend_from_slice(&key_id.0);
        Ok(aad)
    }

    /// Seals a root key bound to this jurisdiction, its version and its key id:
    /// `nonce || ct || tag`.
    pub fn seal(
        &self,
        version: KeyVersion,
        key_id: &KeyId,
        root: &SecretKey,
    ) -> Result<Vec<u8>, Error> {
        seal_under(&self.seal, &self.aad(version, key_id)?, root)
    }

    /// Opens a sealed root key; [`Error::Integrity`] under a wrong master key or when
    /// the sealed value was moved to another jurisdiction, version or key id.
    pub fn open(
        &self,
        version: KeyVersion,
        key_id: &KeyId,
        sealed: &[u8],
    ) -> Result<SecretKey, Error> {
        open_under(&self.seal, &self.aad(version, key_id)?, sealed)
    }

    /// HMAC-SHA256 of `message` under the metadata key.
    pub fn authenticate(&self, message: &[u8]) -> Result<[u8; 32], Error> {
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.mac.as_slice())
            .map_err(|_| Error::TooLong("key"))?;
        mac.update(message);
        let mut tag = [0u8; 32];
        tag.copy_from_slice(&mac.finalize().into_bytes());
        Ok(tag)
    }

    /// Checks a tag from [`WrappingKey::authenticate`] in constant time.
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> Result<(), Error> {
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.mac.as_slice())
            .map_err(|_| Error::TooLong("key"))?;
        mac.update(message);
        mac.verify_slice(tag).map_err(|_| Error::Integrity)
    }
}

fn seal_under(cipher: &Aes256Gcm, aad: &[u8], root: &SecretKey) -> Result<Vec<u8>, Error> {
    let [nonce] = fresh_nonces(1)?.try_into().map_err(|_| Error::Random)?;
    let mut sealed = Vec::with_capacity(SEALED_KEY_LEN);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(root.expose());
    let body = sealed
        .get_mut(NONCE_LEN..)
        .ok_or(Error::Malformed("too short"))?;
    let nonce: Nonce<Aes256Gcm> = nonce.into();
    let tag = cipher
        .encrypt_inout_detached(&nonce, aad, body.into())
        .map_err(|_| Error::TooLong("root key"))?;
    sealed.extend_from_slice(&tag);
    Ok(sealed)
}

fn open_under(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<SecretKey, Error> {
    if sealed.len() != SEALED_KEY_LEN {
        return Err(Error::Integrity);
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(KEY_LEN);
    let mut key = SecretKey([0u8; KEY_LEN]);
    key.0.copy_from_slice(body);
    let mut nonce_bytes = [0u8; NONCE_LEN];
    nonce_bytes.copy_from_slice(nonce);
    let mut tag_bytes = [0u8; TAG_LEN];
    tag_bytes.copy_from_slice(tag);
    let nonce: Nonce<Aes256Gcm> = nonce_bytes.into();
    let tag: Tag<Aes256Gcm> = tag_bytes.into();
    let result = cipher.decrypt_inout_detached(&nonce, aad, key.0.as_mut_slice().into(), &tag);
    // On failure `key` holds garbage and is zeroized as it drops.
    result.map(|()| key).map_err(|_| Error::Integrity)
}

/// Opens root keys of the format-1 keyring (one key-wrapping key for every
/// jurisdiction, unauthenticated metadata). Only `keys migrate` reads that format.
pub struct LegacyKeyWrapper {
    cipher: Aes256Gcm,
}

impl fmt::Debug for LegacyKeyWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LegacyKeyWrapper(<redacted>)")
    }
}

/// Length of a sealed root key: nonce, encrypted key, tag.
pub const SEALED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

impl LegacyKeyWrapper {
    /// `wrap = HKDF-Expand(HKDF-Extract(MASTER_KEY_SALT, master), lp16(label), 32)`.
    pub fn new(master: &SecretKey) -> Result<Self, Error> {
        let prk = hkdf_extract(MASTER_KEY_SALT, master.expose());
        let mut info = Vec::new();
        put_lp16(&mut info, KEY_WRAP_LABEL)?;
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hkdf_expand(prk.as_slice(), &info, okm.as_mut_slice())?;
        let cipher =
            Aes256Gcm::new_from_slice(okm.as_slice()).map_err(|_| Error::TooLong("key"))?;
        Ok(Self { cipher })
    }

    fn aad(jurisdiction: &Jurisdiction, version: KeyVersion) -> Result<Vec<u8>, Error> {
        let mut aad = Vec::with_capacity(64);
        put_lp16(&mut aad, ROOT_KEY_AAD_LABEL)?;
        put_lp16(&mut aad, jurisdiction.as_str().as_bytes())?;
        aad.extend_from_slice(&version.get().to_be_bytes());
        Ok(aad)
    }

    /// Seals a root key in the format-1 way (kept to test migration).
    pub fn seal(
        &self,
        jurisdiction: &Jurisdiction,
        version: KeyVersion,
        root: &SecretKey,
    ) -> Result<Vec<u8>, Error> {
        seal_under(&self.cipher, &Self::aad(jurisdiction, version)?, root)
    }

    /// Opens a format-1 sealed root key; fails with [`Error::Integrity`] under a wrong
    /// master key or when the key was moved to another jurisdiction or version.
    pub fn open(
        &self,
        jurisdiction: &Jurisdiction,
        version: KeyVersion,
        sealed: &[u8],
    ) -> Result<SecretKey, Error> {
        open_under(&self.cipher, &Self::aad(jurisdiction, version)?, sealed)
    }
}

#[cfg(test)]
mod tests;
