//! `serve --config FILE` and `config check FILE`: keys are flags, flags and the
//! environment win, mistakes are named by line, and a check changes nothing.

use super::*;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("ringfence.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A data directory no server can create: a test that expects a refusal sets it, so
/// that a server that wrongly accepted its configuration stops instead of serving.
const UNUSABLE_DATA_DIR: &str = "/proc/ringfence-cannot-create";

/// `ringfence` without the test defaults for settings the file must be able to set.
fn ringfence_bare() -> Command {
    let mut command = ringfence();
    command
        .env_remove("RINGFENCE_METRICS_LISTEN")
        .env_remove("RINGFENCE_SHUTDOWN_DRAIN_SECS");
    command
}

#[test]
fn a_config_file_sets_flags_and_flags_and_environment_win() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let config = write_config(
        dir.path(),
        "# a development server\n\
         dev = true\n\
         listen = \"127.0.0.1:1\"\n\
         metrics-listen = \"off\"\n\
         jurisdictions = [\"US\", \"SG\"]\n\
         shutdown-drain-secs = 0\n\
         prove = \"off\"\n",
    );
    // The flag's listen address wins over the file's.
    let mut command = ringfence_bare();
    command
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("RINGFENCE_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Server(Some(command.spawn().unwrap()));
    let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("address=") {
            break;
        }
    }
    assert!(!seen.trim_end().ends_with("127.0.0.1:1"), "{seen}");
    // The environment beat the file's `off`.
    assert!(seen.contains("metrics served"), "{seen}");
    assert!(seen.contains("--dev: mTLS"), "{seen}");
    stop(child);
    // The file's jurisdictions were used: the development keyring holds US and SG only.
    let keys = run(ringfence()
        .current_dir(dir.path())
        .args(["keys", "list", "--dev"]));
    keys.succeeded();
    assert!(
        keys.stdout.contains("US") && keys.stdout.contains("SG"),
        "{}",
        keys.stdout
    );
    assert!(!keys.stdout.contains("EU"), "{}", keys.stdout);

    // A flag on the command line that the file also sets is the command line's, also
    // when it is wrong: the error names the flag, not the file.
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "nowhere"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    out.complains("invalid value 'nowhere' for '--listen");
    assert!(!out.stderr.contains("ringfence.toml:"), "{}", out.stderr);
    // RINGFENCE_CONFIG names the file too, and a bad value is named by its line.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:1", "256.0.0.1:1"),
    )
    .unwrap();
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .env("RINGFENCE_CONFIG", &config)
        // Were the mistake missed, the server would stop here instead of serving.
        .env("RINGFENCE_DATA_DIR", UNUSABLE_DATA_DIR)
        .args(["serve"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    out.complains("ringfence.toml:3: invalid value '256.0.0.1:1' for '--listen");
}

#[test]
fn config_file_mistakes_are_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "listen = \"127.0.0.1:0\"\n\nlisen = 1\n",
            "ringfence.toml:3: unknown key `lisen`",
        ),
        (
            "max-message-bytes = \"lots\"\n",
            "ringfence.toml:1: invalid value 'lots' for '--max-message-bytes",
        ),
        ("dev = 1\n", "ringfence.toml:1: `dev` must be true or false"),
        (
            "[tls]\ncert = \"x\"\n",
            "ringfence.toml:1: unknown key `tls`",
        ),
        ("listen = \n", "is not valid TOML"),
    ] {
        let config = write_config(dir.path(), text);
        for args in [&["serve", "--config"][..], &["config", "check"][..]] {
            let out = run(ringfence_bare()
                .current_dir(dir.path())
                .env("RINGFENCE_DATA_DIR", UNUSABLE_DATA_DIR)
                .args(args)
                .arg(&config));
            assert_eq!(out.code, 2, "{args:?} {text:?}: {}", out.stderr);
            out.complains(expected);
        }
    }
    let out =
        run(ringfence_bare()
            .current_dir(dir.path())
            .args(["config", "check", "missing.toml"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    out.complains("missing.toml");
}

#[test]
fn config_check_checks_what_serve_would_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    // Another process holds the address: a check that bound it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let config = write_config(
        dir.path(),
        &format!("dev = true\nlisten = \"{address}\"\nprove = \"off\"\n"),
    );
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    out.says("would serve").says("--dev creates");
    // Nothing was created: no data directory, no keys, no PKI, no archive.
    assert!(!dir.path().join("ringfence-data").exists());

    // Outside --dev, a keyring must exist and open with the master key.
    let config = write_config(
        dir.path(),
        "danger-trust-identity-headers = true\nprove = \"off\"\n",
    );
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config)
        .env("RINGFENCE_MASTER_KEY", "ab".repeat(32)));
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    out.complains("no keyring");
    let init = run(ringfence()
        .current_dir(dir.path())
        .args(["keys", "init"])
        .env("RINGFENCE_MASTER_KEY", "ab".repeat(32)));
    init.succeeded();
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config)
        .env("RINGFENCE_MASTER_KEY", "ab".repeat(32)));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    out.says("opens").says("keys for US, SG, EU");
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config)
        .env("RINGFENCE_MASTER_KEY", "cd".repeat(32)));
    assert_eq!(
        out.code, 1,
        "a wrong master key: {}{}",
        out.stdout, out.stderr
    );

    // Off loopback without TLS: refused, as serve refuses it.
    let config = write_config(
        dir.path(),
        "danger-trust-identity-headers = true\nlisten = \"0.0.0.0:50051\"\nprove = \"off\"\n",
    );
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config));
    assert_eq!(out.code, 1, "{}", out.stderr);
    out.complains("loopback");

    // A policy set that breaks an invariant is refused under enforce, as serve would.
    let Some(cvc5) =
        system_tools::system_tool("the cvc5 SMT solver", "CVC5", "cvc5", &["--version"])
    else {
        return;
    };
    let us_data = dir.path().join("policies/us-data.cedar");
    let text = std::fs::read_to_string(&us_data).unwrap();
    let broken = text.replace(
        "action == Action::\"encrypt\",\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Organization::\"parentco\" ||",
        "action == Action::\"encrypt\",\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Team::\"parentco-eng\" ||",
    );
    assert_ne!(broken, text);
    std::fs::write(&us_data, broken).unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "danger-trust-identity-headers = true\nprove = \"enforce\"\nprove-solver = \"{}\"\n",
            cvc5.display()
        ),
    );
    let out = run(ringfence_bare()
        .current_dir(dir.path())
        .args(["config", "check"])
        .arg(&config)
        .env("RINGFENCE_MASTER_KEY", "ab".repeat(32)));
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    out.complains("refused by the proof guard")
        .complains("invariant `parent-company-staff-never-write-us` is violated");
    assert!(
        !dir.path().join("ringfence-data/policy-sets").exists()
            || std::fs::read_dir(dir.path().join("ringfence-data/policy-sets"))
                .unwrap()
                .next()
                .is_none(),
        "config check archived a policy set"
    );
}

