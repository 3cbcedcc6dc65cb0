//! System tools some tests need (a Python with `cryptography` or grpcio, OpenSSL; later
//! HSMs, databases). `scripts/test` installs them. A test asks for its tool here: when it is
//! missing the test prints a loud SKIPPED line and returns, unless
//! `RINGFENCE_REQUIRE_SYSTEM_TOOLS=1` (set by `scripts/test` and CI), where it fails.
//!
//! Included by path from tests that do not need the server fixtures of `common`.
#![allow(dead_code, clippy::panic)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set to `1` to make a missing tool fail its test instead of skipping it.
pub const REQUIRE_VAR: &str = "RINGFENCE_REQUIRE_SYSTEM_TOOLS";

/// The program named by `$env_var`, else `program` on `PATH`, if running it with
/// `probe` succeeds. `needs` says what is missing in the SKIPPED line or the failure.
pub fn system_tool(needs: &str, env_var: &str, program: &str, probe: &[&str]) -> Option<PathBuf> {
    let candidate = match std::env::var_os(env_var) {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => on_path(program),
    };
    let problem = match &candidate {
        None => format!("`{program}` is not on PATH and `{env_var}` is not set"),
        Some(path) => match Command::new(path).args(probe).stdin(Stdio::null()).output() {
            Ok(output) if output.status.success() => return candidate,
            Ok(output) => format!(
                "`{} {}` failed ({}): {}",
                path.display(),
                probe.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => format!("`{}` cannot run: {error}", path.display()),
        },
    };
    if std::env::var_os(REQUIRE_VAR).is_some_and(|value| value == "1") {
        panic!("{needs} is required ({REQUIRE_VAR}=1) but missing: {problem}");
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of
    // passing tests, and a skip must not go unnoticed.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED (needs {needs}: run scripts/test): {problem}\n"
    );
    None
}

/// A Python 3 that can `import cryptography`: `$RINGFENCE_PYTHON`, else `python3`.
pub fn python_with_cryptography() -> Option<PathBuf> {
    system_tool(
        "python3 with the `cryptography` package",
        "RINGFENCE_PYTHON",
        "python3",
        &["-c", "import cryptography"],
    )
}

/// A Python 3 with grpcio and grpcio-tools (examples/python/requirements.txt):
/// `$RINGFENCE_PYTHON`, else `python3`.
pub fn python_with_grpc() -> Option<PathBuf> {
    system_tool(
        "python3 with grpcio and grpcio-tools (examples/python/requirements.txt)",
        "RINGFENCE_PYTHON",
        "python3",
        &["-c", "import grpc, grpc_tools.protoc"],
    )
}

/// A Python 3 with the Prometheus client library, whose OpenMetrics parser checks the
/// metrics exposition: `$RINGFENCE_PYTHON`, else `python3`.
pub fn python_with_prometheus_client() -> Option<PathBuf> {
    system_tool(
        "python3 with prometheus_client (tests/requirements.txt)",
        "RINGFENCE_PYTHON",
        "python3",
        &["-c", "import prometheus_client.openmetrics.parser"],
    )
}

/// The OpenSSL command line tool: `$RINGFENCE_OPENSSL`, else `openssl`.
pub fn openssl() -> Option<PathBuf> {
    system_tool(
        "the openssl tool",
        "RINGFENCE_OPENSSL",
        "openssl",
        &["version"],
    )
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
