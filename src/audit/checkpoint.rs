//! Signed checkpoints: Ed25519 signatures over (sequence number, chain head), written
//! into the chain itself as `kind: "checkpoint"` entries.
//!
//! The signing key lives in the data directory (PKCS#8 PEM, mode 0600) or where
//! `--checkpoint-key` says; the public key is exported as SPKI PEM, so an auditor can
//! check checkpoints with `ringfence audit verify --public-key` or with OpenSSL (the
//! signed message is plain text, see `docs/decision-log.md`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Default file of the checkpoint signing key, in the data directory.
pub const SIGNING_KEY_FILE: &str = "audit-signing-key.pem";
/// The public key next to it, for auditors.
pub const PUBLIC_KEY_FILE: &str = "audit-signing-key.pub.pem";
/// `kind` of checkpoint entries.
pub const CHECKPOINT_KIND: &str = "checkpoint";
/// First line of every signed message: names the format and its version.
const DOMAIN: &str = "ringfence decision log checkpoint v1";
/// First line of a message that also vouches for the keyring's generations.
const DOMAIN_V2: &str = "ringfence decision log checkpoint v2";

/// The signed part of a checkpoint entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Sequence number of the last entry before the checkpoint (0: empty log).
    pub seq: u64,
    /// Hash of that entry: the chain head it vouches for.
    pub head: String,
    /// When it was signed (RFC 3339).
    pub signed_at: String,
    /// The keyring generation of every jurisdiction when it was signed (rollback
    /// protection: `serve` refuses an older keyring). Absent in checkpoints written
    /// before keyring format 2.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub key_generations: BTreeMap<String, u64>,
    /// First 16 hex digits of SHA-256 over the raw public key.
    pub key_id: String,
    /// Base64 of the 64-byte Ed25519 signature over [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes signed without key generations: four lines of text.
    pub fn message(seq: u64, head: &str, signed_at: &str) -> String {
        format!("{DOMAIN}\nseq {seq}\nhead {head}\nsigned_at {signed_at}\n")
    }

    /// The exact bytes signed: the four lines of [`Checkpoint::message`] (under the v2
    /// domain) and a fifth, `keyring US:3,SG:1`, when key generations are carried.
    pub fn message_with(
        seq: u64,
        head: &str,
        signed_at: &str,
        key_generations: &BTreeMap<String, u64>,
    ) -> String {
        if key_generations.is_empty() {
            return Self::message(seq, head, signed_at);
        }
        let generations: Vec<String> = key_generations
            .iter()
            .map(|(jurisdiction, generation)| format!("{jurisdiction}:{generation}"))
            .collect();
        format!(
            "{DOMAIN_V2}\nseq {seq}\nhead {head}\nsigned_at {signed_at}\nkeyring {}\n",
            generations.join(",")
        )
    }

    /// The message this checkpoint's signature covers.
    pub fn signed_message(&self) -> String {
        Self::message_with(self.seq, &self.head, &self.signed_at, &self.key_generations)
    }

    /// Checks that generation keys are jurisdiction codes, so the `keyring` line of the
    /// signed message reads one way only.
    pub fn check_generations(&self) -> Result<(), String> {
        match self
            .key_generations
            .keys()
            .find(|code| crate::record::Jurisdiction::new(code).is_err())
        {
            Some(code) => Err(format!(
                "key generation for `{}`, which is not a jurisdiction code",
                crate::record::shown(code)
            )),
            None => Ok(()),
        }
    }
}

/// Errors of checkpoint keys and signatures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A key file cannot be read, written or parsed.
    #[error("checkpoint key `{path}`: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong (never key material).
        reason: String,
    },
    /// The OS random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random,
}

fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(digest.get(..8).unwrap_or_default())
}

