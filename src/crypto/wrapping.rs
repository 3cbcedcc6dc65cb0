//! Root keys at rest: key ids, the per-jurisdiction wrapping key that seals them, and
//! the format-1 wrapper `keys migrate` reads (`docs/crypto.md`, "Keyring").

use super::*;

/// The public name of one root key version (see [`DerivationKey::key_id`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub(super) [u8; KEY_ID_LEN]);

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
    subjects: Aes256Gcm,
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
        let subjects = Aes256Gcm::new_from_slice(expand(SUBJECT_SEAL_LABEL)?.as_slice())
            .map_err(|_| Error::TooLong("key"))?;
        Ok(Self {
            jurisdiction: jurisdiction.clone(),
            seal,
            subjects,
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

    fn subject_aad(&self, subject: &SubjectId) -> Result<Vec<u8>, Error> {
        let mut aad = Vec::with_capacity(64 + subject.as_str().len());
        put_lp16(&mut aad, SUBJECT_SEAL_LABEL)?;
        put_lp16(&mut aad, self.jurisdiction.as_str().as_bytes())?;
        put_lp16(&mut aad, subject.as_str().as_bytes())?;
        Ok(aad)
    }

    /// Seals a subject's secret bound to this jurisdiction and the subject id, under
    /// the subject-sealing key `HKDF-Expand(WK_J, lp16("ringfence/v2
    /// subject-secret-seal"), 32)`: `nonce || ct || tag` ([`SEALED_SUBJECT_LEN`]).
    pub fn seal_subject(
        &self,
        subject: &SubjectId,
        secret: &SubjectSecret,
    ) -> Result<Vec<u8>, Error> {
        let key = SecretKey(secret.0);
        seal_under(&self.subjects, &self.subject_aad(subject)?, &key)
    }

    /// Opens a sealed subject secret; [`Error::Integrity`] under a wrong master key
    /// or when the sealed value was moved to another jurisdiction or subject.
    pub fn open_subject(&self, subject: &SubjectId, sealed: &[u8]) -> Result<SubjectSecret, Error> {
        let key = open_under(&self.subjects, &self.subject_aad(subject)?, sealed)?;
        Ok(SubjectSecret(*key.expose()))
    }

    /// The check value a subject store keeps per jurisdiction to tell which master key
    /// sealed it: `HMAC(metadata key, lp16("ringfence/v2 subject-store-check") ||
    /// lp16(J))`, hex. Reveals nothing about the key.
    pub fn subject_store_check(&self) -> Result<String, Error> {
        let mut message = Vec::with_capacity(64);
        put_lp16(&mut message, SUBJECT_STORE_CHECK_LABEL)?;
        put_lp16(&mut message, self.jurisdiction.as_str().as_bytes())?;
        Ok(hex::encode(self.authenticate(&message)?))
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

pub(super) fn seal_under(
    cipher: &Aes256Gcm,
    aad: &[u8],
    root: &SecretKey,
) -> Result<Vec<u8>, Error> {
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

pub(super) fn open_under(
    cipher: &Aes256Gcm,
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretKey, Error> {
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
/// Length of a sealed subject secret: nonce, encrypted secret, tag.
pub const SEALED_SUBJECT_LEN: usize = SEALED_KEY_LEN;

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
