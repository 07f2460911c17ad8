//! `cargo xtask setup`: installs what a fresh machine lacks, and is quick when nothing is
//! missing. Each failure names the missing piece and the command that installs it.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::{has_command, is_root, output, run};

/// The bpf-linker release that links rustc's own LLVM 22 (newer ones need a system LLVM).
pub const BPF_LINKER_VERSION: &str = "0.10.2";
pub const NIGHTLY_LLVM_MAJOR: u32 = 22;
/// Debian packages the tests, demo and bench use, by the command (or, starting with `/`, the
/// file) that proves each is there.
pub const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    // The bench's plots draw their text with it.
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
    // The kernel matrix (kernels.rs): QEMU boots each kernel with an initramfs whose shell
    // and tools are busybox's; dpkg-deb unpacks the kernels' packages.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("dpkg-deb", "dpkg"),
    // The image's static agent (`cargo xtask image`, the Dockerfile): ring's C for musl.
    ("musl-gcc", "musl-tools"),
];

/// The target the image's agent is built for (static: the image has nothing else).
pub const IMAGE_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn setup() -> anyhow::Result<()> {
    ebpf_toolchain()?;
    cargo_fuzz()?;
    packages()
}

/// cargo-fuzz, which builds and runs the fuzz targets (`cargo xtask fuzz`, fuzz/).
fn cargo_fuzz() -> anyhow::Result<()> {
    use crate::fuzz::CARGO_FUZZ_VERSION;
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
        "--force",
    ]))
    .with_context(|| {
        format!(
            "cargo-fuzz {CARGO_FUZZ_VERSION} (it builds and runs the fuzz targets) could not be \
             installed; install it with `cargo install cargo-fuzz@{CARGO_FUZZ_VERSION} --locked` \
             (it needs crates.io)"
        )
    })
}

/// The nightly's rust-src and bpf-linker, which agent/build.rs needs to build ebpf/.
fn ebpf_toolchain() -> anyhow::Result<()> {
    // The nightly toolchain is part of the machine image; `rustup update` must never run (it
    // would replace the toolchains the project pins to).
    let toolchains = output("rustup", &["toolchain", "list"])
        .context("rustup is needed to find the nightly toolchain (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!("no nightly toolchain: the eBPF programs need one built on LLVM {NIGHTLY_LLVM_MAJOR} \
               (e.g. `rustup toolchain install nightly-2026-05-19`, then make it the `nightly` the build uses)");
    }
    let version = output("rustc", &["+nightly", "-vV"])?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if llvm_major != Some(NIGHTLY_LLVM_MAJOR) {
        bail!(
            "the nightly toolchain uses LLVM {llvm_major:?}, but bpf-linker {BPF_LINKER_VERSION} links LLVM {NIGHTLY_LLVM_MAJOR}: \
             install a nightly built on LLVM {NIGHTLY_LLVM_MAJOR} (e.g. `rustup toolchain install nightly-2026-05-19`) \
             and make it the `nightly` the build uses; do not run `rustup update`"
        );
    }

    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context(
            "the nightly toolchain's rust-src component (the eBPF build compiles core from it) \
             could not be installed; install it with `rustup component add rust-src --toolchain nightly`",
        )?;
    }

    let targets = output("rustup", &["target", "list", "--installed"])?;
    if !targets.lines().any(|l| l.trim() == IMAGE_TARGET) {
        eprintln!("setup: adding the {IMAGE_TARGET} target (the image's static agent)");
        run(Command::new("rustup").args(["target", "add", IMAGE_TARGET])).with_context(|| {
            format!(
                "the {IMAGE_TARGET} standard library (for the container image's static agent) \
                     could not be installed; install it with `rustup target add {IMAGE_TARGET}`"
            )
        })?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION}");
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))
        .with_context(|| {
            format!(
                "bpf-linker {BPF_LINKER_VERSION} (it links the eBPF programs with the nightly's LLVM \
                 {NIGHTLY_LLVM_MAJOR}) could not be installed; install it with \
                 `cargo install bpf-linker@{BPF_LINKER_VERSION} --locked` (it needs crates.io)"
            )
        })?;
    }
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("missing packages {missing:?}: run `{install}` as root");
    }
    eprintln!("setup: installing {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))
        .and_then(|()| {
            run(Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        })
        .with_context(|| {
            format!("the Debian packages {missing:?} could not be installed; install them with `{install}`")
        })
}
