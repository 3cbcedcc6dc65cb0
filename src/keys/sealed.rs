//! The keyring file format: each jurisdiction's versions sealed under its wrapping key
//! and its metadata authenticated (`docs/crypto.md`, "Keyring"); opening one checks
//! both. Reads formats 2 and 3, writes 3. May not lock or write files.

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
    /// Versions below this one are retired (format 3; absent in format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) min_decryption_version: Option<u32>,
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
    /// base64 of `nonce || sealed key || tag`; absent once the version is destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sealed: Option<String>,
    /// When the version was destroyed (format 3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) destroyed_at: Option<String>,
}

/// One version in memory: its PRK and sealed bytes while it is held, its tombstone
/// (key id, dates) once destroyed. Cloning shares the PRK.
#[derive(Clone)]
pub(super) struct VersionKeys {
    pub(super) key_id: KeyId,
    pub(super) created_at: String,
    pub(super) held: Held,
}

/// What is left of a version's key.
#[derive(Clone)]
pub(super) enum Held {
    /// The PRK, and the root key as sealed at rest.
    Key {
        derivation: Arc<DerivationKey>,
        /// Wiped when dropped: once a version is destroyed and the last keyring that
        /// held it is gone, not even its sealed form stays in memory.
        sealed: zeroize::Zeroizing<Vec<u8>>,
    },
    /// Destroyed at this time: nothing left that opens its envelopes.
    Destroyed { at: String },
}

impl VersionKeys {
    pub(super) fn held(
        derivation: DerivationKey,
        key_id: KeyId,
        created_at: String,
        sealed: Vec<u8>,
    ) -> Self {
        Self {
            key_id,
            created_at,
            held: Held::Key {
                derivation: Arc::new(derivation),
                sealed: zeroize::Zeroizing::new(sealed),
            },
        }
    }

    pub(super) fn derivation(&self) -> Option<&DerivationKey> {
        match &self.held {
            Held::Key { derivation, .. } => Some(derivation),
            Held::Destroyed { .. } => None,
        }
    }
}

/// One jurisdiction's keys in memory. Cloning shares the wrapping key and the PRKs.
#[derive(Clone)]
pub(super) struct JurisdictionKeys {
    pub(super) wrapping: Arc<WrappingKey>,
    pub(super) generation: u64,
    pub(super) current: KeyVersion,
    /// Versions below this one are retired or destroyed.
    pub(super) min_decryption: KeyVersion,
    pub(super) versions: BTreeMap<KeyVersion, VersionKeys>,
}

/// A version as the metadata authenticates it: number, key id, creation time and
/// either the sealed key or the time it was destroyed.
pub(super) struct VersionMeta<'a> {
    pub(super) version: KeyVersion,
    pub(super) key_id: &'a KeyId,
    pub(super) created_at: &'a str,
    pub(super) sealed: Result<&'a [u8], &'a str>,
}

impl JurisdictionKeys {
    /// The authenticated bytes of format 3 ([`metadata_bytes`]).
    pub(super) fn metadata(&self) -> Result<Vec<u8>, crypto::Error> {
        metadata_bytes(
            self.wrapping.jurisdiction(),
            self.generation,
            self.current,
            Some(self.min_decryption),
            self.versions.iter().map(|(version, keys)| VersionMeta {
                version: *version,
                key_id: &keys.key_id,
                created_at: keys.created_at.as_str(),
                sealed: match &keys.held {
                    Held::Key { sealed, .. } => Ok(sealed.as_slice()),
                    Held::Destroyed { at } => Err(at.as_str()),
                },
            }),
        )
    }
}

/// The authenticated bytes (`docs/crypto.md`, "Authenticated metadata").
///
/// Format 2 (`min_decryption` `None`; every version held): `lp16(label2) || lp16(J) ||
/// u64be(generation) || u32be(current) || u32be(count) || per version ascending:
/// u32be(version) || key_id || lp16(created_at) || lp16(sealed)`.
///
/// Format 3: `lp16(label3) || lp16(J) || u64be(generation) || u32be(current) ||
/// u32be(min_decryption) || u32be(count) || per version ascending: u32be(version) ||
/// key_id || lp16(created_at) || u8(0) || lp16(sealed)` for a held version, `... ||
/// u8(1) || lp16(destroyed_at)` for a destroyed one.
pub(super) fn metadata_bytes<'a>(
    jurisdiction: &Jurisdiction,
    generation: u64,
    current: KeyVersion,
    min_decryption: Option<KeyVersion>,
    versions: impl ExactSizeIterator<Item = VersionMeta<'a>>,
) -> Result<Vec<u8>, crypto::Error> {
    let mut out = Vec::with_capacity(64 + versions.len() * 128);
    let label = match min_decryption {
        Some(_) => METADATA_LABEL,
        None => METADATA_LABEL_V2,
    };
    crypto::put_lp16(&mut out, label)?;
    crypto::put_lp16(&mut out, jurisdiction.as_str().as_bytes())?;
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&current.get().to_be_bytes());
    if let Some(min) = min_decryption {
        out.extend_from_slice(&min.get().to_be_bytes());
    }
    let count =
        u32::try_from(versions.len()).map_err(|_| crypto::Error::TooLong("version list"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for meta in versions {
        out.extend_from_slice(&meta.version.get().to_be_bytes());
        out.extend_from_slice(meta.key_id.as_bytes());
        crypto::put_lp16(&mut out, meta.created_at.as_bytes())?;
        match (min_decryption, meta.sealed) {
            (None, Ok(sealed)) => crypto::put_lp16(&mut out, sealed)?,
            (None, Err(_)) => return Err(crypto::Error::TooLong("destroyed version in format 2")),
            (Some(_), Ok(sealed)) => {
                out.push(0);
                crypto::put_lp16(&mut out, sealed)?;
            }
            (Some(_), Err(destroyed_at)) => {
                out.push(1);
                crypto::put_lp16(&mut out, destroyed_at.as_bytes())?;
            }
        }
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
        VersionKeys::held(derivation, key_id, crate::record::rfc3339_now(), sealed),
        key_id,
    ))
}

