//! Host traffic: processes in a node's own network namespace (the kubelet, hostNetwork pods)
//! reaching services, balanced by the socket programs (`sluice agent --cgroup-root`). The
//! clients are `sluice-probe` processes placed in a test-owned child cgroup
//! ([`TestCgroup`]) and the node's netns; node 1's agent has the socket programs on that
//! cgroup, node 2's agent none. Each test checks what the application saw (answers, the peer
//! address `getpeername()`/`recvfrom()` report, errors) and, where it matters, the source the
//! server saw and that no conntrack entry was made (no tc program translated the flow).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_testbed::{
    cgroup::{ProbeMode, Probed, TestCgroup},
    sluice::{sluice_bin, SluiceCluster},
    ClusterOptions, Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
const VIP6: &str = "fd00:10:96::70:10";
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 20);
const NODE_PORT: u16 = 30070;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 70);

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice-probe"))
}

/// A two-node cluster (dual-stack if asked) with agents running, node 1's with the socket
/// programs on a fresh test cgroup.
fn cluster(hint: &str, dual_stack: bool) -> (SluiceCluster, TestCgroup) {
    let mut cluster =
        SluiceCluster::with_options(hint, 2, &ClusterOptions::new().dual_stack(dual_stack))
            .unwrap();
    let cgroup = TestCgroup::new().unwrap();
    start_agent_1(&mut cluster, &cgroup);
    cluster.start_agent(2, &[]).unwrap();
    (cluster, cgroup)
}

fn start_agent_1(cluster: &mut SluiceCluster, cgroup: &TestCgroup) {
    cluster
        .start_agent(1, &["--cgroup-root", cgroup.path().to_str().unwrap()])
        .unwrap()
        .wait_for_log("socket programs attached", Duration::from_secs(5))
        .unwrap();
}

/// A pod of `web` on node `node` (the `n`th address of its pod CIDR; dual-stack if the
/// cluster is), serving TCP and UDP on 8080.
fn web_pod(cluster: &SluiceCluster, node: usize, n: u8) -> Pod {
    let node_ref = cluster.node(node);
    let name = format!("web-{node}-{n}");
    let pod = match node_ref.pod_ip6(n) {
        Some(ip6) if cluster.cluster.is_dual_stack() => {
            node_ref.add_pod_dual(&name, node_ref.pod_ip(n), ip6)
        }
        _ => node_ref.add_pod(&name, node_ref.pod_ip(n)),
    }
    .unwrap();
    pod.serve(&[8080]).unwrap();
    pod
}

/// The `web` LoadBalancer service (TCP and UDP port 80 -> 8080, NodePort 30070 for TCP), with
/// `spec` lines added, and its slice(s) with `pods`; plus `empty`, a ClusterIP service
/// without endpoints.
fn write_web(cluster: &SluiceCluster, pods: &[(&Pod, usize)], spec: &str) {
    let dual = cluster.cluster.is_dual_stack();
    let families = if dual {
        format!("  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n")
    } else {
        String::new()
    };
    let service = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
{families}  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 80, protocol: UDP, targetPort: 8080, nodePort: {}}}
{spec}status:
  loadBalancer:
    ingress: [{{ip: "{LB_IP}"}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: shop}}
spec:
  clusterIP: {EMPTY_VIP}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 80, protocol: UDP, targetPort: 8080}}
"#,
        NODE_PORT + 1
    );
    let slice = |family: &str, address: &dyn Fn(&Pod) -> String| {
        let endpoints: String = pods
            .iter()
            .map(|(pod, node)| {
                format!(
                    "- {{addresses: [\"{}\"], nodeName: node-{node}, conditions: {{ready: true}}}}\n",
                    address(pod)
                )
            })
            .collect();
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-{}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: {family}
endpoints:
{endpoints}ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
"#,
            family.to_lowercase()
        )
    };
    cluster.manifests.write("web.yaml", &service).unwrap();
    cluster
        .manifests
        .write("web-slice-v4.yaml", &slice("IPv4", &|p| p.ip().to_string()))
        .unwrap();
    if dual {
        cluster
            .manifests
            .write(
                "web-slice-v6.yaml",
                &slice("IPv6", &|p| p.ipv6().unwrap().to_string()),
            )
            .unwrap();
    }
}

