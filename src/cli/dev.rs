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
        /// Employee id, e.g. alice; must be an employee of the directory.
        #[arg(long)]
        employee: String,
        /// The service that will present the token (its `azp`), e.g. us-support-tool;
        /// must be a service of the directory. No other service can use the token.
        #[arg(long)]
        service: String,
        /// Policy directory (its directory lists employees and services).
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
        /// Minutes until the token expires.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(1..=1440))]
        ttl_minutes: i64,
    },
    /// Revoke the development client certificate of a service: its serial joins
    /// <data-dir>/dev-pki/client-crl.pem, which `serve --dev` reloads (connections
    /// using it are refused from their next request), and its certificate and key are
    /// deleted; `dev init` issues new ones.
    Revoke {
        #[command(flatten)]
        data: DataDir,
        /// The service whose certificate to revoke, e.g. us-signup.
        #[arg(long)]
        service: String,
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
            service,
            policies,
            ttl_minutes,
        } => {
            let snapshot = match PolicySnapshot::load(&policies) {
                Ok(snapshot) => snapshot,
                Err(error) => return fail(EXIT_INVALID_POLICIES, error),
            };
            for id in [&employee, &service] {
                if !ringfence::record::is_directory_id(id) {
                    return fail(EXIT_FAILURE, format!("`{id}` is not a directory id"));
                }
            }
            let known = snapshot.check_caller(
                &ringfence::policy::Principal::Employee(employee.clone()),
                &service,
            );
            if let Err(error) = known {
                return fail(
                    EXIT_FAILURE,
                    format!("{error} ({}): no token minted", policies.display()),
                );
            }
            let signer = match DevPki::of(&data.data_dir).token_signer() {
                Ok(signer) => signer,
                Err(error) => return fail(EXIT_FAILURE, error),
            };
            match signer.mint(&employee, &service, time::Duration::minutes(ttl_minutes)) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
        Command::Revoke { data, service } => {
            if !ringfence::record::is_directory_id(&service) {
                return fail(EXIT_FAILURE, format!("`{service}` is not a directory id"));
            }
            let pki = DevPki::of(&data.data_dir);
            match pki.revoke(&service) {
                Ok(serial) => {
                    println!(
                        "revoked the client certificate of {service} (serial {serial}) in {}; `ringfence dev init` issues a new one",
                        pki.client_crl().display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
    }
}
