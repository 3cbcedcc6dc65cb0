//! Master key sources: where the key that every jurisdiction's wrapping key derives
//! from comes from (a file or the environment today; an HSM later).
//!
//! Owns parsing of master key text and the development master key file. It hands out
//! per-jurisdiction [`WrappingKey`]s, never the master key itself, and may not touch the
//! keyring file or the decision log.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use zeroize::Zeroizing;

use super::{Error, KEYRING_FILE};
use crate::crypto::{self, LegacyKeyWrapper, SecretKey, WrappingKey};
use crate::record::Jurisdiction;

/// Name of the environment variable that holds the master key (hex or base64).
pub const MASTER_KEY_ENV: &str = "RINGFENCE_MASTER_KEY";
/// File name of the development master key created in the data directory.
pub const DEV_MASTER_KEY_FILE: &str = "dev-master.key";

/// A source of per-jurisdiction wrapping keys. The file and environment source derives
/// them from one master key; an HSM source will derive them inside the token.
pub trait MasterKeySource: std::fmt::Debug + Send + Sync {
    /// Where the key comes from, for messages (never the key).
    fn describe(&self) -> String;
    /// Whether this is a development key stored next to the keyring.
    fn is_development(&self) -> bool;
    /// The wrapping key of `jurisdiction`.
    fn wrapping_key(&self, jurisdiction: &Jurisdiction) -> Result<WrappingKey, Error>;
    /// The single key-wrapping key of the format-1 keyring, for `keys migrate`.
    fn legacy_wrapper(&self) -> Result<LegacyKeyWrapper, Error>;
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

/// Where a local master key came from; a development key must never reach production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyOrigin {
    /// The `RINGFENCE_MASTER_KEY` environment variable.
    Environment,
    /// Another environment variable, by name (e.g. the new key of `keys rotate-master`).
    Variable(&'static str),
    /// An operator-supplied key file.
    File(PathBuf),
    /// Generated in this process and never stored (tests, benchmarks).
    Generated,
    /// A development key file in the data directory.
    Development {
        /// The file.
        path: PathBuf,
        /// Whether it was created by this command.
        created: bool,
    },
}

/// A master key held in process memory (from a file, the environment or a development
/// key file). Zeroized on drop; Debug shows the origin only.
#[derive(Debug)]
pub struct LocalMasterKey {
    key: SecretKey,
    origin: MasterKeyOrigin,
}

impl LocalMasterKey {
    /// A master key from bytes already in hand (tests, tools).
    pub fn new(key: SecretKey, origin: MasterKeyOrigin) -> Self {
        Self { key, origin }
    }

    /// A fresh random master key that is never stored (tests, benchmarks).
    pub fn generate() -> Result<Self, Error> {
        Ok(Self::new(
            SecretKey::generate()?,
            MasterKeyOrigin::Generated,
        ))
    }

    /// Where it came from.
    pub fn origin(&self) -> &MasterKeyOrigin {
        &self.origin
    }
}

impl MasterKeySource for LocalMasterKey {
    fn describe(&self) -> String {
        match &self.origin {
            MasterKeyOrigin::Environment => format!("environment variable {MASTER_KEY_ENV}"),
            MasterKeyOrigin::Variable(name) => format!("environment variable {name}"),
            MasterKeyOrigin::File(path) => format!("master key file `{}`", path.display()),
            MasterKeyOrigin::Generated => "a master key generated in this process".to_owned(),
            MasterKeyOrigin::Development { path, .. } => {
                format!("DEVELOPMENT master key file `{}`", path.display())
            }
        }
    }

    fn is_development(&self) -> bool {
        matches!(self.origin, MasterKeyOrigin::Development { .. })
    }

    fn wrapping_key(&self, jurisdiction: &Jurisdiction) -> Result<WrappingKey, Error> {
        Ok(WrappingKey::derive(&self.key, jurisdiction)?)
    }

