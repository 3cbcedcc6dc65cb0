use super::*;
use crate::crypto::LegacyKeyWrapper;

fn jurisdictions(codes: &[&str]) -> Vec<Jurisdiction> {
    codes
        .iter()
        .map(|c| Jurisdiction::new(c).unwrap())
        .collect()
}

fn master() -> LocalMasterKey {
    LocalMasterKey::new(
        SecretKey::generate().unwrap(),
        MasterKeyOrigin::File(PathBuf::from("test.key")),
    )
}

/// A saved keyring with US and SG at version 1 and US rotated to version 2.
fn saved(dir: &Path, master: &LocalMasterKey) -> PathBuf {
    let path = dir.join(KEYRING_FILE);
    let mut keyring = Keyring::empty(&path);
    for jurisdiction in jurisdictions(&["US", "SG"]) {
        keyring.initialize(&jurisdiction, master).unwrap();
    }
    keyring.rotate(&Jurisdiction::new("US").unwrap()).unwrap();
    keyring.save().unwrap();
    path
}

fn edit(path: &Path, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    change(&mut value);
    let text = serde_json::to_string_pretty(&value).unwrap();
    fs::write(path, &text).unwrap();
    text
}

#[test]
fn initializes_rotates_saves_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = dir.path().join(KEYRING_FILE);
    let us = Jurisdiction::new("US").unwrap();
    let mut keyring = Keyring::empty(&path);
    let event = keyring.initialize(&us, &master).unwrap();
    assert_eq!(
        (event.operation, event.version, event.generation),
        ("init", KeyVersion::FIRST, 1)
    );
    assert!(keyring.initialize(&us, &master).is_err(), "init twice");
    let rotated = keyring.rotate(&us).unwrap();
    assert_eq!((rotated.version.get(), rotated.generation), (2, 2));
    assert_ne!(rotated.key_id, event.key_id);
    keyring.save().unwrap();

    let mut reopened = Keyring::open(&path, &master).unwrap();
    assert!(
        !reopened.is_configured(&us),
        "open alone configures nothing"
    );
    let error = reopened
        .configure_encryption(&jurisdictions(&["US", "EU"]))
        .unwrap_err();
    assert!(
        error.to_string().contains("keys init --jurisdictions EU"),
        "{error}"
    );
    reopened
        .configure_encryption(&jurisdictions(&["US"]))
        .unwrap();
    assert_eq!(reopened.current_for_encryption(&us).unwrap().get(), 2);
    assert!(reopened.derivation_key(&us, KeyVersion::FIRST).is_ok());
    assert!(matches!(
        reopened.derivation_key(&us, KeyVersion::new(3).unwrap()),
        Err(Error::UnknownKeyVersion(..))
    ));
    assert_eq!(
        reopened.generations(),
        BTreeMap::from([("US".to_owned(), 2)])
    );
    let summary = reopened.summary();
    assert_eq!(summary[0].versions[1].key_id, rotated.key_id.to_string());
    assert!(matches!(
        Keyring::open(&dir.path().join("none.json"), &master),
        Err(Error::NoKeyring(_))
    ));
}

#[test]
fn wrong_master_key_is_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path(), &master());
    let error = Keyring::open(&path, &master()).unwrap_err();
    assert!(matches!(error, Error::WrongMasterKey { .. }), "{error}");
    assert!(error.to_string().contains("test.key"), "{error}");
}

#[test]
fn edited_metadata_is_refused_naming_the_jurisdiction_and_the_file_stays_untouched() {
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 5] = [
        ("current rolled back", |v| {
            v["jurisdictions"]["US"]["current"] = 1.into()
        }),
        ("generation lowered", |v| {
            v["jurisdictions"]["US"]["generation"] = 1.into()
        }),
        ("version dropped", |v| {
            v["jurisdictions"]["US"]["versions"]
                .as_array_mut()
                .unwrap()
                .pop();
            v["jurisdictions"]["US"]["current"] = 1.into();
        }),
        ("created_at changed", |v| {
            v["jurisdictions"]["US"]["versions"][0]["created_at"] = "2020-01-01T00:00:00Z".into()
        }),
        ("sections swapped", |v| {
            let us = v["jurisdictions"]["US"].clone();
            v["jurisdictions"]["US"] = v["jurisdictions"]["SG"].clone();
            v["jurisdictions"]["SG"] = us;
        }),
    ];
    for (what, change) in edits {
        let dir = tempfile::tempdir().unwrap();
        let master = master();
        let path = saved(dir.path(), &master);
        let text = edit(&path, change);
        let error = Keyring::open(&path, &master).unwrap_err();
        match what {
            // Both sections fail: indistinguishable from a wrong key, still refused.
            "sections swapped" => assert!(
                matches!(error, Error::WrongMasterKey { .. }),
                "{what}: {error}"
            ),
            _ => {
                assert!(matches!(error, Error::Tampered { .. }), "{what}: {error}");
                assert!(error.to_string().contains("`US`"), "{what}: {error}");
            }
        }
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            text,
            "{what}: file untouched"
        );
    }
}

