//! Any text as a decision log line: `audit verify` must answer, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|line: &str| {
    let _ = ringfence::audit::split_line(line);
});
