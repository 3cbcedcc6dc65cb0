//! What a suite run found, per case and per suite, with coverage of the policies,
//! as text for people and JUnit XML for CI. May not decide.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::*;

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// Decisions checked (one per combination of the matrix and field).
    pub checks: usize,
    /// Why the case failed; empty when it passed.
    pub failures: Vec<String>,
    /// Failures beyond those listed.
    pub more_failures: usize,
}

impl CaseReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub(super) fn fail(&mut self, failure: String) {
        if self.failures.len() < FAILURES_SHOWN {
            self.failures.push(failure);
        } else {
            self.more_failures += 1;
        }
    }
}

/// The outcome of one suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    /// The suite's name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Cases that ran (those the filter selected), in file order.
    pub cases: Vec<CaseReport>,
}

/// Which policies determined at least one decision of the suites that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// Policy id → number of decisions it determined.
    pub covered: BTreeMap<String, usize>,
    /// Policies that determined no decision: nothing tests them.
    pub uncovered: Vec<String>,
}

impl Coverage {
    /// Share of policies covered, in percent (100 for an empty set).
    pub fn percent(&self) -> f64 {
        let total = self.covered.len() + self.uncovered.len();
        if total == 0 {
            100.0
        } else {
            self.covered.len() as f64 * 100.0 / total as f64
        }
    }
}

/// Everything a run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Hash of the policy set the suites ran against.
    pub policy_set: String,
    /// Per suite, in name order.
    pub suites: Vec<SuiteReport>,
    /// Policy coverage.
    pub coverage: Coverage,
}

impl Report {
    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.cases().filter(|case| case.passed()).count()
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases().filter(|case| !case.passed()).count()
    }

    /// Decisions checked.
    pub fn checks(&self) -> usize {
        self.cases().map(|case| case.checks).sum()
    }

    pub(super) fn cases(&self) -> impl Iterator<Item = &CaseReport> {
        self.suites.iter().flat_map(|suite| suite.cases.iter())
    }

    /// The summary line: `N passed, N failed`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed ({} decisions checked)",
            self.passed(),
            self.failed(),
            self.checks()
        )
    }

    /// Human-readable output: every case, the failures in full, the summary and coverage.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for suite in &self.suites {
            let _ = writeln!(out, "{} ({})", suite.name, suite.path.display());
            for case in &suite.cases {
                let mark = if case.passed() { "PASS" } else { "FAIL" };
                let _ = writeln!(
                    out,
                    "  {mark} {} [{} check{}]",
                    case.name,
                    case.checks,
                    if case.checks == 1 { "" } else { "s" }
                );
                for failure in &case.failures {
                    let _ = writeln!(out, "       - {failure}");
                }
                if case.more_failures > 0 {
                    let _ = writeln!(out, "       - ... and {} more", case.more_failures);
                }
            }
        }
        let _ = writeln!(out, "\n{}", self.summary());
        let total = self.coverage.covered.len() + self.coverage.uncovered.len();
        let _ = writeln!(
            out,
            "policy coverage: {:.1}% ({} of {total} policies determined at least one decision)",
            self.coverage.percent(),
            self.coverage.covered.len()
        );
        for id in &self.coverage.uncovered {
            let _ = writeln!(out, "  never determined a decision: {id}");
        }
        out
    }

    /// Machine-readable output.
    pub fn json(&self) -> Value {
        json!({
            "policy_set": self.policy_set,
            "passed": self.passed(),
            "failed": self.failed(),
            "checks": self.checks(),
            "suites": self.suites.iter().map(|suite| json!({
                "name": suite.name,
                "path": suite.path.display().to_string(),
                "cases": suite.cases.iter().map(|case| json!({
                    "name": case.name,
                    "passed": case.passed(),
                    "checks": case.checks,
                    "failures": case.failures,
                    "more_failures": case.more_failures,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "coverage": {
                "percent": self.coverage.percent(),
                "covered": self.coverage.covered,
                "uncovered": self.coverage.uncovered,
            },
        })
    }

    /// JUnit XML, as CI systems read it: one `testsuite` per suite file, one `testcase`
    /// per case; coverage as properties, and as a failing `coverage` case when below
    /// `min_coverage`.
    pub fn junit(&self, min_coverage: Option<f64>) -> String {
        let coverage_failed = min_coverage.is_some_and(|min| self.coverage.percent() < min);
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"ringfence policy tests\" tests=\"{}\" failures=\"{}\">",
            self.passed() + self.failed() + usize::from(min_coverage.is_some()),
            self.failed() + usize::from(coverage_failed)
        );
        for suite in &self.suites {
            let failures = suite.cases.iter().filter(|case| !case.passed()).count();
            let _ = writeln!(
                out,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" file=\"{}\">",
                xml(&suite.name),
                suite.cases.len(),
                xml(&suite.path.display().to_string())
            );
            for case in &suite.cases {
                let _ = write!(
                    out,
                    "    <testcase name=\"{}\" classname=\"{}\" assertions=\"{}\"",
                    xml(&case.name),
                    xml(&suite.name),
                    case.checks
                );
                if case.passed() {
                    out.push_str("/>\n");
                } else {
                    let mut text = case.failures.join("\n");
                    if case.more_failures > 0 {
                        let _ = write!(text, "\n... and {} more", case.more_failures);
                    }
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml(case
                            .failures
                            .first()
                            .map(String::as_str)
                            .unwrap_or_default()),
                        xml(&text)
                    );
                }
            }
            out.push_str("  </testsuite>\n");
        }
        let _ = writeln!(
            out,
            "  <testsuite name=\"policy-coverage\" tests=\"{}\" failures=\"{}\">",
            usize::from(min_coverage.is_some()),
            usize::from(coverage_failed)
        );
        out.push_str("    <properties>\n");
        let _ = writeln!(
            out,
            "      <property name=\"policy_set\" value=\"{}\"/>",
            xml(&self.policy_set)
        );
        let _ = writeln!(
            out,
            "      <property name=\"coverage_percent\" value=\"{:.1}\"/>",
            self.coverage.percent()
        );
        for id in &self.coverage.uncovered {
            let _ = writeln!(
                out,
                "      <property name=\"uncovered_policy\" value=\"{}\"/>",
                xml(id)
            );
        }
        out.push_str("    </properties>\n");
        if let Some(min) = min_coverage {
            let _ = write!(
                out,
                "    <testcase name=\"coverage at least {min}%\" classname=\"policy-coverage\""
            );
            if coverage_failed {
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"coverage {:.1}% is below {min}%\">never determined a decision: {}</failure>\n    </testcase>",
                    self.coverage.percent(),
                    xml(&self.coverage.uncovered.join(", "))
                );
            } else {
                out.push_str("/>\n");
            }
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 forbids.
pub(in crate::policy) fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

pub(super) fn describe(decision: &FieldDecision) -> String {
    let verdict = if decision.allowed { "allow" } else { "deny" };
    if !decision.errors.is_empty() {
        format!(
            "{verdict} (evaluation error: {})",
            decision.errors.join("; ")
        )
    } else if decision.policies.is_empty() {
        format!("{verdict} (no policy applies: default deny)")
    } else {
        format!("{verdict} (determined by {})", decision.policies.join(", "))
    }
}
