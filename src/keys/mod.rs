//! The keyring: per-jurisdiction, versioned 256-bit root keys, each jurisdiction sealed
//! and authenticated under a wrapping key of its own, changed by one writer at a time,
//! and each version's lifecycle (active, decrypt-only, retired, destroyed).
//!
//! Owns the keyring file (`keyring.json`), its lock file and the master-key sources
//! ([`master`]). It never returns root key bytes: callers get a [`DerivationKey`] (the
//! HKDF PRK of a root key) to derive record keys, and [`KeyEvent`]s describing each
//! change for the decision log. It may not touch the decision log itself: the caller
//! that holds both locks ([`crate::keyadmin`], the server) logs the events. Format and
//! hierarchy: `docs/crypto.md`, "Keyring".

mod error;
mod legacy;
mod lifecycle;
pub mod master;
mod sealed;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::crypto::{self, DerivationKey, KeyId, SecretKey, WrappingKey};
use crate::fsutil::{self, LockFile};
use crate::record::{Jurisdiction, KeyVersion};

pub use error::Error;
pub use master::{
    DEV_MASTER_KEY_FILE, LocalMasterKey, MASTER_KEY_ENV, MasterKeyOrigin, MasterKeyPolicy,
    MasterKeySource, MasterKeyText, load_master_key, parse_master_key,
};

use sealed::{
    Held, JurisdictionFile, JurisdictionKeys, KeyringFile, Opening, VersionFile, VersionKeys,
    new_version, open_jurisdiction,
};

/// File name of the sealed keyring in the data directory.
pub const KEYRING_FILE: &str = "keyring.json";
/// File name of the keyring's writer lock in the data directory.
pub const KEYRING_LOCK_FILE: &str = "keyring.lock";
/// The keyring format this code writes (and reads).
pub const KEYRING_FORMAT: &str = "ringfence-keyring/3";
/// The format before retirement and destruction; read, and written as format 3 with
/// the next change.
pub const PREVIOUS_KEYRING_FORMAT: &str = "ringfence-keyring/2";
/// The first format: one wrapping key, unauthenticated metadata. Only `keys migrate`
/// reads it.
pub const LEGACY_KEYRING_FORMAT: &str = "ringfence-keyring/1";
const METADATA_LABEL: &[u8] = b"ringfence/v3 keyring-metadata";
const METADATA_LABEL_V2: &[u8] = b"ringfence/v2 keyring-metadata";

/// One change to the keyring, for the decision log. Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    /// `init`, `rotate`, `retire`, `unretire`, `destroy`, `reseal` (a new master key)
    /// or `migrate`.
    pub operation: &'static str,
    /// The jurisdiction changed.
    pub jurisdiction: Jurisdiction,
    /// The version created (or carried over, for `migrate`).
    pub version: KeyVersion,
    /// Its key id.
    pub key_id: KeyId,
    /// The jurisdiction's generation after the change.
    pub generation: u64,
}

/// Where a key version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionState {
    /// The current version: new encryptions use it, and it decrypts.
    Active,
    /// An older version that still decrypts.
    DecryptOnly,
    /// Kept sealed, but decrypts nothing until `unretire`.
    Retired,
    /// Its sealed key is gone: nothing decrypts under it, ever.
    Destroyed,
}

impl VersionState {
    /// Every state, in lifecycle order.
    pub const ALL: [VersionState; 4] = [
        VersionState::Active,
        VersionState::DecryptOnly,
        VersionState::Retired,
        VersionState::Destroyed,
    ];

    /// The name `keys list` and the admin service use.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Active => "active",
            VersionState::DecryptOnly => "decrypt-only",
            VersionState::Retired => "retired",
            VersionState::Destroyed => "destroyed",
        }
    }
}

/// What an operator may see of a jurisdiction's keys: versions, ids and dates, no bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The jurisdiction.
    pub jurisdiction: String,
    /// The jurisdiction's generation (rises with every change).
    pub generation: u64,
    /// Version used for new encryptions.
    pub current: u32,
    /// Versions below this one are retired or destroyed.
    pub min_decryption_version: u32,
    /// Every version: number, key id, creation time, state.
    pub versions: Vec<VersionInfo>,
}

/// One version as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// Key id (32 hex digits).
    pub key_id: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Where it stands.
    pub state: VersionState,
    /// When it was destroyed (RFC 3339), if it was.
    pub destroyed_at: Option<String>,
}

