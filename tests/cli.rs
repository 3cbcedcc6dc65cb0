//! The `ringfence` binary as users run it: exit codes, diagnostics, and the quick start.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use assert_cmd::cargo::CommandCargoExt;
use common::*;

fn ringfence() -> Command {
    let mut command = Command::cargo_bin("ringfence").unwrap();
    command
        .env_remove("RINGFENCE_MASTER_KEY")
        .env("RINGFENCE_LOG", "info");
    command
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    /// Asserts that the command exited with 0.
    #[track_caller]
    fn succeeded(&self) -> &Self {
        assert_eq!(self.code, 0, "exit code {}: {}", self.code, self.stderr);
        self
    }

    /// Asserts that standard output names `needle`.
    #[track_caller]
    fn says(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout does not say `{needle}`: {}",
            self.stdout
        );
        self
    }

    /// Asserts that standard error names `needle`.
    #[track_caller]
    fn complains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr does not say `{needle}`: {}",
            self.stderr
        );
        self
    }
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn policy_validate_accepts_the_shipped_set_and_names_file_and_line_of_errors() {
    let ok = run(ringfence()
        .args(["policy", "validate", "--policies"])
        .arg(shipped_policies()));
    ok.succeeded();
    ok.says("valid: 10 policies");

    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    std::fs::write(
        dir.path().join("new.cedar"),
        "@id(\"typo\")\npermit (principal, action == Action::\"decrypt\", resource)\nwhen { resource.clasification == \"public\" };\n",
    )
    .unwrap();
    let bad = run(ringfence()
        .args(["policy", "validate", "--policies"])
        .arg(dir.path()));
    assert_eq!(bad.code, 3, "{}", bad.stderr);
    bad.complains("new.cedar:3:");
    bad.complains("clasification");

    // `serve` refuses to start on the same set, before binding anything.
    let data = tempfile::tempdir().unwrap();
    let serve = run(ringfence()
        .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
        .arg(dir.path())
        .arg("--data-dir")
        .arg(data.path().join("d")));
    assert_eq!(serve.code, 3, "{}", serve.stderr);
    serve.complains("new.cedar:3:");
    assert!(!serve.stderr.contains("listening"), "{}", serve.stderr);
}

#[test]
fn policy_explain_says_why() {
    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "carol",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
            "--field",
            "email",
            "--purpose",
            "support",
            "--ticket",
            "INC-1",
        ]));
    out.succeeded();
    out.says("DENY");
    assert!(
        out.stdout
            .contains("determined by parent-company-never-reads-us (")
            && out.stdout.contains("us-data.cedar)"),
        "{}",
        out.stdout
    );

    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "alice",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
        ]));
    out.succeeded();
    assert_eq!(
        out.stdout.lines().count(),
        21,
        "a header and the 20 catalog fields: {}",
        out.stdout
    );
    out.says("no policy permits this (default deny)");
    out.says("determined by public-fields-readable-by-employees");

    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "mallory",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
        ]));
    assert_eq!(out.code, 1);
    out.complains("unknown principal");
}

#[test]
fn serve_refuses_insecure_configurations() {
    let data = tempfile::tempdir().unwrap();
    let out = run(ringfence()
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--danger-trust-identity-headers",
            "--policies",
        ])
        .arg(shipped_policies())
        .arg("--data-dir")
        .arg(data.path()));
    assert_eq!(out.code, 1);
    out.complains("listen on a loopback address");
    for (flags, expected) in [
        (
            &["--dev"][..],
            "--dev keeps its CA key in the data directory",
        ),
        (
            &[][..],
            "without TLS: pass --tls-cert, --tls-key and --client-ca",
        ),
    ] {
        let out = run(ringfence()
            .args(["serve", "--listen", "0.0.0.0:0"])
            .args(flags)
            .arg("--policies")
            .arg(shipped_policies())
            .arg("--data-dir")
            .arg(data.path()));
        assert_eq!(out.code, 1, "{flags:?}");
        assert!(out.stderr.contains(expected), "{flags:?}: {}", out.stderr);
    }
    // Half a TLS configuration is a usage error.
    let out = run(ringfence().args(["serve", "--tls-cert", "server.pem"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    out.complains("--tls-key");
    // A TLS configuration with unreadable files names the file.
    let out = run(ringfence()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "missing.pem",
            "--tls-key",
            "missing-key.pem",
            "--client-ca",
            "missing-ca.pem",
            "--policies",
        ])
        .arg(shipped_policies())
        .arg("--data-dir")
        .arg(data.path()));
    assert_eq!(out.code, 1, "{}", out.stderr);
    out.complains("missing.pem");

    let out = run(ringfence()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jurisdictions",
            "US,us",
        ])
        .arg("--data-dir")
        .arg(data.path()));
    assert_eq!(
        out.code, 2,
        "bad jurisdiction is a usage error: {}",
        out.stderr
    );
    out.complains("invalid jurisdiction `us`");
}

