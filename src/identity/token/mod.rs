//! Employee tokens: JWTs issued by the company's identity provider, verified against
//! the provider's public keys (a JWKS file, reloadable). The algorithm comes from the
//! key (Ed25519 → EdDSA, P-256 → ES256, RSA → RS256), never from the token; `alg:
//! none` and HMAC keys are refused. Issuer, audience, subject and expiry are required;
//! not-before is checked when present; both with a small leeway. The subject is the employee's directory
//! id; no other claim is used (the directory, not the token, says who someone is).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::Digest as _;

/// Largest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest leeway accepted for clock skew.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;
/// Verified tokens remembered (by SHA-256) until they expire, so a service that sends
/// the same token with every call pays for one signature check, not one per call.
const CACHE_CAPACITY: usize = 4096;

/// Where keys come from and what tokens must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// JWKS file of the identity provider's signing keys.
    pub jwks: PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Allowed clock skew for `exp` and `nbf`.
    pub leeway: Duration,
    /// Whether tokens bound to no service (no `cnf.x5t#S256`, no `azp`) are accepted
    /// (`--danger-accept-unbound-tokens`); callers authenticated so are logged with
    /// `authentication` `mtls+unbound-token`.
    pub accept_unbound: bool,
}

/// What an employee token is bound to: who may present it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `cnf.x5t#S256` (RFC 8705): the base64url SHA-256 thumbprint of the client
    /// certificate that must present it. When a token has both, this wins over `azp`:
    /// it names one certificate, and the TLS handshake proved its key.
    Certificate(String),
    /// `azp`: the directory id of the service that must present it.
    Service(String),
    /// Neither: any service could present it.
    Unbound,
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// The employee.
    pub subject: String,
    /// Who may present it.
    pub binding: Binding,
    /// What holds a long-lived call to it.
    pub lease: Lease,
}

/// A JWKS that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWKS `{path}`: {reason}")]
pub struct JwksError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Why a token was refused; each names the check that failed, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `Bearer <token>`, too long, or not a JWT.
    #[error("employee token is malformed: {0}")]
    Malformed(String),
    /// The header names a key the JWKS does not have, or no key where one is needed.
    #[error("employee token is signed by an unknown key: {0}")]
    UnknownKey(String),
    /// The header's algorithm is not the key's.
    #[error("employee token algorithm is not allowed for its key (expected {0:?})")]
    Algorithm(Algorithm),
    /// The signature does not verify.
    #[error("employee token signature is invalid")]
    Signature,
    /// `exp` is in the past.
    #[error("employee token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("employee token is not valid yet (nbf)")]
    NotYetValid,
    /// Wrong `iss`.
    #[error("employee token issuer is not the configured identity provider")]
    Issuer,
    /// Wrong `aud`.
    #[error("employee token audience does not include this service")]
    Audience,
    /// A required claim is missing.
    #[error("employee token lacks the required claim `{0}`")]
    MissingClaim(String),
    /// A claim has the wrong type.
    #[error("employee token claim `{0}` is malformed")]
    ClaimFormat(String),
    /// The subject is not a directory id.
    #[error("employee token subject is not a valid directory id")]
    Subject,
    /// The key set was reloaded after the token was verified (a long-lived stream).
    #[error("the identity provider's keys were reloaded after this employee token was verified")]
    KeysReloaded,
}

struct Key {
    key: DecodingKey,
    algorithm: Algorithm,
}

struct Keys {
    by_id: HashMap<String, Arc<Key>>,
    /// The key to use for tokens without `kid`, when the set has exactly one.
    only: Option<Arc<Key>>,
}

/// A token that passed every check: its subject, binding and when it stops being
/// valid.
struct Accepted {
    subject: String,
    binding: Binding,
    expires: i64,
}

/// What a verified employee token holds a long-lived call to: the token's expiry
/// (with the configured leeway) and the key set that verified it. A stream checks it
/// before each record.
#[derive(Clone)]
pub struct Lease {
    expires: i64,
    generation: u64,
    verifier: Arc<TokenVerifier>,
}

