//! The keyring: per-jurisdiction, versioned 256-bit root keys, sealed at rest under a
//! key derived from the operator's master key.
//!
//! Owns the keyring file and the master-key sources. It never returns root key bytes:
//! callers get a [`DerivationKey`] (the HKDF PRK of a root key) to derive record keys.
//! New encryptions use a jurisdiction's newest version; every version held still decrypts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{self, DerivationKey, KeyWrapper, SecretKey};
use crate::record::{Jurisdiction, KeyVersion};

/// Name of the environment variable that holds the master key (hex or base64).
pub const MASTER_KEY_ENV: &str = "RINGFENCE_MASTER_KEY";
/// File name of the development master key created in the data directory.
pub const DEV_MASTER_KEY_FILE: &str = "dev-master.key";
/// File name of the sealed keyring in the data directory.
pub const KEYRING_FILE: &str = "keyring.json";
const KEYRING_FORMAT: &str = "ringfence-keyring/1";

/// Errors of the keyring and master-key handling. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The keyring file is not valid.
    #[error("keyring `{path}` is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The master key does not open the keyring.
    #[error(
        "the master key does not open keyring `{0}` (wrong {MASTER_KEY_ENV} or key file, or the keyring was altered)"
    )]
    WrongMasterKey(PathBuf),
    /// A master key value could not be parsed; the value itself is never shown.
    #[error("master key from {0} is not 32 bytes encoded as 64 hex digits or base64")]
    BadMasterKey(String),
    /// No master key was supplied and a development key may not be used.
    #[error(
        "no master key was supplied for keyring `{0}`: pass --master-key-file or set {MASTER_KEY_ENV} (a development key is only created for a new keyring, and not with --no-dev-master-key)"
    )]
    NoMasterKey(PathBuf),
    /// The jurisdiction has no keys.
    #[error("unknown jurisdiction `{0}`")]
    UnknownJurisdiction(Jurisdiction),
    /// The jurisdiction has no key of that version.
    #[error("jurisdiction `{0}` has no key version {1}")]
    UnknownKeyVersion(Jurisdiction, KeyVersion),
    /// Key generation or sealing failed.
    #[error("key operation failed: {0}")]
    Crypto(#[from] crypto::Error),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Master key text as supplied (hex or base64), zeroized on drop, redacted in Debug.
#[derive(Clone)]
pub struct MasterKeyText(Zeroizing<String>);

impl MasterKeyText {
    /// Wraps supplied text.
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// The text, for parsing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for MasterKeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeyText(<redacted>)")
    }
}

/// Where the master key came from; a development key must never reach production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// The `RINGFENCE_MASTER_KEY` environment variable.
    Environment,
    /// An operator-supplied key file.
    File(PathBuf),
    /// A development key file in the data directory, created or reused by `serve`.
    Development {
        /// The file.
        path: PathBuf,
        /// Whether it was created by this start.
        created: bool,
    },
}

/// Parses a master key from 64 hex digits or standard base64 of 32 bytes.
pub fn parse_master_key(text: &str, origin: &str) -> Result<SecretKey, Error> {
    let text = Zeroizing::new(text.trim().to_owned());
    let decoded = Zeroizing::new(if text.len() == 64 {
        hex::decode(text.as_bytes()).ok()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .ok()
    });
    let mut bytes = Zeroizing::new([0u8; crypto::KEY_LEN]);
    match decoded.as_deref() {
        Some(raw) if raw.len() == crypto::KEY_LEN => bytes.copy_from_slice(raw),
        _ => return Err(Error::BadMasterKey(origin.to_owned())),
    }
    Ok(SecretKey::from_bytes(*bytes))
}

