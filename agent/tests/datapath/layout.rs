//! A pinned map left by another Sluice version whose layout differs (here: a `services` map
//! whose values are the 20 bytes they were before they carried copies of the first backends)
//! is refused at load with an error naming the map, not reused by programs that would read
//! past its values.

use std::{ffi::CString, os::fd::RawFd};

use sluice_common::MAX_SERVICES;

use crate::support::*;

/// Creates a hash map (key 8 bytes, value `value_size`) with bpf(BPF_MAP_CREATE) and pins it
/// at `path` (bpf(BPF_OBJ_PIN)).
fn pin_hash_map(path: &std::path::Path, value_size: u32, max_entries: u32) {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // BPF_MAP_TYPE_HASH
    attr[4..8].copy_from_slice(&8u32.to_ne_bytes()); // key_size
    attr[8..12].copy_from_slice(&value_size.to_ne_bytes());
    attr[12..16].copy_from_slice(&max_entries.to_ne_bytes());
    // SAFETY: bpf(BPF_MAP_CREATE) with an attr buffer valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), attr.len() as u32) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let fd = fd as RawFd;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes()); // pathname
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes()); // bpf_fd
                                                             // SAFETY: bpf(BPF_OBJ_PIN) with a NUL-terminated path and our own descriptor.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_mut_ptr(), attr.len() as u32) };
    let error = std::io::Error::last_os_error();
    // SAFETY: closing our own descriptor (the pin keeps the map).
    unsafe { libc::close(fd) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {error}", path.display());
}

#[test]
fn a_pinned_services_map_of_the_old_value_layout_is_refused_naming_it() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    std::fs::create_dir_all(&pin_path).unwrap();
    pin_hash_map(&pin_path.join("services"), 20, MAX_SERVICES);

    let error = match Datapath::load(&pin_path) {
        Ok(_) => panic!("a services map with 20-byte values was reused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("services"), "{error}");
    assert!(error.contains("sluice cleanup"), "{error}");

    // cleanup removes it, and the datapath then loads.
    Datapath::cleanup(&pin_path).expect("cleanup");
    let datapath = Datapath::load(&pin_path).expect("load after cleanup");
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
}