impl Lease {
    /// Whether the token still holds: not expired, and its key set not reloaded since.
    pub fn check(&self) -> Result<(), TokenError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if self.expires.saturating_add(self.verifier.leeway()) < now {
            return Err(TokenError::Expired);
        }
        if self.verifier.generation() != self.generation {
            return Err(TokenError::KeysReloaded);
        }
        Ok(())
    }
}

impl PartialEq for Lease {
    fn eq(&self, other: &Self) -> bool {
        self.expires == other.expires
            && self.generation == other.generation
            && Arc::ptr_eq(&self.verifier, &other.verifier)
    }
}

impl Eq for Lease {}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("expires", &self.expires)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Verifies employee tokens; the key set can be reloaded while requests run.
pub struct TokenVerifier {
    config: TokenConfig,
    keys: ArcSwap<Keys>,
    /// Accepted tokens by SHA-256, with the key generation that accepted them;
    /// emptied whenever the keys are reloaded, so a key removed from the JWKS revokes
    /// its tokens at once.
    accepted: std::sync::Mutex<(u64, HashMap<[u8; 32], Accepted>)>,
    /// Held while the JWKS is reloaded.
    reloading: std::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("jwks", &self.config.jwks)
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .field("keys", &self.keys.load().by_id.len())
            .finish()
    }
}

fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(okp.x.trim_end_matches('='))
                .map_err(|_| "Ed25519 `x` is not base64url".to_owned())?;
            let x: [u8; 32] = x
                .try_into()
                .map_err(|_| "Ed25519 `x` is not 32 bytes".to_owned())?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map_err(|_| "Ed25519 `x` is not a curve point".to_owned())?;
            if key.is_weak() {
                return Err("weak (small-order) Ed25519 key".to_owned());
            }
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::RSA(rsa) => {
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA `n` is not base64url".to_owned())?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} required"
                ));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (HMAC) keys are not accepted".to_owned());
        }
        _ => return Err("unsupported key type (use Ed25519, P-256 or RSA)".to_owned()),
    };
    if let Some(declared) = &jwk.common.key_algorithm {
        let expected = match algorithm {
            Algorithm::EdDSA => KeyAlgorithm::EdDSA,
            Algorithm::ES256 => KeyAlgorithm::ES256,
            _ => KeyAlgorithm::RS256,
        };
        if *declared != expected {
            return Err(format!("`alg` {declared:?} does not match the key type"));
        }
    }
    Ok(algorithm)
}

/// Reads a JWKS. Keys that cannot be used (an unsupported curve or type, HMAC, a bad
/// encoding) are skipped with a warning, so an identity provider that publishes one
/// new kind of key does not lock everyone out; a set with no usable key is refused
/// unless `allow_empty` (a reload whose set is empty, or holds no usable key, revokes every token).
fn load_keys(path: &Path, allow_empty: bool) -> Result<Keys, JwksError> {
    let fail = |reason: String| JwksError {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|error| fail(error.to_string()))?;
    let set: JwkSet =
        serde_json::from_str(&text).map_err(|error| fail(format!("not a JWKS: {error}")))?;
    let mut by_id = HashMap::new();
    let mut all = Vec::new();
    let mut skipped = Vec::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let name = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("#{index}"));
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let usable = algorithm_of(jwk).and_then(|algorithm| {
            DecodingKey::from_jwk(jwk)
                .map(|key| Key { key, algorithm })
                .map_err(|error| error.to_string())
        });
        let key = match usable {
            Ok(key) => Arc::new(key),
            Err(reason) => {
                tracing::warn!(jwks = %path.display(), key = %name, %reason, "JWKS key skipped");
                skipped.push(format!("key `{name}`: {reason}"));
                continue;
            }
        };
        if let Some(kid) = &jwk.common.key_id
            && by_id.insert(kid.clone(), Arc::clone(&key)).is_some()
        {
            return Err(fail(format!("key id `{kid}` appears twice")));
        }
        all.push(key);
    }
    // On reload, a set that parses but holds no usable key is what the identity
    // provider publishes now: it revokes every token (keeping the old keys would
    // keep tokens alive that it may have meant to end).
    if all.is_empty() && !allow_empty {
        let mut reason = "no usable signing key".to_owned();
        if !skipped.is_empty() {
            reason.push_str(": ");
            reason.push_str(&skipped.join("; "));
        }
        return Err(fail(reason));
    }
    let only = if all.len() == 1 { all.pop() } else { None };
    Ok(Keys { by_id, only })
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    /// Required and checked by `jsonwebtoken` to be a number in the future.
    #[serde(default)]
    exp: Option<f64>,
    /// The service the token was issued to (OpenID Connect).
    #[serde(default)]
    azp: Option<String>,
    /// Proof-of-possession confirmation (RFC 7800, RFC 8705).
    #[serde(default)]
    cnf: Option<Confirmation>,
}

