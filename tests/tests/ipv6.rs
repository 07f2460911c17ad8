//! IPv6 and dual stack with real traffic on a dual-stack two-node cluster plus an outside client
//! (`ext`), one `sluice agent` per node.
//!
//! The IPv6 datapath (ebpf/src/v6/) has the IPv4 one's behaviours. Here: IPv6 ClusterIPs
//! across nodes, a dual-stack service on both families with each family's endpoints, NodePort
//! over IPv6 from outside (local backend: the client's address kept; remote backend: node 1's
//! IPv6 address), hairpin, REJECT (TCP refused, UDP port unreachable), sessionAffinity shared by
//! a service port's ClusterIP and NodePort, loadBalancerSourceRanges, a backend's ICMPv6 port
//! unreachable translated back to the client, masquerade of ClusterIP traffic from outside the
//! cluster CIDRs and --masquerade-all, pods reaching an externalTrafficPolicy Local NodePort
//! through every endpoint, and IPv6 traffic that is not for a service (with its neighbour
//! discovery) crossing every hook untouched.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use sluice_testbed::{
    client::{ReplyAny, RequestError},
    cluster::ClusterOptions,
    sluice::SluiceCluster,
    tally, Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 10);
const VIP6: &str = "fd00:10:96::60:10";
const NODE_PORT: u16 = 30090;
/// `sluice_common::HAIRPIN6_SNAT_ADDR`, the IPv6 service loopback address.
const HAIRPIN6_ADDR: &str = "fd00:a9fe:2a01::1";

fn dual_stack_cluster(hint: &str) -> SluiceCluster {
    SluiceCluster::with_options(hint, 2, &ClusterOptions::new().dual_stack(true)).unwrap()
}

/// A dual-stack pod of `web` on node `node` serving TCP and UDP on 8080.
fn web_pod(cluster: &SluiceCluster, node: usize, n: u8) -> Pod {
    let node_ref = cluster.node(node);
    let pod = node_ref
        .add_pod_dual(
            &format!("web-{node}-{n}"),
            node_ref.pod_ip(n),
            node_ref.pod_ip6(n).unwrap(),
        )
        .unwrap();
    pod.serve(&[8080]).unwrap();
    pod
}

fn client_pod(cluster: &SluiceCluster, node: usize) -> Pod {
    let node_ref = cluster.node(node);
    node_ref
        .add_pod_dual(
            &format!("client-{node}"),
            node_ref.pod_ip(10),
            node_ref.pod_ip6(10).unwrap(),
        )
        .unwrap()
}

/// The dual-stack `web` NodePort service (TCP and UDP port 80 -> 8080) and its IPv4 and IPv6
/// slices.
fn write_web(cluster: &SluiceCluster, pods: &[(&Pod, usize)]) {
    let service = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: {VIP}
  clusterIPs: ["{VIP}", "{VIP6}"]
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 80, protocol: UDP, targetPort: 8080, nodePort: {}}}
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
    cluster
        .manifests
        .write(
            "web-slice-v6.yaml",
            &slice("IPv6", &|p| p.ipv6().unwrap().to_string()),
        )
        .unwrap();
}

fn sources(pod: &Pod) -> BTreeSet<IpAddr> {
    pod.seen().iter().map(|s| s.source.ip()).collect()
}

/// Every request succeeded, from `dst`, answered by `pod`.
fn assert_all_from(replies: &[Result<ReplyAny, RequestError>], dst: SocketAddr, pod: &Pod) {
    for reply in replies {
        match reply {
            Ok(r) => assert_eq!(r.peer, dst, "reply not from {dst}: {r:?}"),
            Err(e) => panic!("request to {dst} failed: {e}; tally {:?}", tally(replies)),
        }
    }
    let seen: BTreeSet<String> = tally(replies).keys().cloned().collect();
    assert_eq!(seen, BTreeSet::from([pod.name().to_string()]));
}

