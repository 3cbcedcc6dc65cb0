//! The lifecycle of key versions: retire, unretire, destroy, and re-seal under a new
//! master key, each raising the jurisdiction's generation once and describing itself
//! as [`KeyEvent`]s. Changes the keyring in memory only; may not save, lock or log.

use std::sync::Arc;

use super::sealed::{Held, JurisdictionKeys, VersionKeys, check_key_id};
use super::{Error, KeyEvent, Keyring, MasterKeySource, VersionState};
use crate::crypto::DerivationKey;
use crate::record::{Jurisdiction, KeyVersion};

impl Keyring {
    fn jurisdiction_mut(
        &mut self,
        jurisdiction: &Jurisdiction,
    ) -> Result<&mut JurisdictionKeys, Error> {
        self.keys
            .get_mut(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))
    }

    /// Retires every version of `jurisdiction` below `below`: their fields stop
    /// decrypting until [`Keyring::unretire`]. The current version cannot be retired
    /// (rotate first). One event per version that changed state; none, and no change,
    /// when all of them were retired or destroyed already. Not saved until
    /// [`Keyring::save`].
    pub fn retire(
        &mut self,
        jurisdiction: &Jurisdiction,
        below: KeyVersion,
    ) -> Result<Vec<KeyEvent>, Error> {
        let keys = self.jurisdiction_mut(jurisdiction)?;
        if below > keys.current {
            return Err(Error::Refused(format!(
                "cannot retire versions below {below} of `{jurisdiction}`: version {} is current (rotate first; new encryptions need it)",
                keys.current
            )));
        }
        if below <= keys.min_decryption {
            return Ok(Vec::new());
        }
        let changed: Vec<KeyVersion> = keys
            .versions
            .range(keys.min_decryption..below)
            .filter(|(_, v)| v.derivation().is_some())
            .map(|(version, _)| *version)
            .collect();
        if !changed.is_empty() {
            keys.min_decryption = below;
        }
        Ok(keys.changed("retire", jurisdiction, &changed))
    }

    /// Lets every retired (not destroyed) version of `jurisdiction` from `from` on
    /// decrypt again. Not saved until [`Keyring::save`].
    pub fn unretire(
        &mut self,
        jurisdiction: &Jurisdiction,
        from: KeyVersion,
    ) -> Result<Vec<KeyEvent>, Error> {
        let keys = self.jurisdiction_mut(jurisdiction)?;
        if from >= keys.min_decryption {
            return Ok(Vec::new());
        }
        let changed: Vec<KeyVersion> = keys
            .versions
            .range(from..keys.min_decryption)
            .filter(|(_, v)| v.derivation().is_some())
            .map(|(version, _)| *version)
            .collect();
        let Some(lowest) = changed.first().copied() else {
            return Err(Error::Refused(format!(
                "every version of `{jurisdiction}` from {from} below {} was destroyed: nothing to unretire",
                keys.min_decryption
            )));
        };
        keys.min_decryption = lowest;
        Ok(keys.changed("unretire", jurisdiction, &changed))
    }

    /// Destroys the sealed keys of every version of `jurisdiction` below `below`. Each
    /// must be retired first; destroyed versions keep their number, key id and dates.
    /// Permanent once saved: no file, key or command brings them back (copies of the
    /// old keyring in backups aside, `docs/crypto.md`, "Destroying keys").
    pub fn destroy(
        &mut self,
        jurisdiction: &Jurisdiction,
        below: KeyVersion,
    ) -> Result<Vec<KeyEvent>, Error> {
        let keys = self.jurisdiction_mut(jurisdiction)?;
        if below > keys.min_decryption {
            return Err(Error::Refused(format!(
                "version {} of `{jurisdiction}` is not retired: retire versions below {below} first (`ringfence keys retire --jurisdiction {jurisdiction} --below {below}`), check that nothing needs them, then destroy them",
                keys.min_decryption
            )));
        }
        let at = crate::record::rfc3339_now();
        let mut changed = Vec::new();
        for (version, v) in keys.versions.range_mut(..below) {
            if v.derivation().is_some() {
                v.held = Held::Destroyed { at: at.clone() };
                changed.push(*version);
            }
        }
        Ok(keys.changed("destroy", jurisdiction, &changed))
    }

    /// Re-seals every held key of every jurisdiction under the wrapping keys of
    /// `new_master`, leaving root keys, key ids and envelopes unchanged: once saved,
    /// the old master key opens nothing of this keyring. One `reseal` event per
    /// jurisdiction. Not saved until [`Keyring::save`].
    pub fn reseal(&mut self, new_master: &dyn MasterKeySource) -> Result<Vec<KeyEvent>, Error> {
        let mut events = Vec::new();
        for (jurisdiction, keys) in &mut self.keys {
            let wrapping = new_master.wrapping_key(jurisdiction)?;
            for (version, v) in &mut keys.versions {
                if let Held::Key { sealed, .. } = &mut v.held {
                    let root = keys
                        .wrapping
                        .open(*version, &v.key_id, sealed)
                        .map_err(|_| Error::Tampered {
                            path: self.path.clone(),
                            jurisdiction: jurisdiction.clone(),
                            what: format!("sealed key v{version}"),
                        })?;
                    let derivation = DerivationKey::from_root(&root);
                    if check_key_id(&wrapping, *version, &v.key_id, &derivation).is_err() {
                        return Err(Error::KeyIdMismatch {
                            path: self.path.clone(),
                            jurisdiction: jurisdiction.clone(),
                            version: *version,
                            key_id: v.key_id,
                        });
                    }
                    *sealed = zeroize::Zeroizing::new(wrapping.seal(*version, &v.key_id, &root)?);
                }
            }
            keys.wrapping = Arc::new(wrapping);
            let current = keys.current;
            events.extend(keys.changed("reseal", jurisdiction, &[current]));
        }
        Ok(events)
    }
}

impl JurisdictionKeys {
    pub(super) fn state(&self, version: KeyVersion, keys: &VersionKeys) -> VersionState {
        if keys.derivation().is_none() {
            VersionState::Destroyed
        } else if version < self.min_decryption {
            VersionState::Retired
        } else if version == self.current {
            VersionState::Active
        } else {
            VersionState::DecryptOnly
        }
    }

    /// Raises the generation for one change and describes the versions it touched
    /// (no change, and no events, when it touched none).
    fn changed(
        &mut self,
        operation: &'static str,
        jurisdiction: &Jurisdiction,
        versions: &[KeyVersion],
    ) -> Vec<KeyEvent> {
        if versions.is_empty() {
            return Vec::new();
        }
        self.generation = self.generation.saturating_add(1);
        versions
            .iter()
            .filter_map(|version| {
                let keys = self.versions.get(version)?;
                Some(KeyEvent {
                    operation,
                    jurisdiction: jurisdiction.clone(),
                    version: *version,
                    key_id: keys.key_id,
                    generation: self.generation,
                })
            })
            .collect()
    }
}
