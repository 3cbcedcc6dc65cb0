//! Prometheus metrics: what the request path counts (calls, decisions, log commits,
//! authentication failures, key events), what is read from the running server at
//! each scrape (policy set, reloads, keys, slots in use), and the HTTP endpoint that
//! serves them in the OpenMetrics text format. May not decide, log or touch key
//! material; every label takes values from a bounded set, never from what a caller
//! sends unchecked, so that no caller can grow the exposition.

mod http;
mod state;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub use http::{Endpoint, serve};
pub use state::{Slots, State};

use crate::audit::Entry;
use crate::record::Jurisdiction;

/// The label value of anything outside a label's known set.
const OTHER: &str = "other";

/// The methods of `ringfence.v1.Ringfence` and `ringfence.v1.KeyAdmin` (checked
/// against the proto by a test); any other path is counted as `other`.
pub const METHODS: &[&str] = &[
    "/ringfence.v1.Ringfence/EncryptRecord",
    "/ringfence.v1.Ringfence/DecryptRecord",
    "/ringfence.v1.Ringfence/Authorize",
    "/ringfence.v1.Ringfence/DecryptRecords",
    "/ringfence.v1.Ringfence/GetStatus",
    "/ringfence.v1.Ringfence/RewrapRecord",
    "/ringfence.v1.Ringfence/RewrapRecords",
    "/ringfence.v1.KeyAdmin/RotateKey",
    "/ringfence.v1.KeyAdmin/RetireKeys",
    "/ringfence.v1.KeyAdmin/UnretireKeys",
    "/ringfence.v1.KeyAdmin/DestroyKeys",
    "/ringfence.v1.KeyAdmin/ListKeys",
    "/ringfence.v1.KeyAdmin/ShredSubject",
];

/// The kinds of log entries that carry decisions of their own (follow-ups such as
/// `undelivered` or `integrity_failure` repeat decisions already counted).
const DECIDING_KINDS: &[&str] = &[
    "encrypt",
    "decrypt",
    "authorize",
    "rewrap",
    crate::audit::KEY_ADMIN_KIND,
];

/// A label value shared cheaply between label sets (a configured jurisdiction).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    decision: &'static str,
    jurisdiction: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyEventLabels {
    operation: &'static str,
    jurisdiction: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// What the decision log's writer counts; handed to the log when it opens.
#[derive(Debug, Clone)]
pub struct LogMetrics {
    commit_seconds: Histogram,
    batch_entries: Histogram,
    write_failures: Counter,
    sealed_segments: Counter,
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self {
            commit_seconds: latency_histogram(),
            batch_entries: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            write_failures: Counter::default(),
            sealed_segments: Counter::default(),
        }
    }
}

impl LogMetrics {
    /// A batch of `entries` written and fsynced in `took`.
    pub fn committed(&self, entries: usize, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        // A commit that carries only a checkpoint is no batch of requests.
        if entries > 0 {
            self.batch_entries.observe(entries as f64);
        }
    }

    /// A write or fsync failed (the segment is sealed and the log refuses appends
    /// until it continues in a new one).
    pub fn write_failed(&self) {
        self.write_failures.inc();
    }

    /// A segment was sealed after a failed write.
    pub fn segment_sealed(&self) {
        self.sealed_segments.inc();
    }
}

/// The counters and histograms of one server. Cheap to share; a fresh one (as tests
/// and offline commands make) simply counts into nothing anyone scrapes.
#[derive(Debug)]
pub struct Metrics {
    rpc: Histograms<RpcLabels>,
    decisions: Family<DecisionLabels, Counter>,
    key_events: Family<KeyEventLabels, Counter>,
    authentication_failures: Family<ReasonLabels, Counter>,
    log: LogMetrics,
    jurisdictions: Vec<Label>,
    other: Label,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl Metrics {
    /// Metrics of a server configured with `jurisdictions` (the values the
    /// `jurisdiction` label may take besides `other`).
    pub fn new(jurisdictions: &[Jurisdiction]) -> Self {
        Self {
            rpc: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            decisions: Family::default(),
            key_events: Family::default(),
            authentication_failures: Family::default(),
            log: LogMetrics::default(),
            jurisdictions: jurisdictions
                .iter()
                .map(|jurisdiction| Label(Arc::from(jurisdiction.as_str())))
                .collect(),
            other: Label(Arc::from(OTHER)),
        }
    }

    /// The decision log's metrics.
    pub fn log(&self) -> &LogMetrics {
        &self.log
    }

    /// The `method` label of a request path.
    pub fn method(path: &str) -> &'static str {
        METHODS
            .iter()
            .find(|method| **method == path)
            .copied()
            .unwrap_or(OTHER)
    }

    /// A call to `method` (from [`Metrics::method`]) ended with gRPC status `code`
    /// after `took`.
    pub fn rpc_finished(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.rpc
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .observe(took.as_secs_f64());
    }