/// `count` probes from node `node`'s own netns in the cgroup.
fn probe_from_node(
    cluster: &SluiceCluster,
    cgroup: &TestCgroup,
    node: usize,
    mode: ProbeMode,
    dst: SocketAddr,
    count: usize,
) -> Vec<Probed> {
    let netns = cluster.node(node).netns_path();
    cgroup
        .probe(&probe_bin(), netns, mode, dst, count, TIMEOUT)
        .unwrap()
}

/// Polls until a probe succeeds (the agent programs the maps shortly after a manifest write).
fn wait_until_answered(cgroup: &TestCgroup, netns: &Path, mode: ProbeMode, dst: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probed = cgroup
            .probe(&probe_bin(), netns, mode, dst, 1, TIMEOUT)
            .unwrap();
        if matches!(probed.as_slice(), [Probed::Ok { .. }]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{dst} ({mode:?}) never answered from {}: {probed:?}",
            netns.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every probe succeeded with `peer` as the address the application saw; returns how many
/// answers each pod gave.
fn answers(probed: &[Probed], peer: SocketAddr) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for p in probed {
        match p {
            Probed::Ok { peer: seen, text } => {
                assert_eq!(
                    *seen, peer,
                    "the application saw {seen}, not the service: {p:?}"
                );
                *counts.entry(text.clone()).or_default() += 1;
            }
            Probed::Err { .. } => panic!("probe to {peer} failed: {p:?} (all: {probed:?})"),
        }
    }
    counts
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_string()).collect()
}

fn sources(pod: &Pod) -> BTreeSet<IpAddr> {
    pod.seen().iter().map(|s| s.source.ip()).collect()
}

/// `sluice state --json conntrack` of node `node`'s pins.
fn conntrack(cluster: &SluiceCluster, node: usize) -> Vec<Value> {
    let bin = sluice_bin();
    let pins = cluster.pins[node - 1].path();
    let out: Output = cluster
        .node(node)
        .exec(&[
            bin.as_os_str(),
            "state".as_ref(),
            "--pin-path".as_ref(),
            pins.as_os_str(),
            "--json".as_ref(),
            "conntrack".as_ref(),
        ])
        .unwrap();
    assert!(out.status.success(), "sluice state: {out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["conntrack"].as_array().cloned().unwrap_or_default()
}

/// The conntrack flows whose client address is `ip`.
fn flows_from(cluster: &SluiceCluster, node: usize, ip: IpAddr) -> Vec<Value> {
    conntrack(cluster, node)
        .into_iter()
        .filter(|f| {
            f["client"]
                .as_str()
                .and_then(|c| c.parse::<SocketAddr>().ok())
                .is_some_and(|c| c.ip() == ip)
        })
        .collect()
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

#[test]
fn node_reaches_a_cluster_ip_over_tcp_and_udp_with_local_and_remote_backends() {
    let (cluster, cgroup) = cluster("host-cip", false);
    let local = web_pod(&cluster, 1, 20);
    let remote = web_pod(&cluster, 2, 20);
    write_web(&cluster, &[(&local, 1), (&remote, 2)], "");
    let netns = cluster.node(1).netns_path();
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, vip(80));

    // TCP: both backends, and getpeername() shows the ClusterIP, not the pod.
    let tcp = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 40);
    let counts = answers(&tcp, vip(80));
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[&local, &remote]),
        "{counts:?}"
    );
    // Unconnected UDP: recvfrom() reports the ClusterIP as the reply's source.
    let udp = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Udp, vip(80), 40);
    let counts = answers(&udp, vip(80));
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[&local, &remote]),
        "{counts:?}"
    );
    // Connected UDP: getpeername() and recvfrom() both say the ClusterIP (the probe appends
    // "(recvfrom <addr>)" to the answer if they differ).
    let connected = probe_from_node(&cluster, &cgroup, 1, ProbeMode::UdpConnected, vip(80), 20);
    for text in answers(&connected, vip(80)).keys() {
        assert!(
            !text.contains("recvfrom"),
            "recvfrom disagreed with getpeername: {text}"
        );
    }

    // An IPv6 socket reaching the ClusterIP through its IPv4-mapped address (as dual-stack
    // runtimes do) is balanced the same way, and sees the mapped ClusterIP as its peer.
    let mapped = SocketAddr::from((VIP.to_ipv6_mapped(), 80));
    for mode in [ProbeMode::Tcp, ProbeMode::Udp, ProbeMode::UdpConnected] {
        let probed = probe_from_node(&cluster, &cgroup, 1, mode, mapped, 30);
        let counts = answers(&probed, mapped);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            names(&[&local, &remote]),
            "{mode:?} to {mapped}: {counts:?}"
        );
    }

    // The servers saw the node's own addresses (no source NAT): its node IP for the remote
    // pod, one of its addresses (the pod-facing gateway or the node IP) for the local one.
    let node1 = cluster.node(1);
    let own: BTreeSet<IpAddr> = [node1.node_ip().unwrap().into(), node1.gateway().into()].into();
    assert_eq!(
        sources(&remote),
        BTreeSet::from([IpAddr::from(node1.node_ip().unwrap())])
    );
    assert!(
        sources(&local).is_subset(&own) && !sources(&local).is_empty(),
        "the local pod saw {:?}, not the node's own addresses {own:?}",
        sources(&local)
    );
    // Translated at the socket: no tc program made a conntrack entry for the node's flows.
    for ip in &own {
        let flows = flows_from(&cluster, 1, *ip);
        assert!(flows.is_empty(), "host flows went through tc: {flows:#?}");
    }
}