#[test]
fn ipv6_pod_traffic_crosses_nodes_and_sluice_hooks_untouched() {
    let mut cluster = dual_stack_cluster("v6-pods");
    let client = client_pod(&cluster, 1);
    let web = web_pod(&cluster, 2, 21);
    write_web(&cluster, &[(&web, 2)]);
    cluster.start_agents().unwrap();

    // Pod to pod over IPv6, across the nodes: both pods' veths and both nodes' external
    // interfaces carry Sluice's programs; neighbour discovery and the flows pass them.
    let dst: SocketAddr = web.addr6(8080).into();
    let replies = client.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = client.udp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(client.ipv6().unwrap())])
    );

    // From outside, routed through node 2, to the pod's IPv6 address.
    web.clear_seen();
    let ext = cluster.cluster.external();
    ext.add_route_via(cluster.node(2).pod_cidr6().unwrap().into(), cluster.node(2))
        .unwrap();
    let replies = ext.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = ext.udp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(ext.ipv6().unwrap())])
    );
}

#[test]
fn the_ipv4_frontends_of_a_dual_stack_service_use_the_ipv4_endpoints() {
    let mut cluster = dual_stack_cluster("v6-dual-svc");
    let client = client_pod(&cluster, 1);
    let web = web_pod(&cluster, 2, 21);
    write_web(&cluster, &[(&web, 2)]);
    cluster.start_agents().unwrap();

    // ClusterIP over IPv4 from a dual-stack pod on the other node: DNAT to the pod's IPv4
    // address (the IPv6 slice does not leak into the IPv4 frontend).
    let dst: SocketAddr = SocketAddrV4::new(VIP, 80).into();
    let replies = client.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = client.udp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V4(client.ip())]));

    // NodePort over IPv4 on node 1 from outside: the remote backend sees node 1.
    web.clear_seen();
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ip().unwrap();
    let dst: SocketAddr = SocketAddrV4::new(node_1, NODE_PORT).into();
    let replies = ext.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V4(node_1)]));

    // Its IPv6 ClusterIP: DNAT to the pod's IPv6 address, the client's IPv6 address kept.
    web.clear_seen();
    let dst: SocketAddr = SocketAddr::new(vip6().into(), 80);
    let replies = client.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = client.udp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(client.ipv6().unwrap())])
    );
}

fn vip6() -> Ipv6Addr {
    VIP6.parse().unwrap()
}

/// Asserts every request succeeded from `dst` and each of `pods` answered at least `min`
/// times, nothing else.
fn assert_spread(
    replies: &[Result<ReplyAny, RequestError>],
    dst: SocketAddr,
    pods: &[&Pod],
    min: usize,
) {
    let counts = tally(replies);
    for reply in replies {
        match reply {
            Ok(r) => assert_eq!(r.peer, dst, "reply not from {dst}: {r:?}"),
            Err(e) => panic!("request to {dst} failed: {e}; tally {counts:?}"),
        }
    }
    let expected: BTreeSet<String> = pods.iter().map(|p| p.name().to_string()).collect();
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(seen, expected, "answered by {counts:?}");
    for (pod, n) in &counts {
        assert!(*n >= min, "{pod} answered only {n} times: {counts:?}");
    }
}

#[test]
fn ipv6_cluster_ip_reaches_backends_on_the_other_node() {
    let mut cluster = dual_stack_cluster("v6-clusterip");
    let client = client_pod(&cluster, 1);
    let web = [web_pod(&cluster, 2, 21), web_pod(&cluster, 2, 22)];
    write_web(&cluster, &[(&web[0], 2), (&web[1], 2)]);
    cluster.start_agents().unwrap();

    let dst = SocketAddr::new(vip6().into(), 80);
    let replies = client.tcp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_spread(&replies, dst, &[&web[0], &web[1]], 20);
    let replies = client.udp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_spread(&replies, dst, &[&web[0], &web[1]], 20);
    // DNAT only: the servers on the other node saw the client pod's IPv6 address.
    for pod in &web {
        assert_eq!(
            sources(pod),
            BTreeSet::from([IpAddr::V6(client.ipv6().unwrap())])
        );
    }
}

