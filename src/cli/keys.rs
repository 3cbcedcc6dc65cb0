//! `ringfence keys ...`: create, list, rotate and migrate root keys offline. Versions,
//! key ids and dates only, never key bytes; every change is logged as `key_event`
//! entries with a signed checkpoint, and refused while a server holds the log.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ringfence::keyadmin::{self, DataPaths};
use ringfence::keys::{self, KeyEvent, Keyring, MASTER_KEY_ENV, MasterKeyPolicy};
use ringfence::record::Jurisdiction;

use super::{DataDir, EXIT_FAILURE, fail};

/// How a keys command finds the master key and the checkpoint key.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(flatten)]
    data: DataDir,
    /// Master key file (else the RINGFENCE_MASTER_KEY environment variable).
    #[arg(long)]
    master_key_file: Option<PathBuf>,
    /// DEVELOPMENT ONLY: use (for `init`: create) the development master key stored in
    /// the data directory, as `serve --dev` does.
    #[arg(long, visible_alias = "dev")]
    danger_allow_development_master_key: bool,
    /// Decision log checkpoint signing key, as given to `serve` (default:
    /// audit-signing-key.pem in the data directory).
    #[arg(long)]
    checkpoint_key: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create the keyring (or add jurisdictions to it): version 1 of a root key per
    /// jurisdiction. `serve` never creates keys outside `--dev`.
    Init {
        #[command(flatten)]
        args: KeyArgs,
        /// Jurisdictions to create keys for, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "US,SG,EU")]
        jurisdictions: Vec<Jurisdiction>,
    },
    /// List jurisdictions, generations, key versions, key ids and creation dates.
    List {
        #[command(flatten)]
        args: KeyArgs,
    },
    /// Add a new root key version for a jurisdiction and make it current. Refused while
    /// a server runs; restart the server to encrypt with it. Older versions keep
    /// decrypting.
    Rotate {
        #[command(flatten)]
        args: KeyArgs,
        /// Jurisdiction to rotate, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
    },
    /// Convert a keyring of format 1 (unauthenticated metadata) to format 2, once.
    Migrate {
        #[command(flatten)]
        args: KeyArgs,
    },
}

impl KeyArgs {
    fn paths(&self) -> DataPaths {
        DataPaths {
            data_dir: self.data.data_dir.clone(),
            checkpoint_key: self.checkpoint_key.clone(),
        }
    }

    fn master(&self, create: bool) -> Result<keys::LocalMasterKey, keys::Error> {
        let env = std::env::var(MASTER_KEY_ENV)
            .ok()
            .map(keys::MasterKeyText::new);
        keys::load_master_key(
            env.as_ref(),
            self.master_key_file.as_deref(),
            &self.data.data_dir,
            MasterKeyPolicy {
                allow_development: self.danger_allow_development_master_key,
                create_development: create && self.danger_allow_development_master_key,
            },
        )
    }
}

fn print_events(events: &[KeyEvent]) {
    for event in events {
        println!(
            "{}\tv{}\t{}\tgeneration {}\t({})",
            event.jurisdiction, event.version, event.key_id, event.generation, event.operation
        );
    }
}

fn report(result: Result<Vec<KeyEvent>, keyadmin::Error>, nothing: &str) -> ExitCode {
    match result {
        Ok(events) if events.is_empty() => {
            println!("{nothing}");
            ExitCode::SUCCESS
        }
        Ok(events) => {
            print_events(&events);
            ExitCode::SUCCESS
        }
        Err(keyadmin::Error::Log(error @ ringfence::audit::Error::Locked { .. })) => fail(
            EXIT_FAILURE,
            format!(
                "{error}: key changes are refused while a server runs (it would keep serving the keys it loaded); stop it, then retry"
            ),
        ),
        Err(error) => fail(EXIT_FAILURE, error),
    }
}

/// Where the keyring stood before the change (for the rollback check and unlogged
/// changes), the keyring after it, and the events between.
type Changed = (Vec<KeyEvent>, Keyring, Vec<KeyEvent>);

fn run_change(
    args: &KeyArgs,
    create: bool,
    actor: &str,
    change: impl FnOnce(&Path, &keys::LocalMasterKey) -> Result<Changed, keys::Error>,
) -> Result<Vec<KeyEvent>, keyadmin::Error> {
    if let Err(error) = std::fs::create_dir_all(&args.data.data_dir) {
        return Err(keyadmin::Error::Other(format!(
            "cannot create data directory `{}`: {error}",
            args.data.data_dir.display()
        )));
    }
    let master = args.master(create)?;
    if keys::MasterKeySource::is_development(&master) {
        eprintln!(
            "warning: using the {}: not for production",
            keys::MasterKeySource::describe(&master)
        );
    }
    keyadmin::change_offline(
        &args.paths(),
        actor,
        Box::new(|path: &Path| change(path, &master)),
    )
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Init {
            args,
            jurisdictions,
        } => {
            let result = run_change(&args, true, "ringfence keys init", |path, master| {
                let mut keyring =
                    Keyring::open_if_present(path, master)?.unwrap_or_else(|| Keyring::empty(path));
                let before = keyring.states();
                let mut events = Vec::new();
                for jurisdiction in &jurisdictions {
                    if !keyring.holds(jurisdiction) {
                        events.push(keyring.initialize(jurisdiction, master)?);
                    }
                }
                Ok((before, keyring, events))
            });
            report(result, "every jurisdiction already has keys: nothing to do")
        }
        Command::Rotate { args, jurisdiction } => {
            let result = run_change(&args, false, "ringfence keys rotate", |path, master| {
                let mut keyring = Keyring::open(path, master)?;
                let before = keyring.states();
                let event = keyring.rotate(&jurisdiction)?;
                Ok((before, keyring, vec![event]))
            });
            report(result, "nothing rotated")
        }
        Command::Migrate { args } => {
            let result = run_change(&args, false, "ringfence keys migrate", |path, master| {
                // A format-1 keyring has no generations: the log's newest checkpoint
                // must not vouch for any (else the old file is a rollback).
                let (keyring, events) = keys::migrate(path, master)?;
                Ok((Vec::new(), keyring, events))
            });
            report(result, "nothing to migrate")
        }
        Command::List { args } => {
            let opened = args.master(false).and_then(|master| {
                Keyring::open(&args.data.data_dir.join(keys::KEYRING_FILE), &master)
            });
            match opened {
                Ok(keyring) => {
                    for info in keyring.summary() {
                        for version in &info.versions {
                            let marker = if version.version == info.current {
                                " (current)"
                            } else {
                                ""
                            };
                            println!(
                                "{}\tv{}\t{}\t{}\tgeneration {}{marker}",
                                info.jurisdiction,
                                version.version,
                                version.key_id,
                                version.created_at,
                                info.generation
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
    }
}
