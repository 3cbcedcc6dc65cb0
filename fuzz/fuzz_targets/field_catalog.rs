//! Any text as `policies/fields.toml`: a catalog or a diagnostic, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::field_catalog(data));