/// Signs checkpoints. The key is zeroized on drop and never printed.
pub struct CheckpointSigner {
    key: SigningKey,
    key_id: String,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// Loads the signing key from `path`, creating a fresh one (mode 0600) if the file
    /// does not exist, and writes the public key to `public_path`. Returns the signer
    /// and whether the key was created.
    pub fn load_or_create(path: &Path, public_path: &Path) -> Result<(Self, bool), Error> {
        let key_error = |reason: String| Error::Key {
            path: path.to_owned(),
            reason,
        };
        let (key, created) = match std::fs::read_to_string(path) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                let key = SigningKey::from_pkcs8_pem(&text)
                    .map_err(|_| key_error("not a PKCS#8 PEM Ed25519 private key".to_owned()))?;
                (key, false)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let seed = crate::keyfile::generate_ed25519().map_err(|_| Error::Random)?;
                let key = SigningKey::from_bytes(&seed);
                let pem = crate::keyfile::ed25519_pem(&seed);
                crate::fsutil::write_private_file(path, pem.as_bytes())
                    .map_err(|error| key_error(error.to_string()))?;
                (key, true)
            }
            Err(error) => return Err(key_error(error.to_string())),
        };
        let signer = Self {
            key_id: key_id(&key.verifying_key()),
            key,
        };
        let public = signer.public_key_pem()?;
        if std::fs::read_to_string(public_path).ok().as_deref() != Some(public.as_str()) {
            std::fs::write(public_path, public).map_err(|error| Error::Key {
                path: public_path.to_owned(),
                reason: error.to_string(),
            })?;
        }
        Ok((signer, created))
    }

    /// A signer for a given key (tests and benchmarks).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        Self {
            key_id: key_id(&key.verifying_key()),
            key,
        }
    }

    /// A verifier for this signer's checkpoints.
    pub fn verifier(&self) -> CheckpointVerifier {
        let key = self.key.verifying_key();
        CheckpointVerifier {
            key_id: key_id(&key),
            key,
        }
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_key_pem(&self) -> Result<String, Error> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|error| Error::Key {
                path: PathBuf::new(),
                reason: error.to_string(),
            })
    }

    /// The key id checkpoints carry.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs (seq, head) now.
    pub fn sign(&self, seq: u64, head: &str, signed_at: &str) -> Checkpoint {
        self.sign_with(seq, head, signed_at, &BTreeMap::new())
    }

    /// Signs (seq, head) and the keyring generations now.
    pub fn sign_with(
        &self,
        seq: u64,
        head: &str,
        signed_at: &str,
        key_generations: &BTreeMap<String, u64>,
    ) -> Checkpoint {
        let signature = self
            .key
            .sign(Checkpoint::message_with(seq, head, signed_at, key_generations).as_bytes());
        Checkpoint {
            seq,
            head: head.to_owned(),
            signed_at: signed_at.to_owned(),
            key_generations: key_generations.clone(),
            key_id: self.key_id.clone(),
            signature: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                signature.to_bytes(),
            ),
        }
    }
}

/// Checks checkpoints against one public key.
#[derive(Debug, Clone)]
pub struct CheckpointVerifier {
    key: VerifyingKey,
    key_id: String,
}

impl CheckpointVerifier {
    /// Parses an SPKI PEM public key (as `audit public-key` prints it).
    pub fn from_pem(text: &str) -> Result<Self, String> {
        let key = VerifyingKey::from_public_key_pem(text.trim())
            .map_err(|_| "not a PEM Ed25519 public key (-----BEGIN PUBLIC KEY-----)".to_owned())?;
        if key.is_weak() {
            return Err("a weak (small-order) Ed25519 public key".to_owned());
        }
        Ok(Self {
            key_id: key_id(&key),
            key,
        })
    }

