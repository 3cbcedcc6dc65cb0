//! Caller authentication: who is calling (a service) and for whom (an employee).
//!
//! Produces a typed [`Caller`] from transport facts; handlers read it from request
//! extensions and nothing in a request body can change it. Whether the named service
//! and employee exist is checked against the directory by `policy`.
//!
//! [`Mode::Verified`]: the service is the one named by its verified client
//! certificate (mTLS, see [`tls`]); the employee, if any, is the subject of a
//! signed token in the `authorization: Bearer` header (see [`token`]). Identity
//! headers are refused in this mode. [`Mode::DangerTrustIdentityHeaders`] believes
//! the `x-ringfence-*` headers and exists for local experiments on loopback only.
//!
//! Dependencies run one way: this module uses [`tls`] (the listener and what it
//! proved) and [`token`] (employee tokens); neither uses it.

pub mod tls;
pub mod token;

use std::sync::Arc;

use crate::policy::Principal;
use crate::record::is_directory_id;
use tls::PeerInfo;
use token::{Binding, TokenVerifier};

/// Metadata header naming the calling service in the danger mode.
pub const SERVICE_HEADER: &str = "x-ringfence-service";
/// Metadata header naming the employee the service acts for in the danger mode.
pub const EMPLOYEE_HEADER: &str = "x-ringfence-employee";
/// Metadata header carrying the employee token: `authorization: Bearer <jwt>`.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// `authentication` of callers identified by their client certificate alone.
pub const METHOD_MTLS: &str = "mtls";
/// `authentication` of employees identified by a token bound to the calling mTLS
/// service (its certificate, or its id in `azp`).
pub const METHOD_MTLS_TOKEN: &str = "mtls+token";
/// `authentication` of employees identified by a token bound to no service, accepted
/// only with `--danger-accept-unbound-tokens`.
pub const METHOD_MTLS_UNBOUND_TOKEN: &str = "mtls+unbound-token";
/// `authentication` in the danger mode.
pub const METHOD_DANGER: &str = "danger-trust-identity-headers";
/// Every `authentication` value ringfence puts in a request's context.
pub const METHODS: [&str; 4] = [
    METHOD_MTLS,
    METHOD_MTLS_TOKEN,
    METHOD_MTLS_UNBOUND_TOKEN,
    METHOD_DANGER,
];

/// Proven identity: client certificates, and optionally employee tokens.
#[derive(Debug)]
pub struct Verified {
    /// Employee token verifier; without it, calls carrying a token are refused.
    pub tokens: Option<Arc<TokenVerifier>>,
    /// The listener's client-certificate verifier: a connection is checked again when
    /// its revocation lists change.
    pub certificates: Option<Arc<tls::ClientVerifier>>,
}

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub enum Mode {
    /// No authentication is configured: every request is refused.
    Disabled,
    /// Development only: believe identity headers. Loopback listeners only.
    DangerTrustIdentityHeaders,
    /// mTLS for services, signed tokens for employees.
    Verified(Arc<Verified>),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Directory id of the calling service.
    pub service: String,
    /// Directory id of the employee the service acts for, if any.
    pub employee: Option<String>,
    /// How the caller was authenticated.
    pub method: &'static str,
    /// For an employee named by a token: what holds a stream to that token.
    pub lease: Option<token::Lease>,
    /// For a service named by a client certificate: what holds a stream to that
    /// certificate.
    pub certificate: Option<CertificateLease>,
}

/// What a connection's client certificate stays valid for: its expiry, and the
/// verifier that checks its chain again after the revocation lists change.
#[derive(Debug, Clone)]
pub struct CertificateLease {
    not_after: Option<i64>,
    recheck: Option<(Arc<tls::ClientVerifier>, Arc<tls::PeerChain>)>,
}

impl CertificateLease {
    /// Whether the certificate is still good: not expired since the handshake, and
    /// its chain still verifies against the current revocation lists.
    pub fn check(&self) -> Result<(), Error> {
        if let Some(not_after) = self.not_after
            && time::OffsetDateTime::now_utc().unix_timestamp() > not_after
        {
            return Err(Error::Certificate(
                "the client certificate has expired since this connection was made: reconnect with a current one".to_owned(),
            ));
        }
        if let Some((verifier, chain)) = &self.recheck {
            verifier.recheck(chain).map_err(Error::Certificate)?;
        }
        Ok(())
    }
}

