//! What proofs cost: proves the shipped policy set and the shipped set plus N generated
//! policies (default 200: team permits per jurisdiction with purposes and tickets,
//! location and role forbids, service encrypt permits), and measures what the proof
//! guard adds to a policy reload. Each figure is the median of RUNS (default 5). Needs
//! cvc5 (`$CVC5` or on PATH). Run:
//!
//!     cargo run --release --example prove_scale -- [POLICIES] [RUNS]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringfence::policy::prove::{ProveOptions, Verdict, prove_blocking};
use ringfence::policy::{PolicySnapshot, PolicyStore, ProofGuard, ProofMode, Trigger};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

/// `count` policies in the shape of the shipped ones.
fn generated(count: usize) -> String {
    let jurisdictions = ["US", "SG", "EU"];
    let classes = ["pii", "sensitive", "restricted"];
    let mut out = String::new();
    for i in 0..count {
        let j = jurisdictions[i % 3];
        let class = classes[i % 3];
        let text = match i % 4 {
            0 | 1 => format!(
                "@id(\"gen-{i}-team-reads\")\npermit (principal in Team::\"gen-team-{i}\", action == Action::\"decrypt\", resource in Jurisdiction::\"{j}\")\nwhen {{ resource.classification == \"{class}\" && context.purpose == \"purpose-{i}\" && context.ticket != \"\" && principal.roles.contains(\"role-{i}\") }};\n\n"
            ),
            2 => format!(
                "@id(\"gen-{i}-location-forbid\")\nforbid (principal is Employee, action == Action::\"decrypt\", resource in Jurisdiction::\"{j}\")\nwhen {{ principal.location == \"X{i}\" && resource.classification != \"public\" }};\n\n"
            ),
            _ => format!(
                "@id(\"gen-{i}-service-writes\")\npermit (principal == Service::\"gen-service-{i}\", action == Action::\"encrypt\", resource)\nwhen {{ resource.jurisdiction == principal.jurisdiction && resource.record_type == \"user_profile\" }};\n\n"
            ),
        };
        out.push_str(&text);
    }
    out
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(200);
    let runs: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(5);
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let options = ProveOptions::default();
    let work = tempfile::tempdir().unwrap();
    let large = work.path().join("large");
    copy_dir(&shipped, &large);
    std::fs::write(large.join("generated.cedar"), generated(count)).unwrap();

    for (name, dir) in [
        ("shipped", shipped.clone()),
        ("shipped + generated", large.clone()),
    ] {
        let mut loads = Vec::new();
        let mut proofs = Vec::new();
        let mut last = None;
        for _ in 0..runs {
            let started = Instant::now();
            let snapshot = PolicySnapshot::load(&dir).unwrap();
            loads.push(started.elapsed());
            let started = Instant::now();
            let report = prove_blocking(&snapshot, &options);
            proofs.push(started.elapsed());
            assert_eq!(report.verdict(), Verdict::Proved, "{}", report.human());
            last = Some((snapshot.len(), report));
        }
        let (policies, report) = last.unwrap();
        println!(
            "{name}: {policies} policies, {} invariants: load {}, prove {} (median of {runs})",
            report.invariants.len(),
            ms(median(loads)),
            ms(median(proofs))
        );
        for proof in &report.invariants {
            println!(
                "  {:<50} {:>3} environments {:>8}",
                proof.id,
                proof.environments,
                ms(proof.took)
            );
        }
    }

    // A reload: a comment appended to a policy file, with the guard off and enforcing (a new set each
    // time, so the proof cache never answers).
    for mode in [ProofMode::Off, ProofMode::Enforce] {
        let dir = work.path().join(format!("reload-{}", mode.as_str()));
        copy_dir(&shipped, &dir);
        let archive = work.path().join(format!("archive-{}", mode.as_str()));
        let store = PolicyStore::load_guarded(
            &dir,
            ProofGuard {
                mode,
                options: options.clone(),
            },
            &archive,
        )
        .unwrap();
        let mut took = Vec::new();
        for run in 0..runs {
            let path = dir.join("company-wide.cedar");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, format!("{text}\n// edit {run}\n")).unwrap();
            let started = Instant::now();
            store.reload(Trigger::Hangup).unwrap();
            took.push(started.elapsed());
        }
        println!(
            "reload of the shipped set, proof guard {}: {} (median of {runs})",
            mode.as_str(),
            ms(median(took))
        );
    }
}
