//! Any text as a decision log line: `audit verify` must answer, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::log_line(data));
