//! Data subjects as operators meet them: `keys shred` live and offline, a shred that
//! survives `kill -9`, `audit query --subject`, and a subject store that `serve`
//! refuses (damaged, or sealed under another master key) without touching it.

use super::*;

/// Clients of a `serve --dev` process in `dir` at `address`.
struct DevClients {
    runtime: tokio::runtime::Runtime,
    signup: ringfence::pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
    support: ringfence::pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
    alice: String,
}

impl DevClients {
    fn connect(dir: &Path, address: &str) -> Self {
        let pki = dir.join("ringfence-data/dev-pki");
        let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let socket: std::net::SocketAddr = address.parse().unwrap();
        let client = |service: &str| {
            let (ca, cert, key) = (
                read("ca.pem"),
                read(&format!("clients/{service}.pem")),
                read(&format!("clients/{service}-key.pem")),
            );
            runtime.block_on(
                async move { mtls_client(socket, &ca, Some((&cert, &key))).await.unwrap() },
            )
        };
        let signup = client("us-signup");
        let support = client("us-support-tool");
        let alice = dev_token(dir, "alice", "us-support-tool");
        Self {
            runtime,
            signup,
            support,
            alice: std::fs::read_to_string(alice).unwrap(),
        }
    }

    fn encrypt(&mut self, id: &str, subject: &str) -> ringfence::pb::EncryptedRecord {
        let mut message = profile(id, "US");
        message.subject_id = subject.to_owned();
        self.runtime.block_on(encrypted_record(
            &mut self.signup,
            tonic::Request::new(message),
        ))
    }

    /// The outcome of `email` read by alice.
    fn email(
        &mut self,
        record: &ringfence::pb::EncryptedRecord,
    ) -> ringfence::pb::field_outcome::Outcome {
        let request = with_token(
            decrypt_request(record.clone(), &["email"], "support", "INC-1"),
            &self.alice,
        );
        let answer = self
            .runtime
            .block_on(self.support.decrypt_record(request))
            .unwrap()
            .into_inner();
        outcome(&answer, "email").clone()
    }
}

/// Writes a development token of `employee` bound to `service` to a file in `dir`.
fn dev_token(dir: &Path, employee: &str, service: &str) -> std::path::PathBuf {
    let token = run(ringfence().current_dir(dir).args([
        "dev",
        "token",
        "--employee",
        employee,
        "--service",
        service,
    ]));
    token.succeeded();
    let path = dir.join(format!("{employee}-{service}.jwt"));
    std::fs::write(&path, token.stdout.trim()).unwrap();
    path
}

fn is_shredded(outcome: &ringfence::pb::field_outcome::Outcome) -> bool {
    matches!(outcome, ringfence::pb::field_outcome::Outcome::Error(error)
        if error.kind() == ringfence::pb::field_error::Kind::Shredded)
}