#[test]
fn a_dual_stack_service_answers_on_both_families_from_each_familys_endpoints() {
    let mut cluster = dual_stack_cluster("v6-dual");
    let client = client_pod(&cluster, 2);
    let web = [web_pod(&cluster, 1, 21), web_pod(&cluster, 2, 21)];
    write_web(&cluster, &[(&web[0], 1), (&web[1], 2)]);
    cluster.start_agents().unwrap();

    for dst in [
        SocketAddr::new(VIP.into(), 80),
        SocketAddr::new(vip6().into(), 80),
    ] {
        for pod in &web {
            pod.clear_seen();
        }
        let replies = client.tcp_requests_any(dst, 60, TIMEOUT).unwrap();
        assert_spread(&replies, dst, &[&web[0], &web[1]], 10);
        let replies = client.udp_requests_any(dst, 60, TIMEOUT).unwrap();
        assert_spread(&replies, dst, &[&web[0], &web[1]], 10);
        // Each family's frontend reached the pods on that family's addresses: the sources
        // the servers saw are the client's address of that family.
        let client_ip = if dst.is_ipv4() {
            IpAddr::V4(client.ip())
        } else {
            IpAddr::V6(client.ipv6().unwrap())
        };
        for pod in &web {
            assert_eq!(sources(pod), BTreeSet::from([client_ip]), "via {dst}");
        }
    }
}

#[test]
fn ipv6_node_port_from_outside_to_a_local_backend_keeps_the_client_address() {
    let mut cluster = dual_stack_cluster("v6-nodeport");
    let web = web_pod(&cluster, 1, 21);
    write_web(&cluster, &[(&web, 1)]);
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();

    let node_1 = cluster.node(1).node_ipv6().unwrap();
    let dst = SocketAddr::new(node_1.into(), NODE_PORT);
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let dst_udp = SocketAddr::new(node_1.into(), NODE_PORT + 1);
    let replies = ext.udp_requests_any(dst_udp, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst_udp, &web);
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(ext.ipv6().unwrap())])
    );
}

#[test]
fn ipv6_node_port_from_outside_with_cluster_policy_masquerades_to_remote_backends() {
    let mut cluster = dual_stack_cluster("v6-nodeport-masq");
    let local = web_pod(&cluster, 1, 21);
    let remote = web_pod(&cluster, 2, 21);
    write_web(&cluster, &[(&local, 1), (&remote, 2)]);
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ipv6().unwrap();

    let dst = SocketAddr::new(node_1.into(), NODE_PORT);
    let replies = ext.tcp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_spread(&replies, dst, &[&local, &remote], 20);
    // Cluster policy: the local backend sees the client, the remote one node 1's IPv6 address
    // (masquerade, so its replies come back through node 1).
    assert_eq!(
        sources(&local),
        BTreeSet::from([IpAddr::V6(ext.ipv6().unwrap())])
    );
    assert_eq!(sources(&remote), BTreeSet::from([IpAddr::V6(node_1)]));

    let dst_udp = SocketAddr::new(node_1.into(), NODE_PORT + 1);
    let replies = ext.udp_requests_any(dst_udp, 60, TIMEOUT).unwrap();
    assert_spread(&replies, dst_udp, &[&local, &remote], 10);
}

#[test]
fn a_pod_reaches_itself_through_its_ipv6_cluster_ip() {
    let mut cluster = dual_stack_cluster("v6-hairpin");
    let web = web_pod(&cluster, 1, 21);
    write_web(&cluster, &[(&web, 1)]);
    cluster.start_agents().unwrap();

    let dst = SocketAddr::new(vip6().into(), 80);
    let replies = web.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = web.udp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    // Hairpin: the pod sees the service loopback address, not itself.
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(HAIRPIN6_ADDR.parse().unwrap())])
    );
}

