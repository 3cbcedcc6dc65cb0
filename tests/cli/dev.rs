//! `ringfence dev`.

use super::*;

#[test]
fn dev_revoke_lists_the_certificate_keeps_earlier_revocations_and_dev_init_reissues() {
    let dir = tempfile::tempdir().unwrap();
    let dev = |args: &[&str]| {
        run(ringfence()
            .current_dir(dir.path())
            .arg("dev")
            .args(args)
            .arg("--policies")
            .arg(shipped_policies()))
    };
    let revoke = |service: &str| {
        run(ringfence()
            .current_dir(dir.path())
            .args(["dev", "revoke", "--service", service]))
    };
    assert_eq!(dev(&["init"]).code, 0);
    let pki = dir.path().join("ringfence-data/dev-pki");
    let serial = |service: &str| {
        let pem = std::fs::read(pki.join(format!("clients/{service}.pem"))).unwrap();
        ringfence::dev::certificate_serial(&pem).unwrap()
    };
    let listed = || {
        let pem = std::fs::read(pki.join("client-crl.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
        let number = crl.crl_number().unwrap().to_string();
        let revoked: Vec<(Vec<u8>, i64)> = crl
            .iter_revoked_certificates()
            .map(|entry| {
                (
                    entry.serial().to_bytes_be(),
                    entry.revocation_date.timestamp(),
                )
            })
            .collect();
        (number, revoked)
    };
    assert_eq!(listed(), ("1".to_owned(), Vec::new()));

    let first = serial("us-signup");
    let done = revoke("us-signup");
    done.succeeded();
    assert!(
        done.stdout
            .contains("revoked the client certificate of us-signup")
    );
    assert!(!pki.join("clients/us-signup.pem").exists());
    assert!(!pki.join("clients/us-signup-key.pem").exists());
    let (number, revoked) = listed();
    assert_eq!(number, "2");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].0, first);

    // Nothing left to revoke until `dev init` issues a new certificate.
    let again = revoke("us-signup");
    assert_eq!(again.code, 1);
    again.complains("no current certificate");
    assert_eq!(dev(&["init"]).code, 0);
    let second = serial("us-signup");
    assert_ne!(second, first);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(revoke("us-signup").code, 0);
    let (number, later) = listed();
    assert_eq!(number, "3");
    assert_eq!(later.len(), 2);
    assert_eq!(later[0], revoked[0], "an earlier revocation changed");
    assert_eq!(later[1].0, second);
    assert!(later[1].1 > later[0].1);
}