pub(super) enum Opening {
    Invalid(String),
    Unauthentic(String),
    KeyId(KeyVersion, KeyId),
    Crypto(crypto::Error),
}

/// Opens one jurisdiction of a file in format 3 (`format3`) or 2: the metadata tag
/// first, then every held key, each checked against its key id.
pub(super) fn open_jurisdiction(
    wrapping: WrappingKey,
    entry: &JurisdictionFile,
    format3: bool,
) -> Result<JurisdictionKeys, Opening> {
    let current = KeyVersion::new(entry.current)
        .ok_or_else(|| Opening::Invalid("current version 0".to_owned()))?;
    if entry.generation == 0 {
        return Err(Opening::Invalid("generation 0".to_owned()));
    }
    let min_decryption = match (format3, entry.min_decryption_version) {
        (true, Some(min)) => Some(
            KeyVersion::new(min)
                .ok_or_else(|| Opening::Invalid("min_decryption_version 0".to_owned()))?,
        ),
        (true, None) => {
            return Err(Opening::Invalid(
                "no `min_decryption_version` (required in format 3)".to_owned(),
            ));
        }
        (false, Some(_)) => {
            return Err(Opening::Invalid(
                "`min_decryption_version` is not part of format 2".to_owned(),
            ));
        }
        (false, None) => None,
    };
    let mut parsed = BTreeMap::new();
    for version_entry in &entry.versions {
        let version = KeyVersion::new(version_entry.version)
            .ok_or_else(|| Opening::Invalid("version 0".to_owned()))?;
        let key_id = KeyId::parse(&version_entry.key_id)
            .ok_or_else(|| Opening::Invalid(format!("v{version}: key id is not 32 hex digits")))?;
        let sealed = match (&version_entry.sealed, &version_entry.destroyed_at, format3) {
            (Some(sealed), None, _) => Ok(base64::engine::general_purpose::STANDARD
                .decode(sealed)
                .map_err(|_| Opening::Invalid(format!("v{version}: sealed key is not base64")))?),
            (None, Some(at), true) => Err(at.as_str()),
            _ => {
                return Err(Opening::Invalid(format!(
                    "v{version}: needs `sealed` or (format 3) `destroyed_at`, not both"
                )));
            }
        };
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
        min_decryption,
        parsed
            .iter()
            .map(|(version, (key_id, created_at, sealed))| VersionMeta {
                version: *version,
                key_id,
                created_at,
                sealed: sealed.as_ref().map(Vec::as_slice).map_err(|at| *at),
            }),
    )
    .map_err(Opening::Crypto)?;
    // The tag covers generation, current version, the retirement threshold and the
    // whole version list: checked before any key is unsealed, so an edited file is
    // refused whole.
    wrapping
        .verify(&metadata, &tag)
        .map_err(|_| Opening::Unauthentic("metadata tag".to_owned()))?;
    let min_decryption = min_decryption.unwrap_or(KeyVersion::FIRST);
    match parsed.get(&current) {
        Some((_, _, Ok(_))) if min_decryption <= current => {}
        Some((_, _, Ok(_))) => {
            return Err(Opening::Invalid(format!(
                "current version {current} is retired (min_decryption_version {min_decryption})"
            )));
        }
        Some((_, _, Err(_))) => {
            return Err(Opening::Invalid(format!(
                "current version {current} is destroyed"
            )));
        }
        None => {
            return Err(Opening::Invalid(format!(
                "current version {current} is not in the keyring"
            )));
        }
    }
    let mut versions = BTreeMap::new();
    for (version, (key_id, created_at, sealed)) in parsed {
        let keys = match sealed {
            Err(at) => VersionKeys {
                key_id,
                created_at: created_at.to_owned(),
                held: Held::Destroyed { at: at.to_owned() },
            },
            Ok(sealed) => {
                let root = wrapping
                    .open(version, &key_id, &sealed)
                    .map_err(|_| Opening::Unauthentic(format!("sealed key v{version}")))?;
                let derivation = DerivationKey::from_root(&root);
                check_key_id(&wrapping, version, &key_id, &derivation)?;
                VersionKeys::held(derivation, key_id, created_at.to_owned(), sealed)
            }
        };
        versions.insert(version, keys);
    }
    Ok(JurisdictionKeys {
        wrapping: Arc::new(wrapping),
        generation: entry.generation,
        current,
        min_decryption,
        versions,
    })
}

/// Refuses a root key whose key id is not the one stored for it.
pub(super) fn check_key_id(
    wrapping: &WrappingKey,
    version: KeyVersion,
    key_id: &KeyId,
    derivation: &DerivationKey,
) -> Result<(), Opening> {
    let actual = derivation
        .key_id(wrapping.jurisdiction(), version)
        .map_err(Opening::Crypto)?;
    if bool::from(subtle::ConstantTimeEq::ct_eq(
        actual.as_bytes().as_slice(),
        key_id.as_bytes().as_slice(),
    )) {
        Ok(())
    } else {
        Err(Opening::KeyId(version, *key_id))
    }
}
