//! `ringfence keys` and the key files ringfence writes.

use super::*;

#[test]
fn a_supplied_master_key_never_appears_in_output_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let key = "5a".repeat(32);
    let (child, started, _) = spawn_serve(dir.path(), &[], Some(&key));
    assert!(!started.contains(&key));
    assert!(!started.contains("DEVELOPMENT"), "{started}");
    assert!(!dir.path().join("ringfence-data/dev-master.key").exists());
    stop(child);

    let wrong = serve_refused(dir.path(), Some(&"6b".repeat(32)), &[]);
    assert_eq!(wrong.code, 1, "{}", wrong.stderr);
    wrong.complains("does not open keyring");
    assert!(!wrong.stderr.contains(&"6b".repeat(32)));

    let garbled = serve_refused(dir.path(), Some("not-a-key-but-secret"), &[]);
    assert_eq!(garbled.code, 1);
    garbled.complains("is not 32 bytes");
    assert!(!garbled.stderr.contains("not-a-key-but-secret"));

    let none = serve_refused(dir.path(), None, &[]);
    assert_eq!(none.code, 1);
    none.complains("no master key was supplied");
}

#[test]
fn concurrent_offline_rotations_all_land_once_each_and_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let key = "3c".repeat(32);
    let init = keys_with(dir.path(), &key, &["init", "--jurisdictions", "US,SG"]);
    init.succeeded();
    // The data directory `keys init` created is its owner's alone.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("ringfence-data"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }
    // 20 pairs: a US and an SG rotation started together, all 40 at once.
    let children: Vec<_> = (0..20)
        .flat_map(|_| ["US", "SG"])
        .map(|jurisdiction| {
            ringfence()
                .current_dir(dir.path())
                .env("RINGFENCE_MASTER_KEY", &key)
                .args(["keys", "rotate", "--jurisdiction", jurisdiction])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut reported = std::collections::BTreeSet::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let fields: Vec<&str> = stdout.trim().split('\t').collect();
        assert!(
            reported.insert((fields[0].to_owned(), fields[1].to_owned())),
            "two rotations reported the same version: {stdout}"
        );
    }
    let list = keys_with(dir.path(), &key, &["list"]);
    list.succeeded();
    for jurisdiction in ["US", "SG"] {
        let versions = list
            .stdout
            .lines()
            .filter(|line| line.starts_with(&format!("{jurisdiction}\t")))
            .count();
        assert_eq!(versions, 21, "{}", list.stdout);
        assert!(
            list.stdout.contains(&format!("{jurisdiction}\tv21\t")),
            "{}",
            list.stdout
        );
    }
    let events = key_events(dir.path());
    assert_eq!(
        events.iter().filter(|e| e.0 == "init").count(),
        2,
        "{events:?}"
    );
    let rotations: std::collections::BTreeSet<_> =
        events.iter().filter(|e| e.0 == "rotate").collect();
    assert_eq!(
        rotations.len(),
        40,
        "one distinct entry per rotation: {events:?}"
    );
    let verify = verify_with_public_key(dir.path());
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    verify.says(", 42 key events)");
    verify.says("every signature valid");
    // No temporary keyring copies are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ringfence-data"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn key_changes_are_refused_while_a_server_runs_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let key = "4d".repeat(32);
    let (server, _, _) = spawn_serve(dir.path(), &[], Some(&key));
    let keyring = std::fs::read(dir.path().join("ringfence-data/keyring.json")).unwrap();
    let rotate = keys_with(dir.path(), &key, &["rotate", "--jurisdiction", "US"]);
    assert_eq!(rotate.code, 1, "{}", rotate.stderr);
    rotate.complains("`ringfence serve` on 127.0.0.1:0 (pid");
    rotate.complains("stop it");
    assert_eq!(
        std::fs::read(dir.path().join("ringfence-data/keyring.json")).unwrap(),
        keyring,
        "keyring untouched"
    );
    // A second server on the same data directory is refused the same way.
    let second = serve_refused(dir.path(), Some(&key), &[]);
    assert_eq!(second.code, 1, "{}", second.stderr);
    second.complains("is in use by");
    stop(server);
    let rotate = keys_with(dir.path(), &key, &["rotate", "--jurisdiction", "US"]);
    rotate.succeeded();
}

