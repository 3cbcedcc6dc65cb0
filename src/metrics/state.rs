//! The metrics read from the running server at each scrape: the policy set, reloads
//! and proofs, key versions, log health and slots in use. May not change anything it
//! reads.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Gauges of the moment, read at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slots {
    /// `Ringfence` calls in progress (of [`crate::service::UNARY_IN_PROGRESS`]).
    pub unary_calls: usize,
    /// `KeyAdmin` calls in progress.
    pub key_admin_calls: usize,
    /// Bulk streams open.
    pub streams: usize,
    /// Streamed records being decided and decrypted.
    pub stream_records: usize,
    /// TLS connections waiting for their handshake.
    pub handshakes: usize,
}

/// What a scrape reads from the running server.
pub struct State {
    /// The gatekeeper: policy store, keyring, decision log.
    pub gate: Arc<crate::gatekeeper::Gatekeeper>,
    /// Slots in use now.
    pub slots: Box<dyn Fn() -> Slots + Send + Sync>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicySetLabels {
    hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProofLabels {
    verdict: &'static str,
    refused: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyStateLabels {
    jurisdiction: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JurisdictionLabels {
    jurisdiction: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SlotLabels {
    slot: &'static str,
}

/// One gauge or counter with its label sets.
fn encode_labelled<S: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(S, M)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = values.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, value) in values {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.gate.policies().status();
        encode_labelled(
            &mut encoder,
            "ringfence_policy_set",
            "The policy set deciding requests (1), by hash",
            None,
            &[(
                PolicySetLabels {
                    hash: status.policy_set.clone(),
                },
                ConstGauge::new(1i64),
            )],
        )?;
        if let Some(proof) = self.gate.policies().last_proof() {
            encode_labelled(
                &mut encoder,
                "ringfence_policy_last_proof",
                "The latest proof of a policy set's invariants (at start or on a reload; 1), by verdict and whether it refused the set",
                None,
                &[(
                    ProofLabels {
                        verdict: proof.verdict,
                        refused: if proof.refused { "true" } else { "false" },
                    },
                    ConstGauge::new(1i64),
                )],
            )?;
        }
        let failed_otherwise = status
            .reloads_failed
            .saturating_sub(status.reloads_refused_by_proof);
        encode_labelled(
            &mut encoder,
            "ringfence_policy_reloads",
            "Policy reloads by result: succeeded, failed (did not validate), refused_by_proof",
            None,
            &[
                (
                    ResultLabels {
                        result: "succeeded",
                    },
                    ConstCounter::new(status.reloads_succeeded),
                ),
                (
                    ResultLabels { result: "failed" },
                    ConstCounter::new(failed_otherwise),
                ),
                (
                    ResultLabels {
                        result: "refused_by_proof",
                    },
                    ConstCounter::new(status.reloads_refused_by_proof),
                ),
            ],
        )?;

        let keyring = self.gate.keyring().load();
        let summary = keyring.summary();
        let current: Vec<_> = summary
            .iter()
            .map(|info| {
                (
                    JurisdictionLabels {
                        jurisdiction: info.jurisdiction.clone(),
                    },
                    ConstGauge::new(i64::from(info.current)),
                )
            })
            .collect();
        encode_labelled(
            &mut encoder,
            "ringfence_key_current_version",
            "The root key version new encryptions use, by jurisdiction",
            None,
            &current,
        )?;
        let mut versions = Vec::new();
        for info in &summary {
            for state in crate::keys::VersionState::ALL {
                let count = info
                    .versions
                    .iter()
                    .filter(|version| version.state == state)
                    .count();
                versions.push((
                    KeyStateLabels {
                        jurisdiction: info.jurisdiction.clone(),
                        state: state.as_str(),
                    },
                    ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX)),
                ));
            }
        }
        encode_labelled(
            &mut encoder,
            "ringfence_key_versions",
            "Root key versions held, by jurisdiction and state",
            None,
            &versions,
        )?;

        let log = self.gate.log();
        let healthy = ConstGauge::new(i64::from(log.is_healthy()));
        healthy.encode(encoder.encode_descriptor(
            "ringfence_log_healthy",
            "Whether the decision log accepts appends (0: requests are refused with UNAVAILABLE)",
            None,
            healthy.metric_type(),
        )?)?;

        let slots = (self.slots)();
        let in_use = |slot: &'static str, value: usize| {
            (
                SlotLabels { slot },
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)),
            )
        };
        encode_labelled(
            &mut encoder,
            "ringfence_slots_in_use",
            "Bounded resources in use now: unary_calls (of 1024), key_admin_calls (of 16), streams, stream_records (of 128), handshakes (of 256)",
            None,
            &[
                in_use("unary_calls", slots.unary_calls),
                in_use("key_admin_calls", slots.key_admin_calls),
                in_use("streams", slots.streams),
                in_use("stream_records", slots.stream_records),
                in_use("handshakes", slots.handshakes),
            ],
        )
    }
}
