use super::*;
use crate::keys::LocalMasterKey;

fn jurisdictions() -> Vec<Jurisdiction> {
    vec![
        Jurisdiction::new("US").unwrap(),
        Jurisdiction::new("EU").unwrap(),
    ]
}

fn keyring(dir: &Path, master: &LocalMasterKey) -> Keyring {
    Keyring::create_unlogged(&dir.join("keyring.json"), master, &jurisdictions()).unwrap()
}

fn subject(id: &str) -> SubjectId {
    SubjectId::new(id).unwrap()
}

/// Every file of a directory with its bytes, to show that a refusal wrote nothing
/// (SQLite's shared-memory index and empty WAL, which a read-only open may create,
/// aside).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            !name.ends_with("-shm") && !name.ends_with("-wal")
        })
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_first_encryptions_of_one_subject_create_one_secret() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let keyring = Arc::new(keyring(dir.path(), &master));
    // No cache, so every task goes to the store.
    let subjects = Arc::new(Subjects::open(dir.path(), &keyring, 0).unwrap());
    let us = Jurisdiction::new("US").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (subjects, keyring, us) = (Arc::clone(&subjects), Arc::clone(&keyring), us.clone());
        tasks.push(tokio::spawn(async move {
            subjects
                .for_encryption(&keyring, &us, &subject("carol"))
                .await
                .unwrap()
        }));
    }
    let mut secrets = Vec::new();
    for task in tasks {
        secrets.push(task.await.unwrap());
    }
    // Every task got the same secret: compared through the record keys they derive
    // (secrets never print).
    let scope_id = crate::record::RecordId::new("r").unwrap();
    let record_type = crate::record::RecordType::new("user_profile").unwrap();
    let key_id = keyring
        .key_id(&us, crate::record::KeyVersion::FIRST)
        .unwrap();
    let root = keyring
        .derivation_key(&us, crate::record::KeyVersion::FIRST)
        .unwrap();
    let scope = crate::crypto::RecordScope {
        jurisdiction: &us,
        key_version: crate::record::KeyVersion::FIRST,
        record_type: &record_type,
        record_id: &scope_id,
    };
    let field = crate::record::FieldName::new("email").unwrap();
    let first = root
        .subject_record_key(
            &scope,
            &crate::crypto::SubjectScope {
                subject: &subject("carol"),
                secret: &secrets[0],
                key_id,
            },
        )
        .unwrap();
    let [nonce] = crate::crypto::fresh_nonces(1).unwrap().try_into().unwrap();
    let sealed = first.seal(&scope, &field, &nonce, b"x").unwrap();
    let envelope = crate::crypto::Envelope::parse(&sealed).unwrap();
    for secret in &secrets {
        let key = root
            .subject_record_key(
                &scope,
                &crate::crypto::SubjectScope {
                    subject: &subject("carol"),
                    secret,
                    key_id,
                },
            )
            .unwrap();
        assert_eq!(
            key.open(&scope, &field, &envelope).unwrap().as_slice(),
            b"x"
        );
    }
    // And the store holds exactly one row for the subject.
    let connection = rusqlite::Connection::open(dir.path().join(SUBJECTS_FILE)).unwrap();
    let rows: i64 = connection
        .query_row(
            "SELECT count(*) FROM subjects WHERE subject = 'carol'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_shredded_subject_stays_shredded_across_a_restart_and_gets_no_new_secret() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let keyring = keyring(dir.path(), &master);
    let [us, eu] = <[Jurisdiction; 2]>::try_from(jurisdictions()).unwrap();
    let dave_sealed;
    {
        let subjects = Subjects::open(dir.path(), &keyring, 16).unwrap();
        subjects
            .for_encryption(&keyring, &us, &subject("dave"))
            .await
            .unwrap();
        subjects
            .for_encryption(&keyring, &us, &subject("erin"))
            .await
            .unwrap();
        let connection = rusqlite::Connection::open(dir.path().join(SUBJECTS_FILE)).unwrap();
        dave_sealed = connection
            .query_row(
                "SELECT sealed FROM subjects WHERE subject = 'dave'",
                [],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .unwrap();
        // In the database file, not only the WAL, before it is shredded.
        connection
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        drop(connection);
        assert!(
            snapshot_all(dir.path()).iter().any(|(_, bytes)| bytes
                .windows(dave_sealed.len())
                .any(|window| window == dave_sealed)),
            "the sealed secret should be on disk before shredding"
        );
        let outcome = subjects
            .shred(&subject("dave"), &[us.clone(), eu.clone()])
            .await
            .unwrap();
        assert_eq!(
            outcome.iter().map(ShredOutcome::as_str).collect::<Vec<_>>(),
            ["shredded", "no_secret"]
        );
        // Cached before, gone now.
        assert!(matches!(
            subjects
                .lookup(&keyring, &us, &subject("dave"))
                .await
                .unwrap(),
            Lookup::Shredded(_)
        ));
    }
    // The store thread has gone with its queue; a new process opens the file.
    let subjects = Subjects::open(dir.path(), &keyring, 16).unwrap();
    for jurisdiction in [&us, &eu] {
        assert!(matches!(
            subjects
                .lookup(&keyring, jurisdiction, &subject("dave"))
                .await
                .unwrap(),
            Lookup::Shredded(_)
        ));
        assert!(matches!(
            subjects
                .for_encryption(&keyring, jurisdiction, &subject("dave"))
                .await,
            Err(Error::Shredded { .. })
        ));
    }
    assert!(matches!(
        subjects
            .lookup(&keyring, &us, &subject("erin"))
            .await
            .unwrap(),
        Lookup::Live(_)
    ));
    assert!(matches!(
        subjects
            .lookup(&keyring, &us, &subject("nobody"))
            .await
            .unwrap(),
        Lookup::Unknown
    ));
    // Nothing of dave's secret is left in the database file or the WAL.
    let connection = rusqlite::Connection::open(dir.path().join(SUBJECTS_FILE)).unwrap();
    let live: i64 = connection
        .query_row(
            "SELECT count(*) FROM subjects WHERE subject = 'dave' AND sealed IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(live, 0);
    // secure_delete zeroed the freed bytes and the checkpoint emptied the WAL: the
    // sealed secret is in no file of the data directory.
    for (name, bytes) in snapshot_all(dir.path()) {
        assert!(
            !bytes
                .windows(dave_sealed.len())
                .any(|window| window == dave_sealed),
            "{name} still holds the shredded sealed secret"
        );
    }
}

fn snapshot_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_store_sealed_under_another_master_key_or_damaged_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let keyring = keyring(dir.path(), &master);
    let us = Jurisdiction::new("US").unwrap();
    {
        let subjects = Subjects::open(dir.path(), &keyring, 16).unwrap();
        subjects
            .for_encryption(&keyring, &us, &subject("frank"))
            .await
            .unwrap();
    }
    // Another keyring (another master key) over the same store.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keyring_at(other_dir.path());
    let before = snapshot(dir.path());
    let refused = Subjects::open(dir.path(), &other, 16).unwrap_err();
    assert!(matches!(refused, Error::WrongMasterKey(..)), "{refused}");
    assert!(snapshot(dir.path()) == before, "the refusal changed files");

    // Readable by its owner only, like the keyring.
    let path = dir.path().join(SUBJECTS_FILE);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // A damaged file.
    let mut bytes = std::fs::read(&path).unwrap();
    for byte in bytes.iter_mut().skip(100).take(4000) {
        *byte ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let before = snapshot(dir.path());
    let refused = Subjects::open(dir.path(), &keyring, 16).unwrap_err();
    assert!(matches!(refused, Error::Corrupt(..)), "{refused}");
    assert!(refused.to_string().contains("left untouched"), "{refused}");
    assert!(snapshot(dir.path()) == before, "the refusal changed files");
}

fn keyring_at(dir: &Path) -> Keyring {
    keyring(dir, &LocalMasterKey::generate().unwrap())
}

#[tokio::test]
async fn the_cache_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let keyring = keyring(dir.path(), &master);
    let us = Jurisdiction::new("US").unwrap();
    let subjects = Subjects::open(dir.path(), &keyring, 3).unwrap();
    for n in 0..10 {
        subjects
            .for_encryption(&keyring, &us, &subject(&format!("s{n}")))
            .await
            .unwrap();
    }
    let cache = subjects.cache.lock().unwrap();
    assert_eq!(cache.len, 3);
    assert_eq!(cache.entries.values().map(HashMap::len).sum::<usize>(), 3);
    assert_eq!(cache.order.len(), 3);
    assert!(cache.get(&us, &subject("s9")).is_some());
    assert!(cache.get(&us, &subject("s0")).is_none());
}

#[tokio::test]
async fn rotating_the_master_key_reseals_the_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let mut keyring = keyring(dir.path(), &master);
    let us = Jurisdiction::new("US").unwrap();
    {
        let subjects = Subjects::open(dir.path(), &keyring, 0).unwrap();
        subjects
            .for_encryption(&keyring, &us, &subject("gina"))
            .await
            .unwrap();
    }
    let old = keyring.clone();
    let new_master = LocalMasterKey::generate().unwrap();
    keyring.reseal(&new_master).unwrap();
    assert_eq!(reseal_store(dir.path(), &old, &keyring).unwrap(), Some(1));
    // Interrupted before the keyring was saved: running it again changes nothing.
    assert_eq!(reseal_store(dir.path(), &old, &keyring).unwrap(), Some(0));
    let subjects = Subjects::open(dir.path(), &keyring, 0).unwrap();
    assert!(matches!(
        subjects
            .lookup(&keyring, &us, &subject("gina"))
            .await
            .unwrap(),
        Lookup::Live(_)
    ));
    drop(subjects);
    assert!(matches!(
        Subjects::open(dir.path(), &old, 0),
        Err(Error::WrongMasterKey(..))
    ));
}

