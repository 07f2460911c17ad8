//! kube-proxy's Service behaviours with real traffic on a two-node cluster plus an outside
//! client (`ext`), one `sluice agent` per node. Each test checks what the client sees and, where
//! it matters, the source address the server saw.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use sluice_testbed::{
    client::{ReplyAny, RequestError},
    retry_until,
    sluice::SluiceCluster,
    tally, Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 10);
const NODE_PORT: u16 = 30080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// A pod of the `web` service on node `node` (the `n`th address of its pod CIDR), serving TCP
/// and UDP on 8080.
fn web_pod(cluster: &SluiceCluster, node: usize, n: u8) -> Pod {
    let node_ref = cluster.node(node);
    let pod = node_ref
        .add_pod(&format!("web-{node}-{n}"), node_ref.pod_ip(n))
        .unwrap();
    pod.serve(&[8080]).unwrap();
    pod
}

fn client_pod(cluster: &SluiceCluster, node: usize) -> Pod {
    let node_ref = cluster.node(node);
    node_ref
        .add_pod(&format!("client-{node}"), node_ref.pod_ip(10))
        .unwrap()
}

/// The `web` Service: port 80 (TCP and UDP) -> 8080, NodePort 30080 for TCP, with `spec`
/// lines added (YAML, indented two spaces), and `status` for a load balancer.
fn web_service(type_: &str, spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: {type_}
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 80, protocol: UDP, targetPort: 8080, nodePort: {}}}
{spec}status:
  loadBalancer:
    ingress: [{{ip: "{LB_IP}"}}]
"#,
        NODE_PORT + 1
    )
}

/// The `web` EndpointSlice with `pods` (all ready), each on its node.
fn web_slice(pods: &[(&Pod, usize)]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|(pod, node)| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-{node}, conditions: {{ready: true}}}}\n",
                pod.ip()
            )
        })
        .collect();
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 8080, protocol: UDP}}
"#
    )
}

fn write(cluster: &SluiceCluster, service: &str, slice: &str) {
    cluster.manifests.write("web.yaml", service).unwrap();
    cluster.manifests.write("web-slice.yaml", slice).unwrap();
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_string()).collect()
}

/// Asserts every request succeeded, came back from `dst`, and was answered by each of `pods`
/// at least `min` times and by nothing else.
fn assert_answered(
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
    let expected = names(pods);
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(seen, expected, "answered by {counts:?}");
    for (pod, n) in &counts {
        assert!(*n >= min, "{pod} answered only {n} times: {counts:?}");
    }
}

/// The source addresses `pod` saw since the last `clear_seen`.
fn sources(pod: &Pod) -> BTreeSet<IpAddr> {
    pod.seen().iter().map(|s| s.source.ip()).collect()
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddrV4::new(ip, port).into()
}

#[test]
fn cluster_ip_reaches_backends_on_the_other_node() {
    let mut cluster = SluiceCluster::new("svc-remote", 2).unwrap();
    let client = client_pod(&cluster, 1);
    let web = [web_pod(&cluster, 2, 21), web_pod(&cluster, 2, 22)];
    write(
        &cluster,
        &web_service("ClusterIP", ""),
        &web_slice(&[(&web[0], 2), (&web[1], 2)]),
    );
    cluster.start_agents().unwrap();

    let dst = v4(VIP, 80);
    let replies = client.tcp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&web[0], &web[1]], 20);
    let replies = client.udp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&web[0], &web[1]], 20);
    // A ClusterIP is DNAT only: the servers on the other node saw the client pod.
    for pod in &web {
        assert_eq!(sources(pod), BTreeSet::from([IpAddr::V4(client.ip())]));
    }
}

