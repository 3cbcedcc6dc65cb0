//! `serve --otlp-endpoint`: request spans, each carrying the decision log's request id,
//! received by an in-process OTLP/gRPC collector built from the OpenTelemetry protocol
//! types (the `otlp` feature, which the test command enables).
#![cfg(feature = "otlp")]

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use super::*;

/// Keeps every export it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// (span name, its string attributes) of everything received.
fn spans(collector: &Collector) -> Vec<(String, Vec<(String, String)>)> {
    let mut spans = Vec::new();
    for export in collector.0.lock().unwrap().iter() {
        for resource in &export.resource_spans {
            for scope in &resource.scope_spans {
                for span in &scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(text) => Some((kv.key.clone(), text.clone())),
                            Value::IntValue(n) => Some((kv.key.clone(), n.to_string())),
                            _ => None,
                        })
                        .collect();
                    spans.push((span.name.clone(), attributes));
                }
            }
        }
    }
    spans
}

#[test]
fn request_spans_carry_the_request_id_to_an_otlp_collector() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = collector.clone();
    runtime.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(serving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let (server, started, logs) = spawn_serve(dir.path(), &["--otlp-endpoint", &endpoint], None);
    let address = address_of(&started);
    let (encrypted_id, decrypted_id, record_ids) = runtime.block_on(async {
        let mut client =
            ringfence::pb::ringfence_client::RingfenceClient::connect(format!("http://{address}"))
                .await
                .unwrap();
        let encrypted = client
            .encrypt_record(as_caller(profile("u-1", "US"), "us-signup", None))
            .await
            .unwrap()
            .into_inner();
        let record = encrypted.record.unwrap();
        let decrypted = client
            .decrypt_record(as_caller(
                decrypt_request(record.clone(), &["email"], "support", "INC-1"),
                "us-support-tool",
                Some("alice"),
            ))
            .await
            .unwrap()
            .into_inner();
        // A stream: each record is a span of its own with its own id.
        let requests =
            (0..2).map(move |_| decrypt_request(record.clone(), &["email"], "support", "INC-2"));
        let mut answers = client
            .decrypt_records(as_caller(
                tokio_stream::iter(requests),
                "us-support-tool",
                Some("alice"),
            ))
            .await
            .unwrap()
            .into_inner();
        let mut record_ids = Vec::new();
        while let Some(answer) = answers.message().await.unwrap() {
            record_ids.push(answer.request_id);
        }
        (encrypted.request_id, decrypted.request_id, record_ids)
    });
    // Stopping flushes the spans still buffered.
    stop_logged(server, &logs);

    let spans = spans(&collector);
    let find = |name: &str, id: &str| {
        spans.iter().find(|(span, attributes)| {
            span == name
                && attributes
                    .iter()
                    .any(|(key, value)| key == "request_id" && value == id)
        })
    };
    let encrypt = find("request", &encrypted_id)
        .unwrap_or_else(|| panic!("no span for {encrypted_id}: {spans:?}"));
    assert!(
        encrypt
            .1
            .iter()
            .any(|(key, value)| key == "method" && value == "/ringfence.v1.Ringfence/EncryptRecord"),
        "{encrypt:?}"
    );
    assert!(find("request", &decrypted_id).is_some(), "{spans:?}");
    assert_eq!(record_ids.len(), 2);
    for id in &record_ids {
        assert!(
            find("record", id).is_some(),
            "no record span for {id}: {spans:?}"
        );
    }
    // Spans carry ids and method names, never plaintext, people or records.
    let everything = format!("{spans:?}");
    for absent in ["SECRET-", "alice", "us-support-tool", "u-1"] {
        assert!(!everything.contains(absent), "{absent}: {everything}");
    }
}