#[test]
fn node_reaches_node_ports_load_balancer_ips_and_the_other_nodes_node_port() {
    let (cluster, cgroup) = cluster("host-np", false);
    let local = web_pod(&cluster, 1, 20);
    let remote = web_pod(&cluster, 2, 20);
    write_web(&cluster, &[(&local, 1), (&remote, 2)], "");
    let netns = cluster.node(1).netns_path();
    let own_node_port = SocketAddr::from((cluster.node(1).node_ip().unwrap(), NODE_PORT));
    let lb = SocketAddr::from((LB_IP, 80));
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, own_node_port);

    // Its own node IP's NodePort and the load balancer IP: balanced at connect() over both
    // backends, the application seeing the address it dialled.
    for dst in [own_node_port, lb] {
        let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, dst, 30);
        let counts = answers(&probed, dst);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            names(&[&local, &remote]),
            "{dst}: {counts:?}"
        );
    }
    let flows = flows_from(&cluster, 1, cluster.node(1).node_ip().unwrap().into());
    assert!(flows.is_empty(), "host flows went through tc: {flows:#?}");

    // The other node's NodePort is not this node's frontend (kube-proxy only takes local
    // destinations there): the connection goes to node 2, whose tc programs balance it.
    let other = SocketAddr::from((cluster.node(2).node_ip().unwrap(), NODE_PORT));
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, other, 20);
    let counts = answers(&probed, other);
    assert!(
        counts.keys().all(|k| names(&[&local, &remote]).contains(k)),
        "{counts:?}"
    );
    let node1_ip = IpAddr::from(cluster.node(1).node_ip().unwrap());
    let flows = flows_from(&cluster, 2, node1_ip);
    assert!(
        !flows.is_empty(),
        "node 2's tc programs did not balance node 1's connection to its NodePort"
    );
}