#[test]
fn node_port_from_outside_and_from_pods_with_cluster_policy() {
    let mut cluster = SluiceCluster::new("svc-nodeport", 2).unwrap();
    let local = web_pod(&cluster, 1, 21);
    let remote = web_pod(&cluster, 2, 21);
    let client = client_pod(&cluster, 2);
    write(
        &cluster,
        &web_service("NodePort", ""),
        &web_slice(&[(&local, 1), (&remote, 2)]),
    );
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ip().unwrap();

    let dst = v4(node_1, NODE_PORT);
    let replies = ext.tcp_requests_any(dst, 100, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&local, &remote], 20);
    // Cluster policy: the local backend sees the client, the remote one node 1 (masquerade,
    // so its replies come back through node 1).
    assert_eq!(sources(&local), BTreeSet::from([IpAddr::V4(ext.ip())]));
    assert_eq!(sources(&remote), BTreeSet::from([IpAddr::V4(node_1)]));

    // UDP NodePort too.
    let dst_udp = v4(node_1, NODE_PORT + 1);
    let replies = ext.udp_requests_any(dst_udp, 60, TIMEOUT).unwrap();
    assert_answered(&replies, dst_udp, &[&local, &remote], 10);

    // From a pod on node 2 to node 1's NodePort.
    let replies = client.tcp_requests_any(dst, 60, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&local, &remote], 10);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let mut cluster = SluiceCluster::new("svc-etp-local", 2).unwrap();
    let web = web_pod(&cluster, 2, 21);
    let client = client_pod(&cluster, 1);
    write(
        &cluster,
        &web_service(
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        ),
        &web_slice(&[(&web, 2)]),
    );
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();

    // Node 2 has the endpoint: served, and the pod sees the real client.
    let node_2 = v4(cluster.node(2).node_ip().unwrap(), NODE_PORT);
    let replies = ext.tcp_requests_any(node_2, 30, TIMEOUT).unwrap();
    assert_answered(&replies, node_2, &[&web], 30);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V4(ext.ip())]));

    // Node 1 has none: dropped (not rejected), as kube-proxy does.
    let node_1 = v4(cluster.node(1).node_ip().unwrap(), NODE_PORT);
    let answer = ext.tcp_request_any(node_1, Duration::from_millis(700));
    assert!(
        matches!(answer, Err(RequestError::Timeout)),
        "node 1 without a local endpoint answered {answer:?}"
    );

    // A pod on node 1 is not outside traffic: node 1's NodePort and the load balancer IP take
    // it to the service's endpoints anywhere (kube-proxy's "pod traffic for external
    // destinations"), without masquerade.
    for dst in [node_1, v4(LB_IP, 80)] {
        let replies = client.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
        assert_answered(&replies, dst, &[&web], 10);
    }
    assert_eq!(
        sources(&web),
        BTreeSet::from([IpAddr::V4(ext.ip()), IpAddr::V4(client.ip())])
    );
}

#[test]
fn load_balancer_ips_external_ips_and_source_ranges() {
    let mut cluster = SluiceCluster::new("svc-lb", 2).unwrap();
    let web = web_pod(&cluster, 1, 21);
    let node_1 = cluster.node(1).node_ip().unwrap();
    let ext_ip = cluster.cluster.external().ip();
    // The "load balancer" and the router for external IPs: ext sends both to node 1.
    let ext = cluster.cluster.external();
    ext.add_route(&format!("{LB_IP}/32"), node_1).unwrap();
    ext.add_route(&format!("{EXTERNAL_IP}/32"), node_1).unwrap();
    let service = |ranges: &str| {
        web_service(
            "LoadBalancer",
            &format!(
                "  externalIPs: [\"{EXTERNAL_IP}\"]\n  loadBalancerSourceRanges: [{ranges}]\n"
            ),
        )
    };
    write(
        &cluster,
        &service(&format!("\"{ext_ip}/32\"")),
        &web_slice(&[(&web, 1)]),
    );
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();

    for ip in [LB_IP, EXTERNAL_IP] {
        let dst = v4(ip, 80);
        let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
        assert_answered(&replies, dst, &[&web], 20);
    }

    // ext outside the allowed ranges: the load balancer IP drops it, the external IP (which
    // source ranges do not cover) still serves it.
    cluster
        .manifests
        .write("web.yaml", &service("\"203.0.113.0/24\""))
        .unwrap();
    retry_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || match ext.tcp_request_any(v4(LB_IP, 80), Duration::from_millis(300)) {
            Err(RequestError::Timeout) => Ok(()),
            other => anyhow::bail!("LB IP still answers a source outside the ranges: {other:?}"),
        },
    )
    .unwrap();
    let dst = v4(EXTERNAL_IP, 80);
    let replies = ext.tcp_requests_any(dst, 10, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&web], 10);
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints() {
    let mut cluster = SluiceCluster::new("svc-itp", 2).unwrap();
    let local = web_pod(&cluster, 1, 21);
    let remote = web_pod(&cluster, 2, 21);
    write(
        &cluster,
        &web_service("ClusterIP", "  internalTrafficPolicy: Local\n"),
        &web_slice(&[(&local, 1), (&remote, 2)]),
    );
    let client_1 = client_pod(&cluster, 1);
    let client_2 = client_pod(&cluster, 2);
    cluster.start_agents().unwrap();
    let dst = v4(VIP, 80);
    let replies = client_1.tcp_requests_any(dst, 40, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&local], 40);
    let replies = client_2.tcp_requests_any(dst, 40, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&remote], 40);
}

