//! Proof reports for people (human), programs (JSON) and CI systems (JUnit XML). May
//! not run the solver.

use serde_json::{Value, json};

use super::super::suite::xml;
use super::{Outcome, ProofReport};

fn ms(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

impl ProofReport {
    /// For a terminal: one line per invariant, counterexamples in full.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for proof in &self.invariants {
            let took = ms(proof.took);
            match &proof.outcome {
                Outcome::Proved if proof.environments == 0 => out.push_str(&format!(
                    "proved    {} (the schema admits no such request)\n",
                    proof.id
                )),
                Outcome::Proved => out.push_str(&format!(
                    "proved    {} ({} environments, {took} ms)\n",
                    proof.id, proof.environments
                )),
                Outcome::Violated(counterexample) => {
                    out.push_str(&format!("VIOLATED  {} ({took} ms)\n", proof.id));
                    out.push_str(&format!("  {}\n", proof.description));
                    out.push_str(&format!(
                        "  in {}: {}\n",
                        counterexample.environment, counterexample.summary
                    ));
                    match &counterexample.replay {
                        Ok(()) => out.push_str(
                            "  replayed through the authorizer: the case below fails, as the invariant is broken\n",
                        ),
                        Err(why) => out.push_str(&format!("  not reproduced by the authorizer: {why}\n")),
                    }
                    for line in counterexample.suite.lines() {
                        out.push_str(&format!("    {line}\n"));
                    }
                }
                Outcome::Unproven(why) => {
                    out.push_str(&format!("UNPROVEN  {} ({took} ms): {why}\n", proof.id))
                }
            }
        }
        out.push_str(&format!(
            "{}: {} invariants of policy set {} in {} ms\n",
            self.verdict().as_str(),
            self.invariants.len(),
            self.policy_set,
            ms(self.took)
        ));
        out
    }

    /// One JSON document.
    pub fn json(&self) -> Value {
        json!({
            "policy_set": self.policy_set,
            "at": self.at,
            "verdict": self.verdict().as_str(),
            "took_ms": ms(self.took),
            "invariants": self.invariants.iter().map(|proof| {
                let mut entry = serde_json::Map::new();
                entry.insert("id".into(), json!(proof.id));
                entry.insert("description".into(), json!(proof.description));
                entry.insert("hash".into(), json!(proof.hash));
                entry.insert("environments".into(), json!(proof.environments));
                entry.insert("took_ms".into(), json!(ms(proof.took)));
                match &proof.outcome {
                    Outcome::Proved => {
                        entry.insert("outcome".into(), json!("proved"));
                    }
                    Outcome::Violated(counterexample) => {
                        entry.insert("outcome".into(), json!("violated"));
                        entry.insert("counterexample".into(), json!({
                            "environment": counterexample.environment,
                            "summary": counterexample.summary,
                            "suite": counterexample.suite,
                            "replayed": counterexample.replay.is_ok(),
                            "replay_problem": counterexample.replay.as_ref().err(),
                            "erring_policy": counterexample.erring_policy,
                        }));
                    }
                    Outcome::Unproven(why) => {
                        entry.insert("outcome".into(), json!("unproven"));
                        entry.insert("reason".into(), json!(why));
                    }
                }
                Value::Object(entry)
            }).collect::<Vec<_>>(),
            "facts": self.facts.iter().map(|(environment, facts)| json!({
                "environment": environment,
                "facts": facts.iter().map(|fact| json!({"says": fact.says, "cedar": fact.cedar})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// JUnit XML: one test case per invariant.
    pub fn junit(&self) -> String {
        let failures = self
            .invariants
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Violated(_)))
            .count();
        let errors = self
            .invariants
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Unproven(_)))
            .count();
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"invariants\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">\n",
            self.invariants.len(),
            self.took.as_secs_f64()
        );
        for proof in &self.invariants {
            out.push_str(&format!(
                "<testcase classname=\"invariants\" name=\"{}\" time=\"{:.3}\">",
                xml(&proof.id),
                proof.took.as_secs_f64()
            ));
            match &proof.outcome {
                Outcome::Proved => {}
                Outcome::Violated(counterexample) => out.push_str(&format!(
                    "<failure message=\"{}\">{}</failure>",
                    xml(&counterexample.summary),
                    xml(&counterexample.suite)
                )),
                Outcome::Unproven(why) => {
                    out.push_str(&format!("<error message=\"{}\"/>", xml(why)))
                }
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("</testsuite>\n</testsuites>\n");
        out
    }
}