#[test]
fn a_service_without_endpoints_fails_the_call_at_once() {
    let (cluster, cgroup) = cluster("host-empty", false);
    let web = web_pod(&cluster, 1, 20);
    write_web(&cluster, &[(&web, 1)], "");
    let netns = cluster.node(1).netns_path();
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, vip(80));

    let empty = SocketAddr::from((EMPTY_VIP, 80));
    for mode in [ProbeMode::Tcp, ProbeMode::Udp, ProbeMode::UdpConnected] {
        let start = Instant::now();
        let probed = probe_from_node(&cluster, &cgroup, 1, mode, empty, 3);
        let elapsed = start.elapsed();
        for p in &probed {
            assert!(
                matches!(p, Probed::Err { errno, .. } if *errno == libc::ECONNREFUSED),
                "{mode:?} to a service without endpoints: {p:?}"
            );
        }
        assert!(
            elapsed < TIMEOUT,
            "{mode:?}: refused only after {elapsed:?}: {probed:?}"
        );
    }
}

#[test]
fn session_affinity_keeps_the_node_on_one_backend() {
    let (cluster, cgroup) = cluster("host-aff", false);
    let pods: Vec<Pod> = [(1, 20), (1, 21), (2, 20), (2, 21)]
        .into_iter()
        .map(|(node, n)| web_pod(&cluster, node, n))
        .collect();
    let endpoints: Vec<(&Pod, usize)> = pods.iter().zip([1, 1, 2, 2]).collect();
    write_web(
        &cluster,
        &endpoints,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n",
    );
    let netns = cluster.node(1).netns_path();
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, vip(80));

    for mode in [ProbeMode::Tcp, ProbeMode::Udp] {
        let probed = probe_from_node(&cluster, &cgroup, 1, mode, vip(80), 20);
        let counts = answers(&probed, vip(80));
        assert_eq!(counts.len(), 1, "{mode:?}: not one backend: {counts:?}");
    }
}

#[test]
fn a_pod_process_in_the_cgroup_keeps_the_tc_path() {
    let (cluster, cgroup) = cluster("host-pod", false);
    let web = web_pod(&cluster, 2, 20);
    write_web(&cluster, &[(&web, 2)], "");
    let node1 = cluster.node(1);
    let client = node1.add_pod("client", node1.pod_ip(10)).unwrap();
    wait_until_answered(&cgroup, node1.netns_path(), ProbeMode::Tcp, vip(80));

    // A process of the cgroup in the pod's netns: the socket programs leave it alone (another
    // namespace cookie), from_pod balances its packets, with a conntrack entry.
    let probed = cgroup
        .probe(
            &probe_bin(),
            client.netns_path(),
            ProbeMode::Tcp,
            vip(80),
            5,
            TIMEOUT,
        )
        .unwrap();
    let counts = answers(&probed, vip(80));
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[&web])
    );
    let flows = flows_from(&cluster, 1, client.ip().into());
    assert!(
        flows
            .iter()
            .any(|f| f["service"] == vip(80).to_string().as_str()),
        "the pod's connections were not balanced by tc: {flows:#?}"
    );
    assert!(
        sources(&web).contains(&IpAddr::from(client.ip())),
        "{:?}",
        sources(&web)
    );
    // The same probe in the node's netns: balanced at connect(), no conntrack entry.
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 5);
    answers(&probed, vip(80));
    let node_ip = IpAddr::from(node1.node_ip().unwrap());
    assert!(flows_from(&cluster, 1, node_ip).is_empty());
}

#[test]
fn node_reaches_an_ipv6_cluster_ip() {
    let (cluster, cgroup) = cluster("host-v6", true);
    let local = web_pod(&cluster, 1, 20);
    let remote = web_pod(&cluster, 2, 20);
    write_web(&cluster, &[(&local, 1), (&remote, 2)], "");
    let vip6 = SocketAddr::from((VIP6.parse::<Ipv6Addr>().unwrap(), 80));
    let netns = cluster.node(1).netns_path();
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, vip6);

    for mode in [ProbeMode::Tcp, ProbeMode::Udp, ProbeMode::UdpConnected] {
        let probed = probe_from_node(&cluster, &cgroup, 1, mode, vip6, 30);
        let counts = answers(&probed, vip6);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            names(&[&local, &remote]),
            "{mode:?}: {counts:?}"
        );
    }
    assert_eq!(
        sources(&remote)
            .into_iter()
            .filter(IpAddr::is_ipv6)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([IpAddr::from(cluster.node(1).node_ipv6().unwrap())])
    );
}