#[test]
fn session_affinity_client_ip_sticks_to_one_backend() {
    let mut cluster = SluiceCluster::new("svc-affinity", 2).unwrap();
    let web = [
        web_pod(&cluster, 1, 21),
        web_pod(&cluster, 1, 22),
        web_pod(&cluster, 2, 21),
    ];
    write(
        &cluster,
        &web_service(
            "ClusterIP",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        ),
        &web_slice(&[(&web[0], 1), (&web[1], 1), (&web[2], 2)]),
    );
    let client = client_pod(&cluster, 1);
    cluster.start_agents().unwrap();
    let dst = v4(VIP, 80);
    let replies = client.tcp_requests_any(dst, 40, TIMEOUT).unwrap();
    let counts = tally(&replies);
    assert_eq!(
        counts.len(),
        1,
        "40 connections of one client went to {counts:?}"
    );
    assert!(!counts.contains_key("ERROR"), "{counts:?}");
}

#[test]
fn a_service_without_endpoints_rejects_at_once() {
    let mut cluster = SluiceCluster::new("svc-reject", 2).unwrap();
    let client = client_pod(&cluster, 1);
    write(&cluster, &web_service("NodePort", ""), &web_slice(&[]));
    cluster.start_agents().unwrap();
    let dst = v4(VIP, 80);

    let started = Instant::now();
    let tcp = client.tcp_request_any(dst, TIMEOUT);
    assert!(matches!(tcp, Err(RequestError::Refused)), "TCP: {tcp:?}");
    let udp = client.udp_request_any(dst, TIMEOUT);
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "UDP: {udp:?}"
    );
    // From outside, through a NodePort, too.
    let ext = cluster.cluster.external();
    let node_port = v4(cluster.node(1).node_ip().unwrap(), NODE_PORT);
    let tcp = ext.tcp_request_any(node_port, TIMEOUT);
    assert!(
        matches!(tcp, Err(RequestError::Refused)),
        "NodePort TCP: {tcp:?}"
    );
    assert!(
        started.elapsed() < TIMEOUT,
        "rejections took {:?}: something waited for a timeout",
        started.elapsed()
    );
}

#[test]
fn masquerade_from_outside_the_cluster_and_hairpin() {
    let mut cluster = SluiceCluster::new("svc-masq", 2).unwrap();
    let web = web_pod(&cluster, 2, 21);
    write(
        &cluster,
        &web_service("ClusterIP", ""),
        &web_slice(&[(&web, 2)]),
    );
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ip().unwrap();

    // ext routes the service range through node 1 (not a pod: outside the cluster CIDR).
    ext.add_route("10.96.0.0/12", node_1).unwrap();
    let dst = v4(VIP, 80);
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&web], 20);
    assert_eq!(sources(&web), BTreeSet::from([IpAddr::V4(node_1)]));

    // Hairpin: the backend reaches itself through its own service.
    let replies = web.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&web], 20);
}