#[test]
fn a_rolled_back_keyring_is_refused_by_serve_and_keys_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let key = "1f".repeat(32);
    let keyring = dir.path().join("ringfence-data/keyring.json");
    assert_eq!(keys_with(dir.path(), &key, &["init"]).code, 0);
    let old = std::fs::read(&keyring).unwrap();
    let rotate = keys_with(dir.path(), &key, &["rotate", "--jurisdiction", "US"]);
    rotate.succeeded();
    // Someone with write access to the data directory restores the older file: every
    // tag in it is genuine, only the log's checkpoint knows it is old.
    std::fs::write(&keyring, &old).unwrap();
    let serve = serve_refused(dir.path(), Some(&key), &[]);
    assert_eq!(serve.code, 1, "{}", serve.stderr);
    assert!(
        serve
            .stderr
            .contains("keyring was rolled back: jurisdiction `US` is at generation 1")
            && serve.stderr.contains("vouches for generation 2"),
        "{}",
        serve.stderr
    );
    let again = keys_with(dir.path(), &key, &["rotate", "--jurisdiction", "US"]);
    assert_eq!(again.code, 1, "{}", again.stderr);
    again.complains("rolled back");
    assert_eq!(std::fs::read(&keyring).unwrap(), old, "file untouched");
    let verify = verify_with_public_key(dir.path());
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
}

#[test]
fn keys_migrate_converts_the_old_format_once_and_logs_it() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ringfence-data");
    std::fs::create_dir_all(&data).unwrap();
    let key = "2a".repeat(32);
    let master = ringfence::keys::parse_master_key(&key, "test").unwrap();
    let wrapper = ringfence::crypto::LegacyKeyWrapper::new(&master).unwrap();
    let us = ringfence::Jurisdiction::new("US").unwrap();
    let root = ringfence::crypto::SecretKey::generate().unwrap();
    let sealed = wrapper
        .seal(&us, ringfence::KeyVersion::FIRST, &root)
        .unwrap();
    let legacy = serde_json::json!({
        "format": "ringfence-keyring/1",
        "jurisdictions": {"US": {"current": 1, "versions": [{
            "version": 1, "created_at": "2026-01-01T00:00:00Z",
            "sealed": base64::engine::general_purpose::STANDARD.encode(sealed),
        }]}},
    });
    std::fs::write(data.join("keyring.json"), legacy.to_string()).unwrap();
    let list = keys_with(dir.path(), &key, &["list"]);
    assert_eq!(list.code, 1, "{}", list.stderr);
    list.complains("ringfence keys migrate");
    let migrate = keys_with(dir.path(), &key, &["migrate"]);
    migrate.succeeded();
    let expected_id = ringfence::crypto::DerivationKey::from_root(&root)
        .key_id(&us, ringfence::KeyVersion::FIRST)
        .unwrap()
        .to_string();
    migrate.says(&expected_id);
    let list = keys_with(dir.path(), &key, &["list"]);
    list.succeeded();
    assert!(
        list.stdout
            .contains(&format!("US\tv1\t{expected_id}\t2026-01-01T00:00:00Z")),
        "{}",
        list.stdout
    );
    assert_eq!(
        key_events(dir.path()),
        vec![("migrate".to_owned(), "US".to_owned(), 1)]
    );
    let twice = keys_with(dir.path(), &key, &["migrate"]);
    assert_eq!(twice.code, 1, "{}", twice.stderr);
    twice.complains("nothing to migrate");
}