    /// Calls to `method` that ended with `code` so far, as a scrape would show them.
    #[cfg(test)]
    pub(crate) fn calls(&self, method: &'static str, code: tonic::Code) -> u64 {
        let mut registry = Registry::default();
        registry.register_with_unit(
            "ringfence_rpc_duration",
            "",
            Unit::Seconds,
            self.rpc.clone(),
        );
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            return 0;
        }
        let series = format!(
            "ringfence_rpc_duration_seconds_count{{method=\"{method}\",code=\"{}\"}} ",
            code_name(code)
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    /// A caller or connection was refused: `reason` is one of a fixed set
    /// (`identity::Error::kind`, `tls_handshake`, `unknown_principal`).
    pub fn authentication_failed(&self, reason: &'static str) {
        self.authentication_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn jurisdiction(&self, code: &str) -> Label {
        self.jurisdictions
            .iter()
            .find(|label| &*label.0 == code)
            .unwrap_or(&self.other)
            .clone()
    }

    /// What `entry` decided, to count once it is durable ([`Metrics::logged`]).
    pub fn tally(&self, entry: &Entry) -> Tally {
        let mut tally = Tally::default();
        if entry.kind == "key_event" {
            if let Some(event) = &entry.key_event {
                tally.key_event = Some(KeyEventLabels {
                    operation: static_of(
                        &event.operation,
                        &[
                            "init", "rotate", "retire", "unretire", "destroy", "reseal", "migrate",
                            "unlogged",
                        ],
                    ),
                    jurisdiction: self.jurisdiction(&event.jurisdiction),
                });
            }
            return tally;
        }
        if !DECIDING_KINDS.contains(&entry.kind.as_str()) {
            return tally;
        }
        // A key change or shred logs its decision, then what came of it (`failed: `,
        // `shredded: `) with the same decisions: those are counted once.
        if entry.kind == crate::audit::KEY_ADMIN_KIND
            && (entry.outcome.starts_with("failed: ") || entry.outcome.starts_with("shredded: "))
        {
            return tally;
        }
        let Some(action) = entry.action.as_deref().and_then(|name| {
            crate::policy::Action::ALL
                .iter()
                .find(|a| a.as_str() == name)
        }) else {
            return tally;
        };
        tally.action = action.as_str();
        if let Some(admin) = &entry.key_admin {
            for ring in &admin.key_rings {
                tally.rings.push((
                    self.jurisdiction(&ring.jurisdiction),
                    ring.decision == "allow",
                ));
            }
        } else if let Some(record) = &entry.record {
            tally.jurisdiction = Some(self.jurisdiction(&record.jurisdiction));
            for field in &entry.fields {
                match field.decision.as_str() {
                    "allow" => tally.allowed += 1,
                    _ => tally.denied += 1,
                }
            }
        }
        tally
    }

    /// Counts a tally whose entry is now durable in the decision log.
    pub fn logged(&self, tally: Tally) {
        if let Some(labels) = tally.key_event {
            self.key_events.get_or_create(&labels).inc();
        }
        let action = tally.action;
        let count = |jurisdiction: Label, allowed: bool, n: u64| {
            if n > 0 {
                self.decisions
                    .get_or_create(&DecisionLabels {
                        action,
                        decision: if allowed { "allow" } else { "deny" },
                        jurisdiction,
                    })
                    .inc_by(n);
            }
        };
        if let Some(jurisdiction) = tally.jurisdiction {
            count(jurisdiction.clone(), true, tally.allowed);
            count(jurisdiction, false, tally.denied);
        }
        for (jurisdiction, allowed) in tally.rings {
            count(jurisdiction, allowed, 1);
        }
    }

    /// The registry a scrape encodes: these metrics plus `state`, read at each scrape.
    pub fn registry(&self, state: State) -> Registry {
        let mut registry = Registry::default();
        registry.register_with_unit(
            "ringfence_rpc_duration",
            "gRPC calls of the Ringfence and KeyAdmin services by method and status code, and how long each took (a stream: its whole life)",
            Unit::Seconds,
            self.rpc.clone(),
        );
        registry.register(
            "ringfence_decisions",
            "Decisions durably logged, per field (per key ring for key administration), by action, decision and jurisdiction",
            self.decisions.clone(),
        );
        registry.register(
            "ringfence_key_events",
            "Changes to the keyring logged by this server, by operation and jurisdiction",
            self.key_events.clone(),
        );
        registry.register(
            "ringfence_authentication_failures",
            "Callers and connections refused, by reason (counted before the decision log's rate limit)",
            self.authentication_failures.clone(),
        );
        registry.register_with_unit(
            "ringfence_log_commit_duration",
            "Decision log commits (write and fsync of one batch)",
            Unit::Seconds,
            self.log.commit_seconds.clone(),
        );
        registry.register(
            "ringfence_log_batch_entries",
            "Entries per decision log commit (group commit)",
            self.log.batch_entries.clone(),
        );
        registry.register(
            "ringfence_log_write_failures",
            "Decision log writes or fsyncs that failed (each refuses requests until the log continues in a new segment)",
            self.log.write_failures.clone(),
        );
        registry.register(
            "ringfence_log_sealed_segments",
            "Decision log segments sealed after a failed write",
            self.log.sealed_segments.clone(),
        );
        registry.register_collector(Box::new(state));
        registry
    }
}

/// What one log entry decided, counted once the entry is durable.
#[derive(Debug, Default)]
pub struct Tally {
    action: &'static str,
    jurisdiction: Option<Label>,
    allowed: u64,
    denied: u64,
    rings: Vec<(Label, bool)>,
    key_event: Option<KeyEventLabels>,
}

/// `value` as the static string of `known` it equals, else `other`.
fn static_of(value: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .find(|candidate| **candidate == value)
        .copied()
        .unwrap_or(OTHER)
}

/// The conventional name of a gRPC status code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests;