#[test]
fn udp_flows_move_off_a_removed_endpoint_at_once() {
    let mut cluster = SluiceCluster::new("svc-stale", 2).unwrap();
    let web = [web_pod(&cluster, 1, 21), web_pod(&cluster, 2, 21)];
    write(
        &cluster,
        &web_service("ClusterIP", ""),
        &web_slice(&[(&web[0], 1), (&web[1], 2)]),
    );
    let client = client_pod(&cluster, 1);
    cluster.start_agents().unwrap();
    let dst = v4(VIP, 80);

    // One UDP socket, one 5-tuple, many datagrams: conntrack keeps it on one backend.
    let first_and_after = client
        .run(|| -> anyhow::Result<(String, Vec<String>)> {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(dst)?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            let ask = |socket: &std::net::UdpSocket| -> anyhow::Result<String> {
                socket.send(b"?")?;
                let mut buf = [0u8; 256];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
            };
            let first = ask(&socket)?;
            for _ in 0..5 {
                anyhow::ensure!(ask(&socket)? == first, "the flow changed backend");
            }
            // Remove the backend this flow uses (in another thread's view: the manifests).
            let keep = if first == web[0].name() {
                &web[1]
            } else {
                &web[0]
            };
            let keep_node = if keep.name() == web[0].name() { 1 } else { 2 };
            cluster
                .manifests
                .write("web-slice.yaml", &web_slice(&[(keep, keep_node)]))?;
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut after = Vec::new();
            while Instant::now() < deadline {
                match ask(&socket) {
                    Ok(answer) => {
                        after.push(answer.clone());
                        if answer == keep.name() {
                            break;
                        }
                    }
                    Err(_) => after.push("ERROR".into()),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok((first, after))
        })
        .unwrap()
        .unwrap();
    let (first, after) = first_and_after;
    assert_ne!(
        after.last().map(String::as_str),
        Some(first.as_str()),
        "the UDP flow stayed on the removed endpoint {first}: {after:?}"
    );
    assert!(
        after.last().is_some_and(|a| a != "ERROR"),
        "the UDP flow never reached the remaining endpoint: {after:?}"
    );
}

#[test]
fn icmp_errors_of_translated_flows_reach_the_client() {
    let mut cluster = SluiceCluster::new("svc-icmp", 2).unwrap();
    // A backend with no UDP server: it answers the datagram with ICMP port unreachable.
    let silent = cluster
        .node(2)
        .add_pod("silent", cluster.node(2).pod_ip(21))
        .unwrap();
    silent.serve_tcp(&[8080]).unwrap();
    write(
        &cluster,
        &web_service("ClusterIP", ""),
        &web_slice(&[(&silent, 2)]),
    );
    let client = client_pod(&cluster, 1);
    cluster.start_agents().unwrap();
    // The client's connected socket only hears an ICMP error about VIP:80: the error must be
    // translated back from the backend's address.
    let udp = client.udp_request_any(v4(VIP, 80), TIMEOUT);
    assert!(
        udp.as_ref().is_err_and(RequestError::is_port_unreachable),
        "{udp:?}"
    );
}

#[test]
fn topology_prefer_close_stays_in_the_zone() {
    let mut cluster = SluiceCluster::new("svc-zone", 2).unwrap();
    let near = web_pod(&cluster, 1, 21);
    let far = web_pod(&cluster, 2, 21);
    let zone_1 = cluster.node(1).zone().unwrap().to_string();
    let zone_2 = cluster.node(2).zone().unwrap().to_string();
    let slice = web_slice(&[(&near, 1), (&far, 2)])
        .replacen(
            "nodeName: node-1,",
            &format!(
                "nodeName: node-1, zone: {zone_1}, hints: {{forZones: [{{name: {zone_1}}}]}},"
            ),
            1,
        )
        .replacen(
            "nodeName: node-2,",
            &format!(
                "nodeName: node-2, zone: {zone_2}, hints: {{forZones: [{{name: {zone_2}}}]}},"
            ),
            1,
        );
    write(
        &cluster,
        &web_service("ClusterIP", "  trafficDistribution: PreferClose\n"),
        &slice,
    );
    let client_1 = client_pod(&cluster, 1);
    let client_2 = client_pod(&cluster, 2);
    cluster.start_agents().unwrap();
    let dst = v4(VIP, 80);
    let replies = client_1.tcp_requests_any(dst, 30, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&near], 30);
    let replies = client_2.tcp_requests_any(dst, 30, TIMEOUT).unwrap();
    assert_answered(&replies, dst, &[&far], 30);
}
