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
            VersionKeys::held(
                DerivationKey::from_root(other),
                key_id,
                crate::record::rfc3339_now(),
                sealed,
            ),
        );
    }
    let mut keyring = Keyring::empty(&path);
    keyring.keys.insert(
        us.clone(),
        JurisdictionKeys {
            wrapping: Arc::new(wrapping),
            generation: 2,
            current: KeyVersion::new(2).unwrap(),
            min_decryption: KeyVersion::FIRST,
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

fn v(number: u32) -> KeyVersion {
    KeyVersion::new(number).unwrap()
}

fn states(keyring: &Keyring, jurisdiction: &str) -> Vec<(u32, VersionState)> {
    keyring
        .summary()
        .into_iter()
        .find(|info| info.jurisdiction == jurisdiction)
        .unwrap()
        .versions
        .iter()
        .map(|version| (version.version, version.state))
        .collect()
}

#[test]
fn retire_unretire_and_destroy_follow_the_lifecycle_and_survive_reopening() {
    use VersionState::*;
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = saved(dir.path(), &master);
    let us = Jurisdiction::new("US").unwrap();
    let mut keyring = Keyring::open(&path, &master).unwrap();
    keyring.rotate(&us).unwrap();
    assert_eq!(
        states(&keyring, "US"),
        [(1, DecryptOnly), (2, DecryptOnly), (3, Active)]
    );

    // The current version cannot be retired; nor can a version be destroyed before
    // it is retired.
    assert!(matches!(keyring.retire(&us, v(4)), Err(Error::Refused(_))));
    let refused = keyring.destroy(&us, v(2)).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("retire versions below 2 first"),
        "{refused}"
    );

    let generation = keyring.generations()["US"];
    let retired = keyring.retire(&us, v(3)).unwrap();
    assert_eq!(
        retired
            .iter()
            .map(|e| (e.operation, e.version.get()))
            .collect::<Vec<_>>(),
        [("retire", 1), ("retire", 2)]
    );
    assert!(retired.iter().all(|e| e.generation == generation + 1));
    assert!(
        keyring.retire(&us, v(2)).unwrap().is_empty(),
        "already retired"
    );
    assert_eq!(
        keyring.generations()["US"],
        generation + 1,
        "no-op changes nothing"
    );
    assert!(matches!(
        keyring.derivation_key(&us, v(1)),
        Err(Error::RetiredKeyVersion(_, version)) if version == v(1)
    ));
    assert!(keyring.derivation_key(&us, v(3)).is_ok());
    // Other jurisdictions are untouched.
    assert!(
        keyring
            .derivation_key(&Jurisdiction::new("SG").unwrap(), v(1))
            .is_ok()
    );
    keyring.save().unwrap();

    let mut keyring = Keyring::open(&path, &master).unwrap();
    assert_eq!(
        states(&keyring, "US"),
        [(1, Retired), (2, Retired), (3, Active)]
    );
    let unretired = keyring.unretire(&us, v(2)).unwrap();
    assert_eq!(unretired.len(), 1);
    assert_eq!(
        states(&keyring, "US"),
        [(1, Retired), (2, DecryptOnly), (3, Active)]
    );

    let destroyed = keyring.destroy(&us, v(2)).unwrap();
    assert_eq!(
        destroyed
            .iter()
            .map(|e| (e.operation, e.version.get()))
            .collect::<Vec<_>>(),
        [("destroy", 1)]
    );
    keyring.save().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let first = &file["jurisdictions"]["US"]["versions"][0];
    assert!(
        first.get("sealed").is_none(),
        "a destroyed key is not on disk: {first}"
    );
    assert!(first["destroyed_at"].is_string());
    assert_eq!(file["format"], KEYRING_FORMAT);

    // Destroyed for good: reopened, it stays destroyed; unretire cannot bring it back.
    let mut keyring = Keyring::open(&path, &master).unwrap();
    assert_eq!(
        states(&keyring, "US"),
        [(1, Destroyed), (2, DecryptOnly), (3, Active)]
    );
    assert!(matches!(
        keyring.derivation_key(&us, v(1)),
        Err(Error::DestroyedKeyVersion(..))
    ));
    keyring.retire(&us, v(2)).unwrap();
    let error = keyring.unretire(&us, v(1)).unwrap_err();
    assert!(error.to_string().contains("destroyed"), "{error}");
    // Version numbers are never reused.
    assert_eq!(keyring.rotate(&us).unwrap().version, v(4));
}

#[test]
fn lifecycle_state_is_authenticated() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = saved(dir.path(), &master);
    let us = Jurisdiction::new("US").unwrap();
    let mut keyring = Keyring::open(&path, &master).unwrap();
    keyring.retire(&us, v(2)).unwrap();
    keyring.save().unwrap();
    // Lowering the threshold by hand, or dropping it, would unretire without a trace.
    for edit_file in [
        (|value: &mut serde_json::Value| {
            value["jurisdictions"]["US"]["min_decryption_version"] = 1.into();
        }) as fn(&mut serde_json::Value),
        |value| {
            value["jurisdictions"]["US"]
                .as_object_mut()
                .unwrap()
                .remove("min_decryption_version");
        },
        |value| {
            value["jurisdictions"]["US"]["versions"][0]["destroyed_at"] =
                "2026-01-01T00:00:00Z".into();
            value["jurisdictions"]["US"]["versions"][0]
                .as_object_mut()
                .unwrap()
                .remove("sealed");
        },
    ] {
        let original = fs::read_to_string(&path).unwrap();
        edit(&path, edit_file);
        assert!(Keyring::open(&path, &master).is_err());
        fs::write(&path, original).unwrap();
    }
    assert!(Keyring::open(&path, &master).is_ok());
}

