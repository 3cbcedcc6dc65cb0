//! Data subjects: each (jurisdiction, subject) has random secret material of its own,
//! sealed under that jurisdiction's wrapping key in a subject store and mixed into
//! every format-2 record key of the subject; shredding destroys it.
//!
//! Owns the subject store ([`SubjectStore`], SQLite by default: [`sqlite`]) and a
//! bounded cache of unsealed secrets (zeroized when evicted). It may not decide who
//! may shred (the gatekeeper does) or write the decision log.

pub mod sqlite;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::crypto::{SubjectSecret, WrappingKey};
use crate::keys::Keyring;
use crate::record::{Jurisdiction, SubjectId};

pub use sqlite::{SUBJECTS_FILE, SqliteStore};

/// Default number of unsealed subject secrets kept in memory.
pub const DEFAULT_CACHE_ENTRIES: usize = 100_000;

/// Errors of the subject store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be read or written.
    #[error("{0}")]
    Store(String),
    /// The store's file is damaged or not a subject store.
    #[error(
        "the subject store `{0}` is damaged or not a subject store: {1}; it was left untouched (restore it from a backup)"
    )]
    Corrupt(PathBuf, String),
    /// The store was sealed under another master key.
    #[error(
        "the subject store `{0}` was sealed under another master key (jurisdiction {1}): supply the master key the keyring and the store were created with; nothing was changed"
    )]
    WrongMasterKey(PathBuf, String),
    /// A stored secret failed to open: altered, or moved between subjects.
    #[error(
        "the secret of a data subject in {0} failed authentication: the subject store was altered"
    )]
    Integrity(Jurisdiction),
    /// The subject was shredded: nothing is encrypted for it again.
    #[error(
        "data subject `{subject}` was shredded in {jurisdiction} at {at}: nothing is encrypted for it again"
    )]
    Shredded {
        /// The subject.
        subject: SubjectId,
        /// Where.
        jurisdiction: Jurisdiction,
        /// When.
        at: String,
    },
    /// The keyring holds no keys for the jurisdiction.
    #[error("no keys for jurisdiction {0}")]
    UnknownJurisdiction(Jurisdiction),
    /// Sealing or the RNG failed.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::Error),
}

/// A stored subject: its sealed secret, or when it was shredded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// The sealed secret.
    Live(Vec<u8>),
    /// Shredded at this time; nothing is left.
    Shredded {
        /// When.
        at: String,
    },
}

/// What shredding did in one jurisdiction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShredOutcome {
    /// The secret was destroyed.
    Shredded {
        /// Where.
        jurisdiction: Jurisdiction,
    },
    /// The subject had no secret there (nothing was ever encrypted for it); a
    /// tombstone now stops one from being created.
    NoSecret {
        /// Where.
        jurisdiction: Jurisdiction,
    },
    /// Shredded before.
    AlreadyShredded {
        /// Where.
        jurisdiction: Jurisdiction,
        /// When.
        at: String,
    },
}

impl ShredOutcome {
    /// The jurisdiction.
    pub fn jurisdiction(&self) -> &Jurisdiction {
        match self {
            ShredOutcome::Shredded { jurisdiction }
            | ShredOutcome::NoSecret { jurisdiction }
            | ShredOutcome::AlreadyShredded { jurisdiction, .. } => jurisdiction,
        }
    }

    /// `shredded`, `no_secret` or `already_shredded`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ShredOutcome::Shredded { .. } => "shredded",
            ShredOutcome::NoSecret { .. } => "no_secret",
            ShredOutcome::AlreadyShredded { .. } => "already_shredded",
        }
    }
}

/// What a store operation returns: a future that owns what it needs.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// Where subjects' sealed secrets live: an embedded database on one node, a shared
/// one for many replicas. Stores hold sealed bytes only.
pub trait SubjectStore: Send + Sync + fmt::Debug {
    /// The subject's row, if any.
    fn get(&self, jurisdiction: &Jurisdiction, subject: &SubjectId) -> StoreFuture<Option<Row>>;
    /// Stores `sealed` unless the subject has a row already; returns the row stored
    /// (the first writer's, under concurrency, or a tombstone).
    fn insert_if_absent(
        &self,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
        sealed: Vec<u8>,
        created_at: String,
    ) -> StoreFuture<Row>;
    /// Destroys the subject's secret in each jurisdiction (leaving a tombstone),
    /// durably, before the future resolves.
    fn shred(
        &self,
        subject: &SubjectId,
        jurisdictions: &[Jurisdiction],
        at: String,
    ) -> StoreFuture<Vec<ShredOutcome>>;
}

/// A subject's secret as a request uses it.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The unsealed secret.
    Live(Arc<SubjectSecret>),
    /// Shredded at this time.
    Shredded(String),
    /// No secret was ever made for the subject here.
    Unknown,
}

type CacheKey = (Jurisdiction, SubjectId);