#[test]
fn a_change_saved_but_not_logged_is_recorded_and_the_log_keeps_one_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = "5e".repeat(32);
    assert_eq!(
        keys_with(dir.path(), &key, &["init", "--jurisdictions", "US"]).code,
        0
    );
    // As if `keys rotate` crashed between saving the keyring and logging the change.
    let master = ringfence::keys::LocalMasterKey::new(
        ringfence::keys::parse_master_key(&key, "test").unwrap(),
        ringfence::keys::MasterKeyOrigin::Environment,
    );
    let path = dir.path().join("ringfence-data/keyring.json");
    let mut keyring = ringfence::keys::Keyring::open(&path, &master).unwrap();
    keyring
        .rotate(&ringfence::Jurisdiction::new("US").unwrap())
        .unwrap();
    keyring.save().unwrap();
    // The next key command records the unlogged change before its own.
    let rotate = keys_with(dir.path(), &key, &["rotate", "--jurisdiction", "US"]);
    rotate.succeeded();
    assert_eq!(
        key_events(dir.path()),
        vec![
            ("init".to_owned(), "US".to_owned(), 1),
            ("unlogged".to_owned(), "US".to_owned(), 2),
            ("rotate".to_owned(), "US".to_owned(), 3),
        ]
    );
    let verify = verify_with_public_key(dir.path());
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);

    // Another checkpoint key would sign this log under a second identity: refused,
    // whether it would be created or exists already.
    let missing = keys_with(
        dir.path(),
        &key,
        &[
            "rotate",
            "--jurisdiction",
            "US",
            "--checkpoint-key",
            "other.pem",
        ],
    );
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    missing.complains("no checkpoint signing key at `other.pem`");
    assert!(!dir.path().join("other.pem").exists());
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(keys_with(fresh.path(), &key, &["init"]).code, 0);
    let foreign = fresh.path().join("ringfence-data/audit-signing-key.pem");
    let other = run(ringfence()
        .current_dir(dir.path())
        .env("RINGFENCE_MASTER_KEY", &key)
        .args(["keys", "rotate", "--jurisdiction", "US", "--checkpoint-key"])
        .arg(&foreign));
    assert_eq!(other.code, 1, "{}", other.stderr);
    other.complains("is signed by key");
    assert_eq!(
        key_events(dir.path()).len(),
        3,
        "nothing logged by refused commands"
    );
}

/// The private keys ringfence writes (checkpoint signing key, development CA, server,
/// client and token keys) load in OpenSSL and in Python `cryptography`, and each tool
/// derives from them the same public key ringfence publishes.
#[test]
fn the_private_keys_ringfence_writes_load_in_openssl_and_python_cryptography() {
    let (Some(openssl), Some(python)) = (
        system_tools::openssl(),
        system_tools::python_with_cryptography(),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let init = run(ringfence().current_dir(dir.path()).args([
        "keys",
        "init",
        "--danger-allow-development-master-key",
    ]));
    assert_eq!(init.code, 0, "keys init: {}", init.stderr);
    let pki = run(ringfence()
        .current_dir(dir.path())
        .args(["dev", "init", "--policies"])
        .arg(shipped_policies()));
    assert_eq!(pki.code, 0, "dev init: {}", pki.stderr);

    let data = dir.path().join("ringfence-data");
    let pki = data.join("dev-pki");
    let keys = [
        data.join("audit-signing-key.pem"),
        pki.join("token-signing-key.pem"),
        pki.join("ca-key.pem"),
        pki.join("server-key.pem"),
        pki.join("clients/us-signup-key.pem"),
    ];
    for key in &keys {
        assert!(key.exists(), "{} was not written", key.display());
        let derived = Command::new(&openssl)
            .args(["pkey", "-pubout", "-in"])
            .arg(key)
            .output()
            .unwrap();
        assert!(
            derived.status.success(),
            "openssl cannot load {}: {}",
            key.display(),
            String::from_utf8_lossy(&derived.stderr)
        );
        let loaded = Command::new(&python)
            .args([
                "-c",
                "import sys\n\
                 from cryptography.hazmat.primitives import serialization as s\n\
                 key = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n\
                 sys.stdout.write(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode())",
            ])
            .arg(key)
            .output()
            .unwrap();
        assert!(
            loaded.status.success(),
            "python cryptography cannot load {}: {}",
            key.display(),
            String::from_utf8_lossy(&loaded.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&derived.stdout),
            String::from_utf8_lossy(&loaded.stdout),
            "openssl and python derive different public keys from {}",
            key.display()
        );
    }
    // The public keys ringfence publishes are the ones the tools derive.
    let derived = |key: &Path| {
        let output = Command::new(&openssl)
            .args(["pkey", "-pubout", "-in"])
            .arg(key)
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        derived(&keys[0]),
        std::fs::read_to_string(data.join("audit-signing-key.pub.pem")).unwrap()
    );
    let certificate_key = Command::new(&openssl)
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(pki.join("server.pem"))
        .output()
        .unwrap();
    assert_eq!(
        derived(&keys[3]),
        String::from_utf8(certificate_key.stdout).unwrap()
    );
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pki.join("jwks.json")).unwrap()).unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let raw = Command::new(&python)
        .args([
            "-c",
            "import sys, base64\n\
             from cryptography.hazmat.primitives import serialization as s\n\
             key = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n\
             raw = key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)\n\
             sys.stdout.write(base64.urlsafe_b64encode(raw).decode().rstrip('='))",
        ])
        .arg(&keys[1])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(raw.stdout).unwrap(), x);
}

