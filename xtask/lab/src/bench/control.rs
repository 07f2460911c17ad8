//! Part 3: the control plane. Per N (services x 10 endpoints):
//!
//! - kube-proxy's layouts of those services loaded in the node netns (removed again): the
//!   time `iptables-restore` and `nft -f` take, each killed after the load budget
//!   (`--kube-proxy-load-timeout`) and then reported as "> budget";
//! - for each Sluice source (`--control-sources`), in a fresh one-node cluster: the
//!   manifests directory (`sluice agent --manifests`) and the API (the test API server,
//!   tests/src/apiserver.rs, listing and watching over HTTP: `sluice agent --kubeconfig`),
//!   both holding the N services before the agent starts: the time from starting the
//!   agent to its "ready" line (logged after the first full sync and attach), its resident
//!   memory then, and the time from an EndpointSlice change to the first real request
//!   answered by the new endpoint (p50/p99 over the changes; a probe every millisecond
//!   from a client pod, so the figures are at most ~1 ms late). The change starts when the
//!   rewritten slice file is in place (manifests) or when the API server's store holds the
//!   updated object and its watchers have been woken (API).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::ValueEnum;
use sluice::datapath::MapSizes;
use sluice_testbed::{in_netns, sluice::SluiceCluster, Pod};

use super::{
    rules::{self, BenchService},
    stats::Summary,
    traffic::{self, in_node_netns, EchoServer, SERVER_PORT, SERVICE_PORT},
    Options,
};

pub const ENDPOINTS_PER_SERVICE: usize = 10;

/// Where the agent reads the cluster's objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// A manifests directory (`--manifests`).
    Manifests,
    /// The test API server, list and watch over HTTP (`--kubeconfig`).
    Api,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Manifests => "manifests",
            Source::Api => "API server",
        }
    }
}

/// How long one kube-proxy load took, or that it was killed at the budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadTime {
    Took(Duration),
    Exceeded(Duration),
}

impl std::fmt::Display for LoadTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadTime::Took(d) => write!(f, "{:.3} s", d.as_secs_f64()),
            LoadTime::Exceeded(b) if b.as_secs() >= 10 => {
                write!(f, "> {:.0} s (killed)", b.as_secs_f64())
            }
            LoadTime::Exceeded(b) => write!(f, "> {:.1} s (killed)", b.as_secs_f64()),
        }
    }
}

/// One Sluice source at one N.
#[derive(Clone, Debug)]
pub struct SluiceControl {
    pub source: Source,
    pub agent_ready: Duration,
    /// VmRSS of the agent after its first sync, KiB.
    pub agent_rss_kib: u64,
    /// EndpointSlice change to datapath, milliseconds.
    pub change_ms: Summary,
}

#[derive(Clone, Debug)]
pub struct ControlResult {
    pub services_requested: usize,
    pub services: usize,
    pub iptables_restore: LoadTime,
    pub nft_load: LoadTime,
    /// One per source measured, in `--control-sources` order.
    pub sluice: Vec<SluiceControl>,
}

impl ControlResult {
    pub fn source(&self, source: Source) -> Option<&SluiceControl> {
        self.sluice.iter().find(|s| s.source == source)
    }
}

fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Runs `program args` in the network namespace at `netns` with `input` on stdin, and
/// kills it (the process we started, by its pid; nsenter execs the program) if it is still
/// running after `budget`. A killed iptables-restore or nft commits nothing: both send
/// their whole input as one transaction at the end.
pub fn load_with_budget(
    netns: &Path,
    program: &str,
    args: &[&str],
    input: &str,
    budget: Duration,
) -> anyhow::Result<LoadTime> {
    let start = Instant::now();
    let mut child = traffic::spawn_in_netns(netns, program, args, Stdio::null())?;
    let mut stdin = child.stdin.take().expect("stdin");
    let outcome = std::thread::scope(|scope| -> anyhow::Result<LoadTime> {
        // Fed from a thread: the program may stop reading (killed) before the input ends.
        scope.spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        loop {
            if let Some(status) = child.try_wait()? {
                let elapsed = start.elapsed();
                if !status.success() {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                    }
                    bail!(
                        "{program} {} in {} failed ({status}): {stderr}",
                        args.join(" "),
                        netns.display()
                    );
                }
                return Ok(LoadTime::Took(elapsed));
            }
            if start.elapsed() >= budget {
                child.kill().with_context(|| format!("killing {program}"))?;
                child.wait()?;
                return Ok(LoadTime::Exceeded(budget));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })?;
    Ok(outcome)
}

/// The N services of 10 endpoints (addresses nobody answers on: programming only).
fn control_services(n: usize) -> Vec<BenchService> {
    let fake: Vec<_> = (0..ENDPOINTS_PER_SERVICE as u32)
        .map(|k| (Ipv4Addr::new(10, 244, 200, 1 + k as u8), SERVER_PORT))
        .collect();
    traffic::bench_services(n, &fake)
}

pub fn run(options: &Options) -> anyhow::Result<Vec<ControlResult>> {
    let mut results = Vec::new();
    for &requested in &options.control_services {
        let n = requested;
        let services = control_services(n);
        let (iptables_restore, nft_load) = kube_proxy_loads(&services, options)?;
        let mut sluice = Vec::new();
        for &source in &options.control_sources {
            let measured = measure_sluice(source, &services, options)
                .with_context(|| format!("Sluice from the {} at {n} services", source.label()))?;
            eprintln!(
                "bench: {n} services x {ENDPOINTS_PER_SERVICE}, {}: agent ready in {:?} ({} KiB), EndpointSlice change p50 {:.1} ms p99 {:.1} ms",
                source.label(),
                measured.agent_ready,
                measured.agent_rss_kib,
                measured.change_ms.p50,
                measured.change_ms.p99
            );
            sluice.push(measured);
        }
        results.push(ControlResult {
            services_requested: requested,
            services: n,
            iptables_restore,
            nft_load,
            sluice,
        });
    }
    Ok(results)
}

/// iptables-restore and `nft -f` of `services` in a fresh node netns, each within the budget.
fn kube_proxy_loads(
    services: &[BenchService],
    options: &Options,
) -> anyhow::Result<(LoadTime, LoadTime)> {
    let n = services.len();
    let node = sluice_testbed::Node::new("bench-kp")?;
    let netns = node.netns_path();
    let budget = options.kube_proxy_load_timeout;
    let iptables_restore = load_with_budget(
        netns,
        "iptables-restore",
        &[],
        &rules::iptables_restore(services),
        budget,
    )?;
    in_node_netns(netns, "iptables-restore", &[], rules::IPTABLES_FLUSH)?;
    eprintln!("bench: {n} services x {ENDPOINTS_PER_SERVICE}: iptables-restore {iptables_restore}");
    let nft_load = load_with_budget(
        netns,
        "nft",
        &["-f", "-"],
        &rules::nft_script(services),
        budget,
    )?;
    in_node_netns(netns, "nft", &["-f", "-"], rules::NFT_FLUSH)?;
    eprintln!("bench: {n} services x {ENDPOINTS_PER_SERVICE}: nft -f {nft_load}");
    Ok((iptables_restore, nft_load))
}

/// What a change writes: the probe service's slice, to the manifests directory or the API.
fn publish_slice(cluster: &SluiceCluster, source: Source, text: &str) -> anyhow::Result<()> {
    match source {
        Source::Manifests => cluster.manifests.write("bench-probe-slice.yaml", text),
        Source::Api => cluster.api().apply(text),
    }
}

/// Agent start to ready, RSS, and EndpointSlice change latency with the objects in `source`.
fn measure_sluice(
    source: Source,
    services: &[BenchService],
    options: &Options,
) -> anyhow::Result<SluiceControl> {
    let mut cluster = match source {
        Source::Manifests => SluiceCluster::new("bench-cp", 1)?,
        Source::Api => SluiceCluster::with_api_server("bench-cpa", 1)?,
    };
    let node = cluster.node(1);
    let pod_a = node.add_pod("bench-a", node.pod_ip(21))?;
    let pod_b = node.add_pod("bench-b", node.pod_ip(22))?;
    let client = node.add_pod("bench-client", node.pod_ip(10))?;
    let _echo_a = EchoServer::start(&pod_a, b'A')?;
    let _echo_b = EchoServer::start(&pod_b, b'B')?;

    // The N services plus the probe service, whose one endpoint flips between pods A and B.
    let mut probe = BenchService {
        namespace: "bench".into(),
        name: "probe".into(),
        vip: Ipv4Addr::new(10, 111, 0, 1),
        port: SERVICE_PORT,
        endpoints: vec![(pod_a.ip(), SERVER_PORT)],
    };
    let mut text = traffic::manifests(services);
    text.push_str(&traffic::service_manifest(&probe));
    match source {
        Source::Manifests => cluster.manifests.write("bench-services.yaml", &text)?,
        Source::Api => cluster.api().apply(&text)?,
    }
    drop(text);
    publish_slice(&cluster, source, &traffic::slice_manifest(&probe, 0))?;

    let start = Instant::now();
    // Maps for the N services and the probe (`--max-services`, `--max-backends`).
    let map_args = MapSizes::for_services(services.len() + 1, ENDPOINTS_PER_SERVICE).agent_args();
    let map_args: Vec<&str> = map_args.iter().map(String::as_str).collect();
    let agent = cluster.spawn_agent(1, &map_args)?;
    agent.wait_for_log(
        sluice_testbed::sluice::AGENT_READY_LINE,
        Duration::from_secs(900),
    )?;
    let agent_ready = start.elapsed();
    let agent_rss_kib = vm_rss_kib(agent.pid())?;

    let dst = SocketAddrV4::new(probe.vip, probe.port);
    let first = in_netns(client.netns_path(), || {
        traffic::transaction(dst, Duration::from_secs(2))
    })??;
    if first != b'A' {
        bail!(
            "the probe service answered from {:?}, not pod A",
            first as char
        );
    }
    let mut change_ms = Vec::new();
    for generation in 1..=options.changes as u64 {
        let (pod, tag) = if generation % 2 == 1 {
            (&pod_b, b'B')
        } else {
            (&pod_a, b'A')
        };
        probe.endpoints = vec![(pod.ip(), SERVER_PORT)];
        publish_slice(
            &cluster,
            source,
            &traffic::slice_manifest(&probe, generation),
        )?;
        let published = Instant::now();
        let took = wait_answered_by(&client, dst, tag, published)
            .with_context(|| format!("EndpointSlice change {generation}"))?;
        change_ms.push(took.as_secs_f64() * 1e3);
    }
    Ok(SluiceControl {
        source,
        agent_ready,
        agent_rss_kib,
        change_ms: Summary::of(change_ms),
    })
}

/// Probes `dst` from `client` every millisecond until the pod tagged `tag` answers; the time
/// since `since`.
fn wait_answered_by(
    client: &Pod,
    dst: SocketAddrV4,
    tag: u8,
    since: Instant,
) -> anyhow::Result<Duration> {
    in_netns(client.netns_path(), || -> anyhow::Result<Duration> {
        let deadline = since + Duration::from_secs(10);
        loop {
            // A refused or timed-out probe during the switch is just "not yet".
            if traffic::transaction(dst, Duration::from_millis(200)).ok() == Some(tag) {
                return Ok(since.elapsed());
            }
            if Instant::now() > deadline {
                bail!("not in the datapath after 10 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })?
}
