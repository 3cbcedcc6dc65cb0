//! The keyring's errors: what went wrong opening, changing or saving it, naming the
//! file, jurisdiction or version, never key bytes. May not touch files.

use std::path::PathBuf;

use crate::crypto::{self, KeyId};
use crate::fsutil;
use crate::record::{Jurisdiction, KeyVersion};

use super::{LEGACY_KEYRING_FORMAT, MASTER_KEY_ENV};

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
    /// No keyring exists yet.
    #[error(
        "no keyring at `{0}`: create one with `ringfence keys init` (or run `ringfence serve --dev` for a development setup)"
    )]
    NoKeyring(PathBuf),
    /// Configured jurisdictions without keys.
    #[error(
        "keyring `{path}` has no root key for {}: create them with `ringfence keys init --jurisdictions {}`",
        jurisdictions.iter().map(|j| format!("`{j}`")).collect::<Vec<_>>().join(", "),
        jurisdictions.iter().map(|j| j.as_str()).collect::<Vec<_>>().join(",")
    )]
    NotInitialized {
        /// The keyring file.
        path: PathBuf,
        /// The jurisdictions without keys.
        jurisdictions: Vec<Jurisdiction>,
    },
    /// The keyring is in the unauthenticated first format.
    #[error(
        "keyring `{0}` is in the old format `{LEGACY_KEYRING_FORMAT}`, whose metadata is not authenticated: convert it once with `ringfence keys migrate` (the old format is no longer served)"
    )]
    Legacy(PathBuf),
    /// The master key opens no jurisdiction of the keyring.
    #[error(
        "the master key ({source_name}) does not open keyring `{path}`: wrong {MASTER_KEY_ENV} or key file, or the keyring was altered"
    )]
    WrongMasterKey {
        /// The keyring file.
        path: PathBuf,
        /// Where the master key came from.
        source_name: String,
    },
    /// One jurisdiction's metadata or sealed keys fail authentication while others pass.
    #[error(
        "keyring `{path}`: jurisdiction `{jurisdiction}` fails authentication ({what}): the file was edited or parts of it were replaced; restore it from a backup"
    )]
    Tampered {
        /// The keyring file.
        path: PathBuf,
        /// The jurisdiction concerned.
        jurisdiction: Jurisdiction,
        /// What failed.
        what: String,
    },
    /// A root key that unseals but does not match its key id.
    #[error(
        "keyring `{path}`: the root key sealed as `{jurisdiction}` v{version} does not match its key id `{key_id}`: keys were swapped or replaced"
    )]
    KeyIdMismatch {
        /// The keyring file.
        path: PathBuf,
        /// The jurisdiction.
        jurisdiction: Jurisdiction,
        /// The version.
        version: KeyVersion,
        /// The stored key id.
        key_id: KeyId,
    },
    /// A master key value could not be parsed; the value itself is never shown.
    #[error("master key from {0} is not 32 bytes encoded as 64 hex digits or base64")]
    BadMasterKey(String),
    /// No master key was supplied.
    #[error(
        "no master key was supplied for keyring `{0}`: pass --master-key-file or set {MASTER_KEY_ENV}"
    )]
    NoMasterKey(PathBuf),
    /// Only a development master key exists, and it was not allowed.
    #[error(
        "refusing the development master key `{0}` (it sits next to the keyring, so anyone who can read the data directory can unseal every key): pass --master-key-file or set {MASTER_KEY_ENV}; for development only, pass --dev or --danger-allow-development-master-key"
    )]
    DevelopmentKeyRefused(PathBuf),
    /// The jurisdiction has no keys.
    #[error("unknown jurisdiction `{0}`")]
    UnknownJurisdiction(Jurisdiction),
    /// The jurisdiction has no key of that version.
    #[error("jurisdiction `{0}` has no key version {1}")]
    UnknownKeyVersion(Jurisdiction, KeyVersion),
    /// The version is retired: it decrypts nothing until `unretire`.
    #[error("key version {1} of `{0}` is retired")]
    RetiredKeyVersion(Jurisdiction, KeyVersion),
    /// The version was destroyed: nothing can decrypt under it any more.
    #[error("key version {1} of `{0}` was destroyed")]
    DestroyedKeyVersion(Jurisdiction, KeyVersion),
    /// A lifecycle change that would break the keyring's rules (retiring the current
    /// version, destroying one still in use, ...); the message says which.
    #[error("{0}")]
    Refused(String),
    /// The keyring lock could not be taken.
    #[error("cannot lock the keyring: {0}")]
    Lock(#[from] fsutil::LockError),
    /// Key generation or sealing failed.
    #[error("key operation failed: {0}")]
    Crypto(#[from] crypto::Error),
}
