use super::*;

fn test_gate(dir: &std::path::Path) -> Arc<Gatekeeper> {
    let keyring = keys::Keyring::create_unlogged(
        &dir.join("keyring.json"),
        &keys::LocalMasterKey::generate().unwrap(),
        &[crate::Jurisdiction::new("US").unwrap()],
    )
    .unwrap();
    let policies = Arc::new(
        crate::policy::PolicyStore::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        )
        .unwrap(),
    );
    let (log, _) = crate::audit::DecisionLog::open(&dir.join("log")).unwrap();
    let subjects = crate::subjects::Subjects::open(dir, &keyring, 1024).unwrap();
    Arc::new(Gatekeeper::new(
        keyring,
        Arc::new(subjects),
        policies,
        log,
        Default::default(),
    ))
}

fn log_entries(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    crate::audit::for_each_entry(&dir.join("log"), &Default::default(), |_, entry| {
        entries.push(entry.clone());
        Ok(())
    })
    .unwrap();
    entries
}

fn authenticated<T>(message: T, service: &str, employee: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller {
        service: service.to_owned(),
        employee: employee.map(str::to_owned),
        method: "test",
        lease: None,
        certificate: None,
    });
    request
}

/// Polls the call `make` returns once (far enough to start its work) and drops
/// it, as a client that cancels does, then waits for what the call left behind.
/// A loaded machine may finish the call within that one poll (then it was
/// delivered): it is tried again, up to 20 times.
async fn cancel<F: std::future::Future>(service: &RingfenceService, make: impl Fn() -> F) {
    let mut cancelled = false;
    for _ in 0..20 {
        let call = make();
        let mut call = std::pin::pin!(call);
        let polled_once =
            std::future::poll_fn(|context| std::task::Poll::Ready(call.as_mut().poll(context)))
                .await;
        if polled_once.is_pending() {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "every call finished within its first poll");
    let still_running = service
        .follow_ups()
        .drain(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(still_running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_encrypt_and_authorize_calls_are_logged_as_undelivered() {
    use pb::ringfence_server::Ringfence as _;
    let dir = tempfile::tempdir().unwrap();
    let service = RingfenceService::new(test_gate(dir.path()), 1 << 20);
    let encrypt = pb::EncryptRecordRequest {
        subject_id: String::new(),
        record_type: "user_profile".to_owned(),
        record_id: "u-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![pb::PlainField {
            name: "email".to_owned(),
            value: b"a@example.com".to_vec(),
        }],
    };
    cancel(&service, || {
        service.encrypt_record(authenticated(encrypt.clone(), "us-signup", None))
    })
    .await;
    let authorize = pb::AuthorizeRequest {
        record_type: "user_profile".to_owned(),
        record_id: "u-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec!["email".to_owned()],
        purpose: "support".to_owned(),
        ticket: "INC-1".to_owned(),
    };
    cancel(&service, || {
        service.authorize(authenticated(
            authorize.clone(),
            "us-support-tool",
            Some("alice"),
        ))
    })
    .await;
    // Calls that finished within their first poll were delivered: only the last
    // decision of each kind, the cancelled one, has a follow-up.
    let entries = log_entries(dir.path());
    let undelivered: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "undelivered")
        .collect();
    assert_eq!(undelivered.len(), 2, "{entries:#?}");
    for (kind, follow_up) in ["encrypt", "authorize"].into_iter().zip(undelivered) {
        let decided = entries.iter().rfind(|e| e["kind"] == kind).unwrap();
        assert_eq!(follow_up["request_id"], decided["request_id"]);
        assert_eq!(follow_up["principal"], decided["principal"]);
        assert_eq!(
            follow_up["outcome"],
            "undelivered: call cancelled by the client"
        );
        assert!(
            follow_up["fields"].as_array().is_none_or(Vec::is_empty),
            "nothing was read: {follow_up}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_transport_never_takes_from_ends_and_every_answer_is_followed_up() {
    use futures_util::StreamExt as _;
    use pb::ringfence_server::Ringfence as _;
    let dir = tempfile::tempdir().unwrap();
    let gate = test_gate(dir.path());
    let service = RingfenceService::new(Arc::clone(&gate), 1 << 20).with_stream_limits(
        crate::config::StreamLimits {
            max_per_caller: 1,
            send_timeout: std::time::Duration::from_millis(300),
        },
    );
    let encrypt = pb::EncryptRecordRequest {
        subject_id: String::new(),
        record_type: "user_profile".to_owned(),
        record_id: "u-1".to_owned(),
        jurisdiction: "US".to_owned(),
        fields: vec![pb::PlainField {
            name: "email".to_owned(),
            value: b"a@example.com".to_vec(),
        }],
    };
    let record = service
        .encrypt_record(authenticated(encrypt, "us-signup", None))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    let requests = |count: usize| {
        let record = record.clone();
        futures_util::stream::iter((0..count).map(move |_| {
            Ok(pb::DecryptRecordRequest {
                record: Some(record.clone()),
                fields: vec!["email".to_owned()],
                purpose: "support".to_owned(),
                ticket: "INC-1".to_owned(),
            })
        }))
    };
    let context = || stream::Context {
        gate: Arc::clone(&gate),
        slots: Arc::clone(&service.streams),
        follow_ups: service.follow_ups(),
        limits: service.stream_limits,
        max_message_bytes: 1 << 20,
    };
    let alice = Caller {
        service: "us-support-tool".to_owned(),
        employee: Some("alice".to_owned()),
        method: "test",
        lease: None,
        certificate: None,
    };
    // A transport that never takes an answer: the stream is never polled.
    let mut stalled = stream::serve::<Decrypts>(context(), alice.clone(), requests(100)).unwrap();
    let second = stream::serve::<Decrypts>(context(), alice.clone(), requests(1));
    assert_eq!(
        second.err().map(|status| status.code()),
        Some(tonic::Code::ResourceExhausted),
        "one stream per caller here"
    );
    let still_running = service
        .follow_ups()
        .drain(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(still_running, 0, "the stalled stream's work ended");
    let entries = log_entries(dir.path());
    let ids = |kind: &str| -> std::collections::BTreeSet<String> {
        entries
            .iter()
            .filter(|e| e["kind"] == kind && e["action"] == "decrypt")
            .map(|e| e["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let read = ids("decrypt");
    assert!(
        (stream::STREAM_CONCURRENCY..100).contains(&read.len()),
        "{} records read: bounded by the stream, not the request",
        read.len()
    );
    assert_eq!(read, ids("undelivered"), "every answer made is followed up");
    // The transport, if it ever asks, learns why.
    let told = stalled.next().await.unwrap().unwrap_err();
    assert_eq!(told.code(), tonic::Code::DeadlineExceeded, "{told:?}");
    assert!(stalled.next().await.is_none());

    // A client that sent all it had (the request stream ended) and takes nothing:
    // its last answers wait in the queue under the same timeout, holding the slot.
    let short = stream::serve::<Decrypts>(context(), alice.clone(), requests(2)).unwrap();
    assert!(stream::serve::<Decrypts>(context(), alice.clone(), requests(0)).is_err());
    let still_running = service
        .follow_ups()
        .drain(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(still_running, 0);
    let undelivered = log_entries(dir.path())
        .iter()
        .filter(|e| e["kind"] == "undelivered")
        .count();
    assert_eq!(undelivered, read.len() + 2);
    assert!(stream::serve::<Decrypts>(context(), alice, requests(0)).is_ok());
    drop(short);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_logs_its_answer_as_undelivered_once_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let gate = test_gate(dir.path());
    let caller = Caller {
        service: "us-support-tool".to_owned(),
        employee: Some("alice".to_owned()),
        method: "test",
        lease: None,
        certificate: None,
    };
    let receipt = gatekeeper::Receipt {
        action: crate::policy::Action::Decrypt,
        request_id: "r-1".to_owned(),
        record: crate::audit::RecordEntry {
            subject: None,
            record_type: "user_profile".to_owned(),
            record_id: "u-1".to_owned(),
            jurisdiction: "US".to_owned(),
        },
        policy_set: "ab".repeat(32),
        plaintext_fields: vec!["email".to_owned()],
    };
    let answer = receipt.clone();
    let service = RingfenceService::new(Arc::clone(&gate), 1 << 20);
    let pending = service
        .pending(caller, async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Ok((pb::DecryptRecordResponse::default(), answer))
        })
        .unwrap();
    // The call goes away while the answer is being made; shutdown waits for the
    // answer and its follow-up.
    drop(pending);
    let still_running = service
        .follow_ups()
        .drain(std::time::Duration::from_secs(10))
        .await;
    assert_eq!(still_running, 0);
    let entries = log_entries(dir.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(entry["kind"], "undelivered");
    assert_eq!(entry["request_id"], "r-1");
    assert_eq!(
        entry["outcome"],
        "undelivered: call cancelled by the client"
    );
    assert_eq!(entry["fields"][0]["field"], "email");
    assert_eq!(entry["fields"][0]["classification"], "pii");
}
