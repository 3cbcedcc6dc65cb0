//! How the server knows its callers: the identity mode of a configuration (its TLS
//! listener and token verifier), the files reloaded on change, and failed handshakes
//! written to the decision log. May not decide, serve or bind.

use std::sync::Arc;

use super::Error;
use crate::config::{Auth, ServeConfig};
use crate::dev::DevPki;
use crate::failures;
use crate::gatekeeper::Gatekeeper;
use crate::identity;
use crate::identity::tls;
use crate::identity::token::TokenVerifier;
use crate::reload;

/// What `start_with` needs to authenticate callers.
pub(super) type Identity = (
    identity::Mode,
    Option<tls::Listener>,
    Option<Arc<TokenVerifier>>,
);

/// The identity mode, TLS configuration and token verifier of a configuration.
pub(crate) fn identity_mode(config: &ServeConfig) -> Result<Identity, Error> {
    let (tls_files, trust_domain, token_config) = match &config.auth {
        Auth::None => {
            tracing::warn!(
                "no caller authentication is configured: every request will be refused with UNAUTHENTICATED (use --dev, or --tls-cert/--tls-key/--client-ca)"
            );
            return Ok((identity::Mode::Disabled, None, None));
        }
        Auth::DangerTrustIdentityHeaders => {
            tracing::warn!(
                "--danger-trust-identity-headers: callers are believed on their word ({} / {} headers), over plain TCP. Development only.",
                identity::SERVICE_HEADER,
                identity::EMPLOYEE_HEADER
            );
            return Ok((identity::Mode::DangerTrustIdentityHeaders, None, None));
        }
        Auth::Mtls {
            tls,
            trust_domain,
            tokens,
        } => (tls.clone(), trust_domain.clone(), tokens.clone()),
        Auth::Dev => {
            let pki = DevPki::of(&config.data_dir);
            (
                pki.tls_files(),
                crate::dev::DEV_TRUST_DOMAIN.to_owned(),
                Some(pki.token_config()),
            )
        }
    };
    let (server_config, verifier) =
        tls::server_config(&tls_files).map_err(|error| Error::Io(error.to_string()))?;
    let tokens = token_config
        .map(|token_config| TokenVerifier::load(token_config).map(Arc::new))
        .transpose()
        .map_err(|error| Error::Io(error.to_string()))?;
    Ok((
        identity::Mode::Verified(Arc::new(identity::Verified {
            tokens: tokens.clone(),
            certificates: Some(Arc::clone(&verifier)),
        })),
        Some(tls::Listener {
            config: server_config,
            verifier,
            trust_domain,
        }),
        tokens,
    ))
}

/// The files reloaded on change and SIGHUP: the JWKS and the revocation lists.
pub(super) fn reloadable_files(
    tokens: Option<Arc<TokenVerifier>>,
    tls: Option<&tls::Listener>,
) -> Vec<reload::WatchedFile> {
    let mut files = Vec::new();
    if let Some(tokens) = tokens {
        files.push(reload::WatchedFile {
            path: tokens.jwks_path().to_owned(),
            what: "employee token keys",
            reload: Arc::new(move || {
                tokens
                    .reload()
                    .map(|keys| format!("{keys} keys"))
                    .map_err(|error| format!("{error}; the current keys stay in place"))
            }),
        });
    }
    if let Some(tls) = tls
        && let Some(path) = tls.verifier.crl_path()
    {
        let verifier = Arc::clone(&tls.verifier);
        files.push(reload::WatchedFile {
            path: path.to_owned(),
            what: "client certificate revocation lists",
            reload: Arc::new(move || {
                verifier
                    .reload()
                    .map(|lists| {
                        let revoked: usize = lists.iter().map(|list| list.revoked).sum();
                        format!(
                            "{} lists, {revoked} certificates revoked; open connections are checked again at their next request",
                            lists.len()
                        )
                    })
                    .map_err(|error| format!("{error}; the lists in use stay in place"))
            }),
        });
    }
    files
}

/// Writes failed TLS handshakes to the decision log as authentication failures (rate
/// limited by the gatekeeper).
pub(super) fn handshake_failures(gate: Arc<Gatekeeper>) -> tls::FailureHook {
    Arc::new(move |remote, reason| {
        let source = failures::Source::Address(remote.ip());
        gate.metrics().authentication_failed("tls_handshake");
        // A flood is counted, not written (nor printed) one by one.
        let Some(held_back) = gate.admit_authentication_failure(&source) else {
            return;
        };
        tracing::info!(%remote, %reason, "refused connection");
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            if let Err(error) = gate
                .log_authentication_failure(&reason, Some(remote), &source, held_back)
                .await
            {
                tracing::error!(%error, "failed handshake not logged");
            }
        });
    })
}
