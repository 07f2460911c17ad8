//! Builds the eBPF programs (ebpf/) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs what this needs; the error below says so when it is missing.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let package = Package {
        name: "sluice-ebpf",
        root_dir: root,
        no_default_features: false,
        features: &[],
    };
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../common/src")
    );
    aya_build::build_ebpf([package], Toolchain::Nightly)
        .map_err(|e| anyhow!("{e:#}"))
        .context("building the eBPF programs failed; run `cargo xtask setup` to install the nightly rust-src component and bpf-linker 0.10.2")
}
