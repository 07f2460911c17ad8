//! Manifest bytes -> objects (`manifests::parse_file`): see `sluice_fuzz::manifests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::manifests::check(data));
