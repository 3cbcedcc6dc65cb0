//! `ringfence audit ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::audit::checkpoint::PUBLIC_KEY_FILE;
use ringfence::audit::{CHECKPOINT_KIND, CheckpointVerifier, Filter, VerifyOptions};

use super::{DataDir, EXIT_FAILURE, EXIT_LOG_TAMPERED, EXIT_REPLAY_MISMATCH, fail};

/// Filters shared by `query` and `replay`.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Principal: a directory id (alice) or a Cedar uid (Employee::"alice").
    #[arg(long)]
    principal: Option<String>,
    /// Calling service id.
    #[arg(long)]
    service: Option<String>,
    /// Entry kind: decrypt, encrypt, authorize, integrity_failure, rejected, unauthenticated, checkpoint, key_event, key_admin.
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
    /// Data subject: who read, encrypted, rewrapped or shredded what of this person
    /// (a data-subject access request). Records without a named subject are their
    /// own subject, by record id.
    #[arg(long)]
    subject: Option<String>,
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
}

impl From<FilterArgs> for Filter {
    fn from(args: FilterArgs) -> Self {
        Filter {
            principal: args.principal,
            service: args.service,
            kind: args.kind,
            jurisdiction: args.jurisdiction,
            record_type: args.record_type,
            record_id: args.record_id,
            subject: args.subject,
            field: args.field,
            decision: args.decision,
            since: args.since,
            until: args.until,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Verify the hash chain, sequence numbers, segments and signed checkpoints of a
    /// decision log. Exit 0 and a summary when intact, 4 and the first bad entry
    /// (segment, line, seq, what is wrong) otherwise.
    Verify {
        #[command(flatten)]
        data: DataDir,
        /// Decision log directory (default: `log` in the data directory).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Check every checkpoint's Ed25519 signature with this public key (PEM, as
        /// `audit public-key` prints it); a non-empty log must then have a checkpoint.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A checkpoint line saved earlier with `audit checkpoint`: the log must still
        /// contain it unchanged (detects truncation or rewriting back to it).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print matching entries as JSON lines, e.g. who read user u-42's email in November:
    /// `audit query --record-id u-42 --field email --decision allow --since 2026-11-01 --until 2026-12-01`.
    /// Reads entries as they are: run `audit verify` to prove they are intact.
    Query {
        #[command(flatten)]
        data: DataDir,
        /// Decision log directory (default: `log` in the data directory).
        #[arg(long)]
        log: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print each entry with its fields one by one (`fields`: one object per field
        /// with its classification, decision, policies, key version and outcome) instead
        /// of the line as stored, whose `field_groups` group them. The lines as stored
        /// are what `audit verify` checks.
        #[arg(long)]
        expand_fields: bool,
    },
    /// Re-decide logged requests with the policy set that decided them (archived by
    /// hash in the data directory) and report every recorded decision that differs.
    /// Exit 0 when all match, 8 when any differs or cannot be replayed.
    Replay {
        #[command(flatten)]
        data: DataDir,
        /// Decision log directory (default: `log` in the data directory).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Print the public key that verifies checkpoints (SPKI PEM), for auditors.
    PublicKey {
        #[command(flatten)]
        data: DataDir,
    },
    /// Print the log's latest checkpoint line; an auditor keeps it and later passes it to
    /// `audit verify --checkpoint` to prove nothing before it was truncated or rewritten.
    Checkpoint {
        #[command(flatten)]
        data: DataDir,
        /// Decision log directory (default: `log` in the data directory).
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

fn read_text(path: &std::path::Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {what} `{}`: {error}", path.display()))
}

/// The decision log directory: `--log`, else `log` in the data directory.
fn log_dir(data: &DataDir, log: Option<PathBuf>) -> PathBuf {
    log.unwrap_or_else(|| data.data_dir.join(ringfence::server::LOG_DIR))
}

fn check_log_dir(log: &std::path::Path) -> Result<(), String> {
    if log.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a decision log directory",
            log.display()
        ))
    }
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Query {
            data,
            log,
            filter,
            expand_fields,
        } => {
            let log = log_dir(&data, log);
            if let Err(problem) = check_log_dir(&log) {
                return fail(EXIT_FAILURE, problem);
            }
            let filter = Filter::from(filter);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let result = ringfence::audit::for_each_entry(&log, &filter, |line, entry| {
                use std::io::Write as _;
                if expand_fields {
                    serde_json::to_writer(&mut out, entry)?;
                    writeln!(out)
                } else {
                    writeln!(out, "{line}")
                }
            });
            // Every line written, or the error that stopped it (a full disk).
            let result = result.and_then(|stats| {
                use std::io::Write as _;
                out.flush().map(|()| stats)
            });
            match result {
                Ok(stats) => {
                    let mut notes = String::new();
                    if stats.unacknowledged > 0 {
                        notes.push_str(&format!(
                            "; {} lines after a failed write, never acknowledged, not shown",
                            stats.unacknowledged
                        ));
                    }
                    if stats.unreadable > 0 {
                        notes.push_str(&format!(
                            "; {} unreadable lines skipped (run `audit verify`)",
                            stats.unreadable
                        ));
                    }
                    eprintln!(
                        "{} of {} entries matched{notes}",
                        stats.matched, stats.entries
                    );
                    ExitCode::SUCCESS
                }
                // The reader went away (`audit query | head`): nothing more to print.
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(error) => fail(
                    EXIT_FAILURE,
                    format!("cannot query `{}`: {error}", log.display()),
                ),
            }
        }
        Command::Verify {
            data,
            log,
            public_key,
            checkpoint,
        } => verify(
            &log_dir(&data, log),
            public_key.as_deref(),
            checkpoint.as_deref(),
        ),
        Command::Replay {
            data,
            log,
            json,
            filter,
        } => replay(&data.data_dir, log, json, filter.into()),
        Command::PublicKey { data } => {
            match read_text(
                &data.data_dir.join(PUBLIC_KEY_FILE),
                "the checkpoint public key",
            ) {
                Ok(pem) => {
                    print!("{pem}");
                    ExitCode::SUCCESS
                }
                Err(problem) => fail(EXIT_FAILURE, problem),
            }
        }
        Command::Checkpoint { data, log } => {
            let log = log_dir(&data, log);
            if let Err(problem) = check_log_dir(&log) {
                return fail(EXIT_FAILURE, problem);
            }
            // Only a checkpoint of a log that verifies is worth keeping.
            let report = match ringfence::audit::verify(&log) {
                Ok(report) => report,
                Err(failure) => {
                    return fail(
                        EXIT_LOG_TAMPERED,
                        format!("decision log is not intact: {failure}"),
                    );
                }
            };
            let Some(seq) = report.last_checkpoint else {
                return fail(
                    EXIT_FAILURE,
                    format!("`{}` has no checkpoint yet", log.display()),
                );
            };
            let filter = Filter {
                kind: Some(CHECKPOINT_KIND.to_owned()),
                ..Filter::default()
            };
            let mut found = None;
            let result = ringfence::audit::for_each_entry(&log, &filter, |line, entry| {
                if entry.get("seq").and_then(serde_json::Value::as_u64) == Some(seq) {
                    found = Some(line.to_owned());
                }
                Ok(())
            });
            match (result, found) {
                (Ok(_), Some(line)) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                (Ok(_), None) => fail(EXIT_FAILURE, format!("checkpoint at seq {seq} not found")),
                (Err(error), _) => fail(
                    EXIT_FAILURE,
                    format!("cannot read `{}`: {error}", log.display()),
                ),
            }
        }
    }
}

fn verify(
    log: &std::path::Path,
    public_key: Option<&std::path::Path>,
    checkpoint: Option<&std::path::Path>,
) -> ExitCode {
    if let Err(problem) = check_log_dir(log) {
        return fail(EXIT_FAILURE, problem);
    }
    let public_key = match public_key
        .map(|path| {
            read_text(path, "public key").and_then(|pem| {
                CheckpointVerifier::from_pem(&pem)
                    .map_err(|problem| format!("`{}`: {problem}", path.display()))
            })
        })
        .transpose()
    {
        Ok(key) => key,
        Err(problem) => return fail(EXIT_FAILURE, problem),
    };
    let saved_checkpoint = match checkpoint
        .map(|path| read_text(path, "saved checkpoint"))
        .transpose()
    {
        Ok(line) => line,
        Err(problem) => return fail(EXIT_FAILURE, problem),
    };
    let options = VerifyOptions {
        public_key,
        saved_checkpoint,
    };
    match ringfence::audit::verify_with(log, &options) {
        Ok(report) => {
            println!(
                "{}: intact: {} entries ({} decisions, {} checkpoints, {} key events) in {} segment(s), {} .. {}, head {}",
                log.display(),
                report.entries,
                report.entries - report.checkpoints - report.key_events,
                report.checkpoints,
                report.key_events,
                report.segments,
                report.first_time.as_deref().unwrap_or("-"),
                report.last_time.as_deref().unwrap_or("-"),
                report.head
            );
            println!(
                "checkpoints: {}{}{}",
                report.checkpoints,
                if report.signatures_checked {
                    ", every signature valid for the given public key"
                } else if report.checkpoints > 0 {
                    " (signatures not checked: pass --public-key)"
                } else {
                    ""
                },
                match report.last_checkpoint {
                    Some(seq) => format!(
                        "; last at seq {seq}, {} entries after it not yet signed",
                        report.unsigned_tail
                    ),
                    None => String::new(),
                }
            );
            if let Some(seq) = report.saved_checkpoint {
                println!("saved checkpoint at seq {seq}: present and unchanged");
            }
            for (segment, unacknowledged) in &report.failed_segments {
                println!(
                    "note: {} was sealed after a failed write; {unacknowledged} line(s) after its last acknowledged entry were never acknowledged",
                    segment.display()
                );
            }
            for (first, last) in &report.reported_unsigned {
                println!(
                    "note: entries seq {first}..{last} were reported by the writer as never signed in time (an `unsigned_tail` entry): nothing vouches for them"
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
    }
}

fn replay(
    data_dir: &std::path::Path,
    log: Option<PathBuf>,
    json: bool,
    filter: Filter,
) -> ExitCode {
    let log = log.unwrap_or_else(|| data_dir.join(ringfence::server::LOG_DIR));
    if let Err(problem) = check_log_dir(&log) {
        return fail(EXIT_FAILURE, problem);
    }
    let archive = data_dir.join(ringfence::server::POLICY_ARCHIVE_DIR);
    let report = match ringfence::audit::replay::replay(&log, &archive, &filter) {
        Ok(report) => report,
        Err(error) => {
            return fail(
                EXIT_FAILURE,
                format!("cannot read `{}`: {error}", log.display()),
            );
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, error),
        }
    } else {
        for mismatch in &report.mismatches {
            println!(
                "DIFFERS seq {} (request {}) field {}: recorded {}, replayed {}",
                mismatch.seq,
                mismatch.request_id,
                mismatch.field,
                mismatch.recorded,
                mismatch.replayed
            );
        }
        for (hash, (problem, entries)) in &report.unavailable {
            println!("CANNOT REPLAY {entries} entries decided by policy set {hash}: {problem}");
        }
        println!(
            "{} entries replayed ({} field decisions) with {} policy set(s): {} differ; {} entries cannot be replayed; {} without decisions skipped",
            report.replayed,
            report.decisions,
            report.policy_sets.len(),
            report.mismatches.len(),
            report.unavailable.values().map(|(_, n)| n).sum::<u64>(),
            report.skipped
        );
    }
    if report.mismatches.is_empty() && report.unavailable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REPLAY_MISMATCH)
    }
}
