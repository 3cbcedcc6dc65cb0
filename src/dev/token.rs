//! The development identity provider: an Ed25519 key that signs employee tokens,
//! and its JWKS. Development only.

use super::*;

/// An Ed25519 token-signing key: the development identity provider.
pub struct TokenSigner {
    key_pem: zeroize::Zeroizing<String>,
    public_raw: Vec<u8>,
    key_id: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Claims of a minted token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenClaims {
    /// Employee id.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// The service the token is issued to: only it may present the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
    /// Proof-of-possession confirmation, e.g. `{"x5t#S256": "<thumbprint>"}` (RFC 8705).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

impl TokenSigner {
    /// A fresh key.
    pub fn generate() -> Result<Self, Error> {
        let failed = |reason: String| Error::Generate {
            what: "token signing key".to_owned(),
            reason,
        };
        let seed = crate::keyfile::generate_ed25519().map_err(failed)?;
        Self::from_pem(&crate::keyfile::ed25519_pem(&seed))
    }

    /// A key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(pem).map_err(generate("token signing key from PEM"))?;
        if key.algorithm() != &PKCS_ED25519 {
            return Err(Error::Generate {
                what: "token signing key".to_owned(),
                reason: "not an Ed25519 key".to_owned(),
            });
        }
        let public_raw = key.public_key_raw().to_vec();
        let key_id = hex::encode(Sha256::digest(&public_raw).get(..8).unwrap_or_default());
        Ok(Self {
            key_pem: zeroize::Zeroizing::new(pem.to_owned()),
            public_raw,
            key_id,
        })
    }

    /// The private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The JWKS holding this key's public half.
    pub fn jwks(&self) -> String {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public_raw);
        serde_json::json!({
            "keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "alg": "EdDSA", "use": "sig"}]
        })
        .to_string()
    }

    /// Signs `claims` (EdDSA, with this key's `kid`).
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, Error> {
        let key =
            jsonwebtoken::EncodingKey::from_ed_pem(self.key_pem.as_bytes()).map_err(|error| {
                Error::Generate {
                    what: "token".to_owned(),
                    reason: error.to_string(),
                }
            })?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &key).map_err(|error| Error::Generate {
            what: "token".to_owned(),
            reason: error.to_string(),
        })
    }

    /// A development token for `employee`, to be presented by `service` only (`azp`),
    /// valid for `ttl` from now.
    pub fn mint(
        &self,
        employee: &str,
        service: &str,
        ttl: time::Duration,
    ) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.sign(&TokenClaims {
            sub: employee.to_owned(),
            iss: DEV_ISSUER.to_owned(),
            aud: DEV_AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + ttl.whole_seconds(),
            azp: Some(service.to_owned()),
            cnf: None,
        })
    }
}