impl PartialEq for CertificateLease {
    fn eq(&self, other: &Self) -> bool {
        self.not_after == other.not_after
            && match (&self.recheck, &other.recheck) {
                (Some((_, mine)), Some((_, theirs))) => Arc::ptr_eq(mine, theirs),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for CertificateLease {}

impl Caller {
    /// Whether the credentials the caller was authenticated with still hold (a long
    /// stream asks before every record): the client certificate (expiry, revocation)
    /// and the employee token (expiry, key reload).
    pub fn check_credentials(&self) -> Result<(), Error> {
        if let Some(certificate) = &self.certificate {
            certificate.check()?;
        }
        if let Some(lease) = &self.lease {
            lease.check()?;
        }
        Ok(())
    }

    /// The Cedar principal: the employee when there is one, else the service.
    pub fn principal(&self) -> Principal {
        match &self.employee {
            Some(employee) => Principal::Employee(employee.clone()),
            None => Principal::Service(self.service.clone()),
        }
    }
}

/// Why a caller is not authenticated. Messages name the failed check, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server has no authentication configured.
    #[error(
        "this server has no caller authentication configured; for local development start it with --danger-trust-identity-headers"
    )]
    NotConfigured,
    /// A required header is absent.
    #[error("missing `{0}` metadata header")]
    Missing(&'static str),
    /// A header appears more than once.
    #[error("`{0}` metadata header given more than once")]
    Repeated(&'static str),
    /// A header value is not a valid directory id.
    #[error(
        "`{0}` metadata header must be 1 to 128 characters of A-Z, a-z, 0-9, `.`, `_`, `@` or `-`"
    )]
    Invalid(&'static str),
    /// The connection is not TLS with a client certificate.
    #[error("this server requires mutual TLS: connect with TLS and a client certificate")]
    NoClientCertificate,
    /// The client certificate names no service.
    #[error("client certificate refused: {0}")]
    Certificate(String),
    /// Identity headers in a mode where identity is proven.
    #[error(
        "identity headers (`{0}`) are not accepted: the service is taken from the client certificate and the employee from a signed token"
    )]
    IdentityHeader(&'static str),
    /// The `authorization` header is not `Bearer <token>`.
    #[error("`authorization` metadata must be `Bearer <token>`")]
    NotBearer,
    /// A token arrived but the server verifies none.
    #[error("this server is not configured to accept employee tokens (no JWKS)")]
    TokensNotConfigured,
    /// The token failed a check.
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// The token names no service that may present it.
    #[error(
        "employee token is not bound to a service: it needs `cnf.x5t#S256` (the SHA-256 thumbprint of the calling service's certificate) or `azp` (the calling service's id); the server accepts unbound tokens only with --danger-accept-unbound-tokens"
    )]
    TokenNotBound,
    /// The token is bound to another certificate or service.
    #[error("employee token is bound to {0}, not to the calling service")]
    TokenForOther(String),
}

impl Error {
    /// The failure's class, a fixed set (the `reason` label of the
    /// `ringfence_authentication_failures_total` metric).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotConfigured => "not_configured",
            Error::Missing(_) | Error::Repeated(_) | Error::Invalid(_) => "identity_headers",
            Error::NoClientCertificate | Error::Certificate(_) => "certificate",
            Error::IdentityHeader(_) => "identity_headers_refused",
            Error::NotBearer | Error::TokensNotConfigured | Error::Token(_) => "token",
            Error::TokenNotBound | Error::TokenForOther(_) => "token_binding",
        }
    }
}

/// Values of one metadata header, as the transport saw them; `None` for a value that
/// is not visible ASCII.
pub type HeaderValues<'a> = Vec<Option<&'a str>>;

