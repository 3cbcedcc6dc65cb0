//! `ringfence audit ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{EXIT_FAILURE, EXIT_LOG_TAMPERED, fail};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Verify the hash chain, sequence numbers and segments of a decision log.
    Verify {
        /// Decision log directory.
        #[arg(long, default_value = "ringfence-data/log")]
        log: PathBuf,
    },
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Verify { log } if !log.is_dir() => fail(
            EXIT_FAILURE,
            format!("`{}` is not a decision log directory", log.display()),
        ),
        Command::Verify { log } => match ringfence::audit::verify(&log) {
            Ok(report) => {
                println!(
                    "{}: intact: {} entries in {} segments, {} .. {}, head {}",
                    log.display(),
                    report.entries,
                    report.segments,
                    report.first_time.as_deref().unwrap_or("-"),
                    report.last_time.as_deref().unwrap_or("-"),
                    report.head
                );
                for torn in &report.torn_tails {
                    println!(
                        "note: {} ends in a torn line left by a crash mid-write",
                        torn.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(failure) => fail(
                EXIT_LOG_TAMPERED,
                format!("decision log is not intact: {failure}"),
            ),
        },
    }
}