/// Finds the master key: `key_file` (the most explicit), else the environment value, else (only when
/// `allow_development` is set) the development key file in `data_dir`, created on the
/// first start when no keyring exists yet.
pub fn load_master_key(
    environment_value: Option<&MasterKeyText>,
    key_file: Option<&Path>,
    data_dir: &Path,
    allow_development: bool,
) -> Result<(SecretKey, MasterKeySource), Error> {
    if let Some(path) = key_file {
        let text = Zeroizing::new(
            fs::read_to_string(path).map_err(io_error("cannot read master key file", path))?,
        );
        let origin = format!("file `{}`", path.display());
        return Ok((
            parse_master_key(&text, &origin)?,
            MasterKeySource::File(path.to_owned()),
        ));
    }
    if let Some(value) = environment_value {
        return Ok((
            parse_master_key(value.expose(), MASTER_KEY_ENV)?,
            MasterKeySource::Environment,
        ));
    }
    let dev_path = data_dir.join(DEV_MASTER_KEY_FILE);
    let keyring_path = data_dir.join(KEYRING_FILE);
    if allow_development && dev_path.exists() {
        let text = Zeroizing::new(
            fs::read_to_string(&dev_path)
                .map_err(io_error("cannot read development master key", &dev_path))?,
        );
        let origin = format!("file `{}`", dev_path.display());
        return Ok((
            parse_master_key(&text, &origin)?,
            MasterKeySource::Development {
                path: dev_path,
                created: false,
            },
        ));
    }
    if !allow_development || keyring_path.exists() {
        return Err(Error::NoMasterKey(keyring_path));
    }
    let key = SecretKey::generate()?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(key.expose())));
    write_private_file(&dev_path, text.as_bytes())?;
    Ok((
        key,
        MasterKeySource::Development {
            path: dev_path,
            created: true,
        },
    ))
}

/// Writes a file readable by its owner only, atomically (temp file, fsync, rename).
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let temporary = path.with_extension("tmp");
    // A stale temporary file could carry looser permissions: start from nothing.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("cannot remove", &temporary)(error)),
    }
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&temporary)
            .map_err(io_error("cannot create", &temporary))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(io_error("cannot write", &temporary))?;
    }
    fs::rename(&temporary, path).map_err(io_error("cannot replace", path))?;
    if let Some(parent) = path.parent() {
        // Makes the rename itself durable.
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error("cannot sync directory", parent))?;
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    format: String,
    jurisdictions: BTreeMap<String, JurisdictionFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JurisdictionFile {
    current: u32,
    versions: Vec<VersionFile>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    version: u32,
    created_at: String,
    /// base64 of `nonce || sealed key || tag` (docs/crypto.md, "Keyring").
    sealed: String,
}

struct JurisdictionKeys {
    current: KeyVersion,
    versions: BTreeMap<KeyVersion, DerivationKey>,
}

/// What an operator may see of a jurisdiction's keys: versions and dates, no bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The jurisdiction.
    pub jurisdiction: String,
    /// Version used for new encryptions.
    pub current: u32,
    /// Every version held, with its creation time.
    pub versions: Vec<(u32, String)>,
}