/// Authenticates a caller from what the transport proved (`peer`) and the request
/// metadata, given a lookup of header values.
pub fn authenticate<'a>(
    mode: &Mode,
    peer: Option<&PeerInfo>,
    header: impl Fn(&'static str) -> HeaderValues<'a>,
) -> Result<Caller, Error> {
    let one = |name: &'static str| -> Result<Option<Option<&'a str>>, Error> {
        let values = header(name);
        match values.as_slice() {
            [] => Ok(None),
            [value] => Ok(Some(*value)),
            _ => Err(Error::Repeated(name)),
        }
    };
    match mode {
        Mode::Disabled => Err(Error::NotConfigured),
        Mode::DangerTrustIdentityHeaders => {
            let id = |name: &'static str| -> Result<Option<&'a str>, Error> {
                match one(name)? {
                    None => Ok(None),
                    Some(Some(value)) if is_directory_id(value) => Ok(Some(value)),
                    Some(_) => Err(Error::Invalid(name)),
                }
            };
            let service = id(SERVICE_HEADER)?.ok_or(Error::Missing(SERVICE_HEADER))?;
            let employee = id(EMPLOYEE_HEADER)?;
            Ok(Caller {
                service: service.to_owned(),
                employee: employee.map(str::to_owned),
                method: METHOD_DANGER,
                lease: None,
                certificate: None,
            })
        }
        Mode::Verified(verified) => {
            for name in [SERVICE_HEADER, EMPLOYEE_HEADER] {
                if !header(name).is_empty() {
                    return Err(Error::IdentityHeader(name));
                }
            }
            let service = match peer.and_then(|peer| peer.service.as_ref()) {
                None => return Err(Error::NoClientCertificate),
                Some(Err(reason)) => return Err(Error::Certificate(reason.clone())),
                Some(Ok(service)) => service.clone(),
            };
            // The handshake checked the certificate once; a connection outlives it.
            let certificate = CertificateLease {
                not_after: peer.and_then(|peer| peer.certificate_not_after),
                recheck: verified
                    .certificates
                    .clone()
                    .zip(peer.and_then(|peer| peer.chain.clone())),
            };
            certificate.check()?;
            let (employee, method, lease) = match one(AUTHORIZATION_HEADER)? {
                None => (None, METHOD_MTLS, None),
                Some(value) => {
                    let (employee, method, lease) = employee(verified, peer, &service, value)?;
                    (Some(employee), method, Some(lease))
                }
            };
            Ok(Caller {
                service,
                employee,
                method,
                lease,
                certificate: Some(certificate),
            })
        }
    }
}

/// The employee named by the `authorization` header of a verified service's request:
/// a bearer token, verified and bound to that service (its certificate, `cnf`, or its
/// id, `azp`; unbound only when allowed). Returns the employee, how it was
/// authenticated, and what holds a stream to the token.
fn employee(
    verified: &Verified,
    peer: Option<&PeerInfo>,
    service: &str,
    header: Option<&str>,
) -> Result<(String, &'static str, token::Lease), Error> {
    let token = header
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .ok_or(Error::NotBearer)?;
    let tokens = verified.tokens.as_ref().ok_or(Error::TokensNotConfigured)?;
    let verified = tokens.verify_leased(token)?;
    let method = match &verified.binding {
        Binding::Certificate(thumbprint) => {
            let presented = peer.and_then(|peer| peer.certificate_thumbprint.as_deref());
            if presented != Some(thumbprint.as_str()) {
                return Err(Error::TokenForOther(format!(
                    "another client certificate (x5t#S256 `{}`)",
                    crate::record::shown(thumbprint)
                )));
            }
            METHOD_MTLS_TOKEN
        }
        Binding::Service(party) if party == service => METHOD_MTLS_TOKEN,
        Binding::Service(party) => {
            return Err(Error::TokenForOther(format!(
                "service `{}` (azp)",
                crate::record::shown(party)
            )));
        }
        Binding::Unbound if tokens.accepts_unbound() => METHOD_MTLS_UNBOUND_TOKEN,
        Binding::Unbound => return Err(Error::TokenNotBound),
    };
    Ok((verified.subject, method, verified.lease))
}

#[cfg(test)]
mod tests;