/// A spawned server, killed if a test fails before stopping it.
struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `ringfence serve` and returns it with the address it listens on.
fn spawn_serve(
    dir: &Path,
    extra: &[&str],
    master_key: Option<&str>,
) -> (Server, String, std::sync::mpsc::Receiver<String>) {
    let dev = extra.contains(&"--dev");
    let mut command = ringfence();
    if !dev {
        // Outside --dev, keys come from `keys init` (idempotent for a keyring that has them).
        let mut init = ringfence();
        init.current_dir(dir).args(["keys", "init"]);
        match master_key {
            Some(key) => init.env("RINGFENCE_MASTER_KEY", key),
            None => init.arg("--danger-allow-development-master-key"),
        };
        let init = run(&mut init);
        assert_eq!(init.code, 0, "keys init: {}", init.stderr);
    }
    command
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(if dev {
            &[][..]
        } else {
            &["--danger-trust-identity-headers"][..]
        })
        .args(extra)
        .args(if dev || master_key.is_some() {
            &[][..]
        } else {
            &["--danger-allow-development-master-key"][..]
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(key) = master_key {
        command.env("RINGFENCE_MASTER_KEY", key);
    }
    let mut server = Server(Some(command.spawn().unwrap()));
    let stderr = server.0.as_mut().unwrap().stderr.take().unwrap();
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    loop {
        let line = receiver
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if let Some(at) = line.find("address=") {
            let address = line[at + "address=".len()..].trim().to_owned();
            return (server, seen + &address, receiver);
        }
    }
}

fn address_of(started: &str) -> String {
    started.lines().last().unwrap().to_owned()
}

/// As [`stop`], printing the server's log if it does not exit cleanly.
fn stop_logged(mut server: Server, logs: &std::sync::mpsc::Receiver<String>) {
    let mut child = server.0.take().unwrap();
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let log: Vec<String> = logs.try_iter().collect();
    assert!(
        status.success(),
        "server exited with {status}:\n{}",
        log.join("\n")
    );
}

fn stop(mut server: Server) {
    let mut child = server.0.take().unwrap();
    // SIGTERM for a graceful stop, then reap.
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "server exited with {status}");
}

#[test]
fn quick_start_runs_on_embedded_defaults_and_round_trips_a_record() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    // The quick start: `serve --dev` creates keys, log and a development PKI, and
    // callers authenticate with client certificates and employee tokens.
    let (child, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
    assert!(started.contains("DEVELOPMENT MASTER KEY"), "{started}");
    assert!(
        started.contains("--dev: mTLS and employee tokens"),
        "{started}"
    );
    for created in [
        "ringfence-data/keyring.json",
        "ringfence-data/dev-master.key",
        "ringfence-data/log/decisions-000001.jsonl",
        "ringfence-data/dev-pki/ca.pem",
        "ringfence-data/dev-pki/clients/us-support-tool.pem",
        "ringfence-data/dev-pki/jwks.json",
    ] {
        assert!(dir.path().join(created).exists(), "{created} missing");
    }
    let token = run(ringfence().current_dir(dir.path()).args([
        "dev",
        "token",
        "--employee",
        "alice",
        "--service",
        "us-support-tool",
    ]));
    token.succeeded();
    // Only for employees and services of the directory.
    let stranger = run(ringfence().current_dir(dir.path()).args([
        "dev",
        "token",
        "--employee",
        "mallory",
        "--service",
        "us-support-tool",
    ]));
    assert_ne!(stranger.code, 0);
    stranger.complains("unknown principal");
    let token = token.stdout.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let address: std::net::SocketAddr = address_of(&started).parse().unwrap();
    let pki = dir.path().join("ringfence-data/dev-pki");
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let ca = read("ca.pem");
        let mut signup = mtls_client(
            address,
            &ca,
            Some((&read("clients/us-signup.pem"), &read("clients/us-signup-key.pem"))),
        )
        .await
        .unwrap();
        let record =
            encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
        let mut support = mtls_client(
            address,
            &ca,
            Some((
                &read("clients/us-support-tool.pem"),
                &read("clients/us-support-tool-key.pem"),
            )),
        )
        .await
        .unwrap();
        let response = support
            .decrypt_record(with_token(
                decrypt_request(record, &["email"], "support", "INC-1"),
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            outcome(&response, "email"),
            ringfence::pb::field_outcome::Outcome::Plaintext(p) if p == &secret_value("u-1", "email")
        ));
        // Plain TCP, or claiming an identity with headers, gets nowhere.
        let plain = ringfence::pb::ringfence_client::RingfenceClient::connect(format!("http://{address}")).await;
        if let Ok(mut plain) = plain {
            assert!(plain.encrypt_record(as_caller(profile("u-2", "US"), "us-signup", None)).await.is_err());
        }
    });
    stop_logged(child, &logs);

    // Private keys created on the way (checkpoint signing key, development CA, token
    // issuer, server and client keys) never reach the server's output or the log.
    let data = dir.path().join("ringfence-data");
    let mut private_keys = vec![
        data.join("audit-signing-key.pem"),
        data.join("dev-pki/ca-key.pem"),
        data.join("dev-pki/server-key.pem"),
        data.join("dev-pki/token-signing-key.pem"),
        data.join("dev-pki/clients/us-support-tool-key.pem"),
    ];
    private_keys.retain(|path| path.exists());
    assert_eq!(private_keys.len(), 5, "private key files missing");
    let mut logged = started.clone();
    for entry in std::fs::read_dir(data.join("log")).unwrap() {
        logged.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    for path in &private_keys {
        let pem = std::fs::read_to_string(path).unwrap();
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        assert!(body.len() > 40, "{}", path.display());
        for chunk in [&body[..40], &body[body.len() - 40..]] {
            assert!(!logged.contains(chunk), "{} leaked", path.display());
        }
    }

    // Restart: the same keys open the old record's keyring, the chain continues.
    let (child, started, _) = spawn_serve(dir.path(), &["--dev"], None);
    assert!(!started.contains("created root key"), "{started}");
    stop(child);
    let verify = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "verify"]));
    verify.succeeded();
    verify.says(" checkpoints, 3 key events)");

    let query = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "query",
        "--principal",
        "alice",
        "--record-id",
        "u-1",
        "--field",
        "email",
        "--decision",
        "allow",
        "--since",
        "2000-01-01",
    ]));
    query.succeeded();
    let lines: Vec<&str> = query.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", query.stdout);
    let entry: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(entry["kind"], "decrypt");
    assert!(query.stderr.starts_with("1 of "), "{}", query.stderr);

    // What an auditor does: export the public key, keep the latest checkpoint, verify
    // signatures and completeness against it, and replay every decision.
    let public_key = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "public-key"]));
    public_key.succeeded();
    assert!(public_key.stdout.starts_with("-----BEGIN PUBLIC KEY-----"));
    std::fs::write(dir.path().join("auditor.pem"), &public_key.stdout).unwrap();
    let checkpoint = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "checkpoint"]));
    checkpoint.succeeded();
    assert!(checkpoint.stdout.contains("\"kind\":\"checkpoint\""));
    std::fs::write(dir.path().join("saved-checkpoint.json"), &checkpoint.stdout).unwrap();
    let keyed = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "verify",
        "--public-key",
        "auditor.pem",
        "--checkpoint",
        "saved-checkpoint.json",
    ]));
    assert_eq!(keyed.code, 0, "{}{}", keyed.stdout, keyed.stderr);
    keyed.says("every signature valid");
    keyed.says(": present and unchanged");
    let replay = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "replay"]));
    assert_eq!(replay.code, 0, "{}{}", replay.stdout, replay.stderr);
    replay.says("2 entries replayed (21 field decisions) with 1 policy set(s): 0 differ");

    // A decision altered in the log (the chain breaks too, but replay reads entries as
    // they are): replay names the entry and field.
    let segment = dir.path().join("ringfence-data/log/decisions-000001.jsonl");
    let text = std::fs::read_to_string(&segment).unwrap();
    let altered = text.replacen("\"field\":\"email\",\"classification\":\"pii\",\"decision\":\"allow\",\"policies\":[\"us-gatekeeper-engineers-read-us\"]", "\"field\":\"email\",\"classification\":\"pii\",\"decision\":\"deny\"", 1);
    assert_ne!(altered, text);
    std::fs::write(&segment, altered).unwrap();
    let differs = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "replay", "--field", "email"]));
    assert_eq!(differs.code, 8, "{}{}", differs.stdout, differs.stderr);
    assert!(
        differs.stdout.contains(
            "field email: recorded deny, replayed allow by us-gatekeeper-engineers-read-us"
        ),
        "{}",
        differs.stdout
    );
    let none =
        run(ringfence()
            .current_dir(dir.path())
            .args(["audit", "query", "--principal", "bob"]));
    assert_eq!(none.code, 0);
    assert!(none.stdout.is_empty());
    let bad_time =
        run(ringfence()
            .current_dir(dir.path())
            .args(["audit", "query", "--since", "last week"]));
    assert_eq!(bad_time.code, 2, "{}", bad_time.stderr);
    // A log that fails its chain takes no further entries, key events included.
    let refused = run(ringfence().current_dir(dir.path()).args([
        "keys",
        "rotate",
        "--jurisdiction",
        "US",
        "--dev",
    ]));
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    refused.complains("hash mismatch");
    std::fs::write(&segment, &text).unwrap();

    // The development master key is refused unless asked for by name.
    let refused = run(ringfence().current_dir(dir.path()).args(["keys", "list"]));
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    refused.complains("--danger-allow-development-master-key");
    let keys = run(ringfence()
        .current_dir(dir.path())
        .args(["keys", "list", "--dev"]));
    keys.succeeded();
    keys.says("US\tv1\t");
    let rotate = run(ringfence().current_dir(dir.path()).args([
        "keys",
        "rotate",
        "--jurisdiction",
        "US",
        "--dev",
    ]));
    rotate.succeeded();
    assert!(
        rotate.stdout.contains("US\tv2\t") && rotate.stdout.contains("generation 2\t(rotate)"),
        "{}",
        rotate.stdout
    );
    let keys = run(ringfence()
        .current_dir(dir.path())
        .args(["keys", "list", "--dev"]));
    assert!(
        keys.stdout.contains("US\tv2\t") && keys.stdout.contains("(current)"),
        "{}",
        keys.stdout
    );
    let dev_key =
        std::fs::read_to_string(dir.path().join("ringfence-data/dev-master.key")).unwrap();
    assert!(!keys.stdout.contains(dev_key.trim()));
}

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
fn kill_9_under_load_loses_no_entry_of_any_answered_request() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let (server, started, _) = spawn_serve(dir.path(), &[], None);
    let address = address_of(&started);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answered = runtime.block_on(async {
        let mut client =
            ringfence::pb::ringfence_client::RingfenceClient::connect(format!("http://{address}"))
                .await
                .unwrap();
        let record = encrypt_profile(&mut client, "u-1", "US").await;
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut client = client.clone();
            let record = record.clone();
            let answered = std::sync::Arc::clone(&answered);
            tasks.push(tokio::spawn(async move {
                // Bounded: stops at the first failure (the kill) or after 10 s.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    let request = decrypt_request(record.clone(), &["email"], "support", "INC-1");
                    match client
                        .decrypt_record(as_caller(request, "us-support-tool", Some("alice")))
                        .await
                    {
                        Ok(response) => {
                            let response = response.into_inner();
                            assert!(matches!(
                                outcome(&response, "email"),
                                ringfence::pb::field_outcome::Outcome::Plaintext(_)
                            ));
                            answered.lock().unwrap().push(response.request_id);
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        // Let the load run, then kill -9 the server in the middle of it.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        drop(server);
        for task in tasks {
            task.await.unwrap();
        }
        let mut ids = Vec::new();
        ids.extend(answered.lock().unwrap().iter().cloned());
        ids
    });
    assert!(answered.len() > 10, "load did not run: {}", answered.len());

    // Whether the kill landed mid-write: the last segment then ends without a newline.
    let log_dir = dir.path().join("ringfence-data/log");
    let mut segments: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    segments.sort();
    let last = std::fs::read(segments.last().unwrap()).unwrap();
    let torn = last.last().is_some_and(|byte| *byte != b'\n');

    // Restart on the same data: the log opens (a torn tail, if any, is set aside) and
    // verifies, checkpoint signatures included.
    let (server, _, _) = spawn_serve(dir.path(), &[], None);
    stop(server);
    let verify = run(ringfence().current_dir(dir.path()).args([
        "audit",
        "verify",
        "--public-key",
        "ringfence-data/audit-signing-key.pub.pem",
    ]));
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    verify.says("every signature valid");
    assert_eq!(
        verify.stdout.contains("ends in a torn line"),
        torn,
        "torn tail reported iff present: {}",
        verify.stdout
    );
    let replay = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "replay"]));
    assert_eq!(replay.code, 0, "{}{}", replay.stdout, replay.stderr);
    let logged = run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "query", "--kind", "decrypt"]));
    let logged: std::collections::HashSet<String> = logged
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for request_id in &answered {
        assert!(
            logged.contains(request_id),
            "plaintext was returned for {request_id} but its entry is missing"
        );
    }
}