#[test]
fn restarts_swap_the_programs_in_place_and_cleanup_removes_them() {
    let (mut cluster, cgroup) = cluster("host-restart", false);
    let web = web_pod(&cluster, 2, 20);
    write_web(&cluster, &[(&web, 2)], "");
    let netns = cluster.node(1).netns_path().to_owned();
    wait_until_answered(&cgroup, &netns, ProbeMode::Tcp, vip(80));
    let links_dir = cluster.pins[0].path().join("cgroup-links");
    let pinned = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(pinned(&links_dir).len(), 8, "{:?}", pinned(&links_dir));

    // Restart with the same cgroup: the pinned links get the new programs (no new link).
    let agent = cluster
        .start_agent(1, &["--cgroup-root", cgroup.path().to_str().unwrap()])
        .unwrap();
    agent
        .wait_for_log("socket programs attached", Duration::from_secs(5))
        .unwrap();
    assert!(
        agent.log().contains("replaced=8"),
        "the restarted agent did not swap its programs into the pinned links:\n{}",
        agent.log()
    );
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 5);
    answers(&probed, vip(80));

    // The pins keep the programs running while no agent runs.
    drop(cluster.take_agent(1));
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 5);
    answers(&probed, vip(80));

    // Started without the flag: the links go, the node's connections are no longer
    // translated (nothing routes the ClusterIP: they fail or time out).
    cluster.start_agent(1, &[]).unwrap();
    assert!(pinned(&links_dir).is_empty(), "{:?}", pinned(&links_dir));
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 1);
    assert!(
        matches!(probed.as_slice(), [Probed::Err { .. }]),
        "translated without the socket programs: {probed:?}"
    );

    // Attached again, then `sluice cleanup` removes links and pins.
    start_agent_1(&mut cluster, &cgroup);
    assert_eq!(pinned(&links_dir).len(), 8);
    drop(cluster.take_agent(1));
    let bin = sluice_bin();
    let out = cluster
        .node(1)
        .exec(&[
            bin.as_os_str(),
            "cleanup".as_ref(),
            "--pin-path".as_ref(),
            cluster.pins[0].path().as_os_str(),
        ])
        .unwrap();
    assert!(out.status.success(), "sluice cleanup: {out:?}");
    assert!(!links_dir.exists());
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, vip(80), 1);
    assert!(
        matches!(probed.as_slice(), [Probed::Err { .. }]),
        "still translated after cleanup: {probed:?}"
    );
}

#[test]
fn load_balancer_source_ranges_apply_to_the_node_itself() {
    let (cluster, cgroup) = cluster("host-ranges", false);
    let web = web_pod(&cluster, 2, 20);
    let netns = cluster.node(1).netns_path();
    let lb = SocketAddr::from((LB_IP, 80));

    // Ranges without the node's address: kube-proxy drops the node's packets to the load
    // balancer IP; the call fails at once with EPERM. The ClusterIP has no ranges.
    write_web(
        &cluster,
        &[(&web, 2)],
        "  loadBalancerSourceRanges: [192.0.2.0/24]\n",
    );
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, vip(80));
    for mode in [ProbeMode::Tcp, ProbeMode::Udp] {
        let probed = probe_from_node(&cluster, &cgroup, 1, mode, lb, 2);
        for p in &probed {
            assert!(
                matches!(p, Probed::Err { errno, .. } if *errno == libc::EPERM),
                "{mode:?} to {lb} from outside its source ranges: {p:?}"
            );
        }
    }

    // The node's address in the ranges: balanced.
    let node_ip = cluster.node(1).node_ip().unwrap();
    write_web(
        &cluster,
        &[(&web, 2)],
        &format!("  loadBalancerSourceRanges: [\"{node_ip}/32\"]\n"),
    );
    wait_until_answered(&cgroup, netns, ProbeMode::Tcp, lb);
    let probed = probe_from_node(&cluster, &cgroup, 1, ProbeMode::Tcp, lb, 5);
    assert_eq!(
        answers(&probed, lb)
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        names(&[&web])
    );
}