#[test]
fn an_ipv6_frontend_without_endpoints_rejects_at_once() {
    let mut cluster = dual_stack_cluster("v6-reject");
    let client = client_pod(&cluster, 1);
    write_web(&cluster, &[]);
    cluster.start_agents().unwrap();
    let dst = SocketAddr::new(vip6().into(), 80);

    let started = std::time::Instant::now();
    let tcp = client.tcp_request_any(dst, TIMEOUT);
    assert!(matches!(tcp, Err(RequestError::Refused)), "TCP: {tcp:?}");
    let udp = client.udp_request_any(dst, TIMEOUT);
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "UDP: {udp:?}"
    );
    // From outside, through the NodePort on node 1's IPv6 address, too.
    let ext = cluster.cluster.external();
    let node_port = SocketAddr::new(cluster.node(1).node_ipv6().unwrap().into(), NODE_PORT);
    let tcp = ext.tcp_request_any(node_port, TIMEOUT);
    assert!(
        matches!(tcp, Err(RequestError::Refused)),
        "NodePort TCP: {tcp:?}"
    );
    let udp = ext.udp_request_any(
        SocketAddr::new(cluster.node(1).node_ipv6().unwrap().into(), NODE_PORT + 1),
        TIMEOUT,
    );
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "NodePort UDP: {udp:?}"
    );
    assert!(
        started.elapsed() < TIMEOUT,
        "rejections took {:?}: something waited for a timeout",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// IPv6 services with sessionAffinity, source ranges, masquerade, externalTrafficPolicy Local,
// and ICMPv6 errors about translated flows.

/// An IPv6-only service `name` (`type`, ClusterIP `vip`, TCP and UDP port 80 -> 8080 with
/// node ports `NODE_PORT + 10/11`, `extra` spec lines) with an IPv6 slice of `pods`.
fn write_service6(
    cluster: &SluiceCluster,
    name: &str,
    kind: &str,
    vip: &str,
    extra: &str,
    pods: &[(&Pod, usize)],
) {
    let service = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  type: {kind}
  ipFamilies: [IPv6]
  clusterIP: "{vip}"
  clusterIPs: ["{vip}"]
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {}}}
  - {{name: dns, port: 80, protocol: UDP, targetPort: 8080, nodePort: {}}}
  - {{name: closed, port: 81, protocol: UDP, targetPort: 9999, nodePort: {}}}
{extra}"#,
        NODE_PORT + 10,
        NODE_PORT + 11,
        NODE_PORT + 12,
    );
    let endpoints: String = pods
        .iter()
        .map(|(pod, node)| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-{node}, conditions: {{ready: true}}}}\n",
                pod.ipv6().unwrap()
            )
        })
        .collect();
    let slice = format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-v6
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv6
endpoints:
{endpoints}ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
- {{name: closed, port: 9999, protocol: UDP}}
"#
    );
    cluster
        .manifests
        .write(&format!("{name}.yaml"), &format!("{service}---\n{slice}"))
        .unwrap();
}

const VIP6_B: &str = "fd00:10:96::60:20";