#[test]
fn audit_verify_names_the_first_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    let mut text = String::new();
    let mut prev = ringfence::audit::GENESIS_HASH.to_owned();
    for seq in 1..=3 {
        let entry = ringfence::audit::Entry {
            time: "2026-11-23T00:00:00Z".to_owned(),
            request_time: 0,
            request_id: format!("r{seq}"),
            kind: "authorize".to_owned(),
            service: None,
            principal: None,
            authentication: "test".to_owned(),
            action: None,
            purpose: String::new(),
            ticket: String::new(),
            record: None,
            policy_set: None,
            fields: vec![],
            outcome: "decided".to_owned(),
            checkpoint: None,
            key_event: None,
            unsigned_tail: None,
        };
        let (line, hash) = ringfence::audit::chain_line(seq, &prev, &entry).unwrap();
        text.push_str(&line);
        text.push('\n');
        prev = hash;
    }
    let segment = ringfence::audit::segment_path(&log, 1);
    std::fs::write(&segment, &text).unwrap();
    let ok = run(ringfence().args(["audit", "verify", "--log"]).arg(&log));
    ok.succeeded();
    // Every audit command also finds the log through the data directory.
    for command in ["verify", "query", "checkpoint"] {
        let by_data_dir = run(ringfence()
            .args(["audit", command, "--data-dir"])
            .arg(dir.path()));
        let expected = if command == "checkpoint" { 1 } else { 0 };
        assert_eq!(
            by_data_dir.code, expected,
            "{command}: {}",
            by_data_dir.stderr
        );
        assert!(
            !by_data_dir.stderr.contains("not a decision log directory"),
            "{command}: {}",
            by_data_dir.stderr
        );
    }
    assert!(
        ok.stdout.contains(
            "intact: 3 entries (3 decisions, 0 checkpoints, 0 key events) in 1 segment(s)"
        ),
        "{}",
        ok.stdout
    );

    std::fs::write(&segment, text.replacen("\"r2\"", "\"r9\"", 1)).unwrap();
    let bad = run(ringfence().args(["audit", "verify", "--log"]).arg(&log));
    assert_eq!(bad.code, 4);
    bad.complains("decisions-000001.jsonl: line 2 (seq 2): hash mismatch");
}

