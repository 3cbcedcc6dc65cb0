//! Subcommands of the `ringfence` binary and their exit codes.

mod admin_client;
mod audit;
mod config;
pub mod config_file;
mod dev;
mod keys;
mod policy;
mod serve;
pub mod telemetry;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code: an operation failed (I/O, keys, transport).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: the policy directory is invalid.
pub const EXIT_INVALID_POLICIES: u8 = 3;
/// Exit code: the decision log failed verification.
pub const EXIT_LOG_TAMPERED: u8 = 4;
/// Exit code: a policy test case failed.
pub const EXIT_TESTS_FAILED: u8 = 5;
/// Exit code: the policy tests passed but covered fewer policies than `--min-coverage`.
pub const EXIT_COVERAGE_LOW: u8 = 6;
/// Exit code: a policy test suite file is invalid.
pub const EXIT_INVALID_SUITE: u8 = 7;
/// Exit code: a replayed decision differs from the logged one (or cannot be replayed).
pub const EXIT_REPLAY_MISMATCH: u8 = 8;
/// Exit code of a command-line usage error (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a policy invariant is violated (`policy prove`).
pub const EXIT_VIOLATED: u8 = 9;
/// Exit code: an invariant could not be proved: the solver is missing, failed, timed
/// out or answered `unknown` (`policy prove`).
pub const EXIT_UNPROVEN: u8 = 10;
/// Exit code: a policy change widens access without an acknowledgement (`policy diff
/// --fail-on-widening`).
pub const EXIT_WIDENING: u8 = 11;

/// ringfence: field-level encryption with jurisdiction-scoped keys, Cedar-policy
/// decryption and a tamper-evident decision log.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of `serve`'s arguments does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the gRPC service.
    // A flag given twice (in the configuration file, then on the command line): the
    // last one wins.
    #[command(args_override_self = true)]
    Serve(serve::Args),
    /// Work with the policy directory.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Inspect and rotate root keys (versions and dates only; never key bytes).
    #[command(subcommand)]
    Keys(keys::Command),
    /// Verify, query and replay the decision log offline.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Development helpers: a local CA, client certificates and employee tokens.
    #[command(subcommand)]
    Dev(dev::Command),
    /// Check a `serve` configuration file without serving.
    #[command(subcommand)]
    Config(config::Command),
}

/// Runs a parsed command line.
pub fn run(cli: Cli, telemetry: &telemetry::Telemetry) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve::run(args, telemetry),
        Command::Policy(command) => policy::run(command),
        Command::Keys(command) => keys::run(command),
        Command::Audit(command) => audit::run(command),
        Command::Dev(command) => dev::run(command),
        Command::Config(command) => config::run(command),
    }
}

/// Prints an error the way every subcommand does and returns its exit code.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    // Not `eprintln!`, which panics when stderr is closed: the exit code must stand.
    let _ = writeln!(std::io::stderr(), "error: {message}");
    ExitCode::from(code)
}

/// `--data-dir`, shared by subcommands that read the data directory.
#[derive(Debug, clap::Args)]
pub struct DataDir {
    /// Data directory holding the keyring and the decision log.
    #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = ringfence::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}
