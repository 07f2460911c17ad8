//! Project tasks: `cargo xtask setup | test | demo | lint | bench | kernels | fuzz`.
//!
//! `setup` installs what a fresh machine lacks and is quick when nothing is missing; `test` and
//! `demo` run it first, so a newcomer needs only those two commands. This binary never links
//! the agent: `demo` and `bench` build and run `sluice-lab` (xtask/lab/) after setup.

use std::process::Command;

use anyhow::bail;
use clap::{Parser, Subcommand};
use xtask::{fuzz, image, is_root, kernels, run, setup::setup, workspace_root};

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
    /// Run the whole test suite (unit, BPF_PROG_RUN and network-namespace tests), then each fuzz
    /// target for a minute (`fuzz`) and the kernel matrix (`kernels`). Needs root. Extra
    /// arguments go to `cargo test` and skip the fuzz targets and the kernel matrix.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The kernel matrix: boot Linux 5.10, 6.1 and 6.12 (Debian's cloud kernels) in QEMU and
    /// run the datapath tests, the trace corpus and a real-traffic test in each. Needs root.
    Kernels {
        /// Which kernels (default: all), e.g. `--kernels 5.10,6.1`.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
    /// Build the cargo-fuzz targets (fuzz/) and run each for a bounded time: manifests,
    /// translate, policy, trace_spec (default: all). Fails naming the saved input when one
    /// crashes.
    Fuzz {
        /// Which targets (default: all).
        targets: Vec<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = fuzz::SUITE_SECONDS)]
        seconds: u64,
        /// Start from the seeds alone, as the test suite does, instead of the corpus earlier
        /// runs kept in fuzz/corpus.
        #[arg(long)]
        fresh: bool,
    },
    /// Build the agent as the Dockerfile does (static, musl) and run it in an empty root with
    /// only what the image's last stage copies. Needs root (chroot).
    Image,
    /// Build Sluice and run the e-commerce platform's Services in a network-namespace node.
    Demo,
    /// rustfmt check, clippy for the workspace and the fuzz targets, and clippy for the eBPF
    /// crate on its own target.
    Lint,
    /// Sluice against kube-proxy's iptables and nftables layouts: per-packet cost, real traffic,
    /// control plane; writes target/bench/report.md and plots. Quick by default, `--full` for
    /// the sizes (`cargo xtask bench --help` lists the options). Needs root.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup(),
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
        Task::Kernels { kernels } => {
            setup()?;
            require_root("the kernel matrix")?;
            kernels::run_matrix(&kernels)
        }
        Task::Fuzz {
            targets,
            seconds,
            fresh,
        } => {
            setup()?;
            let corpus = if fresh {
                fuzz::Corpus::Fresh
            } else {
                fuzz::Corpus::Kept
            };
            fuzz::run_targets(&targets, seconds, corpus)
        }
        Task::Image => {
            setup()?;
            require_root("the image check")?;
            image::check()
        }
        Task::Demo => {
            setup()?;
            lab(&["demo".to_string()])
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Bench { args } => {
            setup()?;
            lab(&[vec!["bench".to_string()], args].concat())
        }
    }
}

/// Builds and runs `sluice-lab` (the demo and the bench), which links the agent and so could
/// not be built before setup.
fn lab(args: &[String]) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .args(["run", "--quiet", "-p", "sluice-lab", "--"])
        .args(args))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    require_root("the test suite")?;
    run(Command::new("cargo")
        .current_dir(workspace_root())
        // The default members: the eBPF crate only builds for its own target (agent/build.rs).
        .arg("test")
        .args(extra))?;
    if extra.is_empty() {
        // The whole suite: a short run of every fuzz target, the image's binary alone in its
        // root, and the datapath on the kernels users run too.
        let seconds = match std::env::var("SLUICE_FUZZ_SECONDS") {
            Ok(s) => s.parse().map_err(|_| {
                anyhow::anyhow!("SLUICE_FUZZ_SECONDS={s:?} is not a number of seconds")
            })?,
            Err(_) => fuzz::SUITE_SECONDS,
        };
        fuzz::run_targets(&[], seconds, fuzz::Corpus::Fresh)?;
        image::check()?;
        kernels::run_matrix(&[])?;
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} creates network namespaces and loads BPF programs: run it as root");
    }
    Ok(())
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
    // The fuzz targets, a workspace of their own, in the workspace's target directory (their
    // dependencies are the agent's, already checked there).
    let fuzz = root.join("fuzz");
    run(Command::new("cargo")
        .current_dir(&fuzz)
        .args(["fmt", "--", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(&fuzz)
        .env("CARGO_TARGET_DIR", root.join("target"))
        .args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
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
