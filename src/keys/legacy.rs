//! The format-1 keyring (`ringfence-keyring/1`: one wrapping key for all jurisdictions,
//! unauthenticated metadata), read once by `keys migrate` and never written.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use super::{
    Error, JurisdictionKeys, KeyEvent, Keyring, LEGACY_KEYRING_FORMAT, MasterKeySource, VersionKeys,
};
use crate::crypto::DerivationKey;
use crate::record::{Jurisdiction, KeyVersion};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    format: String,
    jurisdictions: BTreeMap<String, LegacyJurisdiction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyJurisdiction {
    current: u32,
    versions: Vec<LegacyVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyVersion {
    version: u32,
    created_at: String,
    sealed: String,
}

/// Reads the format-1 keyring at `path` and returns it converted: every root key
/// re-sealed under its jurisdiction's wrapping key with its key id, metadata
/// authenticated, generation 1, the same current versions. Nothing is written: the
/// caller saves it (holding the keyring lock) and logs the events, one per version.
pub fn migrate(
    path: &Path,
    master: &dyn MasterKeySource,
) -> Result<(Keyring, Vec<KeyEvent>), Error> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NoKeyring(path.to_owned()),
        _ => Error::Io {
            action: "cannot read keyring",
            path: path.to_owned(),
            source,
        },
    })?;
    let format = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|error| invalid(error.to_string()))?
        .get("format")
        .and_then(|format| format.as_str().map(str::to_owned));
    if let Some(current @ (super::KEYRING_FORMAT | super::PREVIOUS_KEYRING_FORMAT)) =
        format.as_deref()
    {
        return Err(invalid(format!(
            "already in format `{current}`: nothing to migrate"
        )));
    }
    let file: LegacyFile =
        serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
    if file.format != LEGACY_KEYRING_FORMAT {
        return Err(invalid(format!(
            "unsupported format `{}`, expected `{LEGACY_KEYRING_FORMAT}`",
            crate::record::shown(&file.format)
        )));
    }
    let legacy = master.legacy_wrapper()?;
    let mut keyring = Keyring::empty(path);
    let mut events = Vec::new();
    for (code, entry) in &file.jurisdictions {
        let jurisdiction = Jurisdiction::new(code).map_err(|e| invalid(e.to_string()))?;
        let current = KeyVersion::new(entry.current)
            .ok_or_else(|| invalid(format!("`{code}`: current version 0")))?;
        let wrapping = master.wrapping_key(&jurisdiction)?;
        let mut versions = BTreeMap::new();
        for version_entry in &entry.versions {
            let version = KeyVersion::new(version_entry.version)
                .ok_or_else(|| invalid(format!("`{code}`: version 0")))?;
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(&version_entry.sealed)
                .map_err(|_| invalid(format!("`{code}` v{version}: sealed key is not base64")))?;
            let root = legacy.open(&jurisdiction, version, &sealed).map_err(|_| {
                Error::WrongMasterKey {
                    path: path.to_owned(),
                    source_name: master.describe(),
                }
            })?;
            let derivation = DerivationKey::from_root(&root);
            let key_id = derivation.key_id(&jurisdiction, version)?;
            let resealed = wrapping.seal(version, &key_id, &root)?;
            let keys = VersionKeys::held(
                derivation,
                key_id,
                version_entry.created_at.clone(),
                resealed,
            );
            if versions.insert(version, keys).is_some() {
                return Err(invalid(format!(
                    "`{code}`: version {version} appears twice"
                )));
            }
            events.push(KeyEvent {
                operation: "migrate",
                jurisdiction: jurisdiction.clone(),
                version,
                key_id,
                generation: 1,
            });
        }
        if !versions.contains_key(&current) {
            return Err(invalid(format!(
                "`{code}`: current version {current} is not in the keyring"
            )));
        }
        keyring.keys.insert(
            jurisdiction,
            JurisdictionKeys {
                wrapping: std::sync::Arc::new(wrapping),
                generation: 1,
                current,
                min_decryption: KeyVersion::FIRST,
                versions,
            },
        );
    }
    Ok((keyring, events))
}