#[test]
fn format_2_files_are_read_and_written_back_as_format_3() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = dir.path().join(KEYRING_FILE);
    let us = Jurisdiction::new("US").unwrap();
    let mut keyring = Keyring::empty(&path);
    keyring.initialize(&us, &master).unwrap();
    let jurisdiction = &keyring.keys[&us];
    let held = &jurisdiction.versions[&KeyVersion::FIRST];
    let Held::Key { sealed, .. } = &held.held else {
        panic!("held")
    };
    // Written by hand exactly as the previous release wrote format 2.
    let metadata = sealed::metadata_bytes(
        &us,
        1,
        KeyVersion::FIRST,
        None,
        [sealed::VersionMeta {
            version: KeyVersion::FIRST,
            key_id: &held.key_id,
            created_at: &held.created_at,
            sealed: Ok(sealed),
        }]
        .into_iter(),
    )
    .unwrap();
    let mac = jurisdiction.wrapping.authenticate(&metadata).unwrap();
    let text = serde_json::json!({
        "format": PREVIOUS_KEYRING_FORMAT,
        "jurisdictions": {"US": {
            "generation": 1, "current": 1,
            "versions": [{"version": 1, "key_id": held.key_id.to_string(),
                "created_at": held.created_at, "sealed": base64::engine::general_purpose::STANDARD.encode(sealed)}],
            "mac": hex::encode(mac),
        }}
    });
    fs::write(&path, text.to_string()).unwrap();
    let mut reopened = Keyring::open(&path, &master).unwrap();
    assert!(reopened.derivation_key(&us, KeyVersion::FIRST).is_ok());
    // A format-2 file cannot carry format-3 members.
    edit(&path, |value| {
        value["jurisdictions"]["US"]["min_decryption_version"] = 1.into();
    });
    assert!(Keyring::open(&path, &master).is_err());
    reopened.rotate(&us).unwrap();
    reopened.save().unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(file["format"], KEYRING_FORMAT);
    assert_eq!(
        Keyring::open(&path, &master).unwrap().summary()[0].current,
        2
    );
}

#[test]
fn resealing_under_a_new_master_key_keeps_every_key_and_locks_out_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = master();
    let path = saved(dir.path(), &old);
    let us = Jurisdiction::new("US").unwrap();
    let mut keyring = Keyring::open(&path, &old).unwrap();
    keyring.rotate(&us).unwrap();
    keyring.retire(&us, v(2)).unwrap();
    keyring.destroy(&us, v(2)).unwrap();
    let scope_bytes = |keyring: &Keyring, version: u32| {
        let record_type = crate::record::RecordType::new("user_profile").unwrap();
        let record_id = crate::record::RecordId::new("u-1").unwrap();
        let scope = crate::crypto::RecordScope {
            jurisdiction: &us,
            key_version: v(version),
            record_type: &record_type,
            record_id: &record_id,
        };
        let key = keyring
            .derivation_key(&us, v(version))
            .unwrap()
            .record_key(&scope)
            .unwrap();
        let name = crate::record::FieldName::new("email").unwrap();
        let nonce = crate::crypto::fresh_nonces(1).unwrap();
        let sealed = key
            .seal(&scope, &name, &nonce[0], b"ada@example.com")
            .unwrap();
        (sealed, record_type, record_id, name)
    };
    let (before, record_type, record_id, name) = scope_bytes(&keyring, 3);
    let ids: Vec<_> = keyring
        .summary()
        .into_iter()
        .map(|info| info.versions)
        .collect();
    let new = master();
    let events = keyring.reseal(&new).unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.operation, e.jurisdiction.as_str()))
            .collect::<Vec<_>>(),
        [("reseal", "SG"), ("reseal", "US")]
    );
    keyring.save().unwrap();
    assert!(matches!(
        Keyring::open(&path, &old),
        Err(Error::WrongMasterKey { .. })
    ));
    let reopened = Keyring::open(&path, &new).unwrap();
    let after: Vec<_> = reopened
        .summary()
        .into_iter()
        .map(|info| info.versions)
        .collect();
    assert_eq!(ids, after, "versions, key ids, dates and states unchanged");
    // A field sealed before opens with the re-sealed keys.
    let envelope = crate::crypto::Envelope::parse(&before).unwrap();
    let scope = crate::crypto::RecordScope {
        jurisdiction: &us,
        key_version: v(3),
        record_type: &record_type,
        record_id: &record_id,
    };
    let key = reopened
        .derivation_key(&us, v(3))
        .unwrap()
        .record_key(&scope)
        .unwrap();
    assert_eq!(
        key.open(&scope, &name, &envelope).unwrap().as_slice(),
        b"ada@example.com"
    );
}

#[test]
fn saving_removes_temporary_copies_a_crashed_writer_left() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let path = saved(dir.path(), &master);
    // As `write_private_file` names them: `.keyring.json.<pid>.<hex>.tmp`.
    let stale = dir.path().join(".keyring.json.4242.00112233aabbccdd.tmp");
    fs::write(&stale, fs::read(&path).unwrap()).unwrap();
    let unrelated = dir.path().join(".other.json.4242.00.tmp");
    fs::write(&unrelated, b"x").unwrap();
    let keyring = Keyring::open(&path, &master).unwrap();
    assert!(stale.exists(), "opening removes nothing");
    keyring.save().unwrap();
    assert!(!stale.exists(), "an old copy of the sealed keys is gone");
    assert!(unrelated.exists());
}
