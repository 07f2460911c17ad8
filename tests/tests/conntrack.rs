//! Connection tracking with real traffic on a two-node cluster plus an outside client: closed
//! connections, garbage collection, masquerade ports and the TTL of forwarded packets.

use std::{
    collections::BTreeSet,
    io::Read,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use sluice_testbed::{in_netns, sluice::SluiceCluster, Pod};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 10);
const NODE_PORT: u16 = 30_180;
const TTL_PORT: u16 = 9_000;
const TTL_NODE_PORT: u16 = 30_190;

/// A ClusterIP and NodePort TCP service `web` (80 -> 8080, NodePort [`NODE_PORT`]) over
/// `pods` (pod, node), and a UDP NodePort `ttl` ([`TTL_NODE_PORT`] -> `ttl_pod`:9000).
fn manifests(pods: &[(&Pod, usize)], ttl_pod: Option<(&Pod, usize)>) -> String {
    let endpoints: String = pods
        .iter()
        .map(|(pod, node)| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-{node}, conditions: {{ready: true}}}}\n",
                pod.ip()
            )
        })
        .collect();
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ct}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: ct
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: 8080, protocol: TCP}}
"#
    );
    if let Some((pod, node)) = ttl_pod {
        yaml.push_str(&format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: ttl, namespace: ct}}
spec:
  type: NodePort
  clusterIP: 10.96.60.11
  ports:
  - {{name: probe, port: {TTL_PORT}, protocol: UDP, targetPort: {TTL_PORT}, nodePort: {TTL_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ttl-1
  namespace: ct
  labels: {{kubernetes.io/service-name: ttl}}
addressType: IPv4
endpoints:
- {{addresses: ["{}"], nodeName: node-{node}, conditions: {{ready: true}}}}
ports:
- {{name: probe, port: {TTL_PORT}, protocol: UDP}}
"#,
            pod.ip()
        ));
    }
    yaml
}

fn web_pod(cluster: &SluiceCluster, node: usize, n: u8) -> Pod {
    let node_ref = cluster.node(node);
    let pod = node_ref
        .add_pod(&format!("web-{node}-{n}"), node_ref.pod_ip(n))
        .unwrap();
    pod.serve(&[8080]).unwrap();
    pod
}

/// One TCP request from `local` (a fixed address and port, reused) to `dst`: the answer
/// (the serving pod's name). Retries while the previous connection on the same tuple is
/// still closing in the client's stack.
fn request_from_port(local: SocketAddrV4, dst: SocketAddrV4) -> String {
    let start = Instant::now();
    loop {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&SockAddr::from(local)).unwrap();
        match socket.connect_timeout(&SockAddr::from(dst), TIMEOUT) {
            Ok(()) => {
                let mut stream: TcpStream = socket.into();
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                return answer.trim().to_string();
            }
            // The last connection on this tuple is not closed yet (LAST_ACK).
            Err(e) if start.elapsed() < Duration::from_secs(2) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connecting {local} -> {dst}: {e}"),
        }
    }
}

#[test]
fn a_closed_connection_reusing_its_client_port_is_balanced_again_and_collected() {
    let mut cluster = SluiceCluster::new("ct-reuse", 2).unwrap();
    let web = [web_pod(&cluster, 2, 21), web_pod(&cluster, 2, 22)];
    let node_1 = cluster.node(1);
    let client = node_1.add_pod("client-1", node_1.pod_ip(10)).unwrap();
    cluster
        .manifests
        .write("web.yaml", &manifests(&[(&web[0], 2), (&web[1], 2)], None))
        .unwrap();
    let args = [
        "--conntrack-tcp-timeout-close",
        "2s",
        "--conntrack-gc-interval",
        "300ms",
    ];
    for i in 1..=2 {
        cluster.start_agent(i, &args).unwrap();
    }

    // The same client port, one connection after the other, each closed by both sides:
    // every SYN is a new connection and balanced again (before conntrack tracked TCP state,
    // a SYN this soon after the first was taken for its retransmission and kept its backend).
    let local = SocketAddrV4::new(client.ip(), 45_000);
    let answers: Vec<String> = in_netns(client.netns_path(), || {
        (0..16)
            .map(|_| request_from_port(local, SocketAddrV4::new(VIP, 80)))
            .collect()
    })
    .unwrap();
    let answered: BTreeSet<&str> = answers.iter().map(String::as_str).collect();
    let expected: BTreeSet<&str> = web.iter().map(|p| p.name()).collect();
    assert_eq!(answered, expected, "answers: {answers:?}");

    // `sluice state` shows the last connection's flow as closed, until it expires (2 s) and
    // the agent's GC removes it and says so.
    let flows = conntrack_json(&cluster, 1);
    let ours: Vec<&serde_json::Value> = flows
        .iter()
        .filter(|f| f["client"] == local.to_string())
        .collect();
    assert_eq!(ours.len(), 1, "{flows:?}");
    assert_eq!(ours[0]["state"], "closed", "{flows:?}");
    let agent = cluster.agent_mut(1).unwrap();
    agent
        .wait_for_log(
            "conntrack gc: removed expired entries",
            Duration::from_secs(6),
        )
        .unwrap();
    let flows = conntrack_json(&cluster, 1);
    assert!(
        flows.iter().all(|f| f["client"] != local.to_string()),
        "still tracked after the GC: {flows:?}"
    );
}

