//! Any text as an employee token: refused or accepted, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::token(data));