#[test]
fn ipv6_session_affinity_keeps_a_client_on_one_backend_through_the_cluster_ip_and_the_node_port() {
    let mut cluster = dual_stack_cluster("v6-affinity");
    let client = client_pod(&cluster, 1);
    let web = [
        web_pod(&cluster, 1, 21),
        web_pod(&cluster, 1, 22),
        web_pod(&cluster, 2, 21),
    ];
    write_service6(
        &cluster,
        "sticky",
        "NodePort",
        VIP6_B,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        &[(&web[0], 1), (&web[1], 1), (&web[2], 2)],
    );
    cluster.start_agents().unwrap();

    // One client, 30 connections through the ClusterIP and 30 through node 1's NodePort:
    // one backend for all (kube-proxy keeps affinity per service port, not per address).
    let cluster_ip = SocketAddr::new(VIP6_B.parse::<Ipv6Addr>().unwrap().into(), 80);
    let node_port = SocketAddr::new(cluster.node(1).node_ipv6().unwrap().into(), NODE_PORT + 10);
    let mut replies = client.tcp_requests_any(cluster_ip, 30, TIMEOUT).unwrap();
    replies.extend(client.tcp_requests_any(node_port, 30, TIMEOUT).unwrap());
    let counts = tally(&replies);
    assert_eq!(
        counts.len(),
        1,
        "60 connections of one client went to {counts:?}"
    );
    assert!(!counts.contains_key("ERROR"), "{counts:?}");

    // Another client is balanced on its own (it may land anywhere, but it is answered).
    let ext = cluster.cluster.external();
    let from_outside = SocketAddr::new(cluster.node(1).node_ipv6().unwrap().into(), NODE_PORT + 10);
    let replies = ext.tcp_requests_any(from_outside, 20, TIMEOUT).unwrap();
    let counts = tally(&replies);
    assert_eq!(
        counts.len(),
        1,
        "20 connections from outside went to {counts:?}"
    );
    assert!(!counts.contains_key("ERROR"), "{counts:?}");
}

#[test]
fn ipv6_load_balancer_source_ranges_drop_other_sources() {
    let mut cluster = dual_stack_cluster("v6-lb-ranges");
    let web = web_pod(&cluster, 1, 21);
    let lb_ip: Ipv6Addr = "2001:db8:ffff::50".parse().unwrap();
    let ext = cluster.cluster.external();
    let ext_ip = ext.ipv6().unwrap();
    ext.add_route(
        &format!("{lb_ip}/128"),
        cluster.node(1).node_ipv6().unwrap(),
    )
    .unwrap();
    let write = |cluster: &SluiceCluster, ranges: &str| {
        write_service6(
            cluster,
            "lb",
            "LoadBalancer",
            VIP6_B,
            &format!(
                "  loadBalancerSourceRanges: [{ranges}]\nstatus:\n  loadBalancer: {{ingress: [{{ip: \"{lb_ip}\"}}]}}\n"
            ),
            &[(&web, 1)],
        )
    };
    write(&cluster, &format!("\"{ext_ip}/128\", 192.0.2.0/24"));
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();

    let dst = SocketAddr::new(lb_ip.into(), 80);
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V6(ext_ip)]));

    // ext outside the ranges: dropped (a timeout, not a refusal).
    write(&cluster, "\"2001:db8:1::/48\"");
    sluice_testbed::retry_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || match ext.tcp_request_any(dst, Duration::from_millis(300)) {
            Err(RequestError::Timeout) => Ok(()),
            other => {
                anyhow::bail!("the LB IP still answers a source outside the ranges: {other:?}")
            }
        },
    )
    .unwrap();
    let udp = ext.udp_request_any(dst, Duration::from_millis(500));
    assert!(matches!(udp, Err(RequestError::Timeout)), "UDP: {udp:?}");
}