#[test]
fn the_key_lifecycle_runs_live_through_the_server_and_offline_and_the_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let data = dir.path().join("ringfence-data");
    let (server, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
    let address = address_of(&started);
    let token = |employee: &str, service: &str| {
        let token = run(ringfence().current_dir(dir.path()).args([
            "dev",
            "token",
            "--employee",
            employee,
            "--service",
            service,
        ]));
        token.succeeded();
        let path = dir.path().join(format!("{employee}.jwt"));
        std::fs::write(&path, token.stdout.trim()).unwrap();
        path
    };
    // What the server will decide, explained offline from the policy directory.
    run(ringfence().current_dir(dir.path()).args([
        "policy",
        "explain",
        "--action",
        "rotate_key",
        "--jurisdiction",
        "US",
        "--employee",
        "kim",
        "--service",
        "us-key-console",
        "--ticket",
        "KEY-9",
    ]))
    .succeeded()
    .says("rotate_key KeyRing::\"US\" by Employee::\"kim\"")
    .says("ALLOW determined by us-key-admins-manage-us-keys");
    let kim = token("kim", "us-key-console");
    let alice = token("alice", "us-support-tool");
    let online = |args: &[&str]| {
        run(ringfence()
            .current_dir(dir.path())
            .arg("keys")
            .args(args)
            .args(["--server", &address, "--dev-service", "us-key-console"])
            .arg("--token-file")
            .arg(&kim)
            .args(["--ticket", "KEY-9"]))
    };
    let pki = data.join("dev-pki");
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let socket: std::net::SocketAddr = address.parse().unwrap();
    let client = |service: &'static str| {
        let (ca, cert, key) = (
            read("ca.pem"),
            read(&format!("clients/{service}.pem")),
            read(&format!("clients/{service}-key.pem")),
        );
        runtime
            .block_on(async move { mtls_client(socket, &ca, Some((&cert, &key))).await.unwrap() })
    };
    let mut signup = client("us-signup");
    let mut support = client("us-support-tool");
    let alice_token = std::fs::read_to_string(&alice).unwrap();
    let mut read_email = |record: ringfence::pb::EncryptedRecord| {
        runtime.block_on(async {
            support
                .decrypt_record(with_token(
                    decrypt_request(record, &["email"], "support", "INC-1"),
                    &alice_token,
                ))
                .await
                .unwrap()
                .into_inner()
        })
    };
    let first = runtime.block_on(encrypted_record(
        &mut signup,
        tonic::Request::new(profile("u-1", "US")),
    ));

    online(&["rotate", "--jurisdiction", "US"])
        .succeeded()
        .says("US\tv2\t")
        .says("(rotate)");
    online(&["retire", "--jurisdiction", "US", "--below", "2"])
        .succeeded()
        .says("(retire)");
    let answer = read_email(first.clone());
    assert!(matches!(
        outcome(&answer, "email"),
        ringfence::pb::field_outcome::Outcome::Error(error)
            if error.kind() == ringfence::pb::field_error::Kind::RetiredKeyVersion
    ));
    online(&["unretire", "--jurisdiction", "US", "--from", "1"])
        .succeeded()
        .says("(unretire)");
    online(&["list", "--jurisdiction", "US"])
        .succeeded()
        .says("\tdecrypt-only\t")
        .says("\tactive\t");
    // Offline changes stay refused while the server runs, pointing at --server.
    run(ringfence().current_dir(dir.path()).args([
        "keys",
        "rotate",
        "--jurisdiction",
        "US",
        "--dev",
    ]))
    .complains("--server");
    let second = runtime.block_on(encrypted_record(
        &mut signup,
        tonic::Request::new(profile("u-2", "US")),
    ));
    drop((signup, read_email));
    stop_logged(server, &logs);

    // Offline: re-seal everything under a new master key; the development key that
    // opened it before opens nothing now.
    let old_key = std::fs::read_to_string(data.join("dev-master.key")).unwrap();
    // The current key as the "new" one is refused, and its file stays.
    std::fs::write(dir.path().join("same.key"), &old_key).unwrap();
    let same = run(ringfence().current_dir(dir.path()).args([
        "keys",
        "rotate-master",
        "--dev",
        "--new-master-key-file",
        "same.key",
    ]));
    assert_eq!(same.code, 1, "{}", same.stdout);
    same.complains("already opens");
    assert!(data.join("dev-master.key").exists());
    let new_key = "7e".repeat(32);
    std::fs::write(dir.path().join("new.key"), &new_key).unwrap();
    run(ringfence().current_dir(dir.path()).args([
        "keys",
        "rotate-master",
        "--dev",
        "--new-master-key-file",
        "new.key",
    ]))
    .succeeded()
    .says("re-sealed")
    .says("removed the development master key");
    keys_with(dir.path(), old_key.trim(), &["list"]).complains("does not open keyring");
    keys_with(dir.path(), &new_key, &["list"])
        .succeeded()
        .says("US\tv1\t")
        .says("decrypt-only");

    // Started with only the new master key, everything decrypts.
    let (server, started, logs) = spawn_serve(dir.path(), &["--dev"], Some(&new_key));
    let socket: std::net::SocketAddr = address_of(&started).parse().unwrap();
    runtime.block_on(async {
        let mut support = mtls_client(
            socket,
            &read("ca.pem"),
            Some((
                &read("clients/us-support-tool.pem"),
                &read("clients/us-support-tool-key.pem"),
            )),
        )
        .await
        .unwrap();
        for (record, id) in [(first, "u-1"), (second, "u-2")] {
            let answer = support
                .decrypt_record(with_token(
                    decrypt_request(record, &["email"], "support", "INC-1"),
                    &alice_token,
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(matches!(
                outcome(&answer, "email"),
                ringfence::pb::field_outcome::Outcome::Plaintext(p) if p == &secret_value(id, "email")
            ));
        }
    });
    stop_logged(server, &logs);

    // The log verifies with the public key after online and offline key events, and
    // `audit query` finds them by kind and jurisdiction.
    run(ringfence().current_dir(dir.path()).args([
        "audit",
        "verify",
        "--public-key",
        "ringfence-data/audit-signing-key.pub.pem",
    ]))
    .succeeded()
    .says("every signature valid");
    let us = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "query",
        "--kind",
        "key_event",
        "--jurisdiction",
        "US",
    ]));
    us.succeeded();
    let operations: Vec<String> = us
        .stdout
        .lines()
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            entry["key_event"]["operation"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        operations,
        ["init", "rotate", "retire", "unretire", "reseal"],
        "{}",
        us.stdout
    );
    let admin = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "query",
        "--kind",
        "key_admin",
        "--jurisdiction",
        "US",
        "--principal",
        "kim",
    ]));
    admin.succeeded();
    assert_eq!(admin.stdout.lines().count(), 4, "{}", admin.stdout);
    // Auditors re-decide key administration like any other decision.
    run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "replay", "--kind", "key_admin"]))
    .succeeded()
    .says("4 entries replayed (4 field decisions)")
    .says(": 0 differ");
}