/// The flows `sluice state --json conntrack` shows for node `i`.
fn conntrack_json(cluster: &SluiceCluster, i: usize) -> Vec<serde_json::Value> {
    let bin = sluice_testbed::sluice::sluice_bin();
    let pins = cluster.pins[i - 1].path().to_str().unwrap().to_string();
    let output = cluster
        .node(i)
        .exec(&[
            bin.to_str().unwrap(),
            "state",
            "--pin-path",
            &pins,
            "--json",
            "conntrack",
        ])
        .unwrap();
    assert!(
        output.status.success(),
        "sluice state: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    json["conntrack"].as_array().cloned().unwrap_or_default()
}

/// The node's ephemeral ports, as its netns has them.
fn ephemeral_range(netns: &Path) -> (u16, u16) {
    in_netns(netns, || {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().unwrap());
        (ports.next().unwrap(), ports.next().unwrap())
    })
    .unwrap()
}

#[test]
fn masqueraded_flows_take_ports_outside_the_nodes_ephemeral_range() {
    let mut cluster = SluiceCluster::new("ct-masq", 2).unwrap();
    let web = web_pod(&cluster, 2, 21);
    cluster
        .manifests
        .write("web.yaml", &manifests(&[(&web, 2)], None))
        .unwrap();
    cluster
        .start_agent(1, &["--masquerade-port-range", "62000-62099"])
        .unwrap();
    cluster.start_agent(2, &[]).unwrap();
    let node_1 = cluster.node(1);
    let node_ip = node_1.node_ip().unwrap();
    let (eph_first, eph_last) = ephemeral_range(node_1.netns_path());
    assert!(
        eph_last < 62_000,
        "the node's ephemeral range reaches the masquerade range"
    );

    // The node holds connections of its own to the backend open while outside clients reach
    // it through the NodePort, masqueraded to the node's address.
    let own: Vec<TcpStream> = in_netns(node_1.netns_path(), || {
        (0..10)
            .map(|_| {
                let s = TcpStream::connect_timeout(&web.addr(8080).into(), TIMEOUT).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s
            })
            .collect()
    })
    .unwrap();
    let ext = cluster.cluster.external();
    let dst = SocketAddr::from(SocketAddrV4::new(node_ip, NODE_PORT));
    let replies = ext.tcp_requests_any(dst, 20, TIMEOUT).unwrap();
    for reply in &replies {
        let reply = reply.as_ref().expect("a NodePort answer");
        assert_eq!(reply.peer, dst);
    }
    drop(own);

    let from_node: Vec<u16> = web
        .seen()
        .iter()
        .filter(|s| s.source.ip() == IpAddr::V4(node_ip))
        .map(|s| s.source.port())
        .collect();
    let masqueraded = from_node.iter().filter(|p| (62_000..=62_099).contains(*p));
    let own_ports = from_node
        .iter()
        .filter(|p| (eph_first..=eph_last).contains(*p));
    assert_eq!(
        masqueraded.count(),
        20,
        "masqueraded sources: {from_node:?}"
    );
    assert_eq!(
        own_ports.count(),
        10,
        "the node's own sources: {from_node:?}"
    );
    assert_eq!(from_node.len(), 30, "{from_node:?}");
}

/// Receives one UDP datagram on `port` in the calling thread's netns and returns the TTL it
/// arrived with (IP_RECVTTL).
fn receive_ttl(port: u16) -> impl FnOnce() -> u8 {
    let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVTTL,
            &on as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "IP_RECVTTL");
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    move || {
        let mut data = [0u8; 64];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: a zeroed msghdr is valid; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = size_of::<[u64; 16]>();
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
        assert!(n >= 0, "no datagram: {}", std::io::Error::last_os_error());
        // SAFETY: walking the control messages the kernel wrote.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_TTL {
                    return *(libc::CMSG_DATA(cmsg) as *const libc::c_int) as u8;
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        panic!("no IP_TTL control message");
    }
}

/// The TTL a datagram from the calling thread's netns to `dst` arrives with at `pod`.
fn ttl_at(pod: &Pod, from: &Path, dst: SocketAddrV4) -> u8 {
    let receive = in_netns(pod.netns_path(), || receive_ttl(TTL_PORT)).unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| in_netns(pod.netns_path(), receive).unwrap());
        // Until the receiver runs: a few datagrams, the first one that arrives counts.
        in_netns(from, || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..5 {
                socket.send_to(b"ttl?", dst).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .unwrap();
        receiver.join().unwrap()
    })
}

#[test]
fn forwarded_packets_lose_one_ttl_per_node_whether_redirected_or_routed() {
    let mut cluster = SluiceCluster::new("ct-ttl", 2).unwrap();
    let web = web_pod(&cluster, 2, 21);
    let ttl_pod = cluster
        .node(2)
        .add_pod("ttl-2", cluster.node(2).pod_ip(30))
        .unwrap();
    cluster
        .manifests
        .write("web.yaml", &manifests(&[(&web, 2)], Some((&ttl_pod, 2))))
        .unwrap();
    cluster.start_agents().unwrap();
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1);
    let sent_ttl: u8 = in_netns(ext.netns_path(), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    })
    .unwrap();

    // Outside -> node 1's NodePort (redirected by the programs, not forwarded by the kernel)
    // -> node 2 (routed by the kernel) -> the pod: two hops.
    let via_node_port = ttl_at(
        &ttl_pod,
        ext.netns_path(),
        SocketAddrV4::new(node_1.node_ip().unwrap(), TTL_NODE_PORT),
    );
    assert_eq!(via_node_port, sent_ttl - 2);

    // The same two hops for a pod on node 1 reaching the pod directly (both routed by the
    // kernel).
    let client = node_1.add_pod("client-1", node_1.pod_ip(10)).unwrap();
    let client_ttl: u8 = in_netns(client.netns_path(), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    })
    .unwrap();
    let direct = ttl_at(
        &ttl_pod,
        client.netns_path(),
        SocketAddrV4::new(ttl_pod.ip(), TTL_PORT),
    );
    assert_eq!(client_ttl - direct, sent_ttl - via_node_port);
}
