//! Objects (the input, read as a manifest file) -> desired state -> the service maps: see `sluice_fuzz::translate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::translate::check(data));
