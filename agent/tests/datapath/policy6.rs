//! NetworkPolicy on the IPv6 path: the same checks as policy.rs, for IPv6 packets of
//! dual-stack pods, on `policy6`, `isolated6` and `policy_flows6`. The policies are YAML,
//! resolved from `status.podIPs`, compiled and programmed by the agent's own code.

use std::{net::Ipv6Addr, path::Path};

use sluice::{
    manifests,
    packet::{tcp6_packet, udp6_packet, Flow6},
    policy,
};
use sluice_common::{
    PolicyEvent6, REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS, WAY_INGRESS,
};

use crate::support::*;

/// x/a, x/b, y/a on this node (node-a), y/c on node-b; each dual-stack (10.244.<n>.<m> and
/// fd00:10:244:<n>::<m>), labels pod=<name>, namespaces ns=<name>.
const XA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xa);
const XB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xb);
const YA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x14);
const YC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x1e);
const XA4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const XB4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const YA4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
/// This node's IPv6 address.
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 3);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const VIP6_Y: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);

fn pods_yaml() -> String {
    let mut yaml = String::new();
    for ns in ["x", "y"] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod, v4, v6, node) in [
        ("x", "a", "10.244.0.10", XA6, "node-a"),
        ("x", "b", "10.244.0.11", XB6, "node-a"),
        ("y", "a", "10.244.0.20", YA6, "node-a"),
        ("y", "c", "10.244.1.30", YC6, "node-b"),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
             spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n\
             status: {{podIP: {v4}, podIPs: [{{ip: {v4}}}, {{ip: '{v6}'}}]}}\n"
        ));
    }
    yaml
}

/// Both node addresses, both families' cluster CIDRs.
fn node6() -> NodeContext {
    let mut node = node_context(false);
    node.node_ips.push(NODE6.into());
    node.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
    node
}

fn program_policy(datapath: &mut Datapath, policies: &str) -> sluice::datapath::PolicySyncStats {
    let mut objects = manifests::Objects::default();
    let mut errors = Vec::new();
    let text = format!("{}{policies}", pods_yaml());
    manifests::parse_into(Path::new("policy.yaml"), &text, &mut objects, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let (wire, problems) = policy::program(&objects, &node6());
    assert!(problems.is_empty(), "{problems:?}");
    assert!(!wire.entries6.is_empty() || !wire.isolated6.is_empty());
    let stats = datapath.sync_policy(&wire);
    assert!(stats.failed.is_empty(), "{stats:?}");
    stats
}

fn policy_datapath(services: Vec<(Frontend, ServiceEntry)>, policies: &str) -> Datapath {
    let mut datapath = node_datapath(services, &node6());
    program_policy(&mut datapath, policies);
    datapath
}

fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Flow6 {
    Flow6 {
        proto: PROTO_TCP,
        src,
        sport,
        dst,
        dport,
    }
}

fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Flow6 {
    Flow6 {
        proto: PROTO_UDP,
        ..tcp6(src, sport, dst, dport)
    }
}

fn syn(flow: &Flow6) -> Vec<u8> {
    tcp6_packet(flow, TCP_SYN, &[])
}

fn syn_ack(flow: &Flow6) -> Vec<u8> {
    tcp6_packet(flow, TCP_SYN | TCP_ACK, &[])
}

/// Runs `program` and expects it to pass the packet; returns it as the program left it.
fn passes(program: &SchedClassifier, packet: &[u8]) -> Vec<u8> {
    expect6(program, packet, None, TC_ACT_OK)
}

/// Runs `program` and expects a policy drop for `reason`.
fn denied(program: &SchedClassifier, packet: &[u8], reason: u32) {
    let ran = run_at(program, packet, None);
    assert_eq!(
        (ran.return_value, ran.reason),
        (TC_ACT_SHOT, Some(reason)),
        "{packet:02x?}"
    );
}

fn drops(datapath: &Datapath, reason: u32) -> u64 {
    datapath
        .drop_counts()
        .expect("drops")
        .get(&reason)
        .copied()
        .unwrap_or(0)
}

const ALLOW_B_TO_A_80: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
"#;

#[test]
fn ipv6_ingress_is_denied_unless_a_rule_allows_the_client_and_port() {
    let mut datapath = policy_datapath(vec![], ALLOW_B_TO_A_80);
    let mut events = datapath.take_policy_events().expect("the ring buffer");
    let allowed = tcp6(XB6, 40_000, XA6, 80);
    passes(datapath.to_pod(), &syn(&allowed));
    // Its later packets, and x/a's answer, pass.
    passes(
        datapath.to_pod(),
        &tcp6_packet(&allowed, TCP_PSH_ACK, b"hello"),
    );
    passes(datapath.from_pod(), &syn_ack(&allowed.reversed()));
    // Another namespace's pod, another port: denied, counted and streamed.
    denied(
        datapath.to_pod(),
        &syn(&tcp6(YA6, 40_001, XA6, 80)),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.to_pod(),
        &syn(&tcp6(XB6, 40_002, XA6, 81)),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.to_pod(),
        &udp6_packet(&udp6(XB6, 40_003, XA6, 80), b"udp is not allowed"),
        REASON_DROP_POLICY_INGRESS,
    );
    assert_eq!(drops(&datapath, REASON_DROP_POLICY_INGRESS), 3);
    // A TCP SYN reusing the admitted tuple is a new connection, checked again: allowed here.
    passes(datapath.to_pod(), &syn(&allowed));
    // The node's own IPv6 address may always connect in.
    passes(datapath.to_pod(), &syn(&tcp6(NODE6, 50_000, XA6, 9)));
    // x/b is selected by no policy: open.
    passes(datapath.to_pod(), &syn(&tcp6(YA6, 40_004, XB6, 9)));
    // The same policy applies to x/a's IPv4 address.
    expect(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB4, 40_000, XA4, 80), TCP_SYN),
        None,
        TC_ACT_OK,
    );
    let ran = run_at(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA4, 40_000, XA4, 80), TCP_SYN),
        None,
    );
    assert_eq!(ran.reason, Some(REASON_DROP_POLICY_INGRESS));

    // The first IPv6 drop's event: a PolicyEvent6, told apart by its length.
    let item = events.next().expect("an event for the drop");
    assert_eq!(item.len(), std::mem::size_of::<PolicyEvent6>());
    // SAFETY: the programs write whole PolicyEvent6s; read unaligned from the ring's bytes.
    let event: PolicyEvent6 = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    let addr = |a: [u32; 4]| sluice::datapath::sync6::addr6_from_map(a);
    assert_eq!(
        (
            addr(event.pod),
            addr(event.peer),
            u16::from_be(event.pod_port),
            u16::from_be(event.peer_port),
            event.proto,
            event.way,
            event.reason
        ),
        (
            XA6,
            YA6,
            80,
            40_001,
            PROTO_TCP,
            WAY_INGRESS,
            REASON_DROP_POLICY_INGRESS
        )
    );
    let drop = sluice::monitor::PolicyDrop::decode(&{
        let item = events.next().expect("the second drop's event");
        item.to_vec()
    })
    .expect("decodes");
    assert_eq!(drop.peer, "[fd00:10:244::b]:40002".parse().unwrap());
    // The flows admitted are IPv6 ones, in policy_flows6.
    assert!(!datapath.policy_flows6().unwrap().is_empty());
}