/// The opened keyring. Debug output lists jurisdictions and versions only. Holds each
/// jurisdiction's wrapping key (to seal new versions) and the PRK of every held
/// version. Cloning shares them (a server swaps whole keyrings, see
/// [`crate::keyadmin::LiveKeyring`]).
#[derive(Clone)]
pub struct Keyring {
    path: PathBuf,
    keys: BTreeMap<Jurisdiction, JurisdictionKeys>,
    encrypt_jurisdictions: BTreeSet<Jurisdiction>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field(
                "versions",
                &self
                    .keys
                    .iter()
                    .map(|(j, k)| (j.as_str(), k.versions.len()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Takes the keyring's writer lock in `data_dir`, waiting for other writers.
pub fn lock(data_dir: &Path, holder: &str) -> Result<LockFile, Error> {
    Ok(LockFile::acquire(
        &data_dir.join(KEYRING_LOCK_FILE),
        holder,
    )?)
}

impl Keyring {
    /// A keyring with no jurisdictions yet, to be saved at `path`.
    pub fn empty(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            keys: BTreeMap::new(),
            encrypt_jurisdictions: BTreeSet::new(),
        }
    }

    /// Creates and saves a keyring at `path` with version 1 for every jurisdiction,
    /// configured for encryption, and logs nothing: for tests and benchmarks. Servers
    /// and the CLI create keys through [`crate::keyadmin`], which logs every change.
    pub fn create_unlogged(
        path: &Path,
        master: &dyn MasterKeySource,
        jurisdictions: &[Jurisdiction],
    ) -> Result<Self, Error> {
        let mut keyring = Self::empty(path);
        for jurisdiction in jurisdictions {
            keyring.initialize(jurisdiction, master)?;
        }
        keyring.save()?;
        keyring.configure_encryption(jurisdictions)?;
        Ok(keyring)
    }

    /// Opens the keyring at `path` if it exists ([`Keyring::open`]).
    pub fn open_if_present(
        path: &Path,
        master: &dyn MasterKeySource,
    ) -> Result<Option<Self>, Error> {
        match fs::symlink_metadata(path) {
            Ok(_) => Self::open(path, master).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                action: "cannot read keyring",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Opens an existing keyring: checks every jurisdiction's metadata tag, unseals
    /// every key and checks it against its key id; all or nothing. No jurisdiction is
    /// enabled for encryption until [`Keyring::configure_encryption`].
    pub fn open(path: &Path, master: &dyn MasterKeySource) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoKeyring(path.to_owned()));
            }
            Err(source) => {
                return Err(Error::Io {
                    action: "cannot read keyring",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let format = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|error| invalid(error.to_string()))?
            .get("format")
            .and_then(|format| format.as_str().map(str::to_owned));
        let format3 = match format.as_deref() {
            Some(KEYRING_FORMAT) => true,
            Some(PREVIOUS_KEYRING_FORMAT) => false,
            Some(LEGACY_KEYRING_FORMAT) => return Err(Error::Legacy(path.to_owned())),
            Some(other) => {
                return Err(invalid(format!(
                    "unsupported format `{}`, expected `{KEYRING_FORMAT}`",
                    crate::record::shown(other)
                )));
            }
            None => return Err(invalid("no `format` member".to_owned())),
        };
        let file: KeyringFile =
            serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        let mut keys = BTreeMap::new();
        let mut failed = Vec::new();
        for (code, entry) in &file.jurisdictions {
            let jurisdiction = Jurisdiction::new(code).map_err(|e| invalid(e.to_string()))?;
            let wrapping = master.wrapping_key(&jurisdiction)?;
            match open_jurisdiction(wrapping, entry, format3) {
                Ok(opened) => {
                    keys.insert(jurisdiction, opened);
                }
                Err(Opening::Invalid(reason)) => {
                    return Err(invalid(format!("`{code}`: {reason}")));
                }
                Err(Opening::KeyId(version, key_id)) => {
                    return Err(Error::KeyIdMismatch {
                        path: path.to_owned(),
                        jurisdiction,
                        version,
                        key_id,
                    });
                }
                Err(Opening::Unauthentic(what)) => failed.push((jurisdiction, what)),
                Err(Opening::Crypto(error)) => return Err(error.into()),
            }
        }
        // One jurisdiction failing while others open is an edit; all failing is the
        // wrong master key.
        if !failed.is_empty() {
            if keys.is_empty() {
                return Err(Error::WrongMasterKey {
                    path: path.to_owned(),
                    source_name: master.describe(),
                });
            }
            if let Some((jurisdiction, what)) = failed.into_iter().next() {
                return Err(Error::Tampered {
                    path: path.to_owned(),
                    jurisdiction,
                    what,
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            keys,
            encrypt_jurisdictions: BTreeSet::new(),
        })
    }

    /// Creates version 1 of `jurisdiction` (generation 1). Not saved until [`Keyring::save`].
    pub fn initialize(
        &mut self,
        jurisdiction: &Jurisdiction,
        master: &dyn MasterKeySource,
    ) -> Result<KeyEvent, Error> {
        if let Some(existing) = self.keys.get(jurisdiction) {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "`{jurisdiction}` is already initialized (current version {}); use `ringfence keys rotate`",
                    existing.current
                ),
            });
        }
        let wrapping = master.wrapping_key(jurisdiction)?;
        let version = KeyVersion::FIRST;
        let (keys, key_id) = new_version(&wrapping, version)?;
        self.keys.insert(
            jurisdiction.clone(),
            JurisdictionKeys {
                wrapping: Arc::new(wrapping),
                generation: 1,
                current: version,
                min_decryption: KeyVersion::FIRST,
                versions: BTreeMap::from([(version, keys)]),
            },
        );
        Ok(KeyEvent {
            operation: "init",
            jurisdiction: jurisdiction.clone(),
            version,
            key_id,
            generation: 1,
        })
    }

    /// Adds a new version for `jurisdiction` (highest held + 1) and makes it current.
    /// Older versions keep decrypting. Not saved until [`Keyring::save`].
    pub fn rotate(&mut self, jurisdiction: &Jurisdiction) -> Result<KeyEvent, Error> {
        let keys = self
            .keys
            .get_mut(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))?;
        let newest = keys
            .versions
            .keys()
            .next_back()
            .copied()
            .unwrap_or(keys.current);
        let next = newest
            .next()
            .ok_or_else(|| Error::UnknownKeyVersion(jurisdiction.clone(), newest))?;
        let (version_keys, key_id) = new_version(&keys.wrapping, next)?;
        keys.versions.insert(next, version_keys);
        keys.current = next;
        keys.generation = keys.generation.saturating_add(1);
        Ok(KeyEvent {
            operation: "rotate",
            jurisdiction: jurisdiction.clone(),
            version: next,
            key_id,
            generation: keys.generation,
        })
    }

    /// Writes the keyring atomically (unique temporary file, fsync, rename, fsync of the
    /// directory), first removing temporary copies a crashed writer left (they may hold
    /// versions destroyed since). The caller holds the keyring lock.
    pub fn save(&self) -> Result<(), Error> {
        for stale in fsutil::remove_stale_temporaries(&self.path).map_err(|source| Error::Io {
            action: "cannot remove stale temporary copies of keyring",
            path: self.path.clone(),
            source,
        })? {
            tracing::warn!(file = %stale.display(), "removed a temporary keyring copy a crashed writer left");
        }
        let text = self.file_text()?;
        fsutil::write_private_file(&self.path, text.as_bytes()).map_err(|source| Error::Io {
            action: "cannot write keyring",
            path: self.path.clone(),
            source,
        })
    }

    /// Whether the file at [`Keyring::path`] holds exactly this keyring (after a save
    /// that reported an error, it may or may not).
    pub fn is_saved(&self) -> bool {
        match (fs::read_to_string(&self.path), self.file_text()) {
            (Ok(on_disk), Ok(text)) => on_disk == text,
            _ => false,
        }
    }

    /// The file's text: deterministic for a given keyring (tags are HMACs).
    fn file_text(&self) -> Result<String, Error> {
        let mut file = KeyringFile {
            format: KEYRING_FORMAT.to_owned(),
            jurisdictions: BTreeMap::new(),
        };
        for (jurisdiction, keys) in &self.keys {
            let mac = keys.wrapping.authenticate(&keys.metadata()?)?;
            file.jurisdictions.insert(
                jurisdiction.as_str().to_owned(),
                JurisdictionFile {
                    generation: keys.generation,
                    current: keys.current.get(),
                    min_decryption_version: Some(keys.min_decryption.get()),
                    versions: keys
                        .versions
                        .iter()
                        .map(|(version, v)| {
                            let (sealed, destroyed_at) = match &v.held {
                                Held::Key { sealed, .. } => (
                                    Some(base64::engine::general_purpose::STANDARD.encode(sealed)),
                                    None,
                                ),
                                Held::Destroyed { at } => (None, Some(at.clone())),
                            };
                            VersionFile {
                                version: version.get(),
                                key_id: v.key_id.to_string(),
                                created_at: v.created_at.clone(),
                                sealed,
                                destroyed_at,
                            }
                        })
                        .collect(),
                    mac: hex::encode(mac),
                },
            );
        }
        serde_json::to_string_pretty(&file).map_err(|error| Error::Invalid {
            path: self.path.clone(),
            reason: error.to_string(),
        })
    }

    /// Enables new encryptions for `jurisdictions`; every one of them must hold keys.
    pub fn configure_encryption(&mut self, jurisdictions: &[Jurisdiction]) -> Result<(), Error> {
        let missing: Vec<Jurisdiction> = jurisdictions
            .iter()
            .filter(|j| !self.keys.contains_key(*j))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Error::NotInitialized {
                path: self.path.clone(),
                jurisdictions: missing,
            });
        }
        self.encrypt_jurisdictions = jurisdictions.iter().cloned().collect();
        Ok(())
    }

