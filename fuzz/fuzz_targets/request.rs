//! Any bytes as a request message: decoding and the service's checks answer, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfence_fuzz::request(data));
