//! Any bytes as decision log segments: `audit verify` must answer, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::audit_segment(data));
