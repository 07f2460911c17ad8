//! The `sluice` binary: the node agent and its command-line tools.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sluice::{
    daemon::{self, AgentConfig},
    node::NodeOptions,
};

#[derive(Parser)]
#[command(name = "sluice", version, about = "An eBPF kube-proxy replacement")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: program the datapath from Kubernetes objects and keep it in sync.
    Agent {
        /// Directory of manifests (*.yaml, *.yml, *.json) holding Services and EndpointSlices;
        /// watched for changes.
        #[arg(long)]
        manifests: PathBuf,
        /// Where maps and program links are pinned (on bpffs).
        #[arg(long, default_value = sluice_common::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Seconds between full resyncs (manifests and interfaces), a safety net for missed
        /// notifications; unchanged input writes nothing.
        #[arg(long, default_value_t = 30)]
        resync_interval: u64,
        /// How often expired conntrack entries are deleted (e.g. 60s, 500ms).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        conntrack_gc_interval: Duration,
        #[command(flatten)]
        node: NodeOptions,
        /// Address of the /healthz and /livez server (kube-proxy's healthzBindAddress);
        /// "off" disables it.
        #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind_address)]
        healthz_bind_address: BindAddress,
        /// Address healthCheckNodePort servers listen on.
        #[arg(long, default_value = "0.0.0.0")]
        health_check_bind_ip: std::net::IpAddr,
    },
    /// Push a synthetic packet through the real programs (BPF_PROG_RUN) with maps filled from
    /// manifests, and show what the datapath does with it. Never touches a running agent.
    Trace(sluice::trace::TraceArgs),
    /// Show the running agent's services, backends and conntrack entries.
    State(sluice::inspect::StateArgs),
    /// Remove the pinned datapath (detaches the programs from every pod interface).
    Cleanup {
        #[arg(long, default_value = sluice_common::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; logs captured to files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent {
            manifests,
            pin_path,
            resync_interval,
            conntrack_gc_interval,
            node,
            healthz_bind_address,
            health_check_bind_ip,
        } => run_agent(AgentConfig {
            manifests,
            node,
            healthz_bind_address: healthz_bind_address.0,
            health_check_bind_ip,
            pin_path,
            resync_interval: Duration::from_secs(resync_interval.max(1)),
            conntrack_gc_interval: conntrack_gc_interval.max(Duration::from_millis(100)),
        }),
        Command::Trace(args) => return sluice::trace::run(args),
        Command::State(args) => return sluice::inspect::run(args),
        Command::Cleanup { pin_path } => sluice::datapath::Datapath::cleanup(&pin_path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A socket address, or none ("off").
#[derive(Clone, Debug)]
struct BindAddress(Option<std::net::SocketAddr>);

fn parse_bind_address(value: &str) -> Result<BindAddress, String> {
    if value == "off" || value.is_empty() {
        return Ok(BindAddress(None));
    }
    value
        .parse()
        .map(|a| BindAddress(Some(a)))
        .map_err(|e| format!("{value:?} is not an address:port or \"off\": {e}"))
}

fn run_agent(config: AgentConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config, shutdown_signal()))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
