//! `ringfence keys ...`: create, list, rotate, retire, unretire, destroy and migrate
//! root keys, re-seal them (and the subject store) under a new master key, and shred
//! data subjects. Offline (server stopped) every
//! change is logged as `key_event` entries with a signed checkpoint and refused while a
//! server holds the log; with `--server` the running server's KeyAdmin service decides,
//! logs and applies it live. Versions, key ids, dates and states only, never key bytes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ringfence::keyadmin::{self, DataPaths};
use ringfence::keys::{self, KeyEvent, Keyring, MASTER_KEY_ENV, MasterKeyPolicy};
use ringfence::pb;
use ringfence::record::{Jurisdiction, KeyVersion, SubjectId};

mod master;
mod shred;

use super::admin_client::{ServerArgs, print_key_rings};
use super::{DataDir, EXIT_FAILURE, fail};
use master::rotate_master;
use shred::shred;

/// Environment variable holding the new master key for `rotate-master` when
/// `--new-master-key-file` is not given.
pub const NEW_MASTER_KEY_ENV: &str = "RINGFENCE_NEW_MASTER_KEY";

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
    /// List every key version: jurisdiction, version, key id, creation date, state
    /// (active, decrypt-only, retired, destroyed) and generation.
    List {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Only this jurisdiction.
        #[arg(long)]
        jurisdiction: Option<Jurisdiction>,
    },
    /// Add a new root key version for a jurisdiction and make it current. With
    /// --server it is live for every request that starts after the command returns;
    /// offline (server stopped) the next start uses it. Older versions keep
    /// decrypting.
    Rotate {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Jurisdiction to rotate, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
    },
    /// Retire every version below --below: their fields fail with a per-field
    /// "retired key version" error until `unretire`. The current version cannot be
    /// retired (rotate first).
    Retire {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Jurisdiction, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
        /// Versions below this one are retired.
        #[arg(long)]
        below: KeyVersion,
    },
    /// Let retired versions from --from on decrypt again (destroyed ones stay lost).
    Unretire {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Jurisdiction, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
        /// The lowest version to let decrypt again.
        #[arg(long)]
        from: KeyVersion,
    },
    /// Destroy the sealed keys of every version below --below, which must be retired.
    /// PERMANENT: their fields can never be decrypted again (see docs/crypto.md,
    /// "Destroying keys", for copies in backups).
    Destroy {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// Jurisdiction, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
        /// Versions below this one are destroyed.
        #[arg(long)]
        below: KeyVersion,
    },
    /// Crypto-shred a data subject: destroy its secret in every jurisdiction (or the
    /// ones given), so that none of its format-2 fields ever decrypts again (per-field
    /// KIND_SHREDDED) and nothing is encrypted for it again. PERMANENT (see
    /// docs/crypto.md, "Shredding", for backups). With --server the running server
    /// decides `shred`, logs it and applies it to every request that starts after the
    /// command returns; offline (server stopped) it is logged as a local command.
    /// Format-1 fields do not depend on the subject's secret: rewrap them first.
    Shred {
        #[command(flatten)]
        args: KeyArgs,
        #[command(flatten)]
        server: ServerArgs,
        /// The data subject, as records name it (`subject_id`, default their record id).
        #[arg(long)]
        subject: SubjectId,
        /// Jurisdictions to shred in, comma-separated (default: every one the keyring
        /// holds).
        #[arg(long, value_delimiter = ',')]
        jurisdictions: Vec<Jurisdiction>,
    },
    /// Re-seal every key under a new master key (server stopped): root keys, key ids
    /// and records stay as they are, and so do the subject secrets (re-sealed in the
    /// subject store first); afterwards only the new master key opens the keyring. The current master key comes from --master-key-file or
    /// RINGFENCE_MASTER_KEY as usual.
    RotateMaster {
        #[command(flatten)]
        args: KeyArgs,
        /// File holding the new master key (64 hex digits or base64 of 32 bytes); else
        /// the RINGFENCE_NEW_MASTER_KEY environment variable.
        #[arg(long)]
        new_master_key_file: Option<PathBuf>,
    },
    /// Convert a keyring of format 1 (unauthenticated metadata) to the current format, once.
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
                "{error}: offline key changes are refused while a server runs (it would keep serving the keys it loaded); make the change through it with --server, or stop it and retry"
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
    run_change_inner(args, create, actor, change, Box::new(|_| Ok(())))
}

