//! Stock clients: the Python walkthrough (examples/python/, grpcio with stubs generated
//! from proto/ at run time) against `serve --dev`, as the README shows it.

use super::*;

/// Runs examples/python/walkthrough.py with `--check` against `address`, from `dir`.
fn python_walkthrough(python: &Path, dir: &Path, address: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/walkthrough.py");
    run(Command::new(python)
        .current_dir(dir)
        .arg(script)
        .args(["--address", address, "--check", "--ringfence"])
        .arg(env!("CARGO_BIN_EXE_ringfence"))
        .env_remove("RINGFENCE_MASTER_KEY"))
}

#[test]
fn the_python_walkthrough_round_trips_and_is_denied_where_it_should_be() {
    let Some(python) = system_tools::python_with_grpc() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let (child, started, logs) = spawn_serve(dir.path(), &["--dev"], None);
    let address = address_of(&started);

    let out = python_walkthrough(&python, dir.path(), &address);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for line in [
        "display_name   plaintext 'Ada L.'",
        "email          plaintext 'ada@example.com'",
        "government_id  denied: no policy permits this access",
        "email          denied: denied by policy (parent-company-never-reads-us)",
        "a caller without a client certificate:",
        "GetStatus: UNAVAILABLE",
        "audit query --kind unauthenticated",
    ] {
        out.says(line);
    }
    // Each request the client was answered is in the decision log under the id it was
    // given, and the refused handshake is there with its real cause.
    let ids: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|line| line.split("(request ").nth(1))
        .map(|rest| rest.trim_end_matches("):"))
        .collect();
    assert_eq!(ids.len(), 4, "{}", out.stdout);
    let log = run(ringfence().current_dir(dir.path()).args(["audit", "query"]));
    log.succeeded();
    for id in &ids {
        assert!(
            log.stdout.contains(&format!("\"request_id\":\"{id}\"")),
            "{id} not logged"
        );
    }
    run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "query", "--kind", "unauthenticated"]))
    .succeeded()
    .says("TLS handshake failed: peer sent no certificates");

    // `--check` fails when an answer is not the shipped policies' one: take "support"
    // out of the gatekeepers' purposes and alice is denied what she read before.
    let us_data = dir.path().join("policies/us-data.cedar");
    let text = std::fs::read_to_string(&us_data).unwrap();
    let narrowed = text.replacen(
        "[\"support\", \"incident-response\"",
        "[\"incident-response\"",
        1,
    );
    assert_ne!(text, narrowed);
    std::fs::write(&us_data, narrowed).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the policy change was not reloaded");
        if line.contains("policy set reloaded") {
            break;
        }
    }
    let out = python_walkthrough(&python, dir.path(), &address);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    out.complains("unexpected answers")
        .complains("alice 'support' email: ('denied',), expected ('plaintext',)");
    stop_logged(child, &logs);
    run(ringfence()
        .current_dir(dir.path())
        .args(["audit", "verify"]))
    .succeeded();
}
