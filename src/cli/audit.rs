//! `ringfence audit ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{EXIT_FAILURE, EXIT_LOG_TAMPERED, fail};

// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Verify the hash chain, sequence numbers and segments of a decision log.
    Verify {
        /// Decision log directory.
        #[arg(long, default_value = "ringfence-data/log")]
        log: PathBuf,
    },
    /// Print matching entries as JSON lines, e.g. who read user u-42's email in November:
    /// `audit query --record-id u-42 --field email --decision allow --since 2026-11-01 --until 2026-12-01`.
    /// Reads entries as they are: run `audit verify` to prove they are intact.
    Query {
        /// Decision log directory.
        #[arg(long, default_value = "ringfence-data/log")]
        log: PathBuf,
        /// Principal: a directory id (alice) or a Cedar uid (Employee::"alice").
        #[arg(long)]
        principal: Option<String>,
        /// Calling service id.
        #[arg(long)]
        service: Option<String>,
        /// Entry kind: decrypt, encrypt, authorize, integrity_failure, rejected, unauthenticated.
        #[arg(long)]
        kind: Option<String>,
        /// Record jurisdiction.
        #[arg(long)]
        jurisdiction: Option<String>,
        /// Record type.
        #[arg(long)]
        record_type: Option<String>,
        /// Record id.
        #[arg(long)]
        record_id: Option<String>,
        /// A field the entry decided.
        #[arg(long)]
        field: Option<String>,
        /// allow or deny (of `--field` when given, else of any field).
        #[arg(long, value_parser = ["allow", "deny"])]
        decision: Option<String>,
        /// Entries at or after this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long, value_parser = ringfence::audit::parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Entries before this time (RFC 3339 or YYYY-MM-DD, UTC).
        #[arg(long, value_parser = ringfence::audit::parse_time)]
        until: Option<time::OffsetDateTime>,
    },
}

pub fn run(command: Command) -> ExitCode {
    let (Command::Verify { log } | Command::Query { log, .. }) = &command;
    if !log.is_dir() {
        return fail(
            EXIT_FAILURE,
            format!("`{}` is not a decision log directory", log.display()),
        );
    }
    match command {
        Command::Query {
            log,
            principal,
            service,
            kind,
            jurisdiction,
            record_type,
            record_id,
            field,
            decision,
            since,
            until,
        } => {
            let filter = ringfence::audit::Filter {
                principal,
                service,
                kind,
                jurisdiction,
                record_type,
                record_id,
                field,
                decision,
                since,
                until,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let result = ringfence::audit::query(&log, &filter, |line| {
                use std::io::Write as _;
                writeln!(out, "{line}")
            });
            match result {
                Ok(stats) => {
                    eprintln!(
                        "{} of {} entries matched{}",
                        stats.matched,
                        stats.entries,
                        if stats.unreadable > 0 {
                            format!(
                                "; {} unreadable lines skipped (run `audit verify`)",
                                stats.unreadable
                            )
                        } else {
                            String::new()
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => fail(
                    EXIT_FAILURE,
                    format!("cannot read `{}`: {error}", log.display()),
                ),
            }
        }
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
                for (segment, unacknowledged) in &report.failed_segments {
                    println!(
                        "note: {} was sealed after a failed write; {unacknowledged} line(s) after its last acknowledged entry were never acknowledged",
                        segment.display()
                    );
                }
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