#[test]
fn truncated_and_foreign_files_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = saved(dir.path(), &master);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    let error = Keyring::open(&path, &master).unwrap_err();
    assert!(matches!(error, Error::Invalid { .. }), "{error}");
    fs::write(&path, r#"{"format":"something-else","jurisdictions":{}}"#).unwrap();
    let error = Keyring::open(&path, &master).unwrap_err();
    assert!(error.to_string().contains("unsupported format"), "{error}");
}

#[test]
fn swapped_keys_resealed_with_the_right_master_key_are_refused_by_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = dir.path().join(KEYRING_FILE);
    let us = Jurisdiction::new("US").unwrap();
    let wrapping = master.wrapping_key(&us).unwrap();
    let roots = [
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    ];
    let mut versions = BTreeMap::new();
    for (index, version) in [KeyVersion::FIRST, KeyVersion::new(2).unwrap()]
        .into_iter()
        .enumerate()
    {
        let own = &roots[index];
        let other = &roots[1 - index];
        let key_id = DerivationKey::from_root(own).key_id(&us, version).unwrap();
        // The other version's key sealed under this version's id and position.
        let sealed = wrapping.seal(version, &key_id, other).unwrap();
        versions.insert(
            version,
            VersionKeys {
                derivation: DerivationKey::from_root(other),
                key_id,
                created_at: crate::record::rfc3339_now(),
                sealed,
            },
        );
    }
    let mut keyring = Keyring::empty(&path);
    keyring.keys.insert(
        us.clone(),
        JurisdictionKeys {
            wrapping,
            generation: 2,
            current: KeyVersion::new(2).unwrap(),
            versions,
        },
    );
    keyring.save().unwrap();
    let error = Keyring::open(&path, &master).unwrap_err();
    assert!(matches!(error, Error::KeyIdMismatch { .. }), "{error}");
    assert!(error.to_string().contains("`US` v1"), "{error}");
}

/// A format-1 keyring as the previous release wrote it.
fn legacy_keyring(path: &Path, master: &SecretKey) -> Vec<(u32, [u8; 32])> {
    let wrapper = LegacyKeyWrapper::new(master).unwrap();
    let us = Jurisdiction::new("US").unwrap();
    let mut roots = Vec::new();
    let mut versions = Vec::new();
    for version in 1..=2u32 {
        let root = SecretKey::generate().unwrap();
        let sealed = wrapper
            .seal(&us, KeyVersion::new(version).unwrap(), &root)
            .unwrap();
        versions.push(serde_json::json!({
            "version": version,
            "created_at": "2026-01-01T00:00:00Z",
            "sealed": base64::engine::general_purpose::STANDARD.encode(sealed),
        }));
        roots.push((version, *root.expose()));
    }
    let file = serde_json::json!({
        "format": LEGACY_KEYRING_FORMAT,
        "jurisdictions": {"US": {"current": 2, "versions": versions}},
    });
    fs::write(path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    roots
}

#[test]
fn the_old_format_is_refused_until_migrated_and_keeps_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEYRING_FILE);
    let secret = SecretKey::generate().unwrap();
    let roots = legacy_keyring(&path, &secret);
    let master = LocalMasterKey::new(
        SecretKey::from_bytes(*secret.expose()),
        MasterKeyOrigin::Environment,
    );
    let error = Keyring::open(&path, &master).unwrap_err();
    assert!(matches!(error, Error::Legacy(_)), "{error}");
    assert!(error.to_string().contains("keys migrate"), "{error}");

    let (migrated, events) = migrate(&path, &master).unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e.operation == "migrate" && e.generation == 1)
    );
    migrated.save().unwrap();
    let mut opened = Keyring::open(&path, &master).unwrap();
    let us = Jurisdiction::new("US").unwrap();
    opened
        .configure_encryption(std::slice::from_ref(&us))
        .unwrap();
    assert_eq!(opened.current_for_encryption(&us).unwrap().get(), 2);
    // The same root keys: derived record keys are unchanged.
    for (version, root) in roots {
        let expected = DerivationKey::from_root(&SecretKey::from_bytes(root));
        let version = KeyVersion::new(version).unwrap();
        assert_eq!(
            opened
                .derivation_key(&us, version)
                .unwrap()
                .key_id(&us, version)
                .unwrap(),
            expected.key_id(&us, version).unwrap()
        );
    }
    assert!(
        migrate(&path, &master)
            .unwrap_err()
            .to_string()
            .contains("nothing to migrate")
    );
    // A wrong master key cannot migrate either.
    legacy_keyring(&path, &secret);
    assert!(matches!(
        migrate(&path, &self::master()),
        Err(Error::WrongMasterKey { .. })
    ));
}

#[test]
fn keys_at_rest_are_sealed_and_private_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = saved(dir.path(), &master);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"sealed\"") && text.contains("\"mac\"") && text.contains("\"key_id\""));
    let keyring = Keyring::open(&path, &master).unwrap();
    let printed = format!("{keyring:?} {master:?}");
    assert!(!printed.contains("sealed"), "{printed}");
    let longest_hex_run = printed
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(longest_hex_run < 32, "{printed}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "keyring readable by others: {mode:o}");
    }
}