#[test]
fn a_backends_icmpv6_port_unreachable_reaches_the_client_from_the_cluster_ip() {
    let mut cluster = dual_stack_cluster("v6-icmp");
    let client = client_pod(&cluster, 1);
    // One backend on the other node, serving 8080 only: port 81 -> 9999 is closed there.
    let web = web_pod(&cluster, 2, 21);
    write_service6(&cluster, "closed", "NodePort", VIP6_B, "", &[(&web, 2)]);
    cluster.start_agents().unwrap();

    // The backend's kernel answers with an ICMPv6 port unreachable about
    // client -> backend:9999; the client's connected socket only takes it (ECONNREFUSED, with
    // the sender) when it is about client -> ClusterIP:81, from the ClusterIP.
    let vip = VIP6_B.parse::<Ipv6Addr>().unwrap();
    let started = std::time::Instant::now();
    let udp = client.udp_request_any(SocketAddr::new(vip.into(), 81), TIMEOUT);
    let unreachable = udp
        .as_ref()
        .err()
        .and_then(RequestError::unreachable)
        .unwrap_or_else(|| panic!("expected a port unreachable: {udp:?}"));
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "{udp:?}"
    );
    assert_eq!(
        unreachable.from,
        Some(IpAddr::V6(vip)),
        "the error's sender"
    );
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());

    // From outside through node 1's NodePort (masqueraded to the remote backend): the error
    // comes back through node 1 to the client, from the NodePort address.
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ipv6().unwrap();
    let udp = ext.udp_request_any(SocketAddr::new(node_1.into(), NODE_PORT + 12), TIMEOUT);
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "NodePort: {udp:?}"
    );
    assert_eq!(
        udp.as_ref()
            .err()
            .and_then(RequestError::unreachable)
            .and_then(|u| u.from),
        Some(IpAddr::V6(node_1))
    );
}

#[test]
fn ipv6_cluster_ip_traffic_from_outside_and_with_masquerade_all_is_masqueraded() {
    let mut cluster = dual_stack_cluster("v6-masq");
    let client = client_pod(&cluster, 1);
    let web = web_pod(&cluster, 2, 21);
    write_service6(&cluster, "web6", "ClusterIP", VIP6_B, "", &[(&web, 2)]);
    cluster.start_agents().unwrap();
    let node_1 = cluster.node(1).node_ipv6().unwrap();
    let dst = SocketAddr::new(VIP6_B.parse::<Ipv6Addr>().unwrap().into(), 80);

    // ext routes the ClusterIP through node 1: outside the cluster CIDRs, so masqueraded to
    // node 1's IPv6 address (the backend on node 2 answers node 1, which restores the reply).
    let ext = cluster.cluster.external();
    ext.add_route(&format!("{VIP6_B}/128"), node_1).unwrap();
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = ext.udp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V6(node_1)]));

    // A pod keeps its address...
    web.clear_seen();
    let replies = client.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V6(client.ipv6().unwrap())])
    );
    // ... unless the agent masquerades everything.
    cluster.start_agent(1, &["--masquerade-all"]).unwrap();
    web.clear_seen();
    let replies = client.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    let replies = client.udp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &web);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V6(node_1)]));
}

#[test]
fn pods_reach_an_ipv6_external_traffic_policy_local_node_port_through_every_endpoint() {
    let mut cluster = dual_stack_cluster("v6-etp-local");
    let client = client_pod(&cluster, 1);
    let local = web_pod(&cluster, 1, 21);
    let remote = web_pod(&cluster, 2, 21);
    write_service6(
        &cluster,
        "edge",
        "NodePort",
        VIP6_B,
        "  externalTrafficPolicy: Local\n",
        &[(&local, 1), (&remote, 2)],
    );
    cluster.start_agents().unwrap();
    let dst = SocketAddr::new(cluster.node(1).node_ipv6().unwrap().into(), NODE_PORT + 10);

    // From a pod: every endpoint, the pod's address kept.
    let replies = client.tcp_requests_any(dst, 60, TIMEOUT).unwrap();
    assert_spread(&replies, dst, &[&local, &remote], 10);
    let client_ip = BTreeSet::from([IpAddr::V6(client.ipv6().unwrap())]);
    assert_eq!(sources(&local), client_ip);
    assert_eq!(sources(&remote), client_ip);

    // From outside: the local endpoint only, the client's address kept.
    local.clear_seen();
    let ext = cluster.cluster.external();
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_all_from(&replies, dst, &local);
    assert_eq!(
        sources(&local),
        BTreeSet::from([IpAddr::V6(ext.ipv6().unwrap())])
    );
}
