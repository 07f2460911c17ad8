//! The `sluice` binary: the node agent and its command-line tools.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sluice::{
    config::{AgentSettings, KubeProxyConfig},
    daemon::{self, AgentConfig, Source},
    datapath::MapSizes,
    kube_source::ApiOptions,
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
        /// watched for changes. Without it the agent lists and watches the API server.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// kubeconfig of the API server; without it, KUBECONFIG or ~/.kube/config, then the
        /// pod's service account (in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// A kube-proxy configuration file (KubeProxyConfiguration,
        /// kubeproxy.config.k8s.io/v1alpha1); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// "off" disables it. Default 0.0.0.0:10256.
        #[arg(long, value_parser = parse_bind_address)]
        healthz_bind_address: Option<BindAddress>,
        /// Address healthCheckNodePort servers listen on.
        #[arg(long, default_value = "0.0.0.0")]
        health_check_bind_ip: std::net::IpAddr,
        /// A cgroup v2 directory (usually the host's root, /sys/fs/cgroup): its processes in
        /// the agent's network namespace (the kubelet, hostNetwork pods) have their connect()
        /// and UDP sendmsg() to services balanced by socket programs. Without it, traffic the
        /// node itself sends to a service is not translated.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Entries of the services maps (IPv4 and IPv6 each): one per frontend (service port
        /// on its ClusterIP, external IP, load-balancer IP, NodePort), two with
        /// externalTrafficPolicy Local. Hash maps preallocate: 96/112 bytes of kernel memory per
        /// entry (IPv4/IPv6), used or not. Changing it resizes the pinned maps, keeping their
        /// entries.
        #[arg(long, default_value_t = sluice_common::MAX_SERVICES)]
        max_services: u32,
        /// Entries of the backends maps (IPv4 and IPv6 each): one per endpoint of each
        /// frontend. 80/96 bytes per entry (IPv4/IPv6); resized as --max-services.
        #[arg(long, default_value_t = sluice_common::MAX_BACKENDS)]
        max_backends: u32,
        /// Entries of the conntrack maps (IPv4 and IPv6 each, two maps each: flows the
        /// backend answered, which nothing evicts, and the others, the least recently used
        /// of which go when full): two per translated flow. When the answered map is full, a
        /// newly answered flow stays evictable (counted: conntrack-answered-full). 120/168
        /// bytes per entry (IPv4/IPv6); resized as --max-services, keeping the flows.
        #[arg(long, default_value_t = sluice_common::MAX_CONNTRACK)]
        max_conntrack: u32,
        /// Entries of the NetworkPolicy flow maps (IPv4 and IPv6 each, two maps each as
        /// conntrack's): one per direction of each connection a pod of this node opens or
        /// accepts. Resized as --max-services, keeping the flows.
        #[arg(long, default_value_t = sluice_common::MAX_POLICY_FLOWS)]
        max_policy_flows: u32,
    },
    /// Push a synthetic packet through the real programs (BPF_PROG_RUN) with maps filled from
    /// manifests, and show what the datapath does with it. Never touches a running agent.
    Trace(sluice::trace::TraceArgs),
    /// Show the running agent's services, backends, conntrack entries, drop counters and
    /// NetworkPolicy entries.
    State(sluice::inspect::StateArgs),
    /// Stream the packets NetworkPolicy drops (pod, peer, port, direction, reason).
    Monitor(sluice::monitor::MonitorArgs),
    /// Mount bpffs at /sys/fs/bpf unless it is mounted (the DaemonSet's init container runs
    /// this, so the image needs no shell or mount(8)).
    MountBpffs,
    /// Say which kernel features the datapath uses this kernel lacks, and what Sluice does
    /// without each (the agent logs the same lines at start).
    Kernel,
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
            kubeconfig,
            config,
            pin_path,
            resync_interval,
            conntrack_gc_interval,
            node,
            healthz_bind_address,
            health_check_bind_ip,
            cgroup_root,
            max_services,
            max_backends,
            max_conntrack,
            max_policy_flows,
        } => agent_config(
            manifests,
            config,
            AgentSettings {
                node,
                healthz_bind_address: healthz_bind_address.map(|a| a.0),
                kubeconfig,
            },
        )
        .and_then(|(source, settings)| {
            run_agent(AgentConfig {
                source,
                node: settings.node,
                healthz_bind_address: settings
                    .healthz_bind_address
                    .unwrap_or(Some(DEFAULT_HEALTHZ_BIND_ADDRESS)),
                health_check_bind_ip,
                cgroup_root,
                pin_path,
                map_sizes: MapSizes {
                    services: max_services,
                    backends: max_backends,
                    conntrack: max_conntrack,
                    policy_flows: max_policy_flows,
                },
                resync_interval: Duration::from_secs(resync_interval.max(1)),
                conntrack_gc_interval: conntrack_gc_interval.max(Duration::from_millis(100)),
            })
        }),
        Command::Trace(args) => return sluice::trace::run(args),
        Command::State(args) => return sluice::inspect::run(args),
        Command::Monitor(args) => return sluice::monitor::run(args),
        Command::MountBpffs => sluice::datapath::ensure_bpffs_mounted(),
        Command::Kernel => {
            let release = sluice::datapath::features::kernel_release();
            let missing = sluice::datapath::features::KernelFeatures::get().missing();
            if missing.is_empty() {
                println!("Linux {release}: has every kernel feature the datapath uses");
            }
            for line in missing {
                println!("Linux {release}: {line}");
            }
            Ok(())
        }
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

/// kube-proxy's default healthzBindAddress.
const DEFAULT_HEALTHZ_BIND_ADDRESS: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    sluice::config::DEFAULT_HEALTHZ_PORT,
);

/// The object source and the settings of `sluice agent`: flags, then the configuration file
/// for what the flags leave unset, then (API mode) the hostname as the node name, as
/// kube-proxy does without hostnameOverride.
fn agent_config(
    manifests: Option<PathBuf>,
    config_file: Option<PathBuf>,
    mut settings: AgentSettings,
) -> anyhow::Result<(Source, AgentSettings)> {
    if let Some(path) = &config_file {
        let file = KubeProxyConfig::load(path)?;
        for warning in &file.warnings {
            tracing::warn!(file = %path.display(), "{warning}");
        }
        file.fill(&mut settings);
    }
    let source = match manifests {
        Some(dir) => Source::Manifests(dir),
        None => {
            if settings.node.node_name.is_none() {
                settings.node.node_name = Some(hostname()?);
            }
            Source::Api(ApiOptions {
                kubeconfig: settings.kubeconfig.clone(),
            })
        }
    };
    Ok((source, settings))
}

/// This machine's hostname, lowercased (kube-proxy's default node name).
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|e| {
        anyhow::anyhow!(
            "no --node-name, NODE_NAME or hostnameOverride, and the hostname is unreadable: {e}"
        )
    })?;
    Ok(name.trim().to_lowercase())
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
