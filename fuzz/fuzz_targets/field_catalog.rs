//! Any text as `policies/fields.toml`: a catalog or a diagnostic, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = ringfence::policy::FieldCatalog::parse(text);
});
