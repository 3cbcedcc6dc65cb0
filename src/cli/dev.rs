//! `ringfence dev ...`: a local CA and identity provider for development.

use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::config::DEFAULT_POLICIES;
use ringfence::dev::{DEV_TRUST_DOMAIN, DevPki};
use ringfence::policy::PolicySnapshot;

use super::{DataDir, EXIT_FAILURE, EXIT_INVALID_POLICIES, fail};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create (what is missing of) a development PKI in <data-dir>/dev-pki: a CA, a
    /// server certificate for localhost, a client certificate for every service in the
    /// directory, and a token-signing key with its JWKS. `serve --dev` uses them.
    Init {
        #[command(flatten)]
        data: DataDir,
        /// Policy directory (its directory lists the services).
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
    },
    /// Print a development employee token (JWT) for a directory employee, for the
    /// `authorization: Bearer <token>` header.
    Token {
        #[command(flatten)]
        data: DataDir,
        /// Employee id, e.g. alice.
        #[arg(long)]
        employee: String,
        /// Minutes until the token expires.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..=1440))]
        ttl_minutes: i64,
    },
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Init { data, policies } => {
            let snapshot = match PolicySnapshot::load(&policies) {
                Ok(snapshot) => snapshot,
                Err(error) => return fail(EXIT_INVALID_POLICIES, error),
            };
            let pki = DevPki::of(&data.data_dir);
            match pki.init(&snapshot.service_ids()) {
                Ok(created) => {
                    for path in &created {
                        println!("created {}", path.display());
                    }
                    println!(
                        "development PKI ready in {} (trust domain {DEV_TRUST_DOMAIN}); a client certificate per service is in {}",
                        pki.dir.display(),
                        pki.dir.join("clients").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
        Command::Token {
            data,
            employee,
            ttl_minutes,
        } => {
            if !ringfence::identity::is_directory_id(&employee) {
                return fail(EXIT_FAILURE, format!("`{employee}` is not a directory id"));
            }
            let signer = match DevPki::of(&data.data_dir).token_signer() {
                Ok(signer) => signer,
                Err(error) => return fail(EXIT_FAILURE, error),
            };
            match signer.mint(&employee, time::Duration::minutes(ttl_minutes)) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
    }
}
