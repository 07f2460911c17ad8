//! Part 3: the control plane. Per N (services x 10 endpoints), in a fresh one-node cluster:
//! the time iptables-restore and `nft -f` take to load kube-proxy's layouts of those services
//! (in the node netns, removed again), then the time from starting `sluice agent` on a
//! manifests directory holding them to its "ready" line (logged after the first full sync
//! and attach), its resident memory then, and the time from rewriting one EndpointSlice to
//! the first real request answered by the new endpoint (p50/p99 over the changes; a probe
//! every millisecond from a client pod, so the figures are at most ~1 ms late).

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use sluice::datapath::MapSizes;
use sluice_common::{MAX_BACKENDS, MAX_SERVICES};
use sluice_testbed::{in_netns, sluice::SluiceCluster};

use super::{
    rules::{self, BenchService},
    stats::Summary,
    traffic::{self, in_node_netns, EchoServer, SERVER_PORT, SERVICE_PORT},
    Options,
};

pub const ENDPOINTS_PER_SERVICE: usize = 10;

#[derive(Clone, Debug)]
pub struct ControlResult {
    pub services_requested: usize,
    pub services: usize,
    pub agent_ready: Duration,
    pub iptables_restore: Duration,
    pub nft_load: Duration,
    /// VmRSS of the agent after its first sync, KiB.
    pub agent_rss_kib: u64,
    /// EndpointSlice change to datapath, milliseconds.
    pub change_ms: Summary,
}

/// The most services of 10 endpoints the maps hold at their default sizes. The bench starts
/// the agent with maps sized for what it measures (`MapSizes::for_services`).
pub fn map_limit() -> usize {
    (MAX_SERVICES as usize).min(MAX_BACKENDS as usize / ENDPOINTS_PER_SERVICE)
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

fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

pub fn run(options: &Options) -> anyhow::Result<Vec<ControlResult>> {
    let mut results = Vec::new();
    for &requested in &options.control_services {
        let n = requested;
        let mut cluster = SluiceCluster::new("bench-cp", 1)?;
        let node = cluster.node(1);
        let netns = node.netns_path().to_owned();
        let pod_a = node.add_pod("bench-a", node.pod_ip(21))?;
        let pod_b = node.add_pod("bench-b", node.pod_ip(22))?;
        let client = node.add_pod("bench-client", node.pod_ip(10))?;
        let _echo_a = EchoServer::start(&pod_a, b'A')?;
        let _echo_b = EchoServer::start(&pod_b, b'B')?;

        // N services of 10 endpoints (addresses nobody answers on: programming only), plus
        // the probe service whose one endpoint flips between pods A and B.
        let fake: Vec<_> = (0..ENDPOINTS_PER_SERVICE as u32)
            .map(|k| {
                (
                    std::net::Ipv4Addr::new(10, 244, 200, 1 + k as u8),
                    SERVER_PORT,
                )
            })
            .collect();
        let mut services = traffic::bench_services(n, &fake);
        let mut probe = BenchService {
            namespace: "bench".into(),
            name: "probe".into(),
            vip: std::net::Ipv4Addr::new(10, 111, 0, 1),
            port: SERVICE_PORT,
            endpoints: vec![(pod_a.ip(), SERVER_PORT)],
        };

        let iptables_restore = timed(|| {
            in_node_netns(
                &netns,
                "iptables-restore",
                &[],
                &rules::iptables_restore(&services),
            )
        })?;
        in_node_netns(&netns, "iptables-restore", &[], rules::IPTABLES_FLUSH)?;
        let nft_load =
            timed(|| in_node_netns(&netns, "nft", &["-f", "-"], &rules::nft_script(&services)))?;
        in_node_netns(&netns, "nft", &["-f", "-"], rules::NFT_FLUSH)?;

        services.push(probe.clone());
        let mut text = traffic::manifests(&services[..services.len() - 1]);
        text.push_str(&traffic::service_manifest(&probe));
        cluster.manifests.write("bench-services.yaml", &text)?;
        cluster.manifests.write(
            "bench-probe-slice.yaml",
            &traffic::slice_manifest(&probe, 0),
        )?;
        let start = Instant::now();
        // Maps for the N services and the probe (`--max-services`, `--max-backends`).
        let map_args = MapSizes::for_services(n + 1, ENDPOINTS_PER_SERVICE).agent_args();
        let map_args: Vec<&str> = map_args.iter().map(String::as_str).collect();
        let agent = cluster.spawn_agent(1, &map_args)?;
        agent.wait_for_log(
            sluice_testbed::sluice::AGENT_READY_LINE,
            Duration::from_secs(900),
        )?;
        let agent_ready = start.elapsed();
        let pid = agent.pid();
        let agent_rss_kib = vm_rss_kib(pid)?;
        eprintln!(
            "bench: {n} services x {ENDPOINTS_PER_SERVICE}: agent ready in {agent_ready:?} ({agent_rss_kib} KiB), iptables-restore {iptables_restore:?}, nft -f {nft_load:?}"
        );

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
            cluster.manifests.write(
                "bench-probe-slice.yaml",
                &traffic::slice_manifest(&probe, generation),
            )?;
            let written = Instant::now();
            let took = in_netns(client.netns_path(), || -> anyhow::Result<Duration> {
                let deadline = written + Duration::from_secs(10);
                loop {
                    // A refused or timed-out probe during the switch is just "not yet".
                    if traffic::transaction(dst, Duration::from_millis(200)).ok() == Some(tag) {
                        return Ok(written.elapsed());
                    }
                    if Instant::now() > deadline {
                        bail!("EndpointSlice change {generation} not in the datapath after 10 s");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })??;
            change_ms.push(took.as_secs_f64() * 1e3);
        }
        let change_ms = Summary::of(change_ms);
        eprintln!(
            "bench: EndpointSlice change to datapath at {n} services: p50 {:.1} ms p99 {:.1} ms",
            change_ms.p50, change_ms.p99
        );
        results.push(ControlResult {
            services_requested: requested,
            services: n,
            agent_ready,
            iptables_restore,
            nft_load,
            agent_rss_kib,
            change_ms,
        });
    }
    Ok(results)
}