    /// The generation of every jurisdiction, as checkpoints carry them.
    pub fn generations(&self) -> BTreeMap<String, u64> {
        self.keys
            .iter()
            .map(|(jurisdiction, keys)| (jurisdiction.as_str().to_owned(), keys.generation))
            .collect()
    }

    /// Where every jurisdiction stands: generation, current version and its key id.
    pub fn states(&self) -> Vec<KeyEvent> {
        self.keys
            .iter()
            .filter_map(|(jurisdiction, keys)| {
                let current = keys.versions.get(&keys.current)?;
                Some(KeyEvent {
                    operation: "state",
                    jurisdiction: jurisdiction.clone(),
                    version: keys.current,
                    key_id: current.key_id,
                    generation: keys.generation,
                })
            })
            .collect()
    }

    /// Whether `jurisdiction` holds keys.
    pub fn holds(&self, jurisdiction: &Jurisdiction) -> bool {
        self.keys.contains_key(jurisdiction)
    }

    /// The key version new encryptions for `jurisdiction` use, if it is configured.
    pub fn current_for_encryption(&self, jurisdiction: &Jurisdiction) -> Result<KeyVersion, Error> {
        if !self.encrypt_jurisdictions.contains(jurisdiction) {
            return Err(Error::UnknownJurisdiction(jurisdiction.clone()));
        }
        self.keys
            .get(jurisdiction)
            .map(|keys| keys.current)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))
    }

    /// The derivation key of one version, for encryption or decryption; refused for a
    /// retired or destroyed version.
    pub fn derivation_key(
        &self,
        jurisdiction: &Jurisdiction,
        version: KeyVersion,
    ) -> Result<&DerivationKey, Error> {
        let keys = self
            .keys
            .get(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))?;
        let held = keys
            .versions
            .get(&version)
            .ok_or_else(|| Error::UnknownKeyVersion(jurisdiction.clone(), version))?;
        match held.derivation() {
            None => Err(Error::DestroyedKeyVersion(jurisdiction.clone(), version)),
            Some(_) if version < keys.min_decryption => {
                Err(Error::RetiredKeyVersion(jurisdiction.clone(), version))
            }
            Some(derivation) => Ok(derivation),
        }
    }

    /// The key id of a version the keyring knows (held or destroyed).
    pub fn key_id(&self, jurisdiction: &Jurisdiction, version: KeyVersion) -> Option<&KeyId> {
        self.keys
            .get(jurisdiction)
            .and_then(|keys| keys.versions.get(&version))
            .map(|keys| &keys.key_id)
    }

    /// The wrapping key of a jurisdiction, which seals its subject secrets too.
    pub fn wrapping_key(&self, jurisdiction: &Jurisdiction) -> Option<&Arc<WrappingKey>> {
        self.keys.get(jurisdiction).map(|keys| &keys.wrapping)
    }

    /// The jurisdictions whose keys the keyring holds.
    pub fn jurisdictions(&self) -> impl Iterator<Item = &Jurisdiction> {
        self.keys.keys()
    }

    /// Whether `jurisdiction` accepts new encryptions.
    pub fn is_configured(&self, jurisdiction: &Jurisdiction) -> bool {
        self.encrypt_jurisdictions.contains(jurisdiction)
    }

    /// Versions, key ids and dates of every key; never key bytes.
    pub fn summary(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|(jurisdiction, keys)| KeyInfo {
                jurisdiction: jurisdiction.as_str().to_owned(),
                generation: keys.generation,
                current: keys.current.get(),
                min_decryption_version: keys.min_decryption.get(),
                versions: keys
                    .versions
                    .iter()
                    .map(|(version, v)| VersionInfo {
                        version: version.get(),
                        key_id: v.key_id.to_string(),
                        created_at: v.created_at.clone(),
                        state: keys.state(*version, v),
                        destroyed_at: match &v.held {
                            Held::Destroyed { at } => Some(at.clone()),
                            Held::Key { .. } => None,
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub use legacy::migrate;

#[cfg(test)]
mod tests;
