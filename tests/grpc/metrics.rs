//! The Prometheus endpoint after real traffic, read with a real parser of the
//! OpenMetrics text format (the Prometheus project's Python client).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::*;

/// Parses `exposition` with prometheus_client's OpenMetrics parser (which refuses
/// anything malformed, and an exposition without `# EOF`) into
/// `name{label="value",...}` (labels sorted) -> value.
fn parse_openmetrics(python: &std::path::Path, exposition: &str) -> BTreeMap<String, f64> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(samples))
"#;
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the exposition does not parse: {}\n{exposition}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_real_traffic_and_parse_as_openmetrics() {
    let Some(python) = system_tools::python_with_prometheus_client() else {
        return;
    };
    let server = start().await;
    let mut client = server.client().await;

    // 20 encrypt decisions, allowed, in US.
    let record = encrypted_record(
        &mut client,
        as_caller(profile("u-1", "US"), "us-signup", None),
    )
    .await;
    // Alice reads some fields and is denied others; bob is denied all 20.
    let mut allowed = 0;
    let mut denied = 0;
    for (employee, expect_some_allowed) in [("alice", true), ("bob", false)] {
        let answer = client
            .decrypt_record(as_caller(
                decrypt_request(record.clone(), &[], "support", "INC-1"),
                "us-support-tool",
                Some(employee),
            ))
            .await
            .unwrap()
            .into_inner();
        let plain = answer
            .fields
            .iter()
            .filter(|field| matches!(field.outcome, Some(Outcome::Plaintext(_))))
            .count();
        assert_eq!(plain > 0, expect_some_allowed);
        allowed += plain;
        denied += answer.fields.len() - plain;
    }
    // No identity: refused before any handler. An unknown record type: INVALID_ARGUMENT.
    let refused = client
        .get_status(tonic::Request::new(pb::GetStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut bad = profile("u-2", "US");
    bad.record_type = "no_such_type".to_owned();
    let invalid = client
        .encrypt_record(as_caller(bad, "us-signup", None))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let status = client
        .get_status(as_caller(pb::GetStatusRequest {}, "us-support-tool", None))
        .await
        .unwrap()
        .into_inner();

    let exposition = server.scrape().await;
    assert!(exposition.ends_with("# EOF\n"), "{exposition}");
    let samples = parse_openmetrics(&python, &exposition);
    let value = |series: &str| -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{exposition}"))
    };
    let rpc = |method: &str, code: &str| {
        value(&format!(
            "ringfence_rpc_duration_seconds_count{{code=\"{code}\",method=\"/ringfence.v1.Ringfence/{method}\"}}"
        ))
    };
    assert_eq!(rpc("EncryptRecord", "OK"), 1.0);
    assert_eq!(rpc("EncryptRecord", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(rpc("DecryptRecord", "OK"), 2.0);
    assert_eq!(rpc("GetStatus", "OK"), 1.0);
    assert_eq!(rpc("GetStatus", "UNAUTHENTICATED"), 1.0);
    assert!(
        value(
            "ringfence_rpc_duration_seconds_sum{code=\"OK\",method=\"/ringfence.v1.Ringfence/DecryptRecord\"}"
        ) > 0.0
    );

    let decisions = |action: &str, decision: &str| {
        value(&format!(
            "ringfence_decisions_total{{action=\"{action}\",decision=\"{decision}\",jurisdiction=\"US\"}}"
        ))
    };
    assert_eq!(decisions("encrypt", "allow"), 20.0);
    assert_eq!(decisions("decrypt", "allow"), allowed as f64);
    assert_eq!(decisions("decrypt", "deny"), denied as f64);
    assert_eq!(
        value("ringfence_authentication_failures_total{reason=\"identity_headers\"}"),
        1.0
    );

    // Every decided request's entry went through a commit.
    assert!(value("ringfence_log_batch_entries_sum{}") >= 4.0);
    assert!(value("ringfence_log_commit_duration_seconds_count{}") >= 1.0);
    assert_eq!(value("ringfence_log_write_failures_total{}"), 0.0);
    assert_eq!(value("ringfence_log_healthy{}"), 1.0);

    // State read at the scrape: the running set, reloads, keys, slots.
    assert_eq!(
        value(&format!(
            "ringfence_policy_set{{hash=\"{}\"}}",
            status.policy_set
        )),
        1.0
    );
    assert_eq!(
        value("ringfence_policy_reloads_total{result=\"refused_by_proof\"}"),
        0.0
    );
    assert_eq!(
        value("ringfence_key_current_version{jurisdiction=\"US\"}"),
        1.0
    );
    assert_eq!(
        value("ringfence_key_versions{jurisdiction=\"US\",state=\"active\"}"),
        1.0
    );
    assert_eq!(value("ringfence_slots_in_use{slot=\"unary_calls\"}"), 0.0);
    assert_eq!(value("ringfence_slots_in_use{slot=\"handshakes\"}"), 0.0);

    // The endpoint serves nothing else.
    let (head, _) = server.http_get("GET", "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = server.http_get("POST", "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_cannot_add_label_values() {
    let server = start().await;
    let mut client = server.client().await;
    // Unknown jurisdictions and record types never reach a label; unknown methods are
    // one `other` series however many are tried.
    for n in 0..20 {
        let mut request = profile(&format!("u-{n}"), &format!("X{n}"));
        request.record_type = format!("type_{n}");
        let _ = client
            .encrypt_record(as_caller(request, "us-signup", None))
            .await;
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.unwrap();
        let path = format!("/ringfence.v1.Ringfence/Method{n}")
            .parse()
            .unwrap();
        let refused = grpc
            .unary::<pb::GetStatusRequest, pb::GetStatusResponse, _>(
                as_caller(pb::GetStatusRequest {}, "us-support-tool", None),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented);
    }
    let exposition = server.scrape().await;
    assert!(!exposition.contains("X1"), "{exposition}");
    assert!(!exposition.contains("type_"), "{exposition}");
    assert!(!exposition.contains("Method1"), "{exposition}");
    assert_eq!(
        metric_value(
            &exposition,
            "ringfence_rpc_duration_seconds_count{method=\"other\",code=\"UNIMPLEMENTED\"}"
        ),
        Some(20.0),
        "{exposition}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_from_one_address_cannot_starve_a_scrape() {
    let server = start().await;
    let address = server.running.metrics_addr.unwrap();
    // 40 connections that send nothing, all from 127.0.0.2.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(address).await {
            idle.push(stream);
        }
    }
    // A scraper elsewhere (127.0.0.1) is answered at once.
    let started = std::time::Instant::now();
    let exposition = server.scrape().await;
    assert!(exposition.ends_with("# EOF\n"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "the scrape waited {:?}",
        started.elapsed()
    );
    drop(idle);
}