#[test]
fn policy_test_reports_cases_and_coverage_with_distinct_exit_codes() {
    let shipped = shipped_policies();
    let ok = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(&shipped));
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    ok.says(" passed, 0 failed");
    ok.says("PASS every parent-company employee is denied every US profile field");
    ok.says("policy coverage: 100.0% (10 of 10");

    let json = run(ringfence()
        .args(["policy", "test", "--format", "json", "--policies"])
        .arg(&shipped));
    json.succeeded();
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(report["passed"].as_u64().unwrap() >= 30);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["coverage"]["uncovered"], serde_json::json!([]));

    let junit = run(ringfence()
        .args([
            "policy",
            "test",
            "--format",
            "junit",
            "--min-coverage",
            "100",
            "--policies",
        ])
        .arg(&shipped));
    junit.succeeded();
    assert!(junit.stdout.starts_with("<?xml"), "{}", junit.stdout);
    junit.says("failures=\"0\"");

    // Coverage below the threshold: the filter runs only one suite.
    let low = run(ringfence()
        .args([
            "policy",
            "test",
            "--filter",
            "parent-company/*",
            "--min-coverage",
            "90%",
            "--policies",
        ])
        .arg(&shipped));
    assert_eq!(low.code, 6, "{}{}", low.stdout, low.stderr);
    low.complains("below --min-coverage 90%");
    low.complains("us-legal-reads-restricted");

    // A weakened forbid: the cases that pin it fail, and say how.
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let us = dir.path().join("us-data.cedar");
    let text = std::fs::read_to_string(&us).unwrap();
    std::fs::write(
        &us,
        text.replace(
            " ||\n  principal.employer == Organization::\"parentco\"",
            "",
        ),
    )
    .unwrap();
    let failed = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(failed.code, 5, "{}{}", failed.stdout, failed.stderr);
    failed.says("FAIL parent-company employees on US-only teams are denied by employer");
    failed.says("Employee::\"pat\"");
    failed.says("expected deny, got allow");
    let failed_junit = run(ringfence()
        .args(["policy", "test", "--format", "junit", "--policies"])
        .arg(dir.path()));
    assert_eq!(failed_junit.code, 5);
    failed_junit.says("<failure message=");

    // A typo in a suite is an invalid suite, not a pass.
    std::fs::write(&us, &text).unwrap();
    std::fs::write(
        dir.path().join("tests/typo.yaml"),
        "cases:\n  - name: x\n    service: us-signup\n    expcet: deny\n",
    )
    .unwrap();
    let typo = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(typo.code, 7, "{}{}", typo.stdout, typo.stderr);
    typo.complains("typo.yaml:4:");
    typo.complains("unknown field `expcet`");

    // Invalid policies come first.
    std::fs::write(&us, "permit (principal, action, resource) when { nope };").unwrap();
    let invalid = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(invalid.code, 3, "{}{}", invalid.stdout, invalid.stderr);
}

