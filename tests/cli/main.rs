//! The `ringfence` binary as users run it: exit codes, diagnostics, and the quick start.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../common/mod.rs"]
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
        .env("RINGFENCE_LOG", "info")
        // Servers of parallel tests must not share the default metrics port.
        .env("RINGFENCE_METRICS_LISTEN", "127.0.0.1:0")
        // Tests that stop a server choose their drain.
        .env("RINGFENCE_SHUTDOWN_DRAIN_SECS", "0");
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
        // Tests choose the proof mode: off unless the test names one.
        .args(if extra.contains(&"--prove") {
            &[][..]
        } else {
            &["--prove", "off"][..]
        })
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
    if !extra.contains(&"--prove") {
        command.args(["--prove", "off"]);
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
                entry["format"],
                ringfence::audit::ENTRY_FORMAT,
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

mod audit;
mod config;
mod dev;
mod keys;
mod otlp;
mod policy;
mod python;
mod serve;
mod subjects;
