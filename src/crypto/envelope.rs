//! Field envelopes: the byte layout of a sealed field, its associated data, and the
//! per-record key that seals and opens fields (`docs/crypto.md`, "Envelope").

use super::*;

/// A parsed (not yet authenticated) envelope borrowed from its bytes.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// Format version: 1 or 2.
    pub format: u8,
    /// Jurisdiction named in the header (authenticated only by [`RecordKey::open`]).
    pub jurisdiction: Jurisdiction,
    /// Key version named in the header (authenticated only by [`RecordKey::open`]).
    pub key_version: KeyVersion,
    /// Format 2: the root key's id (authenticated only by [`RecordKey::open`]).
    pub key_id: Option<KeyId>,
    /// Format 2: the data subject, a valid [`SubjectId`] (authenticated only by
    /// [`RecordKey::open`]).
    pub subject: Option<&'a str>,
    header: &'a [u8],
    nonce: [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    tag: [u8; TAG_LEN],
}

/// Smallest possible envelope: magic, version, 1-byte jurisdiction, version, nonce, tag
/// (format 1; format 2 adds a key id and a subject).
pub const MIN_ENVELOPE_LEN: usize = 2 + 1 + 1 + 1 + 4 + NONCE_LEN + TAG_LEN;

/// Reads `len` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a [u8], Error> {
    if rest.len() < len {
        return Err(Error::Malformed("too short"));
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

fn take_array<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    out.copy_from_slice(take(rest, N)?);
    Ok(out)
}

impl<'a> Envelope<'a> {
    /// Parses the header of an envelope (format 1 or 2); authenticates nothing.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.len() < MIN_ENVELOPE_LEN {
            return Err(Error::Malformed("too short"));
        }
        let mut rest = bytes;
        if take(&mut rest, 2)? != ENVELOPE_MAGIC {
            return Err(Error::Malformed("wrong magic bytes"));
        }
        let [format] = take_array::<1>(&mut rest)?;
        if format != ENVELOPE_VERSION && format != ENVELOPE_VERSION_1 {
            return Err(Error::Malformed("unsupported format version"));
        }
        let [jurisdiction_len] = take_array::<1>(&mut rest)?;
        let jurisdiction_len = usize::from(jurisdiction_len);
        if jurisdiction_len == 0 || jurisdiction_len > Jurisdiction::MAX_LEN {
            return Err(Error::Malformed("bad jurisdiction length"));
        }
        let jurisdiction = std::str::from_utf8(take(&mut rest, jurisdiction_len)?)
            .ok()
            .and_then(|code| Jurisdiction::new(code).ok())
            .ok_or(Error::Malformed("bad jurisdiction code"))?;
        let key_version = KeyVersion::new(u32::from_be_bytes(take_array(&mut rest)?))
            .ok_or(Error::Malformed("key version zero"))?;
        let (key_id, subject) = if format == ENVELOPE_VERSION {
            let key_id = KeyId(take_array(&mut rest)?);
            let subject_len = usize::from(u16::from_be_bytes(take_array(&mut rest)?));
            if subject_len == 0 || subject_len > SubjectId::MAX_LEN {
                return Err(Error::Malformed("bad subject length"));
            }
            let subject = std::str::from_utf8(take(&mut rest, subject_len)?)
                .ok()
                .filter(|id| SubjectId::check(id).is_ok())
                .ok_or(Error::Malformed("bad subject id"))?;
            (Some(key_id), Some(subject))
        } else {
            (None, None)
        };
        let nonce = take_array::<NONCE_LEN>(&mut rest)?;
        if rest.len() < TAG_LEN {
            return Err(Error::Malformed("too short"));
        }
        let header_len = bytes.len() - rest.len();
        let (ciphertext, tag_bytes) = rest.split_at(rest.len() - TAG_LEN);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(tag_bytes);
        let header = bytes
            .get(..header_len)
            .ok_or(Error::Malformed("too short"))?;
        Ok(Self {
            format,
            jurisdiction,
            key_version,
            key_id,
            subject,
            header,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// Envelope header. Format 1: `"RF" || 0x01 || u8 len || jurisdiction || u32be(key
/// version) || nonce`. Format 2: `"RF" || 0x02 || u8 len || jurisdiction || u32be(key
/// version) || key_id (16) || lp16(subject) || nonce`.
pub(super) fn envelope_header(
    jurisdiction: &Jurisdiction,
    key_version: KeyVersion,
    subject: Option<&(SubjectId, KeyId)>,
    nonce: &[u8; NONCE_LEN],
    capacity: usize,
) -> Result<Vec<u8>, Error> {
    let code = jurisdiction.as_str().as_bytes();
    let code_len = u8::try_from(code.len()).map_err(|_| Error::TooLong("jurisdiction"))?;
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(&ENVELOPE_MAGIC);
    out.push(if subject.is_some() {
        ENVELOPE_VERSION
    } else {
        ENVELOPE_VERSION_1
    });
    out.push(code_len);
    out.extend_from_slice(code);
    out.extend_from_slice(&key_version.get().to_be_bytes());
    if let Some((subject, key_id)) = subject {
        out.extend_from_slice(&key_id.0);
        put_lp16(&mut out, subject.as_str().as_bytes())?;
    }
    out.extend_from_slice(nonce);
    Ok(out)
}

/// Associated data of a field: `header || lp16(record_type) || lp16(record_id) ||
/// lp16(field_name)`. The header already carries jurisdiction and key version (and,
/// in format 2, key id and subject).
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
    /// Format 2: the subject and root key id the key was derived for (written into
    /// and checked against envelope headers); `None` for format 1.
    pub(super) subject: Option<(SubjectId, KeyId)>,
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
        let subject_len = self
            .subject
            .as_ref()
            .map_or(0, |(subject, _)| KEY_ID_LEN + 2 + subject.as_str().len());
        let capacity = 2
            + 1
            + 1
            + Jurisdiction::MAX_LEN
            + 4
            + subject_len
            + NONCE_LEN
            + plaintext.len()
            + TAG_LEN;
        let mut envelope = envelope_header(
            scope.jurisdiction,
            scope.key_version,
            self.subject.as_ref(),
            nonce,
            capacity,
        )?;
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
    /// record type, jurisdiction, key version, format, key id or subject is
    /// [`Error::Integrity`].
    pub fn open(
        &self,
        scope: &RecordScope<'_>,
        field: &FieldName,
        envelope: &Envelope<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let same_subject = match &self.subject {
            None => envelope.format == ENVELOPE_VERSION_1,
            Some((subject, key_id)) => {
                envelope.format == ENVELOPE_VERSION
                    && envelope.subject == Some(subject.as_str())
                    && envelope.key_id.as_ref() == Some(key_id)
            }
        };
        if &envelope.jurisdiction != scope.jurisdiction
            || envelope.key_version != scope.key_version
            || !same_subject
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
