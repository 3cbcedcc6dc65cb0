use super::*;
use crate::audit::{FieldEntry, KeyEventEntry, RecordEntry};

fn field(name: &str, decision: &str) -> FieldEntry {
    FieldEntry {
        field: name.to_owned(),
        classification: "pii".to_owned(),
        decision: decision.to_owned(),
        policies: vec![],
        errors: vec![],
        key_version: Some(1),
        outcome: if decision == "allow" {
            "decrypt"
        } else {
            "denied"
        }
        .to_owned(),
    }
}

fn entry(kind: &str, jurisdiction: &str, fields: Vec<FieldEntry>) -> Entry {
    Entry {
        time: crate::record::rfc3339_now(),
        request_time: 1_790_000_000,
        request_id: "r".to_owned(),
        kind: kind.to_owned(),
        service: Some("us-support-tool".to_owned()),
        principal: Some("Employee::\"alice\"".to_owned()),
        authentication: "mtls+token".to_owned(),
        action: Some("decrypt".to_owned()),
        purpose: String::new(),
        ticket: String::new(),
        record: Some(RecordEntry {
            record_type: "user_profile".to_owned(),
            record_id: "u-1".to_owned(),
            jurisdiction: jurisdiction.to_owned(),
            subject: None,
        }),
        policy_set: None,
        fields,
        outcome: "decided".to_owned(),
        checkpoint: None,
        key_event: None,
        unsigned_tail: None,
        key_admin: None,
    }
}

fn exposition(metrics: &Metrics) -> String {
    let mut registry = Registry::default();
    registry.register("ringfence_decisions", "", metrics.decisions.clone());
    registry.register("ringfence_key_events", "", metrics.key_events.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

fn jurisdictions() -> Vec<Jurisdiction> {
    ["US", "SG"]
        .iter()
        .map(|code| Jurisdiction::new(code).unwrap())
        .collect()
}

#[test]
fn decisions_are_counted_per_field_once_and_only_for_deciding_entries() {
    let metrics = Metrics::new(&jurisdictions());
    let decided = entry(
        "decrypt",
        "US",
        vec![
            field("email", "allow"),
            field("phone", "allow"),
            field("ssn", "deny"),
        ],
    );
    metrics.logged(metrics.tally(&decided));
    // Follow-ups repeat decisions already counted.
    for kind in [
        "undelivered",
        "integrity_failure",
        "rejected",
        "unauthenticated",
    ] {
        metrics.logged(metrics.tally(&entry(kind, "US", vec![field("email", "allow")])));
    }
    // A jurisdiction outside the configured set is `other`.
    metrics.logged(metrics.tally(&entry("decrypt", "ZZ", vec![field("email", "deny")])));
    let text = exposition(&metrics);
    for (series, value) in [
        (
            r#"ringfence_decisions_total{action="decrypt",decision="allow",jurisdiction="US"}"#,
            "2",
        ),
        (
            r#"ringfence_decisions_total{action="decrypt",decision="deny",jurisdiction="US"}"#,
            "1",
        ),
        (
            r#"ringfence_decisions_total{action="decrypt",decision="deny",jurisdiction="other"}"#,
            "1",
        ),
    ] {
        assert!(text.contains(&format!("{series} {value}\n")), "{text}");
    }
    assert!(!text.contains("ZZ"), "{text}");
    assert_eq!(
        text.matches("ringfence_decisions_total{").count(),
        3,
        "{text}"
    );
}

#[test]
fn a_tally_counts_nothing_until_logged() {
    let metrics = Metrics::new(&jurisdictions());
    let tally = metrics.tally(&entry("decrypt", "US", vec![field("email", "allow")]));
    assert!(!exposition(&metrics).contains("ringfence_decisions_total{"));
    // The entry did not become durable: the tally is dropped.
    drop(tally);
    assert!(!exposition(&metrics).contains("ringfence_decisions_total{"));
}

#[test]
fn key_events_are_counted_by_operation_and_jurisdiction() {
    let metrics = Metrics::new(&jurisdictions());
    let mut event = entry("key_event", "US", vec![]);
    event.record = None;
    event.key_event = Some(KeyEventEntry {
        operation: "rotate".to_owned(),
        jurisdiction: "SG".to_owned(),
        version: 2,
        key_id: "00".repeat(16),
        generation: 2,
    });
    metrics.logged(metrics.tally(&event));
    let text = exposition(&metrics);
    assert!(
        text.contains("ringfence_key_events_total{operation=\"rotate\",jurisdiction=\"SG\"} 1\n"),
        "{text}"
    );
}

#[test]
fn methods_are_the_services_of_the_proto_and_anything_else_is_other() {
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/ringfence/v1/ringfence.proto"),
    )
    .unwrap();
    let mut service = "";
    let mut declared = Vec::new();
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.trim_end_matches(" {");
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let name = rest.split('(').next().unwrap();
            declared.push(format!("/ringfence.v1.{service}/{name}"));
        }
    }
    let mut known: Vec<String> = METHODS.iter().map(|m| (*m).to_owned()).collect();
    declared.sort();
    known.sort();
    assert_eq!(declared, known);
    assert_eq!(
        Metrics::method("/ringfence.v1.Ringfence/DecryptRecord"),
        "/ringfence.v1.Ringfence/DecryptRecord"
    );
    assert_eq!(Metrics::method("/ringfence.v1.Ringfence/Nope"), "other");
    assert_eq!(Metrics::method("/grpc.health.v1.Health/Check"), "other");
}

#[test]
fn a_key_change_or_shred_is_counted_once_though_logged_twice() {
    let metrics = Metrics::new(&jurisdictions());
    let mut decided = entry(crate::audit::KEY_ADMIN_KIND, "US", vec![]);
    decided.record = None;
    decided.action = Some("shred".to_owned());
    decided.key_admin = Some(crate::audit::KeyAdminEntry {
        operation: "shred".to_owned(),
        below: None,
        from: None,
        key_rings: vec![crate::audit::KeyRingDecision {
            jurisdiction: "US".to_owned(),
            decision: "allow".to_owned(),
            policies: vec![],
            errors: vec![],
        }],
        subject: Some("u-1".to_owned()),
    });
    decided.outcome = "allowed".to_owned();
    metrics.logged(metrics.tally(&decided));
    for outcome in ["shredded: US shredded", "failed: disk full"] {
        let mut follow_up = decided.clone();
        follow_up.outcome = outcome.to_owned();
        metrics.logged(metrics.tally(&follow_up));
    }
    let text = exposition(&metrics);
    assert!(
        text.contains(
            "ringfence_decisions_total{action=\"shred\",decision=\"allow\",jurisdiction=\"US\"} 1\n"
        ),
        "{text}"
    );
}