/// The bounded cache of unsealed secrets. Dropped entries are zeroized (by
/// [`SubjectSecret`]'s drop) once the last request using them finishes.
struct Cache {
    capacity: usize,
    /// By jurisdiction, then subject: looked up by reference, without copying keys.
    entries: HashMap<Jurisdiction, HashMap<SubjectId, Arc<SubjectSecret>>>,
    len: usize,
    order: VecDeque<CacheKey>,
    /// Counts shreds; a secret read from the store before a shred is not cached after.
    shreds: u64,
}

impl Cache {
    fn get(&self, jurisdiction: &Jurisdiction, subject: &SubjectId) -> Option<&Arc<SubjectSecret>> {
        self.entries.get(jurisdiction)?.get(subject)
    }

    fn insert(&mut self, (jurisdiction, subject): CacheKey, secret: Arc<SubjectSecret>) {
        if self.capacity == 0 || self.get(&jurisdiction, &subject).is_some() {
            return;
        }
        while self.len >= self.capacity {
            let Some((j, s)) = self.order.pop_front() else {
                break;
            };
            if let Some(subjects) = self.entries.get_mut(&j)
                && subjects.remove(&s).is_some()
            {
                self.len -= 1;
            }
        }
        self.order
            .push_back((jurisdiction.clone(), subject.clone()));
        self.entries
            .entry(jurisdiction)
            .or_default()
            .insert(subject, secret);
        self.len += 1;
    }

    fn forget(&mut self, subject: &SubjectId) {
        self.shreds += 1;
        for subjects in self.entries.values_mut() {
            if subjects.remove(subject).is_some() {
                self.len -= 1;
            }
        }
        self.order.retain(|(_, cached)| cached != subject);
    }
}

/// Subject secrets for requests: sealed in a [`SubjectStore`], unsealed with the
/// jurisdiction's wrapping key, cached.
pub struct Subjects {
    store: Box<dyn SubjectStore>,
    cache: Mutex<Cache>,
}

impl fmt::Debug for Subjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subjects")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The check values of the keyring's wrapping keys, as a store records them.
fn checks(keyring: &Keyring) -> Result<BTreeMap<String, String>, Error> {
    keyring
        .jurisdictions()
        .filter_map(|jurisdiction| {
            keyring
                .wrapping_key(jurisdiction)
                .map(|key| (jurisdiction, key))
        })
        .map(|(jurisdiction, key)| {
            Ok((format!("check:{jurisdiction}"), key.subject_store_check()?))
        })
        .collect()
}

/// Checks that an existing store at `path` is intact and sealed under the keyring's
/// master key, without writing to it.
fn verify_existing(path: &Path, keyring: &Keyring) -> Result<(), Error> {
    if !sqlite::exists(path) {
        return Ok(());
    }
    let meta = sqlite::inspect(path)?;
    for (name, value) in checks(keyring)? {
        if let Some(recorded) = meta.get(&name)
            && recorded != &value
        {
            let jurisdiction = name.trim_start_matches("check:").to_owned();
            return Err(Error::WrongMasterKey(path.to_owned(), jurisdiction));
        }
    }
    Ok(())
}

impl Subjects {
    /// Opens (creating) the SQLite store in `data_dir` for `keyring`. A damaged store,
    /// or one sealed under another master key, is refused before anything is written.
    pub fn open(data_dir: &Path, keyring: &Keyring, cache_entries: usize) -> Result<Self, Error> {
        let path = data_dir.join(SUBJECTS_FILE);
        verify_existing(&path, keyring)?;
        let connection = sqlite::open_connection(&path)?;
        sqlite::record_checks(&connection, &path, &checks(keyring)?)?;
        let store = SqliteStore::start(&path, connection)?;
        Ok(Self::with_store(Box::new(store), cache_entries))
    }

    /// Subjects over any store.
    pub fn with_store(store: Box<dyn SubjectStore>, cache_entries: usize) -> Self {
        Self {
            store,
            cache: Mutex::new(Cache {
                capacity: cache_entries,
                entries: HashMap::new(),
                len: 0,
                order: VecDeque::new(),
                shreds: 0,
            }),
        }
    }

    fn cached(
        &self,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
    ) -> (Option<Arc<SubjectSecret>>, u64) {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (cache.get(jurisdiction, subject).cloned(), cache.shreds)
    }