#[test]
fn a_shred_survives_kill_9_offline_shreds_are_logged_and_queries_find_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let (server, started, _logs) = spawn_serve(dir.path(), &["--dev"], None);
    let address = address_of(&started);
    let mut clients = DevClients::connect(dir.path(), &address);
    let carol = clients.encrypt("u-1", "carol");
    let dave = clients.encrypt("u-2", "dave");
    assert!(matches!(
        clients.email(&carol),
        ringfence::pb::field_outcome::Outcome::Plaintext(_)
    ));

    // Live, through the key console: the shipped policies let kim shred US subjects.
    let kim = dev_token(dir.path(), "kim", "us-key-console");
    let shred = |subject: &str, purpose: &str| {
        run(ringfence()
            .current_dir(dir.path())
            .args([
                "keys",
                "shred",
                "--subject",
                subject,
                "--jurisdictions",
                "US",
            ])
            .args(["--server", &address, "--dev-service", "us-key-console"])
            .arg("--token-file")
            .arg(&kim)
            .args(["--purpose", purpose, "--ticket", "DSR-7"]))
    };
    let refused = shred("carol", "curiosity");
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    refused
        .complains("PermissionDenied")
        .complains("DataSubjects::\"US\"");
    assert!(matches!(
        clients.email(&carol),
        ringfence::pb::field_outcome::Outcome::Plaintext(_)
    ));
    shred("carol", "erasure-request")
        .succeeded()
        .says("US\tshredded");
    assert!(is_shredded(&clients.email(&carol)));

    // kill -9 right after: the shred was durable before the call returned.
    let mut server = server;
    let mut child = server.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(clients);
    let (server, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
    let mut clients = DevClients::connect(dir.path(), &address_of(&started));
    assert!(is_shredded(&clients.email(&carol)));
    assert!(matches!(
        clients.email(&dave),
        ringfence::pb::field_outcome::Outcome::Plaintext(p) if p == secret_value("u-2", "email")
    ));
    drop(clients);

    // Offline shreds are refused while the server runs, and logged when it is stopped.
    let offline = || {
        run(ringfence().current_dir(dir.path()).args([
            "keys",
            "shred",
            "--dev",
            "--subject",
            "dave",
        ]))
    };
    let busy = offline();
    assert_eq!(busy.code, 1, "{}", busy.stdout);
    busy.complains("--server");
    stop_logged(server, &logs);
    offline()
        .succeeded()
        .says("US\tshredded")
        .says("SG\tno_secret")
        .says("EU\tno_secret");

    let (server, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
    let mut clients = DevClients::connect(dir.path(), &address_of(&started));
    assert!(is_shredded(&clients.email(&dave)));
    drop(clients);
    stop_logged(server, &logs);

    // A data-subject access request: everything about carol, nothing about dave.
    let query =
        run(ringfence()
            .current_dir(dir.path())
            .args(["audit", "query", "--subject", "carol"]));
    query.succeeded();
    let entries: Vec<serde_json::Value> = query
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let kinds: std::collections::BTreeSet<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        ["encrypt", "decrypt", "key_admin"]
            .iter()
            .all(|kind| kinds.contains(kind)),
        "{kinds:?}"
    );
    assert!(entries.iter().all(|e| e["record"]["record_id"] != "u-2"));
    let dave_shred = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "query",
        "--subject",
        "dave",
        "--kind",
        "key_admin",
    ]));
    dave_shred.succeeded();
    let line = dave_shred.stdout.lines().last().unwrap();
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["authentication"], "local");
    assert_eq!(entry["action"], "shred");
    assert!(entry["outcome"].as_str().unwrap().starts_with("shredded: "));
    run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "verify"]))
    .succeeded()
    .says("intact");
}

/// Every file of `dir` whose name starts with `subjects.db`, with its bytes.
fn store_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("subjects.db")
        })
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .filter(|(name, bytes)| {
            !(name.ends_with("-shm") || name.ends_with("-wal") && bytes.is_empty())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn serve_refuses_a_damaged_or_foreign_subject_store_and_leaves_it_untouched() {
    // Two development servers, each with its own master key and a subject in its store.
    let make = || {
        let dir = tempfile::tempdir().unwrap();
        copy_policies(&dir.path().join("policies"));
        let (server, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
        let mut clients = DevClients::connect(dir.path(), &address_of(&started));
        clients.encrypt("u-1", "carol");
        drop(clients);
        stop_logged(server, &logs);
        dir
    };
    let (ours, theirs) = (make(), make());
    let data = ours.path().join("ringfence-data");
    let store = data.join("subjects.db");
    // A store is its database file and its write-ahead log together: theirs, whole.
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("subjects.db{suffix}");
        let _ = std::fs::remove_file(data.join(&name));
        let source = theirs.path().join("ringfence-data").join(&name);
        if source.exists() {
            std::fs::copy(source, data.join(&name)).unwrap();
        }
    }
    let refuse = |expected: &str| {
        let before = store_files(&data);
        let mut child = ringfence()
            .current_dir(ours.path())
            .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve started instead of refusing ({expected})");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(
            store_files(&data) == before,
            "the refusal changed the store"
        );
    };
    refuse("sealed under another master key");

    // Damage on disk: everything checkpointed into the database file, then bytes of
    // it overwritten.
    let connection = rusqlite::Connection::open(&store).unwrap();
    connection
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(connection);
    let mut bytes = std::fs::read(&store).unwrap();
    for byte in bytes.iter_mut().skip(100).take(2000) {
        *byte ^= 0xa5;
    }
    std::fs::write(&store, &bytes).unwrap();
    refuse("damaged or not a subject store");
}
