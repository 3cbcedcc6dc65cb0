//! The independent Python implementations of the envelope and of the key hierarchy
//! (`docs/reference_envelope.py`, `docs/reference_keys.py`, written from
//! `docs/crypto.md` alone) reproduce the known-answer vectors that the Rust
//! implementation is pinned to (`tests/data/envelope_kat.json`,
//! `tests/data/key_hierarchy_kat.json`): two implementations, one specification.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/system_tools.rs"]
mod system_tools;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// What `script` prints, parsed, next to the vector it must reproduce.
fn run_reference(script: &str, vector: &str) -> Option<(Value, Value)> {
    run_reference_with(script, &[], vector)
}

fn run_reference_with(script: &str, args: &[&str], vector: &str) -> Option<(Value, Value)> {
    let python = system_tools::python_with_cryptography()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(&python)
        .arg(root.join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {script} failed ({}): {}",
        python.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the reference printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let pinned: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(vector)).unwrap()).unwrap();
    assert_eq!(
        printed, pinned,
        "{script} disagrees with the known-answer vector {vector}"
    );
    Some((printed, pinned))
}

#[test]
fn python_reference_implementation_reproduces_the_known_answer_vector() {
    let Some((printed, pinned)) =
        run_reference("docs/reference_envelope.py", "tests/data/envelope_kat.json")
    else {
        return;
    };

    // The envelope itself, byte for byte.
    let envelope = |vector: &Value| hex::decode(vector["envelope"].as_str().unwrap()).unwrap();
    assert_eq!(envelope(&printed), envelope(&pinned));
    assert!(!envelope(&pinned).is_empty());
}

#[test]
fn python_reference_key_hierarchy_reproduces_its_known_answer_vector() {
    let Some((printed, _)) = run_reference(
        "docs/reference_keys.py",
        "tests/data/key_hierarchy_kat.json",
    ) else {
        return;
    };
    // The sealed root key, byte for byte (nonce || ciphertext || tag).
    assert_eq!(printed["sealed_root_key"].as_str().unwrap().len(), 120);
}

#[test]
fn python_reference_implementation_reproduces_the_format_2_known_answer_vector() {
    let Some((printed, _)) = run_reference_with(
        "docs/reference_envelope.py",
        &["v2"],
        "tests/data/envelope_v2_kat.json",
    ) else {
        return;
    };
    // Format 2: the header names the key id and the subject.
    let envelope = hex::decode(printed["envelope"].as_str().unwrap()).unwrap();
    assert_eq!(envelope.get(2), Some(&2));
}