#[derive(serde::Deserialize)]
struct Confirmation {
    #[serde(rename = "x5t#S256", default)]
    x5t_s256: Option<String>,
}

/// What [`TokenVerifier::verify_timed`] found.
struct Timed {
    subject: String,
    binding: Binding,
    expires: i64,
    generation: u64,
}

impl TokenVerifier {
    /// Loads the JWKS; fails if it holds no usable signing key.
    pub fn load(config: TokenConfig) -> Result<Self, JwksError> {
        if config.leeway > MAX_LEEWAY {
            return Err(JwksError {
                path: config.jwks.clone(),
                reason: format!("leeway above {} s", MAX_LEEWAY.as_secs()),
            });
        }
        let keys = load_keys(&config.jwks, false)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
            accepted: std::sync::Mutex::new((0, HashMap::new())),
            reloading: std::sync::Mutex::new(()),
        })
    }

    /// The JWKS file.
    pub fn jwks_path(&self) -> &Path {
        &self.config.jwks
    }

    /// Reads the JWKS again. A file that cannot be read or parsed (say, caught
    /// mid-write) keeps the current keys; one that parses replaces them, even when it
    /// holds no usable key (then every token is refused). Returns the number of keys.
    pub fn reload(&self) -> Result<usize, JwksError> {
        // One reload at a time (the watcher and SIGHUP may ask at once): the later
        // one reads the file after the earlier one is done, so the newest file wins.
        let _one_at_a_time = match self.reloading.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let keys = load_keys(&self.config.jwks, true)?;
        let count = keys.by_id.len().max(usize::from(keys.only.is_some()));
        // Under the cache lock: a verification that started with the old keys cannot
        // put its result into the cache of the new generation.
        let mut accepted = match self.accepted.lock() {
            Ok(accepted) => accepted,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.keys.store(Arc::new(keys));
        accepted.0 += 1;
        accepted.1.clear();
        Ok(count)
    }

    /// Verifies a token (without the `Bearer ` prefix) and returns its subject. What
    /// the token is bound to is not checked here; see [`TokenVerifier::verify_leased`].
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        self.verify_timed(token).map(|accepted| accepted.subject)
    }

    /// As [`TokenVerifier::verify`], with the token's binding and the [`Lease`] that
    /// holds a long-lived call (a stream) to the token's expiry and to the key set
    /// that verified it.
    pub fn verify_leased(self: &Arc<Self>, token: &str) -> Result<VerifiedToken, TokenError> {
        let (accepted, generation) = self.verify_timed(token).map(|accepted| {
            let generation = accepted.generation;
            (accepted, generation)
        })?;
        Ok(VerifiedToken {
            subject: accepted.subject,
            binding: accepted.binding,
            lease: Lease {
                expires: accepted.expires,
                generation,
                verifier: Arc::clone(self),
            },
        })
    }

    /// Whether tokens bound to no service are accepted.
    pub fn accepts_unbound(&self) -> bool {
        self.config.accept_unbound
    }

    /// The key set's generation: it changes with every reload.
    fn generation(&self) -> u64 {
        match self.accepted.lock() {
            Ok(accepted) => accepted.0,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    fn leeway(&self) -> i64 {
        i64::try_from(self.config.leeway.as_secs()).unwrap_or(0)
    }

    /// The accepted token and the key generation that accepted it.
    fn verify_timed(&self, token: &str) -> Result<Timed, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let leeway = i64::try_from(self.config.leeway.as_secs()).unwrap_or(0);
        let generation = {
            let Ok(mut accepted) = self.accepted.lock() else {
                return Err(TokenError::Malformed("token cache unavailable".to_owned()));
            };
            if let Some(known) = accepted.1.get(&digest) {
                if known.expires.saturating_add(leeway) >= now {
                    return Ok(Timed {
                        subject: known.subject.clone(),
                        binding: known.binding.clone(),
                        expires: known.expires,
                        generation: accepted.0,
                    });
                }
                accepted.1.remove(&digest);
                return Err(TokenError::Expired);
            }
            accepted.0
        };
        let (subject, binding, expires) = self.verify_signed(token)?;
        if let Ok(mut accepted) = self.accepted.lock()
            && accepted.0 == generation
        {
            if accepted.1.len() >= CACHE_CAPACITY {
                accepted.1.clear();
            }
            accepted.1.insert(
                digest,
                Accepted {
                    subject: subject.clone(),
                    binding: binding.clone(),
                    expires,
                },
            );
        }
        Ok(Timed {
            subject,
            binding,
            expires,
            generation,
        })
    }

    /// Every check, signature included; returns the subject, binding and `exp`.
    fn verify_signed(&self, token: &str) -> Result<(String, Binding, i64), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|error| match error.kind() {
            ErrorKind::Json(_) => TokenError::Malformed(
                "the header is not a JWT header with an accepted algorithm (`none` is never accepted)"
                    .to_owned(),
            ),
            _ => TokenError::Malformed("not a signed JWT (header.payload.signature)".to_owned()),
        })?;
        let keys = self.keys.load();
        let key = match &header.kid {
            Some(kid) => keys.by_id.get(kid).ok_or_else(|| {
                TokenError::UnknownKey(format!("no key with kid `{}`", crate::record::shown(kid)))
            })?,
            None => keys.only.as_ref().ok_or_else(|| {
                TokenError::UnknownKey(
                    "the token has no `kid` and the JWKS has several keys".to_owned(),
                )
            })?,
        };
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|error| {
                match error.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::InvalidIssuer => TokenError::Issuer,
                    ErrorKind::InvalidAudience => TokenError::Audience,
                    ErrorKind::MissingRequiredClaim(claim) => {
                        TokenError::MissingClaim(claim.clone())
                    }
                    ErrorKind::InvalidClaimFormat(claim) => TokenError::ClaimFormat(claim.clone()),
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::MissingAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::UnsupportedAlgorithm => TokenError::Algorithm(key.algorithm),
                    ErrorKind::Json(_) => TokenError::ClaimFormat("sub".to_owned()),
                    _ => TokenError::Malformed("the token cannot be decoded".to_owned()),
                }
            })?;
        if !crate::record::is_directory_id(&data.claims.sub) {
            return Err(TokenError::Subject);
        }
        let binding = match (data.claims.cnf, data.claims.azp) {
            (Some(confirmation), _) => match confirmation.x5t_s256 {
                Some(thumbprint) => Binding::Certificate(thumbprint),
                None => return Err(TokenError::ClaimFormat("cnf.x5t#S256".to_owned())),
            },
            (None, Some(service)) => Binding::Service(service),
            (None, None) => Binding::Unbound,
        };
        // `exp` is required and a number; seconds beyond i64 saturate.
        Ok((
            data.claims.sub,
            binding,
            data.claims.exp.unwrap_or_default() as i64,
        ))
    }
}

#[cfg(test)]
mod tests;
