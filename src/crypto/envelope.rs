//! Field envelopes: the byte layout of a sealed field, its associated data, and the
//! per-record key that seals and opens fields (`docs/crypto.md`, "Envelope").

use super::*;

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
pub(super) fn envelope_header(
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
pub(super) fn field_aad(
    header: &[u8],
    scope: &RecordScope<'_>,
    field: &FieldName,
) -> Result<Vec<u8>, Error> {
    let mut aad = Vec::with_capacity(header.len() + 8 + 64 + scope.record_id.as_str().len());
    aad.extend_from_slice(header);
    put_lp16(&mut aad, scope.record_type.as_str().as_bytes())?;
    put_lp16(&mut aad, scope.record_id.as_str().as_bytes())?;
    put_lp16(&mut aad, field.as_str().as_bytes())?;
    Ok(aad)
}

/// The AES-256-GCM key of one record. The cipher state is zeroized on drop.
pub struct RecordKey {
    pub(super) cipher: Aes256Gcm,
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
