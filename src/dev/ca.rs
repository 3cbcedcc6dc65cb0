//! The development CA: certificates for the server and each service, and its
//! revocation list. Development only; `serve --dev` and tests use it.

use super::*;

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    pub(super) cert_pem: String,
    pub(super) key_pem: zeroize::Zeroizing<String>,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: zeroize::Zeroizing<String>,
}

/// What a client certificate should say.
#[derive(Debug, Clone, Default)]
pub struct ClientCert<'a> {
    /// Common name.
    pub common_name: &'a str,
    /// URI SANs (e.g. a SPIFFE ID).
    pub uris: &'a [String],
    /// DNS SANs.
    pub dns: &'a [String],
    /// Validity (not before, not after); default: from now for a year.
    pub validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
}

pub(super) fn validity_from_now() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::minutes(5),
        now + time::Duration::days(CERT_DAYS),
    )
}

impl Ca {
    /// A fresh CA with a P-256 key.
    pub fn generate(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("CA key"))?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity_from_now();
        let cert = params
            .self_signed(&key)
            .map_err(generate("CA certificate"))?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(generate("CA key from PEM"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(generate("CA from PEM"))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: zeroize::Zeroizing::new(key_pem.to_owned()),
            issuer,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A revocation list (PEM) of this CA revoking the certificates with `serials`
    /// (big-endian, no sign byte), numbered `number`, valid for 30 days.
    pub fn revocation_list(&self, serials: &[Vec<u8>], number: u64) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc();
        let revoked: Vec<_> = serials.iter().map(|serial| (serial.clone(), now)).collect();
        self.revocation_list_since(&revoked, number)
    }

    /// A revocation list (PEM) revoking each serial as of its time.
    pub fn revocation_list_since(
        &self,
        revoked: &[(Vec<u8>, time::OffsetDateTime)],
        number: u64,
    ) -> Result<String, Error> {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(30),
            crl_number: number.into(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, since)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: *since,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(generate("revocation list"))
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server_cert(&self, names: &[&str]) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("server key"))?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .map_err(generate("server certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ringfence");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity_from_now();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("server certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A client certificate.
    pub fn client_cert(&self, spec: &ClientCert<'_>) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("client key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name);
        for uri in spec.uris {
            let uri = uri.as_str().try_into().map_err(generate("a URI SAN"))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        for dns in spec.dns {
            let dns = dns.as_str().try_into().map_err(generate("a DNS SAN"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = spec.validity.unwrap_or_else(validity_from_now);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("client certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// The serial number of a PEM certificate (big-endian, no sign byte), as a revocation
/// list names it.
pub fn certificate_serial(cert_pem: &[u8]) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
    Some(cert.serial.to_bytes_be())
}

/// The SPIFFE ID of a service in a trust domain.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}