    /// The key id of this public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether `checkpoint` was signed by this key over what it claims.
    pub fn check(&self, checkpoint: &Checkpoint) -> Result<(), String> {
        if checkpoint.key_id != self.key_id {
            return Err(format!(
                "signed by key {}, not by the given public key {}",
                checkpoint.key_id, self.key_id
            ));
        }
        let bytes = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &checkpoint.signature,
        )
        .map_err(|_| "signature is not base64".to_owned())?;
        let signature =
            Signature::from_slice(&bytes).map_err(|_| "signature is not 64 bytes".to_owned())?;
        checkpoint.check_generations()?;
        let message = checkpoint.signed_message();
        self.key
            .verify_strict(message.as_bytes(), &signature)
            .map_err(|_| "signature does not verify: checkpoint forged or altered".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_generations_are_signed_and_cannot_be_lowered_dropped_or_smuggled() {
        let signer = CheckpointSigner::from_seed(&[7u8; 32]);
        let verifier = CheckpointVerifier::from_pem(&signer.public_key_pem().unwrap()).unwrap();
        let generations = BTreeMap::from([("SG".to_owned(), 1), ("US".to_owned(), 5)]);
        let checkpoint =
            signer.sign_with(9, &"cd".repeat(32), "2026-11-28T08:00:00Z", &generations);
        verifier.check(&checkpoint).unwrap();
        assert!(checkpoint.signed_message().ends_with("keyring SG:1,US:5\n"));
        let mut lowered = checkpoint.clone();
        lowered.key_generations.insert("US".to_owned(), 4);
        assert!(verifier.check(&lowered).is_err());
        let mut dropped = checkpoint.clone();
        dropped.key_generations.clear();
        assert!(
            verifier.check(&dropped).is_err(),
            "a v2 signature is no v1 signature"
        );
        // Keys that would print the same `keyring` line are refused outright.
        let mut smuggled = checkpoint.clone();
        smuggled.key_generations = BTreeMap::from([("SG:1,US".to_owned(), 5)]);
        assert!(
            verifier
                .check(&smuggled)
                .unwrap_err()
                .contains("not a jurisdiction")
        );
    }

    #[test]
    fn a_signature_verifies_only_for_what_was_signed_and_only_with_its_key() {
        let signer = CheckpointSigner::from_seed(&[7u8; 32]);
        let verifier = CheckpointVerifier::from_pem(&signer.public_key_pem().unwrap()).unwrap();
        assert_eq!(verifier.key_id(), signer.key_id());
        let checkpoint = signer.sign(42, &"ab".repeat(32), "2026-11-23T08:00:00Z");
        verifier.check(&checkpoint).unwrap();

        let mut moved = checkpoint.clone();
        moved.seq = 41;
        assert!(
            verifier
                .check(&moved)
                .unwrap_err()
                .contains("does not verify")
        );
        let mut other_head = checkpoint.clone();
        other_head.head = "cd".repeat(32);
        assert!(verifier.check(&other_head).is_err());
        let mut other_time = checkpoint.clone();
        other_time.signed_at = "2026-11-23T08:00:01Z".to_owned();
        assert!(verifier.check(&other_time).is_err());

        let forger = CheckpointSigner::from_seed(&[8u8; 32]);
        let forged = forger.sign(42, &"ab".repeat(32), "2026-11-23T08:00:00Z");
        assert!(
            verifier
                .check(&forged)
                .unwrap_err()
                .contains("not by the given public key")
        );
        // Claiming the right key id does not help the forger.
        let mut relabelled = forged;
        relabelled.key_id = signer.key_id().to_owned();
        assert!(
            verifier
                .check(&relabelled)
                .unwrap_err()
                .contains("does not verify")
        );
        assert!(CheckpointVerifier::from_pem("not a key").is_err());
    }

    #[test]
    fn the_key_is_created_once_private_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        let public = dir.path().join(PUBLIC_KEY_FILE);
        let (first, created) = CheckpointSigner::load_or_create(&path, &public).unwrap();
        assert!(created);
        let (again, created) = CheckpointSigner::load_or_create(&path, &public).unwrap();
        assert!(!created);
        assert_eq!(first.key_id(), again.key_id());
        assert_eq!(
            std::fs::read_to_string(&public).unwrap(),
            first.public_key_pem().unwrap()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let private = std::fs::read_to_string(&path).unwrap();
        assert!(private.contains("BEGIN PRIVATE KEY"));
        assert!(!format!("{first:?}").contains(&private[30..60]));
        std::fs::write(&path, "garbage").unwrap();
        let error = CheckpointSigner::load_or_create(&path, &public).unwrap_err();
        assert!(error.to_string().contains("not a PKCS#8 PEM"), "{error}");
    }
}
