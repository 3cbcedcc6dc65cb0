#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::dev::{Ca, ClientCert, Issued, certificate_serial};

struct Setup {
    _dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    crl_file: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("revocation test CA").unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let crl_file = dir.path().join("crl.pem");
    std::fs::write(&crl_file, ca.revocation_list(&[], 1).unwrap()).unwrap();
    Setup {
        _dir: dir,
        ca,
        ca_file,
        crl_file,
    }
}

impl Setup {
    fn verifier(&self, crl: bool) -> Result<Arc<ClientVerifier>, Error> {
        ClientVerifier::new(
            super::super::certificates(&self.ca_file).unwrap(),
            &self.ca_file,
            crl.then(|| self.crl_file.clone()),
        )
    }

    fn client(&self) -> Issued {
        self.ca
            .client_cert(&ClientCert {
                common_name: "client",
                ..ClientCert::default()
            })
            .unwrap()
    }

    fn publish(&self, contents: &str) {
        std::fs::write(&self.crl_file, contents).unwrap();
    }
}

fn der(issued: &Issued) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
}

fn serial(issued: &Issued) -> Vec<u8> {
    certificate_serial(issued.cert_pem.as_bytes()).unwrap()
}

fn verify(verifier: &ClientVerifier, issued: &Issued) -> Result<(), String> {
    verifier
        .verify_client_cert(&der(issued), &[], UnixTime::now())
        .map(|_| ())
        .map_err(|error| error.to_string())
}

#[test]
fn a_revoked_certificate_is_refused_and_an_open_connection_is_checked_again() {
    let setup = setup();
    let verifier = setup.verifier(true).unwrap();
    let (kept, revoked) = (setup.client(), setup.client());
    verify(&verifier, &kept).unwrap();
    verify(&verifier, &revoked).unwrap();
    let open = PeerChain::new(vec![der(&revoked)], verifier.generation());
    let other = PeerChain::new(vec![der(&kept)], verifier.generation());
    verifier.recheck(&open).unwrap();

    // An unchanged file is no reason to look at open connections again.
    let generation = verifier.generation();
    verifier.reload().unwrap();
    assert_eq!(verifier.generation(), generation);

    setup.publish(&setup.ca.revocation_list(&[serial(&revoked)], 2).unwrap());
    let lists = verifier.reload().unwrap();
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].revoked, 1);
    assert_eq!(lists[0].number.as_deref(), Some("2"));
    let refused = verify(&verifier, &revoked).unwrap_err();
    assert!(refused.contains("Revoked"), "{refused}");
    verify(&verifier, &kept).unwrap();
    let refused = verifier.recheck(&open).unwrap_err();
    assert!(refused.contains("Revoked"), "{refused}");
    assert!(
        refused.contains("since this connection was made"),
        "{refused}"
    );
    verifier.recheck(&other).unwrap();
    // Refused for good, even if a later list forgets it.
    setup.publish(&setup.ca.revocation_list(&[], 3).unwrap());
    verifier.reload().unwrap();
    verify(&verifier, &revoked).unwrap();
    assert!(verifier.recheck(&open).is_err());
}

#[test]
fn an_older_list_an_unreadable_file_or_a_foreign_signature_changes_nothing() {
    let setup = setup();
    let verifier = setup.verifier(true).unwrap();
    let revoked = setup.client();
    setup.publish(&setup.ca.revocation_list(&[serial(&revoked)], 5).unwrap());
    verifier.reload().unwrap();
    let generation = verifier.generation();

    // A rollback to an older list would un-revoke.
    setup.publish(&setup.ca.revocation_list(&[], 4).unwrap());
    let error = verifier.reload().unwrap_err().to_string();
    assert!(
        error.contains("CRL number 4, older than the 5 in use"),
        "{error}"
    );
    // So would the same number with fewer entries, or a file without the list.
    setup.publish(&setup.ca.revocation_list(&[], 5).unwrap());
    let error = verifier.reload().unwrap_err().to_string();
    assert!(
        error.contains("the CRL number 5 of the list in use but other contents"),
        "{error}"
    );
    let other = Ca::generate("another CA").unwrap();
    setup.publish(&other.revocation_list(&[], 1).unwrap());
    let error = verifier.reload().unwrap_err().to_string();
    assert!(error.contains("is missing from the new file"), "{error}");
    // Cut between two PEM blocks: still refused.
    let both = format!(
        "{}{}",
        other.revocation_list(&[], 2).unwrap(),
        setup.ca.revocation_list(&[serial(&revoked)], 6).unwrap()
    );
    setup.publish(&both[..both.len() / 2]);
    assert!(verifier.reload().is_err());
    // Caught mid-write, or not a list at all.
    for garbage in ["-----BEGIN X509 CRL-----\nAAAA", "", "hello"] {
        setup.publish(garbage);
        assert!(verifier.reload().is_err(), "{garbage:?} accepted");
    }
    // Signed by another CA with the same name.
    let impostor = Ca::generate("revocation test CA").unwrap();
    setup.publish(&impostor.revocation_list(&[], 9).unwrap());
    let error = verifier.reload().unwrap_err().to_string();
    assert!(
        error.contains("not signed by the client CA of that name"),
        "{error}"
    );
    assert!(error.contains("is refused"), "{error}");
    // Two lists of one CA.
    let list = setup.ca.revocation_list(&[], 6).unwrap();
    setup.publish(&format!("{list}{list}"));
    let error = verifier.reload().unwrap_err().to_string();
    assert!(error.contains("two lists from"), "{error}");

    assert_eq!(verifier.generation(), generation);
    assert!(verify(&verifier, &revoked).is_err());
    assert_eq!(verifier.lists()[0].number.as_deref(), Some("5"));

    // Leading text before the PEM block, even one starting like DER.
    let pem = setup.ca.revocation_list(&[serial(&revoked)], 6).unwrap();
    setup.publish(&format!("0 comment line\n{pem}"));
    verifier.reload().unwrap();
    assert!(verify(&verifier, &revoked).is_err());

    // A DER list is accepted too.
    let pem = setup.ca.revocation_list(&[serial(&revoked)], 7).unwrap();
    let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
    std::fs::write(&setup.crl_file, der.as_ref()).unwrap();
    verifier.reload().unwrap();
    assert!(verifier.generation() > generation);
    assert!(verify(&verifier, &revoked).is_err());
}

#[test]
fn a_certificate_whose_issuer_has_no_list_is_refused() {
    let setup = setup();
    let client = setup.client();
    let other = Ca::generate("another CA").unwrap();
    setup.publish(&other.revocation_list(&[], 1).unwrap());
    let verifier = setup.verifier(true).unwrap();
    let refused = verify(&verifier, &client).unwrap_err();
    assert!(refused.contains("UnknownRevocationStatus"), "{refused}");
    // Without --client-crl there is no revocation check.
    let verifier = setup.verifier(false).unwrap();
    verify(&verifier, &client).unwrap();
    assert!(verifier.lists().is_empty());
}

#[test]
fn a_bad_file_is_refused_at_start_with_its_name() {
    let setup = setup();
    setup.publish("not a list");
    let error = setup.verifier(true).unwrap_err().to_string();
    assert!(error.contains("crl.pem"), "{error}");
    assert!(
        error.contains("no `-----BEGIN X509 CRL-----` block"),
        "{error}"
    );
}
