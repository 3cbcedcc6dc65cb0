//! Replays every fuzz corpus (`fuzz/corpus/<target>/`) and every crash input ever found
//! (`fuzz/artifacts/<target>/`) through the functions the fuzz targets call, so an
//! ordinary `cargo test` keeps each fixed crash fixed without building the fuzz
//! workspace. A target without a corpus fails: the replay cannot pass by finding nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../fuzz/src/lib.rs"]
mod one_input;

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|entry| entry.unwrap().path()).collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("{}: {error}", dir.display()),
    };
    files.retain(|path| path.is_file());
    files.sort();
    files
}

/// Runs every corpus and artifact input of `target`; fails naming each input that panics.
fn replay(target: &str, run: fn(&[u8])) {
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty: commit a seed corpus for the target"
    );
    let artifacts = files(&fuzz_dir().join("artifacts").join(target));
    let mut panicked = Vec::new();
    for path in corpus.iter().chain(&artifacts) {
        let data = std::fs::read(path).unwrap();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panicked.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(
        panicked.is_empty(),
        "{target}: {} of {} inputs panic:\n{}",
        panicked.len(),
        corpus.len() + artifacts.len(),
        panicked.join("\n")
    );
}

macro_rules! targets {
    ($($target:ident),* $(,)?) => {
        const TARGETS: &[&str] = &[$(stringify!($target)),*];
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), one_input::$target);
            }
        )*
    };
}

targets!(
    envelope,
    field_catalog,
    log_line,
    request,
    audit_segment,
    token,
    policy_suite,
);

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap()).unwrap();
    let bins: BTreeSet<&str> = manifest["bin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bin| bin["name"].as_str().unwrap())
        .collect();
    let replayed: BTreeSet<&str> = TARGETS.iter().copied().collect();
    assert_eq!(
        bins, replayed,
        "fuzz/Cargo.toml targets and the replayed targets differ"
    );
}