/// Runs `serve` in danger-headers mode in `dir` until it exits (for refusals), with a
/// supplied master key if given.
fn serve_refused(dir: &Path, key: Option<&str>, extra: &[&str]) -> Output {
    let mut command = ringfence();
    command.current_dir(dir).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--danger-trust-identity-headers",
    ]);
    if let Some(key) = key {
        command.env("RINGFENCE_MASTER_KEY", key);
    }
    run(command.args(extra))
}

/// `keys` with a supplied master key in `dir`.
fn keys_with(dir: &Path, key: &str, args: &[&str]) -> Output {
    run(ringfence()
        .current_dir(dir)
        .env("RINGFENCE_MASTER_KEY", key)
        .arg("keys")
        .args(args))
}

/// The `key_event` entries of the log in `dir`, as (operation, jurisdiction, version).
fn key_events(dir: &Path) -> Vec<(String, String, u64)> {
    let mut events = Vec::new();
    let log = dir.join("ringfence-data/log");
    let mut segments: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    segments.sort();
    for segment in segments {
        for line in std::fs::read_to_string(segment).unwrap().lines() {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                entry["format"], 2,
                "every new entry carries its format: {line}"
            );
            if entry["kind"] == "key_event" {
                let event = &entry["key_event"];
                assert!(
                    entry["principal"].as_str().unwrap().contains("pid"),
                    "{line}"
                );
                events.push((
                    event["operation"].as_str().unwrap().to_owned(),
                    event["jurisdiction"].as_str().unwrap().to_owned(),
                    event["version"].as_u64().unwrap(),
                ));
            }
        }
    }
    events
}

