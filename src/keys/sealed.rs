//! The keyring file format: each jurisdiction's versions sealed under its wrapping key
//! and its metadata authenticated (`docs/crypto.md`, "Keyring"); opening one checks
//! both. May not lock or write files.

use super::*;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyringFile {
    pub(super) format: String,
    pub(super) jurisdictions: BTreeMap<String, JurisdictionFile>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct JurisdictionFile {
    pub(super) generation: u64,
    pub(super) current: u32,
    pub(super) versions: Vec<VersionFile>,
    /// Hex HMAC-SHA256 of the metadata (docs/crypto.md, "Authenticated metadata").
    pub(super) mac: String,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionFile {
    pub(super) version: u32,
    pub(super) key_id: String,
    pub(super) created_at: String,
    /// base64 of `nonce || sealed key || tag`.
    pub(super) sealed: String,
}

pub(super) struct VersionKeys {
    pub(super) derivation: DerivationKey,
    pub(super) key_id: KeyId,
    pub(super) created_at: String,
    pub(super) sealed: Vec<u8>,
}

pub(super) struct JurisdictionKeys {
    pub(super) wrapping: WrappingKey,
    pub(super) generation: u64,
    pub(super) current: KeyVersion,
    pub(super) versions: BTreeMap<KeyVersion, VersionKeys>,
}

impl JurisdictionKeys {
    /// The authenticated bytes: `lp16(label) || lp16(J) || u64be(generation) ||
    /// u32be(current) || u32be(count) || per version ascending: u32be(version) ||
    /// key_id || lp16(created_at) || lp16(sealed)`.
    pub(super) fn metadata(&self) -> Result<Vec<u8>, crypto::Error> {
        metadata_bytes(
            self.wrapping.jurisdiction(),
            self.generation,
            self.current,
            self.versions.iter().map(|(version, keys)| {
                (
                    *version,
                    &keys.key_id,
                    keys.created_at.as_str(),
                    keys.sealed.as_slice(),
                )
            }),
        )
    }
}

pub(super) fn metadata_bytes<'a>(
    jurisdiction: &Jurisdiction,
    generation: u64,
    current: KeyVersion,
    versions: impl ExactSizeIterator<Item = (KeyVersion, &'a KeyId, &'a str, &'a [u8])>,
) -> Result<Vec<u8>, crypto::Error> {
    let mut out = Vec::with_capacity(64 + versions.len() * 128);
    crypto::put_lp16(&mut out, METADATA_LABEL)?;
    crypto::put_lp16(&mut out, jurisdiction.as_str().as_bytes())?;
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&current.get().to_be_bytes());
    let count =
        u32::try_from(versions.len()).map_err(|_| crypto::Error::TooLong("version list"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (version, key_id, created_at, sealed) in versions {
        out.extend_from_slice(&version.get().to_be_bytes());
        out.extend_from_slice(key_id.as_bytes());
        crypto::put_lp16(&mut out, created_at.as_bytes())?;
        crypto::put_lp16(&mut out, sealed)?;
    }
    Ok(out)
}

pub(super) fn new_version(
    wrapping: &WrappingKey,
    version: KeyVersion,
) -> Result<(VersionKeys, KeyId), Error> {
    let root = SecretKey::generate()?;
    let derivation = DerivationKey::from_root(&root);
    let key_id = derivation.key_id(wrapping.jurisdiction(), version)?;
    let sealed = wrapping.seal(version, &key_id, &root)?;
    Ok((
        VersionKeys {
            derivation,
            key_id,
            created_at: crate::record::rfc3339_now(),
            sealed,
        },
        key_id,
    ))
}

pub(super) enum Opening {
    Invalid(String),
    Unauthentic(String),
    KeyId(KeyVersion, KeyId),
    Crypto(crypto::Error),
}

pub(super) fn open_jurisdiction(
    wrapping: WrappingKey,
    entry: &JurisdictionFile,
) -> Result<JurisdictionKeys, Opening> {
    let current = KeyVersion::new(entry.current)
        .ok_or_else(|| Opening::Invalid("current version 0".to_owned()))?;
    if entry.generation == 0 {
        return Err(Opening::Invalid("generation 0".to_owned()));
    }
    let mut parsed = BTreeMap::new();
    for version_entry in &entry.versions {
        let version = KeyVersion::new(version_entry.version)
            .ok_or_else(|| Opening::Invalid("version 0".to_owned()))?;
        let key_id = KeyId::parse(&version_entry.key_id)
            .ok_or_else(|| Opening::Invalid(format!("v{version}: key id is not 32 hex digits")))?;
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&version_entry.sealed)
            .map_err(|_| Opening::Invalid(format!("v{version}: sealed key is not base64")))?;
        if parsed
            .insert(version, (key_id, version_entry.created_at.as_str(), sealed))
            .is_some()
        {
            return Err(Opening::Invalid(format!("version {version} appears twice")));
        }
    }
    let tag =
        hex::decode(&entry.mac).map_err(|_| Opening::Invalid("`mac` is not hex".to_owned()))?;
    let metadata = metadata_bytes(
        wrapping.jurisdiction(),
        entry.generation,
        current,
        parsed
            .iter()
            .map(|(version, (key_id, created_at, sealed))| {
                (*version, key_id, *created_at, sealed.as_slice())
            }),
    )
    .map_err(Opening::Crypto)?;
    // The tag covers generation, current version and the whole version list: checked
    // before any key is unsealed, so an edited file is refused whole.
    wrapping
        .verify(&metadata, &tag)
        .map_err(|_| Opening::Unauthentic("metadata tag".to_owned()))?;
    if !parsed.contains_key(&current) {
        return Err(Opening::Invalid(format!(
            "current version {current} is not in the keyring"
        )));
    }
    let mut versions = BTreeMap::new();
    for (version, (key_id, created_at, sealed)) in parsed {
        let root = wrapping
            .open(version, &key_id, &sealed)
            .map_err(|_| Opening::Unauthentic(format!("sealed key v{version}")))?;
        let derivation = DerivationKey::from_root(&root);
        let actual = derivation
            .key_id(wrapping.jurisdiction(), version)
            .map_err(Opening::Crypto)?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            actual.as_bytes().as_slice(),
            key_id.as_bytes().as_slice(),
        )) {
            return Err(Opening::KeyId(version, key_id));
        }
        versions.insert(
            version,
            VersionKeys {
                derivation,
                key_id,
                created_at: created_at.to_owned(),
                sealed,
            },
        );
    }
    Ok(JurisdictionKeys {
        wrapping,
        generation: entry.generation,
        current,
        versions,
    })
}