/// A store whose reads complete at once but answer only when let go: a request that
/// read a live secret before a shred and comes back after it.
#[derive(Debug)]
struct HeldReads {
    inner: SqliteStore,
    read: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    holding: Arc<std::sync::atomic::AtomicBool>,
}

impl SubjectStore for HeldReads {
    fn get(&self, jurisdiction: &Jurisdiction, subject: &SubjectId) -> StoreFuture<Option<Row>> {
        let read = self.inner.get(jurisdiction, subject);
        let (done, release, holding) = (
            Arc::clone(&self.read),
            Arc::clone(&self.release),
            Arc::clone(&self.holding),
        );
        Box::pin(async move {
            let row = read.await;
            if holding.load(std::sync::atomic::Ordering::SeqCst) {
                done.notify_one();
                release.notified().await;
            }
            row
        })
    }

    fn insert_if_absent(
        &self,
        jurisdiction: &Jurisdiction,
        subject: &SubjectId,
        sealed: Vec<u8>,
        created_at: String,
    ) -> StoreFuture<Row> {
        self.inner
            .insert_if_absent(jurisdiction, subject, sealed, created_at)
    }

    fn shred(
        &self,
        subject: &SubjectId,
        jurisdictions: &[Jurisdiction],
        at: String,
    ) -> StoreFuture<Vec<ShredOutcome>> {
        self.inner.shred(subject, jurisdictions, at)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_read_before_a_shred_is_not_cached_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let master = LocalMasterKey::generate().unwrap();
    let keyring = Arc::new(keyring(dir.path(), &master));
    let us = Jurisdiction::new("US").unwrap();
    // Make the subject's secret, then serve it through a store that holds reads.
    {
        let subjects = Subjects::open(dir.path(), &keyring, 16).unwrap();
        subjects
            .for_encryption(&keyring, &us, &subject("hana"))
            .await
            .unwrap();
    }
    let path = dir.path().join(SUBJECTS_FILE);
    let connection = sqlite::open_connection(&path).unwrap();
    let held = HeldReads {
        inner: SqliteStore::start(&path, connection).unwrap(),
        read: Arc::new(tokio::sync::Notify::new()),
        release: Arc::new(tokio::sync::Notify::new()),
        holding: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let (read, release, holding) = (
        Arc::clone(&held.read),
        Arc::clone(&held.release),
        Arc::clone(&held.holding),
    );
    let subjects = Arc::new(Subjects::with_store(Box::new(held), 16));

    // A request reads hana's live secret from the store...
    let early = {
        let (subjects, keyring, us) = (Arc::clone(&subjects), Arc::clone(&keyring), us.clone());
        tokio::spawn(async move { subjects.lookup(&keyring, &us, &subject("hana")).await })
    };
    read.notified().await;
    // ...the shred runs to its end while that request is still on its way back...
    holding.store(false, std::sync::atomic::Ordering::SeqCst);
    let outcome = subjects
        .shred(&subject("hana"), std::slice::from_ref(&us))
        .await
        .unwrap();
    assert_eq!(outcome[0].as_str(), "shredded");
    release.notify_one();
    // ...and gets the secret it read (it started before the shred returned)...
    assert!(matches!(early.await.unwrap().unwrap(), Lookup::Live(_)));
    // ...but must not have left it in the cache for requests that start after.
    assert!(matches!(
        subjects
            .lookup(&keyring, &us, &subject("hana"))
            .await
            .unwrap(),
        Lookup::Shredded(_)
    ));
}
