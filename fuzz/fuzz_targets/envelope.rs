//! Any bytes given as a ciphertext: parsing must answer, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::envelope(data));