/// x/a: deny-all ingress; egress to fd00:99::/64 except fd00:99::/120 on TCP 443 and to the
/// pods of namespace y on UDP 81.
const X_A_EGRESS: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  egress:
  - to: [{ipBlock: {cidr: 'fd00:99::/64', except: ['fd00:99::/120']}}]
    ports: [{port: 443}]
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81, protocol: UDP}]
"#;

#[test]
fn ipv6_egress_ip_blocks_with_except_and_replies_of_admitted_flows() {
    let datapath = policy_datapath(vec![], X_A_EGRESS);
    let out = tcp6(XA6, 41_000, "fd00:99::1:1".parse().unwrap(), 443);
    passes(datapath.from_pod(), &syn(&out));
    // The reply passes x/a's deny-all ingress: it answers an admitted flow.
    passes(datapath.to_pod(), &syn_ack(&out.reversed()));
    passes(
        datapath.to_pod(),
        &tcp6_packet(&out.reversed(), TCP_PSH_ACK, b"reply"),
    );
    // A new connection from the same peer is not a reply.
    denied(
        datapath.to_pod(),
        &syn(&tcp6("fd00:99::1:1".parse().unwrap(), 443, XA6, 41_001)),
        REASON_DROP_POLICY_INGRESS,
    );
    // The except range, another port, outside the block: denied.
    for (dst, port) in [
        ("fd00:99::5", 443),
        ("fd00:99::1:1", 80),
        ("fd00:98::1", 443),
    ] {
        denied(
            datapath.from_pod(),
            &syn(&tcp6(XA6, 41_002, dst.parse().unwrap(), port)),
            REASON_DROP_POLICY_EGRESS,
        );
    }
    // UDP 81 to the pods of y, on this node or the other one; not to x/b.
    for dst in [YA6, YC6] {
        let q = udp6(XA6, 41_003, dst, 81);
        passes(datapath.from_pod(), &udp6_packet(&q, b"q"));
        passes(datapath.to_pod(), &udp6_packet(&q.reversed(), b"a"));
    }
    // (A datagram with one byte of payload, shorter than the 12 bytes the parser once
    // required: such packets used to pass untouched.)
    denied(
        datapath.from_pod(),
        &udp6_packet(&udp6(XA6, 41_004, XB6, 81), b"q"),
        REASON_DROP_POLICY_EGRESS,
    );
    assert_eq!(drops(&datapath, REASON_DROP_POLICY_EGRESS), 4);
    // x/b is not isolated: it may send anywhere.
    passes(datapath.from_pod(), &syn(&tcp6(XB6, 41_005, YC6, 1234)));
}

