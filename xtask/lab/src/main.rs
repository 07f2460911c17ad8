//! `sluice-lab demo | bench`: the parts of `cargo xtask` that link the agent (and so need the
//! eBPF toolchain to compile). xtask runs its setup first and then this binary, so a fresh
//! machine can build xtask before anything is installed (issue #12).

mod bench;
mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-lab")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The e-commerce platform's Services and NetworkPolicies on a two-node netns cluster.
    Demo,
    /// Sluice against kube-proxy's iptables and nftables layouts.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> anyhow::Result<()> {
    let root = xtask::workspace_root();
    match Cli::parse().task {
        Task::Demo => demo::run(&root),
        Task::Bench(args) => bench::run(&root, &args),
    }
}