    fn remember(&self, key: CacheKey, secret: &Arc<SubjectSecret>, shreds_before: u64) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A shred since the store was read: the secret may be gone; do not keep it.
        if cache.shreds == shreds_before {
            cache.insert(key, Arc::clone(secret));
        }
    }

    fn wrapping<'k>(
        keyring: &'k Keyring,
        jurisdiction: &Jurisdiction,
    ) -> Result<&'k Arc<WrappingKey>, Error> {
        keyring
            .wrapping_key(jurisdiction)
            .ok_or_else(|| Error::UnknownJurisdiction(jurisdiction.clone()))
    }

    fn unseal(
        keyring: &Keyring,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
        sealed: &[u8],
    ) -> Result<Arc<SubjectSecret>, Error> {
        Self::wrapping(keyring, jurisdiction)?
            .open_subject(subject, sealed)
            .map(Arc::new)
            .map_err(|_| Error::Integrity(jurisdiction.clone()))
    }

    /// The subject's secret for decrypting: live, shredded or unknown.
    pub async fn lookup(
        &self,
        keyring: &Keyring,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
    ) -> Result<Lookup, Error> {
        let (cached, shreds) = self.cached(jurisdiction, subject);
        if let Some(secret) = cached {
            return Ok(Lookup::Live(secret));
        }
        let key = (jurisdiction.clone(), subject.clone());
        match self.store.get(jurisdiction, subject).await? {
            None => Ok(Lookup::Unknown),
            Some(Row::Shredded { at }) => Ok(Lookup::Shredded(at)),
            Some(Row::Live(sealed)) => {
                let secret = Self::unseal(keyring, jurisdiction, subject, &sealed)?;
                self.remember(key, &secret, shreds);
                Ok(Lookup::Live(secret))
            }
        }
    }

    /// The subject's secret for encrypting, created (exactly once, under any
    /// concurrency) when the subject has none; [`Error::Shredded`] once shredded.
    pub async fn for_encryption(
        &self,
        keyring: &Keyring,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
    ) -> Result<Arc<SubjectSecret>, Error> {
        let shredded = |at| Error::Shredded {
            subject: subject.clone(),
            jurisdiction: jurisdiction.clone(),
            at,
        };
        match self.lookup(keyring, jurisdiction, subject).await? {
            Lookup::Live(secret) => return Ok(secret),
            Lookup::Shredded(at) => return Err(shredded(at)),
            Lookup::Unknown => {}
        }
        let (_, shreds) = self.cached(jurisdiction, subject);
        let fresh = SubjectSecret::generate()?;
        let sealed = Self::wrapping(keyring, jurisdiction)?.seal_subject(subject, &fresh)?;
        drop(fresh);
        let row = self
            .store
            .insert_if_absent(jurisdiction, subject, sealed, crate::record::rfc3339_now())
            .await?;
        match row {
            // Ours, or the first writer's: either way the one stored.
            Row::Live(sealed) => {
                let secret = Self::unseal(keyring, jurisdiction, subject, &sealed)?;
                self.remember((jurisdiction.clone(), subject.clone()), &secret, shreds);
                Ok(secret)
            }
            Row::Shredded { at } => Err(shredded(at)),
        }
    }

    /// Shreds `subject` in `jurisdictions`: durably destroys its secrets in the store,
    /// then forgets every cached copy, so that every request that starts after this
    /// returns finds it shredded.
    pub async fn shred(
        &self,
        subject: &SubjectId,
        jurisdictions: &[Jurisdiction],
    ) -> Result<Vec<ShredOutcome>, Error> {
        self.forget(subject);
        let outcome = self
            .store
            .shred(subject, jurisdictions, crate::record::rfc3339_now())
            .await;
        // Again after the store: a request that read the secret in between must not
        // have left it in the cache.
        self.forget(subject);
        outcome
    }

    fn forget(&self, subject: &SubjectId) {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .forget(subject);
    }
}

/// Re-seals the subject store in `data_dir` from `old`'s wrapping keys to `new`'s
/// (`keys rotate-master`), in one transaction. Idempotent: a store already sealed
/// under `new` (a rotation interrupted after this step) is left as it is. Returns how
/// many secrets were re-sealed; `None` when there is no store.
pub fn reseal_store(data_dir: &Path, old: &Keyring, new: &Keyring) -> Result<Option<u64>, Error> {
    let path = data_dir.join(SUBJECTS_FILE);
    if !sqlite::exists(&path) {
        return Ok(None);
    }
    let meta = sqlite::inspect(&path)?;
    let (old_checks, new_checks) = (checks(old)?, checks(new)?);
    let sealed_under = |checks: &BTreeMap<String, String>| {
        checks
            .iter()
            .all(|(name, value)| meta.get(name).is_none_or(|recorded| recorded == value))
    };
    if sealed_under(&new_checks) && !sealed_under(&old_checks) {
        return Ok(Some(0));
    }
    if !sealed_under(&old_checks) {
        return Err(Error::WrongMasterKey(path, "any".to_owned()));
    }
    let mut connection = sqlite::open_connection(&path)?;
    sqlite::reseal_all(
        &mut connection,
        &path,
        |jurisdiction, subject, sealed| {
            let jurisdiction = Jurisdiction::new(jurisdiction)
                .map_err(|error| Error::Corrupt(path.clone(), error.to_string()))?;
            let subject = SubjectId::new(subject)
                .map_err(|error| Error::Corrupt(path.clone(), error.to_string()))?;
            let secret = Subjects::unseal(old, &jurisdiction, &subject, sealed)?;
            Ok(Subjects::wrapping(new, &jurisdiction)?.seal_subject(&subject, &secret)?)
        },
        &new_checks,
    )
    .map(Some)
}

#[cfg(test)]
mod tests;
