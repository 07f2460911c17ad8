//! `cargo xtask bench`: Sluice against kube-proxy's iptables and nftables layouts (issue #7).
//!
//! Parts, each runnable alone (`--parts`): `packet` (BPF_PROG_RUN cost per packet,
//! prog_run.rs), `traffic` (real TCP through a ClusterIP in the netns testbed, traffic.rs),
//! `control` (iptables-restore / nft -f under a time budget; agent start, RSS and
//! EndpointSlice change latency with the objects in a manifests directory and in the test
//! API server, side by side; control.rs). The expected duration is printed first
//! (estimate.rs). The report and plots go to target/bench/ (report.rs, plot.rs).

mod control;
mod estimate;
mod plot;
mod prog_run;
mod report;
pub mod rules;
mod stats;
#[cfg(test)]
mod tests;
mod traffic;

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    Packet,
    Traffic,
    Control,
}

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// The sizes: 10..100,000 services per packet, 100..10,000 for traffic,
    /// 1,000..100,000 for the control plane; longer runs.
    #[arg(long)]
    full: bool,
    /// Which parts to run (default: all).
    #[arg(long, value_delimiter = ',')]
    parts: Vec<Part>,
    /// Numbers of services for the per-packet part (comma-separated).
    #[arg(long, value_delimiter = ',')]
    packet_services: Vec<usize>,
    /// Numbers of services for the traffic part.
    #[arg(long, value_delimiter = ',')]
    traffic_services: Vec<usize>,
    /// Numbers of services (x 10 endpoints) for the control-plane part.
    #[arg(long, value_delimiter = ',')]
    control_services: Vec<usize>,
    /// Packets (distinct keys) per per-packet case.
    #[arg(long)]
    packets: Option<usize>,
    /// Seconds of connect/request/response/close per dataplane and size.
    #[arg(long)]
    seconds: Option<f64>,
    /// Request/response round trips over one connection per dataplane and size.
    #[arg(long)]
    round_trips: Option<usize>,
    /// EndpointSlice changes timed per size and source.
    #[arg(long)]
    changes: Option<usize>,
    /// Where the agent reads the services from in the control-plane part (default: both,
    /// side by side).
    #[arg(long, value_delimiter = ',')]
    control_sources: Vec<control::Source>,
    /// Seconds one iptables-restore or `nft -f` of the control-plane part may take before it
    /// is killed and reported as "> budget" (default 60, 600 with --full: one nftables
    /// transaction of 10,000 services x 10 endpoints takes minutes, and grows with the
    /// square of N).
    #[arg(long)]
    kube_proxy_load_timeout: Option<f64>,
    /// Where the report and plots go (default: target/bench).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// The resolved sizes and repetitions.
#[derive(Clone, Debug)]
pub struct Options {
    pub parts: Vec<Part>,
    pub prog_run_services: Vec<usize>,
    pub traffic_services: Vec<usize>,
    pub control_services: Vec<usize>,
    pub packets: usize,
    pub traffic_duration: Duration,
    pub round_trips: usize,
    pub changes: usize,
    pub control_sources: Vec<control::Source>,
    pub kube_proxy_load_timeout: Duration,
    pub full: bool,
}

impl BenchArgs {
    fn resolve(&self) -> Options {
        let pick = |given: &Vec<usize>, quick: &[usize], full: &[usize]| {
            if !given.is_empty() {
                given.clone()
            } else if self.full {
                full.to_vec()
            } else {
                quick.to_vec()
            }
        };
        Options {
            parts: if self.parts.is_empty() {
                vec![Part::Packet, Part::Traffic, Part::Control]
            } else {
                self.parts.clone()
            },
            prog_run_services: pick(
                &self.packet_services,
                &[10, 1_000, 10_000, 100_000],
                &[10, 1_000, 10_000, 100_000],
            ),
            traffic_services: pick(&self.traffic_services, &[100, 1_000], &[100, 1_000, 10_000]),
            control_services: pick(
                &self.control_services,
                &[1_000, 10_000],
                &[1_000, 10_000, 100_000],
            ),
            packets: self
                .packets
                .unwrap_or(if self.full { 50_000 } else { 5_000 }),
            traffic_duration: Duration::from_secs_f64(self.seconds.unwrap_or(if self.full {
                10.0
            } else {
                2.0
            })),
            round_trips: self
                .round_trips
                .unwrap_or(if self.full { 20_000 } else { 2_000 }),
            changes: self.changes.unwrap_or(if self.full { 100 } else { 20 }),
            control_sources: if self.control_sources.is_empty() {
                vec![control::Source::Manifests, control::Source::Api]
            } else {
                self.control_sources.clone()
            },
            kube_proxy_load_timeout: Duration::from_secs_f64(
                self.kube_proxy_load_timeout
                    .unwrap_or(if self.full { 600.0 } else { 60.0 })
                    .max(1.0),
            ),
            full: self.full,
        }
    }
}

/// The machine the figures came from, from /proc and uname.
#[derive(Clone, Debug)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        kernel,
        cpu,
        cores,
        memory,
    }
}

/// Everything one run measured.
#[derive(Default)]
pub struct Results {
    pub packet: Vec<prog_run::PacketCost>,
    pub traffic: Vec<traffic::TrafficResult>,
    pub control: Vec<control::ControlResult>,
}

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let options = args.resolve();
    eprintln!("{}", estimate::describe(&options));
    if !xtask::is_root() {
        bail!("the bench loads BPF programs and creates network namespaces: run it as root");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if options.parts.iter().any(|p| *p != Part::Packet) {
        // The agent the testbed starts: a release build, as users run it.
        xtask::run(Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "-p",
            "sluice",
        ]))?;
        std::env::set_var("SLUICE_BIN", root.join("target/release/sluice"));
    }
    let results = run_parts(&options)?;
    let machine = machine();
    let plots = plot::draw(&out, &results)?;
    let text = report::render(&options, &machine, &results, &plots);
    let path = out.join("report.md");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: report written to {}", path.display());
    Ok(())
}

pub fn run_parts(options: &Options) -> anyhow::Result<Results> {
    let mut results = Results::default();
    let estimated = estimate::seconds(options);
    // Each part's time next to its estimate, to keep the estimate honest.
    let timed = |part: Part, started: std::time::Instant| {
        let expected = estimated
            .iter()
            .find(|(p, _)| *p == part)
            .map_or(0.0, |e| e.1);
        eprintln!(
            "bench: {part:?} part took {:.0} s (estimated {expected:.0} s)",
            started.elapsed().as_secs_f64()
        );
    };
    if options.parts.contains(&Part::Packet) {
        let started = std::time::Instant::now();
        results.packet = prog_run::run(options).context("per-packet part")?;
        timed(Part::Packet, started);
    }
    if options.parts.contains(&Part::Traffic) {
        let started = std::time::Instant::now();
        results.traffic = traffic::run(options).context("traffic part")?;
        timed(Part::Traffic, started);
    }
    if options.parts.contains(&Part::Control) {
        let started = std::time::Instant::now();
        results.control = control::run(options).context("control-plane part")?;
        timed(Part::Control, started);
    }
    Ok(results)
}
