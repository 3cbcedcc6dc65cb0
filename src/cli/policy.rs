//! `ringfence policy ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::config::DEFAULT_POLICIES;
use ringfence::policy::PolicySnapshot;

use super::{EXIT_INVALID_POLICIES, fail};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Parse and strictly validate the schema, policies, directory and field catalog.
    Validate {
        /// Policy directory.
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
    },
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Validate { policies } => match PolicySnapshot::load(&policies) {
            Ok(snapshot) => {
                println!(
                    "{}: valid: {} policies, {} jurisdictions, policy set hash {}",
                    policies.display(),
                    snapshot.len(),
                    snapshot.jurisdictions().len(),
                    snapshot.hash()
                );
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_INVALID_POLICIES, error),
        },
    }
}
