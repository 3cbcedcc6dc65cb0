//! `ringfence config check FILE`: everything `serve --config FILE` would check before
//! serving, with nothing created, locked or bound.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser as _;

use super::{EXIT_FAILURE, EXIT_INVALID_POLICIES, EXIT_USAGE, fail};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check a configuration file as `serve --config FILE` would read it (with the
    /// RINGFENCE_* environment): addresses, TLS and token files, the policy set and
    /// the proof of its invariants, the master key and the keyring. Binds no port and
    /// changes nothing. Exit 0: it would serve.
    Check {
        /// The TOML configuration file.
        file: PathBuf,
    },
}

pub fn run(command: Command) -> ExitCode {
    let Command::Check { file } = command;
    let argv = ["ringfence", "serve", "--config"]
        .into_iter()
        .map(std::ffi::OsString::from)
        .chain([file.clone().into_os_string()])
        .collect();
    let expanded = match super::config_file::expand(argv) {
        Ok(expanded) => expanded,
        Err(error) => return fail(EXIT_USAGE, error),
    };
    let args = match super::Cli::try_parse_from(&expanded.argv) {
        Ok(super::Cli {
            command: super::Command::Serve(args),
        }) => args,
        Ok(_) => return fail(EXIT_FAILURE, "internal: not a serve command line"),
        Err(error) => return fail(EXIT_USAGE, expanded.explain(&error)),
    };
    let otlp = args.otlp_endpoint().map(str::to_owned);
    if let Some(endpoint) = &otlp
        && !cfg!(feature = "otlp")
    {
        return fail(
            EXIT_FAILURE,
            format!(
                "--otlp-endpoint {endpoint}: this ringfence was built without the `otlp` feature"
            ),
        );
    }
    let config = super::serve::config(args);
    match ringfence::preflight::check(&config) {
        Ok(findings) => {
            for finding in &findings {
                let mark = if finding.warning { "warning" } else { "ok" };
                println!("{mark:<8}{:<11}{}", finding.what, finding.detail);
            }
            if let Some(endpoint) = otlp {
                println!(
                    "{:<8}{:<11}request spans exported over OTLP/gRPC to {endpoint}",
                    "ok", "tracing"
                );
            }
            println!(
                "{}: `ringfence serve --config {}` would serve",
                file.display(),
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(error @ ringfence::server::Error::Policies(_)) => fail(EXIT_INVALID_POLICIES, error),
        Err(error) => fail(EXIT_FAILURE, error),
    }
}