/// The opened keyring. Debug output lists jurisdictions and versions only.
pub struct Keyring {
    path: PathBuf,
    /// `None` once [`Keyring::forget_wrapping_key`] was called: the keyring can still
    /// derive keys but no longer seal new ones.
    wrapper: Option<KeyWrapper>,
    file: KeyringFile,
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

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Keyring {
    /// Opens the keyring at `path`, creating it (and a version-1 key for every
    /// configured jurisdiction that has none) as needed. Returns the jurisdictions
    /// whose first key was created now.
    pub fn open_or_create(
        path: &Path,
        master: &SecretKey,
        configured: &[Jurisdiction],
    ) -> Result<(Self, Vec<Jurisdiction>), Error> {
        let mut keyring = if path.exists() {
            Self::open(path, master)?
        } else {
            Self {
                path: path.to_owned(),
                wrapper: Some(KeyWrapper::new(master)?),
                file: KeyringFile {
                    format: KEYRING_FORMAT.to_owned(),
                    jurisdictions: BTreeMap::new(),
                },
                keys: BTreeMap::new(),
                encrypt_jurisdictions: BTreeSet::new(),
            }
        };
        let mut created = Vec::new();
        for jurisdiction in configured {
            if !keyring.keys.contains_key(jurisdiction) {
                keyring.add_version(jurisdiction, KeyVersion::FIRST)?;
                created.push(jurisdiction.clone());
            }
        }
        if !created.is_empty() {
            keyring.save()?;
        }
        keyring.encrypt_jurisdictions = configured.iter().cloned().collect();
        Ok((keyring, created))
    }

    /// Opens an existing keyring and unseals every key in it. No jurisdiction is
    /// enabled for encryption until [`Keyring::open_or_create`] configures it.
    pub fn open(path: &Path, master: &SecretKey) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_owned(),
            reason,
        };
        let text = fs::read_to_string(path).map_err(io_error("cannot read keyring", path))?;
        let file: KeyringFile =
            serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
        if file.format != KEYRING_FORMAT {
            return Err(invalid(format!(
                "unsupported format `{}`, expected `{KEYRING_FORMAT}`",
                crate::record::shown(&file.format)
            )));
        }
        let wrapper = KeyWrapper::new(master)?;
        let mut keys = BTreeMap::new();
        for (code, entry) in &file.jurisdictions {
            let jurisdiction = Jurisdiction::new(code).map_err(|e| invalid(e.to_string()))?;
            let current = KeyVersion::new(entry.current)
                .ok_or_else(|| invalid(format!("`{code}`: current version 0")))?;
            let mut versions = BTreeMap::new();
            for version_entry in &entry.versions {
                let version = KeyVersion::new(version_entry.version)
                    .ok_or_else(|| invalid(format!("`{code}`: version 0")))?;
                let sealed = base64::engine::general_purpose::STANDARD
                    .decode(&version_entry.sealed)
                    .map_err(|_| {
                        invalid(format!("`{code}` v{version}: sealed key is not base64"))
                    })?;
                let root = wrapper
                    .open(&jurisdiction, version, &sealed)
                    .map_err(|_| Error::WrongMasterKey(path.to_owned()))?;
                if versions
                    .insert(version, DerivationKey::from_root(&root))
                    .is_some()
                {
                    return Err(invalid(format!(
                        "`{code}`: version {version} appears twice"
                    )));
                }
            }
            if !versions.contains_key(&current) {
                return Err(invalid(format!(
                    "`{code}`: current version {current} is not in the keyring"
                )));
            }
            keys.insert(jurisdiction, JurisdictionKeys { current, versions });
        }
        Ok(Self {
            path: path.to_owned(),
            wrapper: Some(wrapper),
            file,
            keys,
            encrypt_jurisdictions: BTreeSet::new(),
        })
    }

    fn add_version(
        &mut self,
        jurisdiction: &Jurisdiction,
        version: KeyVersion,
    ) -> Result<(), Error> {
        let wrapper = self.wrapper.as_ref().ok_or_else(|| Error::Invalid {
            path: self.path.clone(),
            reason: "the key-wrapping key was dropped; reopen the keyring to add keys".to_owned(),
        })?;
        let root = SecretKey::generate()?;
        let sealed = wrapper.seal(jurisdiction, version, &root)?;
        let entry = VersionFile {
            version: version.get(),
            created_at: now_rfc3339(),
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
        };
        let file_entry = self
            .file
            .jurisdictions
            .entry(jurisdiction.as_str().to_owned())
            .or_insert_with(|| JurisdictionFile {
                current: version.get(),
                versions: Vec::new(),
            });
        file_entry.current = version.get();
        file_entry.versions.push(entry);
        let keys = self
            .keys
            .entry(jurisdiction.clone())
            .or_insert_with(|| JurisdictionKeys {
                current: version,
                versions: BTreeMap::new(),
            });
        keys.current = version;
        keys.versions
            .insert(version, DerivationKey::from_root(&root));
        Ok(())
    }

    fn save(&self) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(&self.file).map_err(|error| Error::Invalid {
            path: self.path.clone(),
            reason: error.to_string(),
        })?;
        write_private_file(&self.path, text.as_bytes())
    }

    /// Adds a new version for `jurisdiction`, makes it current and saves the keyring.
    /// Older versions keep decrypting.
    pub fn rotate(&mut self, jurisdiction: &Jurisdiction) -> Result<KeyVersion, Error> {
        let current = self
            .keys
            .get(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))?
            .current;
        let newest = self
            .keys
            .get(jurisdiction)
            .and_then(|keys| keys.versions.keys().next_back().copied())
            .unwrap_or(current);
        let next = newest
            .next()
            .ok_or_else(|| Error::UnknownKeyVersion(jurisdiction.clone(), newest))?;
        self.add_version(jurisdiction, next)?;
        self.save()?;
        Ok(next)
    }

    /// Drops the key-wrapping key (equivalent to the master key) from memory. A server
    /// calls this once its keys exist: it derives, it never seals.
    pub fn forget_wrapping_key(&mut self) {
        self.wrapper = None;
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

    /// The derivation key of one version, for encryption or decryption.
    pub fn derivation_key(
        &self,
        jurisdiction: &Jurisdiction,
        version: KeyVersion,
    ) -> Result<&DerivationKey, Error> {
        let keys = self
            .keys
            .get(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))?;
        keys.versions
            .get(&version)
            .ok_or_else(|| Error::UnknownKeyVersion(jurisdiction.clone(), version))
    }

    /// Whether `jurisdiction` accepts new encryptions.
    pub fn is_configured(&self, jurisdiction: &Jurisdiction) -> bool {
        self.encrypt_jurisdictions.contains(jurisdiction)
    }

    /// Versions and dates of every key; never key bytes.
    pub fn summary(&self) -> Vec<KeyInfo> {
        self.file
            .jurisdictions
            .iter()
            .map(|(code, entry)| KeyInfo {
                jurisdiction: code.clone(),
                current: entry.current,
                versions: entry
                    .versions
                    .iter()
                    .map(|v| (v.version, v.created_at.clone()))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jurisdictions(codes: &[&str]) -> Vec<Jurisdiction> {
        codes
            .iter()
            .map(|c| Jurisdiction::new(c).unwrap())
            .collect()
    }

    #[test]
    fn creates_reopens_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYRING_FILE);
        let master = SecretKey::generate().unwrap();
        let configured = jurisdictions(&["US", "SG"]);
        let (keyring, created) = Keyring::open_or_create(&path, &master, &configured).unwrap();
        assert_eq!(created, configured);
        let us = &configured[0];
        assert_eq!(
            keyring.current_for_encryption(us).unwrap(),
            KeyVersion::FIRST
        );
        let eu = Jurisdiction::new("EU").unwrap();
        assert!(matches!(
            keyring.current_for_encryption(&eu),
            Err(Error::UnknownJurisdiction(_))
        ));

        let mut forgetful = Keyring::open(&path, &master).unwrap();
        forgetful.forget_wrapping_key();
        assert!(
            forgetful.rotate(us).is_err(),
            "cannot seal without the wrapping key"
        );
        let mut reopened = Keyring::open(&path, &master).unwrap();
        assert!(!reopened.is_configured(us), "open alone configures nothing");
        let v2 = reopened.rotate(us).unwrap();
        assert_eq!(v2.get(), 2);
        let (again, created) = Keyring::open_or_create(&path, &master, &configured).unwrap();
        assert!(created.is_empty());
        assert_eq!(again.current_for_encryption(us).unwrap(), v2);
        assert!(again.derivation_key(us, KeyVersion::FIRST).is_ok());
        assert!(matches!(
            again.derivation_key(us, KeyVersion::new(3).unwrap()),
            Err(Error::UnknownKeyVersion(..))
        ));
        let summary = again.summary();
        assert_eq!(summary.len(), 2);
        assert_eq!(summary[1].versions.len(), 2);
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYRING_FILE);
        let configured = jurisdictions(&["US"]);
        Keyring::open_or_create(&path, &SecretKey::generate().unwrap(), &configured).unwrap();
        let error = Keyring::open(&path, &SecretKey::generate().unwrap()).unwrap_err();
        assert!(matches!(error, Error::WrongMasterKey(_)), "{error}");
    }

    #[test]
    fn keys_at_rest_are_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYRING_FILE);
        let master = SecretKey::generate().unwrap();
        let configured = jurisdictions(&["US"]);
        let (keyring, _) = Keyring::open_or_create(&path, &master, &configured).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"sealed\""));
        let printed = format!("{keyring:?}");
        assert!(!printed.contains("sealed"), "{printed}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "keyring readable by others: {mode:o}");
        }
    }

    #[test]
    fn master_key_parsing_never_echoes_the_value() {
        let hex_key = "00".repeat(32);
        assert!(parse_master_key(&hex_key, "test").is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(parse_master_key(&format!("{b64}\n"), "test").is_ok());
        let secretish = "s3cr3t-but-too-short";
        let error = parse_master_key(secretish, "test").unwrap_err().to_string();
        assert!(!error.contains(secretish), "{error}");
    }

    #[test]
    fn development_key_is_created_only_for_a_new_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let (key, source) = load_master_key(None, None, dir.path(), true).unwrap();
        assert!(matches!(
            source,
            MasterKeySource::Development { created: true, .. }
        ));
        let (again, source) = load_master_key(None, None, dir.path(), true).unwrap();
        assert!(matches!(
            source,
            MasterKeySource::Development { created: false, .. }
        ));
        assert_eq!(key.expose(), again.expose());
        // Without development keys and without a supplied key, a keyring cannot open.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(KEYRING_FILE), "{}").unwrap();
        assert!(matches!(
            load_master_key(None, None, other.path(), true),
            Err(Error::NoMasterKey(_))
        ));
    }
}