/// [`run_change`] of an existing keyring with a step before the save (see
/// [`keyadmin::change_offline_with`]).
fn run_change_with<'a>(
    args: &'a KeyArgs,
    actor: &str,
    change: impl FnOnce(&Path, &keys::LocalMasterKey) -> Result<Changed, keys::Error>,
    before_save: Box<keyadmin::BeforeSave<'a>>,
) -> Result<Vec<KeyEvent>, keyadmin::Error> {
    run_change_inner(args, false, actor, change, before_save)
}

fn run_change_inner<'a>(
    args: &'a KeyArgs,
    create: bool,
    actor: &str,
    change: impl FnOnce(&Path, &keys::LocalMasterKey) -> Result<Changed, keys::Error>,
    before_save: Box<keyadmin::BeforeSave<'a>>,
) -> Result<Vec<KeyEvent>, keyadmin::Error> {
    if let Err(error) = ringfence::fsutil::create_private_dir(&args.data.data_dir) {
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
    keyadmin::change_offline_with(
        &args.paths(),
        actor,
        Box::new(|path: &Path| change(path, &master)),
        before_save,
    )
}

/// Makes a change through `--server`'s KeyAdmin service, or offline.
fn change(
    args: &KeyArgs,
    server: &ServerArgs,
    offline: impl FnOnce() -> ExitCode,
    remote: impl FnOnce(
        &super::admin_client::Remote,
        &ServerArgs,
    ) -> Result<pb::KeyChangeResponse, String>,
) -> ExitCode {
    match server.connect(&args.data.data_dir) {
        Ok(None) => offline(),
        Ok(Some(connected)) => match remote(&connected, server) {
            Ok(response) if response.events.is_empty() => {
                println!("nothing to do (request {})", response.request_id);
                ExitCode::SUCCESS
            }
            Ok(response) => {
                for event in &response.events {
                    println!(
                        "{}\tv{}\t{}\tgeneration {}\t({})",
                        event.jurisdiction,
                        event.version,
                        event.key_id,
                        event.generation,
                        event.operation
                    );
                }
                println!("request {}", response.request_id);
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_FAILURE, error),
        },
        Err(error) => fail(EXIT_FAILURE, error),
    }
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
        Command::Rotate {
            args,
            server,
            jurisdiction,
        } => change(
            &args,
            &server,
            || {
                let result = run_change(&args, false, "ringfence keys rotate", |path, master| {
                    let mut keyring = Keyring::open(path, master)?;
                    let before = keyring.states();
                    let event = keyring.rotate(&jurisdiction)?;
                    Ok((before, keyring, vec![event]))
                });
                report(result, "nothing rotated")
            },
            |remote, server| {
                let message = pb::RotateKeyRequest {
                    jurisdiction: jurisdiction.as_str().to_owned(),
                    purpose: server.purpose.clone(),
                    ticket: server.ticket.clone(),
                };
                remote.call(message, |mut client, request| async move {
                    client.rotate_key(request).await
                })
            },
        ),
        Command::Retire {
            args,
            server,
            jurisdiction,
            below,
        } => change(
            &args,
            &server,
            || {
                offline_change(&args, "ringfence keys retire", |keyring| {
                    keyring.retire(&jurisdiction, below)
                })
            },
            |remote, server| {
                let message = pb::RetireKeysRequest {
                    jurisdiction: jurisdiction.as_str().to_owned(),
                    below: below.get(),
                    purpose: server.purpose.clone(),
                    ticket: server.ticket.clone(),
                };
                remote.call(message, |mut client, request| async move {
                    client.retire_keys(request).await
                })
            },
        ),
        Command::Unretire {
            args,
            server,
            jurisdiction,
            from,
        } => change(
            &args,
            &server,
            || {
                offline_change(&args, "ringfence keys unretire", |keyring| {
                    keyring.unretire(&jurisdiction, from)
                })
            },
            |remote, server| {
                let message = pb::UnretireKeysRequest {
                    jurisdiction: jurisdiction.as_str().to_owned(),
                    from: from.get(),
                    purpose: server.purpose.clone(),
                    ticket: server.ticket.clone(),
                };
                remote.call(message, |mut client, request| async move {
                    client.unretire_keys(request).await
                })
            },
        ),
        Command::Destroy {
            args,
            server,
            jurisdiction,
            below,
        } => change(
            &args,
            &server,
            || {
                offline_change(&args, "ringfence keys destroy", |keyring| {
                    keyring.destroy(&jurisdiction, below)
                })
            },
            |remote, server| {
                let message = pb::DestroyKeysRequest {
                    jurisdiction: jurisdiction.as_str().to_owned(),
                    below: below.get(),
                    purpose: server.purpose.clone(),
                    ticket: server.ticket.clone(),
                };
                remote.call(message, |mut client, request| async move {
                    client.destroy_keys(request).await
                })
            },
        ),
        Command::RotateMaster {
            args,
            new_master_key_file,
        } => rotate_master(&args, new_master_key_file.as_deref()),
        Command::Shred {
            args,
            server,
            subject,
            jurisdictions,
        } => shred(&args, &server, &subject, &jurisdictions),
        Command::Migrate { args } => {
            let result = run_change(&args, false, "ringfence keys migrate", |path, master| {
                // A format-1 keyring has no generations: the log's newest checkpoint
                // must not vouch for any (else the old file is a rollback).
                let (keyring, events) = keys::migrate(path, master)?;
                Ok((Vec::new(), keyring, events))
            });
            report(result, "nothing to migrate")
        }
        Command::List {
            args,
            server,
            jurisdiction,
        } => {
            let listed = match server.connect(&args.data.data_dir) {
                Ok(Some(remote)) => {
                    let message = pb::ListKeysRequest {
                        jurisdiction: jurisdiction
                            .as_ref()
                            .map(|j| j.as_str().to_owned())
                            .unwrap_or_default(),
                        purpose: server.purpose.clone(),
                        ticket: server.ticket.clone(),
                    };
                    remote
                        .call(message, |mut client, request| async move {
                            client.list_keys(request).await
                        })
                        .map(|response| response.key_rings)
                }
                Ok(None) => args
                    .master(false)
                    .and_then(|master| {
                        Keyring::open(&args.data.data_dir.join(keys::KEYRING_FILE), &master)
                    })
                    .map(|keyring| {
                        keyring
                            .summary()
                            .into_iter()
                            .filter(|info| {
                                jurisdiction
                                    .as_ref()
                                    .is_none_or(|j| j.as_str() == info.jurisdiction)
                            })
                            .map(pb::KeyRing::from)
                            .collect()
                    })
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error),
            };
            match listed {
                Ok(key_rings) => {
                    print_key_rings(&key_rings);
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
    }
}

/// One offline change to an existing keyring: open, change, save and log.
fn offline_change(
    args: &KeyArgs,
    actor: &str,
    change: impl FnOnce(&mut Keyring) -> Result<Vec<KeyEvent>, keys::Error>,
) -> ExitCode {
    let result = run_change(args, false, actor, |path, master| {
        let mut keyring = Keyring::open(path, master)?;
        let before = keyring.states();
        let events = change(&mut keyring)?;
        Ok((before, keyring, events))
    });
    report(result, "nothing to do")
}