fn verify_with_public_key(dir: &Path) -> Output {
    let public_key = run(ringfence().current_dir(dir).args(["audit", "public-key"]));
    public_key.succeeded();
    std::fs::write(dir.join("auditor.pem"), &public_key.stdout).unwrap();
    run(ringfence()
        .current_dir(dir)
        .args(["audit", "verify", "--public-key", "auditor.pem"]))
}

#[test]
fn concurrent_offline_rotations_all_land_once_each_and_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let key = "3c".repeat(32);
    let init = keys_with(dir.path(), &key, &["init", "--jurisdictions", "US,SG"]);
    init.succeeded();
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
fn serve_never_creates_keys_outside_dev_and_refuses_the_development_key() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let key = "7e".repeat(32);
    let none = serve_refused(dir.path(), Some(&key), &[]);
    assert_eq!(none.code, 1, "{}", none.stderr);
    none.complains("`ringfence keys init`");
    assert!(!dir.path().join("ringfence-data/keyring.json").exists());
    // A configured jurisdiction without keys is named with the command that fixes it.
    let init = keys_with(dir.path(), &key, &["init", "--jurisdictions", "US"]);
    init.succeeded();
    let missing = serve_refused(dir.path(), Some(&key), &["--jurisdictions", "US,SG"]);
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("no root key for `SG`")
            && missing.stderr.contains("keys init --jurisdictions SG"),
        "{}",
        missing.stderr
    );
    let again = keys_with(dir.path(), &key, &["init", "--jurisdictions", "US"]);
    again.succeeded();
    again.says("nothing to do");
    // A development master key next to a keyring is refused by default.
    let dev = tempfile::tempdir().unwrap();
    copy_policies(&dev.path().join("policies"));
    let created = run(ringfence().current_dir(dev.path()).args([
        "keys",
        "init",
        "--danger-allow-development-master-key",
    ]));
    created.succeeded();
    created.complains("DEVELOPMENT");
    let refused = serve_refused(dev.path(), None, &[]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    refused.complains("refusing the development master key");
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
fn dev_revoke_lists_the_certificate_keeps_earlier_revocations_and_dev_init_reissues() {
    let dir = tempfile::tempdir().unwrap();
    let dev = |args: &[&str]| {
        run(ringfence()
            .current_dir(dir.path())
            .arg("dev")
            .args(args)
            .arg("--policies")
            .arg(shipped_policies()))
    };
    let revoke = |service: &str| {
        run(ringfence()
            .current_dir(dir.path())
            .args(["dev", "revoke", "--service", service]))
    };
    assert_eq!(dev(&["init"]).code, 0);
    let pki = dir.path().join("ringfence-data/dev-pki");
    let serial = |service: &str| {
        let pem = std::fs::read(pki.join(format!("clients/{service}.pem"))).unwrap();
        ringfence::dev::certificate_serial(&pem).unwrap()
    };
    let listed = || {
        let pem = std::fs::read(pki.join("client-crl.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
        let number = crl.crl_number().unwrap().to_string();
        let revoked: Vec<(Vec<u8>, i64)> = crl
            .iter_revoked_certificates()
            .map(|entry| {
                (
                    entry.serial().to_bytes_be(),
                    entry.revocation_date.timestamp(),
                )
            })
            .collect();
        (number, revoked)
    };
    assert_eq!(listed(), ("1".to_owned(), Vec::new()));

    let first = serial("us-signup");
    let done = revoke("us-signup");
    done.succeeded();
    assert!(
        done.stdout
            .contains("revoked the client certificate of us-signup")
    );
    assert!(!pki.join("clients/us-signup.pem").exists());
    assert!(!pki.join("clients/us-signup-key.pem").exists());
    let (number, revoked) = listed();
    assert_eq!(number, "2");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].0, first);

    // Nothing left to revoke until `dev init` issues a new certificate.
    let again = revoke("us-signup");
    assert_eq!(again.code, 1);
    again.complains("no current certificate");
    assert_eq!(dev(&["init"]).code, 0);
    let second = serial("us-signup");
    assert_ne!(second, first);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(revoke("us-signup").code, 0);
    let (number, later) = listed();
    assert_eq!(number, "3");
    assert_eq!(later.len(), 2);
    assert_eq!(later[0], revoked[0], "an earlier revocation changed");
    assert_eq!(later[1].0, second);
    assert!(later[1].1 > later[0].1);
}
