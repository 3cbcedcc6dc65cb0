//! `ringfence keys ...`: versions and dates only, never key bytes.

use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::keys::{self, KEYRING_FILE, Keyring, MASTER_KEY_ENV};
use ringfence::record::Jurisdiction;

use super::{DataDir, EXIT_FAILURE, fail};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List jurisdictions, key versions and creation dates.
    List {
        #[command(flatten)]
        data: DataDir,
        /// Master key file (else RINGFENCE_MASTER_KEY, else the development key).
        #[arg(long)]
        master_key_file: Option<PathBuf>,
    },
    /// Add a new root key version for a jurisdiction and make it current. Restart the
    /// server to encrypt with it; older versions keep decrypting.
    Rotate {
        #[command(flatten)]
        data: DataDir,
        /// Master key file (else RINGFENCE_MASTER_KEY, else the development key).
        #[arg(long)]
        master_key_file: Option<PathBuf>,
        /// Jurisdiction to rotate, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
    },
}

fn open(data: &DataDir, master_key_file: Option<&std::path::Path>) -> Result<Keyring, keys::Error> {
    let path = data.data_dir.join(KEYRING_FILE);
    if !path.exists() {
        return Err(keys::Error::Invalid {
            path,
            reason: "no keyring here; `ringfence serve` creates one on first start".to_owned(),
        });
    }
    let env = std::env::var(MASTER_KEY_ENV)
        .ok()
        .map(keys::MasterKeyText::new);
    let (master, _) = keys::load_master_key(env.as_ref(), master_key_file, &data.data_dir, true)?;
    Keyring::open(&path, &master)
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::List {
            data,
            master_key_file,
        } => match open(&data, master_key_file.as_deref()) {
            Ok(keyring) => {
                for info in keyring.summary() {
                    for (version, created_at) in &info.versions {
                        let marker = if *version == info.current {
                            " (current)"
                        } else {
                            ""
                        };
                        println!("{}\tv{version}\t{created_at}{marker}", info.jurisdiction);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_FAILURE, error),
        },
        Command::Rotate {
            data,
            master_key_file,
            jurisdiction,
        } => match open(&data, master_key_file.as_deref())
            .and_then(|mut keyring| keyring.rotate(&jurisdiction))
        {
            Ok(version) => {
                println!("{jurisdiction}: new current key version {version}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_FAILURE, error),
        },
    }
}
