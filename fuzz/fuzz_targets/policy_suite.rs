//! Any text as a policy test suite: a suite or a diagnostic, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::policy_suite(data));
