//! `ringfence config check`: what `serve` would check before serving a
//! configuration (addresses, TLS and token files, the policy set and its proof, the
//! master key and the keyring), without creating, locking, archiving or binding
//! anything. May not change the data directory.

use crate::config::{Auth, ServeConfig};
use crate::keys::{self, Keyring};
use crate::policy::{PolicyStore, ProofMode};
use crate::server::{self, Error};

/// One thing checked and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked: `addresses`, `identity`, `policies`, `keys`, `log`.
    pub what: &'static str,
    /// What was found.
    pub detail: String,
    /// Whether it is a warning (the configuration serves, but should be looked at).
    pub warning: bool,
}

fn found(what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        what,
        detail: detail.into(),
        warning: false,
    }
}

fn warn(what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        what,
        detail: detail.into(),
        warning: true,
    }
}

/// Checks `config` as `serve` would; the first problem is the error.
pub fn check(config: &ServeConfig) -> Result<Vec<Finding>, Error> {
    let mut findings = Vec::new();
    config.check()?;
    if let Some(metrics) = config.metrics_listen {
        if metrics.port() != 0 && metrics == config.listen {
            return Err(Error::Io(format!(
                "--metrics-listen and --listen are both `{metrics}`"
            )));
        }
        if !metrics.ip().is_loopback() {
            findings.push(warn(
                "addresses",
                format!("metrics on `{metrics}` are served without TLS or authentication"),
            ));
        }
    }
    findings.push(found(
        "addresses",
        format!(
            "gRPC on {}, metrics {}",
            config.listen,
            config
                .metrics_listen
                .map_or("off".to_owned(), |address| format!("on {address}"))
        ),
    ));

    findings.push(match &config.auth {
        Auth::None => warn(
            "identity",
            "no caller authentication: every request would be refused (UNAUTHENTICATED)",
        ),
        Auth::DangerTrustIdentityHeaders => warn(
            "identity",
            "--danger-trust-identity-headers: callers are believed on their word (development only)",
        ),
        Auth::Dev => {
            let pki = crate::dev::DevPki::of(&config.data_dir);
            warn(
                "identity",
                format!(
                    "--dev: development PKI in {} (created at first start if missing): not for production",
                    pki.dir.display()
                ),
            )
        }
        Auth::Mtls { tokens, .. } => {
            server::identity_mode(config)?;
            found(
                "identity",
                format!(
                    "mutual TLS: server certificate, key, client CA{} load; employee tokens {}",
                    if matches!(&config.auth, Auth::Mtls { tls, .. } if tls.client_crl.is_some()) {
                        " and revocation lists"
                    } else {
                        ""
                    },
                    if tokens.is_some() {
                        "verified against the JWKS, which loads"
                    } else {
                        "not accepted (no --jwks)"
                    }
                ),
            )
        }
    });

    let archive = config.data_dir.join(crate::config::POLICY_ARCHIVE_DIR);
    let store = PolicyStore::check_guarded(&config.policies, config.proof.clone(), &archive)?;
    let snapshot = store.current();
    let proof = match (config.proof.mode, store.last_proof()) {
        (ProofMode::Off, _) | (_, None) => "not proved (--prove off)".to_owned(),
        (mode, Some(proof)) => format!(
            "{} {}/{} invariants ({})",
            proof.verdict,
            proof.proved,
            proof.invariants,
            mode.as_str()
        ),
    };
    let policies = found(
        "policies",
        format!(
            "{} policies in {}, set {}; {proof}",
            snapshot.len(),
            config.policies.display(),
            snapshot.hash()
        ),
    );
    findings.push(match store.last_proof() {
        Some(proof) if !proof.problems.is_empty() => Finding {
            warning: true,
            detail: format!("{}: {}", policies.detail, proof.problems.join("; ")),
            ..policies
        },
        _ => policies,
    });
    for jurisdiction in &config.jurisdictions {
        if !snapshot.jurisdictions().contains(jurisdiction) {
            findings.push(warn(
                "policies",
                format!("jurisdiction {jurisdiction} has no `Jurisdiction` entity: its records would be refused"),
            ));
        }
    }

    findings.push(check_keys(config)?);
    let signing_key = crate::keyadmin::DataPaths {
        data_dir: config.data_dir.clone(),
        checkpoint_key: config.checkpoint_key.clone(),
    }
    .signing_key();
    findings.push(found(
        "log",
        if signing_key.exists() {
            format!("checkpoint signing key {}", signing_key.display())
        } else {
            format!(
                "checkpoint signing key {} is created at first start",
                signing_key.display()
            )
        },
    ));
    Ok(findings)
}

/// The master key opens the keyring, and every configured jurisdiction holds keys.
fn check_keys(config: &ServeConfig) -> Result<Finding, Error> {
    let keyring_path = config.data_dir.join(keys::KEYRING_FILE);
    // Nothing is created here, also under --dev.
    let master = server::master_key(config, false);
    let master = match master {
        Ok(master) => master,
        Err(error) if config.create_missing_keys && !keyring_path.exists() => {
            return Ok(warn(
                "keys",
                format!(
                    "--dev creates a development master key and keyring at first start ({error})"
                ),
            ));
        }
        Err(error) => return Err(error.into()),
    };
    let Some(keyring) = Keyring::open_if_present(&keyring_path, &master)? else {
        if config.create_missing_keys {
            return Ok(warn(
                "keys",
                format!(
                    "--dev creates the keyring {} at first start",
                    keyring_path.display()
                ),
            ));
        }
        return Err(Error::Keys(keys::Error::NoKeyring(keyring_path)));
    };
    let missing: Vec<_> = config
        .jurisdictions
        .iter()
        .filter(|jurisdiction| !keyring.holds(jurisdiction))
        .cloned()
        .collect();
    if !missing.is_empty() && !config.create_missing_keys {
        return Err(Error::Keys(keys::Error::NotInitialized {
            path: keyring_path,
            jurisdictions: missing,
        }));
    }
    Ok(found(
        "keys",
        format!(
            "the master key ({}) opens {}; keys for {}",
            keys::MasterKeySource::describe(&master),
            keyring_path.display(),
            config
                .jurisdictions
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}
