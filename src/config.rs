//! Typed server configuration, checked before any file is touched or port bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::gatekeeper::Limits;
use crate::identity::tls::TlsFiles;
use crate::identity::token::TokenConfig;
use crate::record::Jurisdiction;

/// How callers prove who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
// Built once per process: the size of the TLS variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Auth {
    /// Nothing configured: every request is refused with UNAUTHENTICATED.
    None,
    /// Development only: believe the identity headers; plain TCP on loopback.
    DangerTrustIdentityHeaders,
    /// mTLS: the service from its client certificate; employees from signed tokens
    /// when `tokens` is set.
    Mtls {
        /// Server certificate, key and client CA.
        tls: TlsFiles,
        /// Trust domain of client certificates' SPIFFE IDs.
        trust_domain: String,
        /// Employee token verification.
        tokens: Option<TokenConfig>,
    },
    /// mTLS and tokens from the development PKI in the data directory, created on
    /// first start (`ringfence dev init`); loopback only.
    Dev,
}

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory (keyring, decision log), relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "ringfence-data";
/// Default policy directory.
pub const DEFAULT_POLICIES: &str = "policies";
/// Jurisdictions configured by default.
pub const DEFAULT_JURISDICTIONS: &[&str] = &["US", "SG", "EU"];
/// Subdirectory of the data directory that holds the decision log.
pub const LOG_DIR: &str = "log";
/// Subdirectory of the data directory that keeps every policy set that decided, by hash.
pub const POLICY_ARCHIVE_DIR: &str = "policy-sets";
/// Default largest gRPC message accepted, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Default of [`StreamLimits::max_per_caller`].
pub const DEFAULT_MAX_STREAMS_PER_CALLER: usize = 64;
/// Default of [`StreamLimits::send_timeout`].
pub const DEFAULT_STREAM_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Limits of `DecryptRecords` streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams one caller (service and employee) may have open at once; more are
    /// refused with `RESOURCE_EXHAUSTED`.
    pub max_per_caller: usize,
    /// Longest the server waits for the client to take an answer. A stream that
    /// stalls longer ends with `DEADLINE_EXCEEDED`, and the answers it had made are
    /// logged as undelivered.
    pub send_timeout: std::time::Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_per_caller: DEFAULT_MAX_STREAMS_PER_CALLER,
            send_timeout: DEFAULT_STREAM_SEND_TIMEOUT,
        }
    }
}

