//! `sluice trace`'s packet spec parser: see `sluice_fuzz::trace_spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::trace_spec::check(data));