/// x/b may only reach x/a on TCP 8080, and takes no connection (deny-all ingress); x/a takes
/// TCP 8080 from x/b only.
const SERVICE_POLICIES: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress, Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 8080}]
"#;

#[test]
fn ipv6_service_traffic_is_judged_at_its_backend_and_its_replies_pass() {
    let to_a = [be(XA6, 8080)];
    let to_y = [be(YC6, 8080)];
    let services = vec![
        (
            Frontend {
                ip: VIP6.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &to_a, &to_a),
        ),
        (
            Frontend {
                ip: VIP6_Y.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &to_y, &[]),
        ),
    ];
    let datapath = policy_datapath(services, SERVICE_POLICIES);
    // x/b -> the ClusterIP: DNATed to x/a:8080, allowed although the ClusterIP is no peer.
    let client = tcp6(XB6, 42_000, VIP6, 80);
    let out = passes(datapath.from_pod(), &syn(&client));
    assert_eq!(ipv6_dst(&out), (XA6, 8080));
    // x/a's ingress judges the client as delivered, on the backend's port.
    passes(datapath.to_pod(), &out);
    // The answer: x/a's egress is open; back at x/b (deny-all ingress) it is a reply,
    // reverse-translated to come from the ClusterIP.
    let answer = syn_ack(&tcp6(XA6, 8080, XB6, 42_000));
    let answered = passes(datapath.from_pod(), &answer);
    let back = passes(datapath.to_pod(), &answered);
    assert_eq!(back, syn_ack(&client.reversed()));
    // x/b -> the other ClusterIP: its backend (y/c:8080) is not allowed: dropped at x/b's
    // from_pod before anything is remembered.
    denied(
        datapath.from_pod(),
        &syn(&tcp6(XB6, 42_001, VIP6_Y, 80)),
        REASON_DROP_POLICY_EGRESS,
    );
    assert_eq!(
        datapath
            .conntrack6_entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.dport == 80u16.to_be())
            .count(),
        1,
        "only the allowed flow is tracked"
    );
    // A new connection to x/b is denied (deny-all ingress).
    denied(
        datapath.to_pod(),
        &syn(&tcp6(XA6, 42_002, XB6, 80)),
        REASON_DROP_POLICY_INGRESS,
    );
}

#[test]
fn ipv6_policy_maps_are_pinned_reused_and_resynced_without_writes() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let admitted = tcp6(XB6, 40_000, XA6, 80);
    {
        let mut datapath = Datapath::load(&pin_path).expect("load pinned");
        assert!(datapath.set_node_config(&node6()).expect("config"));
        assert!(program_policy(&mut datapath, ALLOW_B_TO_A_80).map_writes > 0);
        for map in ["policy6", "isolated6", "policy_flows6"] {
            assert!(pin_path.join(map).exists(), "{map} is not pinned");
        }
        passes(datapath.to_pod(), &syn(&admitted));
    }
    let mut datapath = Datapath::load(&pin_path).expect("reload pinned");
    assert!(!datapath.programmed_policy().entries6.is_empty());
    assert_eq!(datapath.policy_flows6().unwrap().len(), 1);
    assert_eq!(program_policy(&mut datapath, ALLOW_B_TO_A_80).map_writes, 0);
    passes(
        datapath.to_pod(),
        &tcp6_packet(&admitted, TCP_PSH_ACK, b"still admitted"),
    );
    denied(
        datapath.to_pod(),
        &syn(&tcp6(YA6, 40_001, XA6, 80)),
        REASON_DROP_POLICY_INGRESS,
    );
    // Opening x/a again removes its IPv6 entries; the pod is open.
    let stats = program_policy_none(&mut datapath);
    assert!(stats.map_writes > 0);
    assert!(datapath.programmed_policy().entries6.is_empty());
    assert!(datapath.programmed_policy().isolated6.is_empty());
    passes(datapath.to_pod(), &syn(&tcp6(YA6, 40_002, XA6, 80)));
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
    assert!(!pin_path.exists());
}

/// Programs no policy at all.
fn program_policy_none(datapath: &mut Datapath) -> sluice::datapath::PolicySyncStats {
    let stats = datapath.sync_policy(&policy::WirePolicy::default());
    assert!(stats.failed.is_empty(), "{stats:?}");
    stats
}
