//! Employee tokens: verification, binding, JWKS reloads, streams.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_certificate_and_an_employee_token_decrypt() {
    let fx = Fixture::start().await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let mut support = fx.service("us-support-tool").await;
    let response = support
        .decrypt_record(with_token(
            decrypt_request(record.clone(), &["email", "tax_id"], "support", "INC-1"),
            &fx.token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        outcome(&response, "email"),
        Outcome::Plaintext(p) if p == &secret_value("u-1", "email")
    ));
    assert!(matches!(outcome(&response, "tax_id"), Outcome::Denied(_)));

    // The parent company's employee, through the same service: denied by policy.
    let bob = support
        .decrypt_record(with_token(
            decrypt_request(record, &["email"], "support", "INC-1"),
            &fx.token("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(&bob, "email"), Outcome::Denied(_)));

    let entries = fx.server.log_entries();
    let requests: Vec<_> = entries
        .iter()
        .filter(|entry| entry["kind"] != "checkpoint" && entry["kind"] != "key_event")
        .collect();
    assert_eq!(requests[0]["principal"], "Service::\"us-signup\"");
    assert_eq!(requests[0]["authentication"], "mtls");
    assert_eq!(requests[1]["principal"], "Employee::\"alice\"");
    assert_eq!(requests[1]["service"], "us-support-tool");
    assert_eq!(requests[1]["authentication"], "mtls+token");
    assert_eq!(requests[2]["principal"], "Employee::\"bob\"");
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employee_tokens_are_verified_and_every_failure_is_logged() {
    let fx = Fixture::start().await;
    let mut support = fx.service("us-support-tool").await;
    let good = fx.token("alice");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[1] =
        b64(&serde_json::json!({"sub": "lena", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}));
    let payload_swapped = parts.join(".");
    let other_signer = TokenSigner::generate().unwrap();
    let header = |alg: &str| b64(&serde_json::json!({"alg": alg, "typ": "JWT"}));
    let claims =
        b64(&serde_json::json!({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}));
    let with = |change: &dyn Fn(&mut TokenClaims)| {
        let mut claims = fx.claims("alice");
        change(&mut claims);
        fx.signer.sign(&claims).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad signature", payload_swapped, "signature is invalid"),
        (
            "unknown key",
            other_signer.sign(&fx.claims("alice")).unwrap(),
            "unknown key",
        ),
        (
            "wrong issuer",
            with(&|c| c.iss = "https://evil.example".into()),
            "issuer",
        ),
        (
            "wrong audience",
            with(&|c| c.aud = "someone-else".into()),
            "audience",
        ),
        ("expired", with(&|c| c.exp = now - 3600), "expired"),
        (
            "not yet valid",
            with(&|c| c.nbf = now + 3600),
            "not valid yet",
        ),
        (
            "alg none",
            format!("{}.{claims}.", header("none")),
            "malformed",
        ),
        (
            "HS256 with the public key",
            format!("{}.{claims}.c2ln", header("HS256")),
            "not allowed",
        ),
        ("not a JWT", "garbage".to_owned(), "malformed"),
    ];
    for (what, token, expected) in &cases {
        let status = refused(&mut support, with_token(authorize(), token)).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(
            status.message().contains(expected),
            "{what}: {}",
            status.message()
        );
        // Key material never appears in the message.
        assert!(
            !status.message().contains(&fx.signer.jwks()[20..40]),
            "{what}"
        );
    }
    // A subject that is not in the directory.
    let status = refused(&mut support, with_token(authorize(), &fx.token("mallory"))).await;
    assert_status(&status, Code::Unauthenticated, "unknown principal");

    // Naming someone else in headers while authenticated is refused, not obeyed.
    let mut spoof = with_token(authorize(), &good);
    spoof.metadata_mut().insert(
        ringfence::identity::EMPLOYEE_HEADER,
        "lena".parse().unwrap(),
    );
    let status = refused(&mut support, spoof).await;
    assert!(
        status.message().contains("identity headers"),
        "{}",
        status.message()
    );
    let status = refused(
        &mut support,
        as_caller(authorize(), "us-support-tool", Some("lena")),
    )
    .await;
    assert!(
        status.message().contains("identity headers"),
        "{}",
        status.message()
    );
    let mut basic = tonic::Request::new(authorize());
    basic
        .metadata_mut()
        .insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    let status = refused(&mut support, basic).await;
    assert!(status.message().contains("Bearer"), "{}", status.message());

    let logged = fx.unauthenticated(cases.len() + 4).await;
    assert_eq!(logged.len(), cases.len() + 4);
    for (entry, (what, _, expected)) in logged.iter().zip(&cases) {
        let outcome = entry["outcome"].as_str().unwrap();
        assert!(outcome.contains(expected), "{what}: {outcome}");
    }
    // The unknown employee's entry names the service and carries the client address.
    let unknown = logged
        .iter()
        .find(|entry| {
            entry["outcome"]
                .as_str()
                .unwrap()
                .contains("unknown principal")
        })
        .expect("the unknown principal was not logged");
    assert!(
        unknown["outcome"]
            .as_str()
            .unwrap()
            .contains("(from 127.0.0.1:"),
        "{unknown}"
    );
    assert_eq!(unknown["service"], "us-support-tool", "{unknown}");
    // The good token still works.
    let answer = support
        .authorize(with_token(authorize(), &good))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.fields[0].allowed);
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_is_picked_up_without_restart() {
    let fx = Fixture::start().await;
    let mut support = fx.service("us-support-tool").await;
    let next = TokenSigner::generate().unwrap();
    let new_token = next.sign(&fx.claims("alice")).unwrap();
    let status = refused(&mut support, with_token(authorize(), &new_token)).await;
    assert!(
        status.message().contains("unknown key"),
        "{}",
        status.message()
    );
    replace_file(&fx.jwks, &next.jwks());
    let mut accepted = false;
    for _ in 0..100 {
        if support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the new key was never loaded");
    // The old key is gone with the old JWKS.
    let status = refused(&mut support, with_token(authorize(), &fx.token("alice"))).await;
    assert!(
        status.message().contains("unknown key"),
        "{}",
        status.message()
    );
    // A file that does not parse (caught mid-write) is refused; the keys in use stay.
    replace_file(&fx.jwks, "{\"keys\": [");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
    );
    // A set that parses but holds no usable key revokes every token, cached ones
    // included (as an empty set does).
    replace_file(
        &fx.jwks,
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
    );
    let mut revoked = false;
    for _ in 0..100 {
        if let Err(status) = support.authorize(with_token(authorize(), &new_token)).await {
            assert!(
                status.message().contains("unknown key"),
                "{}",
                status.message()
            );
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revoked, "the emptied JWKS was never loaded");
    fx.server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires_or_the_keys_are_reloaded() {
    use tokio_stream::wrappers::ReceiverStream;
    let fx = Fixture::start().await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let mut support = fx.service("us-support-tool").await;
    let ask = || decrypt_request(record.clone(), &["email"], "support", "INC-1");

    // A token that expires, leeway included, two seconds from now.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = fx.claims("alice");
    claims.exp = now - 28;
    let short = fx.signer.sign(&claims).unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut answers = support
        .decrypt_records(with_token(ReceiverStream::new(receiver), &short))
        .await
        .unwrap()
        .into_inner();
    sender.send(ask()).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(first.status.is_none(), "{first:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    sender.send(ask()).await.unwrap();
    let status = answers.message().await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "expired");

    // The identity provider's keys are reloaded (here: the same keys, written again).
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let mut answers = support
        .decrypt_records(with_token(
            ReceiverStream::new(receiver),
            &fx.token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    sender.send(ask()).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(first.status.is_none(), "{first:?}");
    replace_file(&fx.jwks, &fx.signer.jwks());
    let mut ended = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sender.send(ask()).await.is_err() {
            break;
        }
        match answers.message().await {
            Ok(Some(answer)) => assert!(answer.status.is_none(), "{answer:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let status = ended.expect("the stream outlived a reload of the keys");
    assert_status(&status, Code::Unauthenticated, "reloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employee_tokens_are_bound_to_the_service_that_presents_them() {
    let fx = Fixture::start().await;
    let support_cert = service_cert(&fx.ca, &spiffe("us-support-tool"), &[]);
    let mut support = fx.client(&support_cert).await;
    let mut signup = fx.service("us-signup").await;
    let record = encrypted_record(&mut signup, tonic::Request::new(profile("u-1", "US"))).await;
    let ask = || decrypt_request(record.clone(), &["email"], "support", "INC-1");
    let sign = |change: &dyn Fn(&mut TokenClaims)| {
        let mut claims = fx.claims("alice");
        change(&mut claims);
        fx.signer.sign(&claims).unwrap()
    };

    // alice's token for us-support-tool, presented by us-signup: refused.
    let status = signup
        .decrypt_record(with_token(ask(), &fx.token("alice")))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::Unauthenticated,
        "bound to service `us-support-tool` (azp)",
    );
    // A token bound to nothing: refused by default.
    let unbound = sign(&|claims| claims.azp = None);
    let status = support
        .decrypt_record(with_token(ask(), &unbound))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unauthenticated, "not bound to a service");
    // Bound to the presenting certificate: accepted, and `cnf` wins over an `azp`
    // naming another service.
    let to_certificate = sign(&|claims| {
        claims.azp = Some("us-signup".to_owned());
        claims.cnf = Some(serde_json::json!({"x5t#S256": thumbprint(&support_cert.cert_pem)}));
    });
    let answer = support
        .decrypt_record(with_token(ask(), &to_certificate))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        outcome(&answer, "email"),
        Outcome::Plaintext(p) if p == &secret_value("u-1", "email")
    ));
    // The same service with another certificate cannot use it.
    let mut other_support = fx.service("us-support-tool").await;
    let status = other_support
        .decrypt_record(with_token(ask(), &to_certificate))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("another client certificate"),
        "{status:?}"
    );
    let entries: Vec<_> = fx
        .server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "decrypt")
        .collect();
    assert_eq!(entries.len(), 1, "only the bound token read: {entries:#?}");
    assert_eq!(entries[0]["authentication"], "mtls+token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_tokens_are_accepted_only_when_allowed_and_each_use_is_logged() {
    let fx = Fixture::start_with(true).await;
    let mut support = fx.service("us-support-tool").await;
    let mut claims = fx.claims("alice");
    claims.azp = None;
    let unbound = fx.signer.sign(&claims).unwrap();
    support
        .authorize(with_token(authorize(), &unbound))
        .await
        .unwrap();
    // Bound tokens keep their binding.
    let mut signup = fx.service("us-signup").await;
    let status = signup
        .authorize(with_token(authorize(), &fx.token("alice")))
        .await
        .unwrap_err();
    assert!(status.message().contains("bound to service"), "{status:?}");
    let entries = fx.server.log_entries();
    let authorized: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "authorize")
        .collect();
    assert_eq!(authorized.len(), 1);
    assert_eq!(authorized[0]["authentication"], "mtls+unbound-token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_swap_of_the_jwks_is_picked_up() {
    let fx = Fixture::start_full(false, true, false).await;
    let mut support = fx.service("us-support-tool").await;
    let next = TokenSigner::generate().unwrap();
    let new_token = next.sign(&fx.claims("alice")).unwrap();
    let status = refused(&mut support, with_token(authorize(), &new_token)).await;
    assert!(status.message().contains("unknown key"), "{status:?}");
    // What the kubelet does: write a new version directory, point a new link at it,
    // rename the link over `..data`. `jwks.json` itself never changes.
    let mount = fx.jwks.parent().unwrap();
    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    std::fs::write(mount.join("..v2/jwks.json"), next.jwks()).unwrap();
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        if support
            .authorize(with_token(authorize(), &new_token))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the swapped JWKS was never loaded");
    let status = refused(&mut support, with_token(authorize(), &fx.token("alice"))).await;
    assert!(status.message().contains("unknown key"), "{status:?}");
}