/// The configuration files of deploy/ parse: every key is a flag with a valid value,
/// and `config check` gets as far as the files they name (absent here).
#[test]
fn the_deployment_configurations_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(root.join("deploy/kubernetes/ringfence.yaml")).unwrap();
    // The ConfigMap's `ringfence.toml: |` block, unindented.
    let embedded: String = manifest
        .lines()
        .skip_while(|line| line.trim() != "ringfence.toml: |")
        .skip(1)
        .take_while(|line| line.starts_with("    ") || line.trim().is_empty())
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect();
    assert!(
        embedded.contains("listen"),
        "no ringfence.toml in the manifest"
    );
    let kubernetes = dir.path().join("kubernetes.toml");
    std::fs::write(&kubernetes, embedded).unwrap();
    for (config, first_file) in [
        (
            root.join("deploy/ringfence.toml"),
            "/etc/ringfence/tls/server.pem",
        ),
        (kubernetes, "/etc/ringfence/tls/tls.crt"),
    ] {
        let out = run(ringfence_bare()
            .current_dir(dir.path())
            .args(["config", "check"])
            .arg(&config));
        assert_eq!(out.code, 1, "{}: {}", config.display(), out.stderr);
        out.complains(first_file);
    }
}

/// The systemd unit of deploy/ passes `systemd-analyze verify` (when systemd's tools
/// are installed; a documentation check, not a system tool the tests need).
#[test]
fn the_systemd_unit_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: the unit is not verified");
        return;
    };
    assert!(probe.status.success());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/ringfence.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/ringfence serve --config"));
    // Verified against the binary the tests built, where the unit expects it installed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ringfence.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/ringfence", env!("CARGO_BIN_EXE_ringfence")),
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.trim().is_empty(),
        "systemd-analyze verify: {}",
        out.stderr
    );
}