    fn legacy_wrapper(&self) -> Result<LegacyKeyWrapper, Error> {
        Ok(LegacyKeyWrapper::new(&self.key)?)
    }
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

/// How a command may find its master key.
#[derive(Debug, Clone, Copy, Default)]
pub struct MasterKeyPolicy {
    /// Accept the development key file of the data directory (`--dev`,
    /// `--danger-allow-development-master-key`).
    pub allow_development: bool,
    /// Create a development key when none exists and no keyring exists yet.
    pub create_development: bool,
}

/// Finds the master key: `key_file` (the most explicit), else the environment value,
/// else (only when the policy allows it) the development key file in `data_dir`.
pub fn load_master_key(
    environment_value: Option<&MasterKeyText>,
    key_file: Option<&Path>,
    data_dir: &Path,
    policy: MasterKeyPolicy,
) -> Result<LocalMasterKey, Error> {
    if let Some(path) = key_file {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| Error::Io {
            action: "cannot read master key file",
            path: path.to_owned(),
            source,
        })?);
        let origin = format!("file `{}`", path.display());
        return Ok(LocalMasterKey::new(
            parse_master_key(&text, &origin)?,
            MasterKeyOrigin::File(path.to_owned()),
        ));
    }
    if let Some(value) = environment_value {
        return Ok(LocalMasterKey::new(
            parse_master_key(value.expose(), MASTER_KEY_ENV)?,
            MasterKeyOrigin::Environment,
        ));
    }
    let dev_path = data_dir.join(DEV_MASTER_KEY_FILE);
    let keyring_path = data_dir.join(KEYRING_FILE);
    if dev_path.exists() {
        if !policy.allow_development {
            return Err(Error::DevelopmentKeyRefused(dev_path));
        }
        let text = Zeroizing::new(fs::read_to_string(&dev_path).map_err(|source| Error::Io {
            action: "cannot read development master key",
            path: dev_path.clone(),
            source,
        })?);
        let origin = format!("file `{}`", dev_path.display());
        return Ok(LocalMasterKey::new(
            parse_master_key(&text, &origin)?,
            MasterKeyOrigin::Development {
                path: dev_path,
                created: false,
            },
        ));
    }
    if !(policy.allow_development && policy.create_development) || keyring_path.exists() {
        return Err(Error::NoMasterKey(keyring_path));
    }
    let key = SecretKey::generate()?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(key.expose())));
    // Two commands racing to create it must end up with one key: the file is linked
    // into place only if absent, and the loser uses the winner's key.
    let created =
        crate::fsutil::create_private_file(&dev_path, text.as_bytes()).map_err(|source| {
            Error::Io {
                action: "cannot write development master key",
                path: dev_path.clone(),
                source,
            }
        })?;
    if !created {
        return load_master_key(None, None, data_dir, policy);
    }
    Ok(LocalMasterKey::new(
        key,
        MasterKeyOrigin::Development {
            path: dev_path,
            created: true,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: MasterKeyPolicy = MasterKeyPolicy {
        allow_development: true,
        create_development: true,
    };

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
    fn development_key_is_created_only_when_asked_and_used_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        // Neither allowed nor created by default.
        assert!(matches!(
            load_master_key(None, None, dir.path(), MasterKeyPolicy::default()),
            Err(Error::NoMasterKey(_))
        ));
        let key = load_master_key(None, None, dir.path(), DEV).unwrap();
        assert!(matches!(
            key.origin(),
            MasterKeyOrigin::Development { created: true, .. }
        ));
        assert!(key.is_development());
        let again = load_master_key(None, None, dir.path(), DEV).unwrap();
        assert!(matches!(
            again.origin(),
            MasterKeyOrigin::Development { created: false, .. }
        ));
        assert_eq!(key.key.expose(), again.key.expose());
        // An existing development key is refused unless explicitly allowed.
        let error =
            load_master_key(None, None, dir.path(), MasterKeyPolicy::default()).unwrap_err();
        assert!(matches!(error, Error::DevelopmentKeyRefused(_)), "{error}");
        assert!(
            error
                .to_string()
                .contains("--danger-allow-development-master-key"),
            "{error}"
        );
        // A keyring without its key never gets a fresh development key.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(KEYRING_FILE), "{}").unwrap();
        assert!(matches!(
            load_master_key(None, None, other.path(), DEV),
            Err(Error::NoMasterKey(_))
        ));
        assert!(format!("{key:?}").contains("Development"));
        assert!(!format!("{key:?}").contains(&hex::encode(key.key.expose())));
    }
}
