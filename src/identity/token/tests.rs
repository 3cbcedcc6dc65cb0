use super::*;
use jsonwebtoken::{EncodingKey, Header};
use rsa::traits::PublicKeyParts as _;

const ISSUER: &str = "https://idp.example.org";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn claims(subject: &str) -> serde_json::Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    serde_json::json!({"sub": subject, "iss": ISSUER, "aud": "ringfence", "exp": now + 300, "nbf": now - 5})
}

fn verifier(jwks: &serde_json::Value) -> Result<TokenVerifier, JwksError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let verifier = TokenVerifier::load(TokenConfig {
        jwks: path,
        issuer: ISSUER.to_owned(),
        audience: "ringfence".to_owned(),
        leeway: Duration::from_secs(30),
        accept_unbound: false,
    });
    drop(dir);
    verifier
}

fn sign(algorithm: Algorithm, kid: &str, key: &EncodingKey, subject: &str) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims(subject), key).unwrap()
}

#[test]
fn eddsa_es256_and_rs256_tokens_verify_with_the_key_they_name() {
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rsa = rsa::RsaPrivateKey::new(&mut rand_core06::OsRng, 2048).unwrap();
    let ec_point = ec.public_key_raw();
    let jwks = serde_json::json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": b64(ed.public_key_raw()), "kid": "ed"},
        {"kty": "EC", "crv": "P-256", "x": b64(&ec_point[1..33]), "y": b64(&ec_point[33..65]), "kid": "ec", "alg": "ES256"},
        {"kty": "RSA", "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be()), "kid": "rsa"},
        {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB", "kid": "encryption-key-is-skipped"}
    ]});
    let verifier = verifier(&jwks).unwrap();
    let ed_key = EncodingKey::from_ed_der(ed.serialized_der());
    let ec_key = EncodingKey::from_ec_der(ec.serialized_der());
    let rsa_der = rsa::pkcs1::EncodeRsaPrivateKey::to_pkcs1_der(&rsa).unwrap();
    let rsa_key = EncodingKey::from_rsa_der(rsa_der.as_bytes());
    assert_eq!(
        verifier.verify(&sign(Algorithm::EdDSA, "ed", &ed_key, "alice")),
        Ok("alice".to_owned())
    );
    assert_eq!(
        verifier.verify(&sign(Algorithm::ES256, "ec", &ec_key, "lena")),
        Ok("lena".to_owned())
    );
    assert_eq!(
        verifier.verify(&sign(Algorithm::RS256, "rsa", &rsa_key, "bob")),
        Ok("bob".to_owned())
    );
    // A token whose header names another key's kid fails: signature or algorithm.
    assert_eq!(
        verifier.verify(&sign(Algorithm::ES256, "rsa", &ec_key, "alice")),
        Err(TokenError::Algorithm(Algorithm::RS256))
    );
    assert_eq!(
        verifier.verify(&sign(Algorithm::EdDSA, "ec", &ed_key, "alice")),
        Err(TokenError::Algorithm(Algorithm::ES256))
    );
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    assert_eq!(
        verifier.verify(&sign(
            Algorithm::EdDSA,
            "ed",
            &EncodingKey::from_ed_der(other.serialized_der()),
            "alice"
        )),
        Err(TokenError::Signature)
    );
    // Several keys: a token without kid is refused.
    let header = b64(br#"{"alg":"EdDSA"}"#);
    let no_kid = format!("{header}.{}.x", b64(claims("alice").to_string().as_bytes()));
    assert!(matches!(
        verifier.verify(&no_kid),
        Err(TokenError::UnknownKey(_))
    ));
    // Missing claims.
    let mut bare = Header::new(Algorithm::EdDSA);
    bare.kid = Some("ed".to_owned());
    let without_exp = jsonwebtoken::encode(
        &bare,
        &serde_json::json!({"sub": "alice", "iss": ISSUER, "aud": "ringfence"}),
        &ed_key,
    )
    .unwrap();
    assert_eq!(
        verifier.verify(&without_exp),
        Err(TokenError::MissingClaim("exp".to_owned()))
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let without_sub = jsonwebtoken::encode(
        &bare,
        &serde_json::json!({"iss": ISSUER, "aud": "ringfence", "exp": now + 60}),
        &ed_key,
    )
    .unwrap();
    assert!(verifier.verify(&without_sub).is_err());
    let odd_subject = jsonwebtoken::encode(&bare, &serde_json::json!({"sub": "Employee::\"x\"", "iss": ISSUER, "aud": "ringfence", "exp": now + 60}), &ed_key).unwrap();
    assert_eq!(verifier.verify(&odd_subject), Err(TokenError::Subject));
    assert!(matches!(
        verifier.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn accepted_tokens_are_remembered_until_the_keys_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let jwks_of = |key: &rcgen::KeyPair| {
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key_raw()), "kid": "k"}]}).to_string()
    };
    let first = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(&path, jwks_of(&first)).unwrap();
    let verifier = TokenVerifier::load(TokenConfig {
        jwks: path.clone(),
        issuer: ISSUER.to_owned(),
        audience: "ringfence".to_owned(),
        leeway: Duration::ZERO,
        accept_unbound: false,
    })
    .unwrap();
    let token = sign(
        Algorithm::EdDSA,
        "k",
        &EncodingKey::from_ed_der(first.serialized_der()),
        "alice",
    );
    assert_eq!(verifier.verify(&token), Ok("alice".to_owned()));
    assert_eq!(
        verifier.verify(&token),
        Ok("alice".to_owned()),
        "from the cache"
    );
    // A tampered copy is not the cached token.
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert!(verifier.verify(&tampered).is_err());
    // Rotating the key revokes tokens already accepted under the old one.
    let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(&path, jwks_of(&second)).unwrap();
    verifier.reload().unwrap();
    assert_eq!(verifier.verify(&token), Err(TokenError::Signature));
}

#[test]
fn unusable_jwks_are_refused_with_a_reason_and_without_panics() {
    let cases = [
        (
            serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}),
            "HMAC",
        ),
        (
            serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(&[9; 31]), "kid": "short"}]}),
            "32 bytes",
        ),
        (
            serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(&[0; 32]), "kid": "weak"}]}),
            "weak",
        ),
        (
            serde_json::json!({"keys": [{"kty": "RSA", "n": b64(&[0xc5; 128]), "e": "AQAB", "kid": "small"}]}),
            "1024 bits",
        ),
        (
            serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().public_key_raw()), "kid": "a", "alg": "RS256"}]}),
            "does not match",
        ),
        (serde_json::json!({"keys": []}), "no usable signing key"),
        (serde_json::json!({"nokeys": 1}), "not a JWKS"),
    ];
    for (jwks, expected) in cases {
        let error = verifier(&jwks)
            .err()
            .unwrap_or_else(|| panic!("accepted {jwks}"));
        assert!(error.to_string().contains(expected), "{jwks}: {error}");
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let twice = serde_json::json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key_raw()), "kid": "k"},
        {"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key_raw()), "kid": "k"}
    ]});
    assert!(
        verifier(&twice)
            .err()
            .unwrap()
            .to_string()
            .contains("twice")
    );
}
