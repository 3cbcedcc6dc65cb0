//! The PEM form of the Ed25519 private keys ringfence creates (the checkpoint signing
//! key, the development token key): PKCS#8 v1 (RFC 5208, the seed alone), which
//! OpenSSL 3.0 and Python `cryptography` load; both refuse the v2 form with the public
//! key inside. Owns the encoding only; never touches files.

use base64::Engine as _;
use rand::TryRng as _;
use zeroize::Zeroizing;

/// The DER of a PKCS#8 v1 Ed25519 private key up to its seed (RFC 8410 section 7):
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING
/// (32) } }`.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A fresh Ed25519 private key (its 32-byte seed) from the operating system's generator.
pub fn generate_ed25519() -> Result<Zeroizing<[u8; 32]>, String> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rngs::SysRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|_| "the operating system's random number generator failed".to_owned())?;
    Ok(seed)
}

/// The PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`) of an Ed25519 key. Every copy
/// of the seed made on the way is zeroized.
pub fn ed25519_pem(seed: &[u8; 32]) -> Zeroizing<String> {
    let mut der = Zeroizing::new([0u8; 48]);
    for (slot, byte) in der
        .iter_mut()
        .zip(ED25519_PKCS8_V1_PREFIX.iter().chain(seed.iter()))
    {
        *slot = *byte;
    }
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----\n";
    const END: &str = "\n-----END PRIVATE KEY-----\n";
    // Sized up front: a growing string would leave copies of the key behind.
    let mut pem = Zeroizing::new(String::with_capacity(BEGIN.len() + 64 + END.len()));
    pem.push_str(BEGIN);
    base64::engine::general_purpose::STANDARD.encode_string(der.as_slice(), &mut pem);
    pem.push_str(END);
    pem
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;

    use super::*;

    #[test]
    fn keys_are_written_as_pkcs8_v1_and_read_back() {
        let seed = generate_ed25519().unwrap();
        let pem = ed25519_pem(&seed);
        assert_eq!(pem.len(), pem.capacity(), "the PEM string was reallocated");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{}", *pem);
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(key.to_bytes(), *seed);
        // OneAsymmetricKey version 0 (v1): SEQUENCE { INTEGER 0, ... } and 48 bytes in
        // all (no [1] public key), per RFC 8410 section 7.
        let der = ed25519_dalek::pkcs8::KeypairBytes::from_pkcs8_pem(&pem)
            .map(|bytes| bytes.public_key.is_none())
            .unwrap();
        assert!(der, "the PEM carries a public key: that is PKCS#8 v2");
        let body: String = pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(&der[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
    }
}
