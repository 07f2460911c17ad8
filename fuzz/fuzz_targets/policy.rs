//! Objects (the input, read as a manifest file) -> NetworkPolicy resolved, compiled and in the maps' form, against the rule scan: see `sluice_fuzz::policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::policy::check(data));
