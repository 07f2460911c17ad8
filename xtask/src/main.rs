//! Project tasks: `cargo xtask setup | test | demo | lint | bench`.
//!
//! `setup` installs what a fresh machine lacks and is quick when nothing is missing; `test` and
//! `demo` run it first, so a newcomer needs only those two commands.

mod bench;
mod demo;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages the build and tests need.
    Setup,
    /// Run the whole test suite (unit, BPF_PROG_RUN and network-namespace tests). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build Sluice and run the e-commerce platform's Services in a network-namespace node.
    Demo,
    /// rustfmt check, clippy for the workspace, and clippy for the eBPF crate on its own target.
    Lint,
    /// Sluice against kube-proxy's iptables and nftables layouts: per-packet cost, real traffic,
    /// control plane; writes target/bench/report.md and plots. Quick by default, `--full` for
    /// the sizes. Needs root.
    Bench(Box<bench::BenchArgs>),
}

/// The bpf-linker release that links rustc's own LLVM 22 (newer ones need a system LLVM).
const BPF_LINKER_VERSION: &str = "0.10.2";
const NIGHTLY_LLVM_MAJOR: u32 = 22;
/// Debian packages the tests, demo and bench use, by the command (or, starting with `/`, the
/// file) that proves each is there.
const PACKAGES: &[(&str, &str)] = &[
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
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup(),
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
        Task::Demo => {
            setup()?;
            demo::run(&workspace_root())
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Bench(args) => {
            setup()?;
            bench::run(&workspace_root(), &args)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn setup() -> anyhow::Result<()> {
    // The nightly toolchain is part of the machine image; rustup cannot fetch a new one here,
    // and `rustup update` must never run (it would replace the toolchains the project pins to).
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!("no nightly toolchain: the eBPF programs need one (`rustup toolchain install nightly`), with LLVM {NIGHTLY_LLVM_MAJOR}");
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
        ]))?;
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
        ]))?;
    }

    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing packages {missing:?}: run `apt-get install -y {}` as root",
                missing.join(" ")
            );
        }
        eprintln!("setup: installing {missing:?}");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the test suite creates network namespaces and loads BPF programs: run it as root");
    }
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        // The default members: the eBPF crate only builds for its own target (agent/build.rs).
        .arg("test")
        .args(extra))
}

fn lint() -> anyhow::Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate is linted for the target it is built for.
    run(Command::new("cargo")
        .current_dir(root.join("ebpf"))
        .args([
            "+nightly",
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--", "-D", "warnings"]))
}

fn has_command(name: &str) -> bool {
    if name.starts_with('/') {
        return std::path::Path::new(name).is_file();
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|dir| dir.join(name).is_file())
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