/// Configuration of `ringfence serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory: `keyring.json`, `log/`, and a development master key if used.
    pub data_dir: PathBuf,
    /// Policy directory.
    pub policies: PathBuf,
    /// Jurisdictions that accept new encryptions; each must hold keys.
    pub jurisdictions: Vec<Jurisdiction>,
    /// Master key file (else `RINGFENCE_MASTER_KEY`, else a development key).
    pub master_key_file: Option<PathBuf>,
    /// The master key from the environment, if set.
    pub master_key_env: Option<crate::keys::MasterKeyText>,
    /// Whether the development master key of the data directory may be used
    /// (`--dev`, `--danger-allow-development-master-key`).
    pub allow_development_master_key: bool,
    /// Whether missing root keys (and, with `allow_development_master_key`, a
    /// development master key) are created at start: `--dev` only. Otherwise keys come
    /// from `ringfence keys init` and a configured jurisdiction without keys is refused.
    pub create_missing_keys: bool,
    /// How callers are authenticated.
    pub auth: Auth,
    /// Request limits.
    pub limits: Limits,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Limits of bulk streams.
    pub streams: StreamLimits,
    /// Whether to reload the policy directory when its files change (SIGHUP always
    /// reloads).
    pub watch_policies: bool,
    /// Checkpoint signing key (PKCS#8 PEM); default `<data_dir>/audit-signing-key.pem`,
    /// created on first start.
    pub checkpoint_key: Option<PathBuf>,
    /// Decision log segment size before rotation, in bytes.
    pub log_segment_bytes: u64,
    /// Decision log segment age before rotation.
    pub log_segment_age: std::time::Duration,
    /// Unsealed subject secrets kept in memory (0: none; every request reads the
    /// subject store).
    pub subject_cache_entries: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`); none: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// How long `serve` keeps answering after SIGTERM with health `NOT_SERVING`
    /// before it stops accepting (zero: stop at once).
    pub shutdown_drain: std::time::Duration,
    /// Whether policy sets must prove their invariants to serve.
    pub proof: crate::policy::ProofGuard,
}

/// A configuration that must not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The development PKI was asked for on a non-loopback address.
    #[error(
        "--dev keeps its CA key in the data directory, so it is refused on `{0}`: listen on a loopback address, or pass --tls-cert, --tls-key and --client-ca"
    )]
    DevOffLoopback(SocketAddr),
    /// The danger mode was asked for on a non-loopback address.
    #[error(
        "--danger-trust-identity-headers lets any caller claim any identity, so it is refused on `{0}`: listen on a loopback address (127.0.0.1 or [::1])"
    )]
    DangerOffLoopback(SocketAddr),
    /// A non-loopback address without transport security.
    #[error(
        "refusing to listen on non-loopback address `{0}` without TLS: pass --tls-cert, --tls-key and --client-ca (mutual TLS)"
    )]
    NotLoopback(SocketAddr),
    /// No jurisdictions.
    #[error("at least one jurisdiction must be configured")]
    NoJurisdictions,
    /// A jurisdiction listed twice.
    #[error("jurisdiction `{0}` is listed more than once")]
    DuplicateJurisdiction(Jurisdiction),
    /// A trust domain that is not a DNS name.
    #[error("trust domain `{0}` must be a lowercase DNS name such as example.org")]
    TrustDomain(String),
    /// A limit of zero.
    #[error("{0} must be greater than zero")]
    ZeroLimit(&'static str),
    /// A field limit no request could reach: a field travels inside one message.
    #[error(
        "--max-field-bytes ({field}) is larger than --max-message-bytes ({message}): no request could carry such a field; lower --max-field-bytes below it"
    )]
    FieldOverMessage {
        /// `--max-field-bytes`.
        field: usize,
        /// `--max-message-bytes`.
        message: usize,
    },
}

impl ServeConfig {
    /// The embedded defaults, as `serve` without flags uses them.
    pub fn defaults() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            policies: PathBuf::from(DEFAULT_POLICIES),
            jurisdictions: DEFAULT_JURISDICTIONS
                .iter()
                .filter_map(|code| Jurisdiction::new(code).ok())
                .collect(),
            master_key_file: None,
            master_key_env: None,
            allow_development_master_key: false,
            create_missing_keys: false,
            auth: Auth::None,
            limits: Limits::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            streams: StreamLimits::default(),
            watch_policies: true,
            checkpoint_key: None,
            log_segment_bytes: crate::audit::DEFAULT_SEGMENT_BYTES,
            log_segment_age: crate::audit::DEFAULT_SEGMENT_AGE,
            subject_cache_entries: crate::subjects::DEFAULT_CACHE_ENTRIES,
            metrics_listen: None,
            shutdown_drain: std::time::Duration::ZERO,
            proof: crate::policy::ProofGuard {
                mode: crate::policy::ProofMode::Enforce,
                options: crate::policy::prove::ProveOptions::default(),
            },
        }
    }

    /// Checks the configuration as a whole.
    pub fn check(&self) -> Result<(), Error> {
        if !self.listen.ip().is_loopback() {
            match self.auth {
                Auth::Mtls { .. } => {}
                Auth::DangerTrustIdentityHeaders => {
                    return Err(Error::DangerOffLoopback(self.listen));
                }
                Auth::Dev => return Err(Error::DevOffLoopback(self.listen)),
                Auth::None => return Err(Error::NotLoopback(self.listen)),
            }
        }
        if let Auth::Mtls { trust_domain, .. } = &self.auth
            && !crate::identity::tls::valid_trust_domain(trust_domain)
        {
            return Err(Error::TrustDomain(trust_domain.clone()));
        }
        if self.jurisdictions.is_empty() {
            return Err(Error::NoJurisdictions);
        }
        for (index, jurisdiction) in self.jurisdictions.iter().enumerate() {
            if self
                .jurisdictions
                .iter()
                .skip(index + 1)
                .any(|other| other == jurisdiction)
            {
                return Err(Error::DuplicateJurisdiction(jurisdiction.clone()));
            }
        }
        if self.limits.max_fields == 0 {
            return Err(Error::ZeroLimit("max fields"));
        }
        if self.limits.max_field_bytes == 0 {
            return Err(Error::ZeroLimit("max field bytes"));
        }
        if self.max_message_bytes == 0 {
            return Err(Error::ZeroLimit("max message bytes"));
        }
        if self.limits.max_field_bytes > self.max_message_bytes {
            return Err(Error::FieldOverMessage {
                field: self.limits.max_field_bytes,
                message: self.max_message_bytes,
            });
        }
        if self.streams.max_per_caller == 0 {
            return Err(Error::ZeroLimit("max streams per caller"));
        }
        if self.streams.send_timeout.is_zero() {
            return Err(Error::ZeroLimit("stream send timeout"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let config = ServeConfig::defaults();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.jurisdictions.len(), 3);
        config.check().unwrap();
    }

    #[test]
    fn debug_output_redacts_the_master_key() {
        let mut config = ServeConfig::defaults();
        config.master_key_env = Some(crate::keys::MasterKeyText::new("ab".repeat(32)));
        let printed = format!("{config:?}");
        assert!(!printed.contains("abab"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn limits_must_be_reachable() {
        let mut config = ServeConfig::defaults();
        config.limits.max_fields = 0;
        assert_eq!(config.check(), Err(Error::ZeroLimit("max fields")));
        config.limits.max_fields = 1;
        config.limits.max_field_bytes = config.max_message_bytes + 1;
        let refused = config.check().unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("larger than --max-message-bytes"),
            "{refused}"
        );
        config.limits.max_field_bytes = config.max_message_bytes;
        config.check().unwrap();
    }

    #[test]
    fn danger_mode_and_plaintext_are_refused_off_loopback() {
        let mut config = ServeConfig::defaults();
        config.listen = "0.0.0.0:50051".parse().unwrap();
        assert_eq!(config.check(), Err(Error::NotLoopback(config.listen)));
        config.auth = Auth::DangerTrustIdentityHeaders;
        assert_eq!(config.check(), Err(Error::DangerOffLoopback(config.listen)));
        config.auth = Auth::Dev;
        assert_eq!(config.check(), Err(Error::DevOffLoopback(config.listen)));
        config.auth = Auth::Mtls {
            tls: TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                client_ca: "ca".into(),
                client_crl: None,
            },
            trust_domain: "example.org".to_owned(),
            tokens: None,
        };
        config.check().unwrap();
        config.listen = "[::1]:0".parse().unwrap();
        config.check().unwrap();
    }

    #[test]
    fn jurisdiction_lists_are_checked() {
        let mut config = ServeConfig::defaults();
        config.jurisdictions.push(Jurisdiction::new("US").unwrap());
        assert!(matches!(
            config.check(),
            Err(Error::DuplicateJurisdiction(_))
        ));
        config.jurisdictions.clear();
        assert_eq!(config.check(), Err(Error::NoJurisdictions));
    }
}
