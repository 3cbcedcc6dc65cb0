//! Malformed, unauthenticated and housekeeping requests.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_precise_statuses() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-6", "US").await;

    let mut cases: Vec<(pb::EncryptRecordRequest, Code, &str)> = Vec::new();
    let mut empty_id = profile("", "US");
    empty_id.record_id.clear();
    cases.push((empty_id, Code::InvalidArgument, "record_id"));
    let mut unknown_type = profile("u-7", "US");
    unknown_type.record_type = "order".to_owned();
    cases.push((
        unknown_type,
        Code::InvalidArgument,
        "unknown record type `order`",
    ));
    let mut unknown_field = profile("u-7", "US");
    unknown_field.fields[0].name = "shoe_size".to_owned();
    cases.push((
        unknown_field,
        Code::InvalidArgument,
        "unknown field `shoe_size`",
    ));
    let mut bad_name = profile("u-7", "US");
    bad_name.fields[0].name = "Email!".to_owned();
    cases.push((bad_name, Code::InvalidArgument, "invalid field name"));
    let mut duplicate = profile("u-7", "US");
    duplicate.fields[1].name = duplicate.fields[0].name.clone();
    cases.push((duplicate, Code::InvalidArgument, "appears more than once"));
    let mut no_fields = profile("u-7", "US");
    no_fields.fields.clear();
    cases.push((no_fields, Code::InvalidArgument, "no fields"));
    cases.push((
        profile("u-7", "BR"),
        Code::InvalidArgument,
        "jurisdiction `BR` is not configured",
    ));
    cases.push((
        profile("u-7", "us"),
        Code::InvalidArgument,
        "invalid jurisdiction",
    ));
    let mut huge = profile("u-7", "US");
    huge.fields[0].value = vec![7; 1024 * 1024 + 1];
    cases.push((huge, Code::InvalidArgument, "the limit is 1048576 bytes"));
    for (request, code, needle) in cases {
        let status = status_of(
            client
                .encrypt_record(as_caller(request, "us-signup", None))
                .await,
        )
        .await;
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }

    // Policy says no: a US service writing SG records.
    let status = status_of(
        client
            .encrypt_record(as_caller(profile("s-9", "SG"), "us-signup", None))
            .await,
    )
    .await;
    assert_status(&status, Code::PermissionDenied, "`email`");

    let decrypt_cases: Vec<(pb::DecryptRecordRequest, Code, &str)> = vec![
        (
            pb::DecryptRecordRequest::default(),
            Code::InvalidArgument,
            "`record` is required",
        ),
        (
            {
                let mut garbage = record.clone();
                *ciphertext_mut(&mut garbage, "email") =
                    b"not an envelope at all, just bytes".to_vec();
                decrypt_request(garbage, &["email"], "support", "INC-1")
            },
            Code::InvalidArgument,
            "field `email`: ciphertext is not a ringfence envelope",
        ),
        (
            decrypt_request(record.clone(), &["nickname"], "support", "INC-1"),
            Code::InvalidArgument,
            "field `nickname` is not in the record",
        ),
        (
            decrypt_request(record.clone(), &["email", "email"], "support", "INC-1"),
            Code::InvalidArgument,
            "appears more than once",
        ),
        (
            decrypt_request(record.clone(), &["email"], &"p".repeat(129), ""),
            Code::InvalidArgument,
            "invalid purpose",
        ),
        (
            decrypt_request(record.clone(), &["email"], "support", "a\nb"),
            Code::InvalidArgument,
            "control characters",
        ),
    ];
    for (request, code, needle) in decrypt_cases {
        let status = status_of(
            client
                .decrypt_record(as_caller(request, "us-support-tool", Some("alice")))
                .await,
        )
        .await;
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    let rejected: Vec<_> = server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "the mangled envelope is logged");
    assert!(
        rejected[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("field `email`")
    );

    // Larger than the server's message limit: refused by the transport, server unharmed.
    let mut oversized = profile("u-8", "US");
    for field in &mut oversized.fields {
        field.value = vec![1; 512 * 1024];
    }
    let status = status_of(
        client
            .encrypt_record(as_caller(oversized, "us-signup", None))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    encrypt_profile(&mut client, "u-8", "US").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_authentication_only() {
    let server = start().await;
    let mut client = server.client().await;
    let record = encrypt_profile(&mut client, "u-9", "US").await;
    let request = || decrypt_request(record.clone(), &["email"], "support", "INC-1");

    let status = status_of(client.decrypt_record(tonic::Request::new(request())).await).await;
    assert_status(&status, Code::Unauthenticated, "x-ringfence-service");

    let status = status_of(
        client
            .decrypt_record(as_caller(request(), "us-support-tool", Some("mallory")))
            .await,
    )
    .await;
    assert_status(&status, Code::Unauthenticated, "unknown principal");
    let status = status_of(
        client
            .decrypt_record(as_caller(request(), "rogue-service", Some("alice")))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);

    // Two employee headers: refused rather than guessing which one counts.
    let mut doubled = as_caller(request(), "us-support-tool", Some("bob"));
    doubled.metadata_mut().append(
        ringfence::identity::EMPLOYEE_HEADER,
        "alice".parse().unwrap(),
    );
    let status = status_of(client.decrypt_record(doubled).await).await;
    assert_eq!(status.code(), Code::Unauthenticated);

    let unauthenticated: Vec<_> = server
        .log_entries()
        .into_iter()
        .filter(|e| e["kind"] == "unauthenticated")
        .collect();
    assert_eq!(
        unauthenticated.len(),
        4,
        "every refusal is logged: missing header, unknown principal, unknown service, repeated header"
    );
    assert!(
        unauthenticated[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("missing `x-ringfence-service`")
    );
    assert_eq!(unauthenticated[1]["principal"], "Employee::\"mallory\"");
    assert!(
        unauthenticated[3]["outcome"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_identity_mode_every_request_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.auth = ringfence::config::Auth::None;
    let running = ringfence::server::start(config).await.unwrap();
    let mut client = ringfence::pb::ringfence_client::RingfenceClient::connect(format!(
        "http://{}",
        running.local_addr
    ))
    .await
    .unwrap();
    let status = status_of(
        client
            .encrypt_record(as_caller(profile("u-1", "US"), "us-signup", None))
            .await,
    )
    .await;
    assert_status(&status, Code::Unauthenticated, "no caller authentication");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ringfence.v1.Ringfence".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ringfence.v1.Ringfence"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // v1alpha, which grpcurl and Python's grpcio-reflection ask: the services, and
    // the file that declares one, as those tools resolve a method.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let mut alpha = AlphaClient::new(server.channel().await);
    let requests = [
        AlphaRequest::ListServices(String::new()),
        AlphaRequest::FileContainingSymbol("ringfence.v1.Ringfence".to_owned()),
    ]
    .map(
        |message| tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        },
    );
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let listed = responses.message().await.unwrap().unwrap();
    let Some(AlphaResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("unexpected v1alpha answer: {listed:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "ringfence.v1.Ringfence"),
        "{list:?}"
    );
    let file = responses.message().await.unwrap().unwrap();
    let Some(AlphaResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("unexpected v1alpha answer: {file:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
