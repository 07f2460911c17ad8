//! NetworkPolicy in the programs: new connections checked in `from_pod` (egress, against the
//! backend after DNAT) and `to_pod` (ingress, against the client as delivered), admitted flows
//! and replies passing, drops counted and streamed. The policies are YAML, resolved, compiled
//! and programmed by the agent's own code (`policy::program`, `Datapath::sync_policy`).

use std::path::Path;

use sluice::{manifests, policy};
use sluice_common::{
    PolicyEvent, REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS, WAY_EGRESS, WAY_INGRESS,
};

use crate::support::*;

/// x/a: 10.244.0.10 and x/b: 10.244.0.11 (namespace x), y/a: 10.244.0.20 (namespace y), all
/// on this node (node-a); y/c: 10.244.1.30 on node-b. Labels pod=<name>, namespaces ns=<name>;
/// every pod has container ports serve-80-tcp (80) and serve-81-udp (81).
const XA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const XB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const YA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const YC: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 30);

fn pods_yaml() -> String {
    let mut yaml = String::new();
    for ns in ["x", "y"] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for (ns, pod, ip, node) in [
        ("x", "a", XA, "node-a"),
        ("x", "b", XB, "node-a"),
        ("y", "a", YA, "node-a"),
        ("y", "c", YC, "node-b"),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
             spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\n\
             status: {{podIP: {ip}}}\n"
        ));
    }
    yaml
}

/// Resolves `policies` (YAML) with the model pods for this node and programs them.
fn program_policy(datapath: &mut Datapath, policies: &str) -> sluice::datapath::PolicySyncStats {
    let mut objects = manifests::Objects::default();
    let mut errors = Vec::new();
    let text = format!("{}{policies}", pods_yaml());
    manifests::parse_into(Path::new("policy.yaml"), &text, &mut objects, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let (wire, problems) = policy::program(&objects, &node_context(false));
    assert!(problems.is_empty(), "{problems:?}");
    let stats = datapath.sync_policy(&wire);
    assert!(stats.failed.is_empty(), "{stats:?}");
    stats
}

fn policy_datapath(
    services: Vec<(Frontend, ServiceEntry)>,
    masquerade_all: bool,
    policies: &str,
) -> Datapath {
    let mut datapath = node_datapath(services, &node_context(masquerade_all));
    program_policy(&mut datapath, policies);
    datapath
}

/// Runs `program` and expects it to pass the packet (unchanged verdict TC_ACT_OK).
fn passes(program: &SchedClassifier, packet: &[u8]) -> Vec<u8> {
    expect(program, packet, None, TC_ACT_OK)
}

/// Runs `program` and expects a policy drop for `reason`.
fn denied(program: &SchedClassifier, packet: &[u8], reason: u32) {
    let ran = run_at(program, packet, None);
    assert_eq!(
        (ran.return_value, ran.reason),
        (TC_ACT_SHOT, Some(reason)),
        "{}",
        packet::decode(packet)
            .map(|d| d.to_string())
            .unwrap_or_default()
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

/// Isolates every pod of namespace x both ways.
const DENY_ALL_X: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;

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
fn ingress_is_denied_unless_a_rule_allows_the_client_and_port() {
    let datapath = policy_datapath(vec![], false, ALLOW_B_TO_A_80);
    let allowed = flow(PROTO_TCP, XB, 40_000, XA, 80);
    passes(datapath.to_pod(), &tcp_packet(&allowed, TCP_SYN));
    // x/a answers: its egress is open, and the flow was admitted.
    passes(
        datapath.from_pod(),
        &tcp_packet(&allowed.reversed(), TCP_SYN | TCP_ACK),
    );
    // Another pod, another namespace, another port: denied and counted.
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA, 40_001, XA, 80), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_002, XA, 81), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.to_pod(),
        &udp_packet(&flow(PROTO_UDP, XB, 40_003, XA, 80), true),
        REASON_DROP_POLICY_INGRESS,
    );
    assert_eq!(drops(&datapath, REASON_DROP_POLICY_INGRESS), 3);
    // x/b itself is not selected: anyone reaches it.
    passes(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA, 40_004, XB, 9999), TCP_SYN),
    );
    // Egress of x/b is open too.
    passes(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_005, YC, 9999), TCP_SYN),
    );
}

#[test]
fn egress_ip_block_with_except_and_a_port_range_and_replies_pass() {
    let datapath = policy_datapath(
        vec![],
        false,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress, Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.20/32]}}]
    ports: [{port: 8000, endPort: 8100}]
"#,
    );
    let out = flow(PROTO_TCP, XB, 40_000, YC, 8050);
    passes(datapath.from_pod(), &tcp_packet(&out, TCP_SYN));
    // x/b is isolated for ingress with no rule: only the reply of its own connection gets in.
    passes(
        datapath.to_pod(),
        &tcp_packet(&out.reversed(), TCP_SYN | TCP_ACK),
    );
    passes(datapath.from_pod(), &tcp_packet(&out, TCP_PSH_ACK));
    passes(datapath.to_pod(), &tcp_packet(&out.reversed(), TCP_PSH_ACK));
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YC, 8050, XB, 40_001), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    // The ends of the range are in, the next port is not; the except hole is out.
    passes(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_002, YC, 8000), TCP_SYN),
    );
    passes(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_003, YC, 8100), TCP_SYN),
    );
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_004, YC, 8101), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_005, YA, 8050), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
    denied(
        datapath.from_pod(),
        &udp_packet(&flow(PROTO_UDP, XB, 40_006, YC, 8050), true),
        REASON_DROP_POLICY_EGRESS,
    );
    assert_eq!(drops(&datapath, REASON_DROP_POLICY_EGRESS), 3);
    // Outside the block.
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_007, OUTSIDER, 8050), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let datapath = policy_datapath(
        vec![],
        false,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-81-udp, protocol: UDP}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: c}}}]
    ports: [{port: serve-80-tcp}]
"#,
    );
    passes(
        datapath.to_pod(),
        &udp_packet(&flow(PROTO_UDP, YA, 40_000, XA, 81), true),
    );
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA, 40_001, XA, 81), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    passes(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XA, 40_002, YC, 80), TCP_SYN),
    );
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XA, 40_003, YC, 81), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XA, 40_004, YA, 80), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
}

#[test]
fn service_traffic_is_checked_against_the_backend_not_the_cluster_ip() {
    let to_xa = frontend(VIP, 8080, Protocol::Tcp);
    let to_ya = frontend(VIP, 9090, Protocol::Tcp);
    let datapath = policy_datapath(
        vec![
            (
                to_xa,
                entry(FrontendKind::ClusterIp, &[be(XA, 80)], &[be(XA, 80)]),
            ),
            (
                to_ya,
                entry(FrontendKind::ClusterIp, &[be(YA, 80)], &[be(YA, 80)]),
            ),
        ],
        false,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-to-a-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: 80}]
"#,
    );
    // Neither the ClusterIP nor port 8080 is allowed, the backend x/a:80 is.
    let allowed = flow(PROTO_TCP, XB, 40_000, VIP, 8080);
    let out = passes(datapath.from_pod(), &tcp_packet(&allowed, TCP_SYN));
    assert_eq!(tuple_of(&out), flow(PROTO_TCP, XB, 40_000, XA, 80));
    // The backend's reply, reverse-translated on the way to x/b.
    let reply = passes(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, XA, 80, XB, 40_000), TCP_SYN | TCP_ACK),
    );
    assert_eq!(tuple_of(&reply), flow(PROTO_TCP, VIP, 8080, XB, 40_000));

    // y/a:80 is not allowed: dropped before conntrack remembers the flow, so a later packet
    // of it is checked (and dropped) again.
    let denied_flow = flow(PROTO_TCP, XB, 40_001, VIP, 9090);
    let before = datapath.conntrack_entries().unwrap().len();
    denied(
        datapath.from_pod(),
        &tcp_packet(&denied_flow, TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
    assert_eq!(datapath.conntrack_entries().unwrap().len(), before);
    denied(
        datapath.from_pod(),
        &tcp_packet(&denied_flow, TCP_PSH_ACK),
        REASON_DROP_POLICY_EGRESS,
    );
    // UDP the same (no first-packet exception).
    let udp = frontend(VIP, 5353, Protocol::Udp);
    let mut datapath = datapath;
    resync_with_policy(&mut datapath, udp);
}

/// A UDP service to y/a: x/b's egress (to pod=a of x only) denies every datagram, the first and
/// the later ones.
fn resync_with_policy(datapath: &mut Datapath, udp: Frontend) {
    resync(
        datapath,
        vec![(
            udp,
            entry(FrontendKind::ClusterIp, &[be(YA, 53)], &[be(YA, 53)]),
        )],
    );
    let dns = flow(PROTO_UDP, XB, 40_010, VIP, 5353);
    for _ in 0..2 {
        denied(
            datapath.from_pod(),
            &udp_packet(&dns, true),
            REASON_DROP_POLICY_EGRESS,
        );
    }
}

#[test]
fn a_policy_change_keeps_established_flows_and_applies_to_new_ones() {
    let mut datapath = policy_datapath(vec![], false, ALLOW_B_TO_A_80);
    let established = flow(PROTO_TCP, XB, 40_000, XA, 80);
    passes(datapath.to_pod(), &tcp_packet(&established, TCP_SYN));
    passes(
        datapath.from_pod(),
        &tcp_packet(&established.reversed(), TCP_SYN | TCP_ACK),
    );
    // x/a's egress is open; a UDP flow it opens is remembered too.
    let open = flow(PROTO_UDP, XA, 50_000, YC, 53);
    passes(datapath.from_pod(), &udp_packet(&open, true));

    // Now deny everything both ways for every pod of x (no program reload).
    let stats = program_policy(&mut datapath, DENY_ALL_X);
    assert!(stats.map_writes > 0);
    // The established connection goes on both ways.
    passes(datapath.to_pod(), &tcp_packet(&established, TCP_PSH_ACK));
    passes(
        datapath.from_pod(),
        &tcp_packet(&established.reversed(), TCP_PSH_ACK),
    );
    passes(datapath.from_pod(), &udp_packet(&open, true));
    passes(datapath.to_pod(), &udp_packet(&open.reversed(), true));
    // New connections do not, even reusing the same tuple with a new SYN.
    denied(
        datapath.to_pod(),
        &tcp_packet(&established, TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, XB, 40_001, XA, 80), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    denied(
        datapath.from_pod(),
        &udp_packet(&flow(PROTO_UDP, XA, 50_001, YC, 53), true),
        REASON_DROP_POLICY_EGRESS,
    );

    // Removing the policy opens them again, and resyncing the same policy writes nothing.
    let stats = program_policy(&mut datapath, "");
    assert!(stats.map_writes > 0);
    assert!(datapath.programmed_policy().isolated.is_empty());
    assert!(datapath.programmed_policy().entries.is_empty());
    assert_eq!(program_policy(&mut datapath, "").map_writes, 0);
    passes(
        datapath.from_pod(),
        &udp_packet(&flow(PROTO_UDP, XA, 50_002, YC, 53), true),
    );
}

/// A TCP SYN of a pod no policy isolates passes without the lookups for an admitted flow
/// (ebpf policy.rs `syn_isolation`), but its connection is still recorded: a policy isolating the
/// pod later keeps it, both ways, in both directions.
#[test]
fn connections_an_open_pod_opens_or_accepts_survive_a_policy_that_isolates_it_later() {
    let mut datapath = policy_datapath(vec![], false, "");
    // x/a opens a connection to y/c (egress), and y/c one to x/a (ingress); only their SYNs
    // are seen before the policy (the SYN-ACK would record the flow the other way).
    let opened = flow(PROTO_TCP, XA, 41_000, YC, 80);
    let accepted = flow(PROTO_TCP, YC, 42_000, XA, 80);
    passes(datapath.from_pod(), &tcp_packet(&opened, TCP_SYN));
    passes(datapath.to_pod(), &tcp_packet(&accepted, TCP_SYN));

    program_policy(&mut datapath, DENY_ALL_X);
    for established in [opened, accepted] {
        let (program, back) = if established.src == XA {
            (datapath.from_pod(), datapath.to_pod())
        } else {
            (datapath.to_pod(), datapath.from_pod())
        };
        passes(
            back,
            &tcp_packet(&established.reversed(), TCP_SYN | TCP_ACK),
        );
        passes(program, &tcp_packet(&established, TCP_PSH_ACK));
        passes(back, &tcp_packet(&established.reversed(), TCP_PSH_ACK));
    }
    // New connections of the now isolated pod are checked, and denied.
    denied(
        datapath.from_pod(),
        &tcp_packet(&flow(PROTO_TCP, XA, 41_001, YC, 80), TCP_SYN),
        REASON_DROP_POLICY_EGRESS,
    );
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YC, 42_001, XA, 80), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
}

/// Another node of the cluster.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 4);

#[test]
fn a_masqueraded_client_is_seen_as_the_node_address() {
    let svc = frontend(VIP, 8080, Protocol::Tcp);
    let services = || {
        vec![(
            svc,
            entry(FrontendKind::ClusterIp, &[be(XA, 80)], &[be(XA, 80)]),
        )]
    };
    // masqueradeAll: x/b's flow to the service reaches x/a from this node's address, not from
    // x/b; connections from the pod's own node are always allowed in.
    let datapath = policy_datapath(
        services(),
        true,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {matchLabels: {pod: a}}}
"#,
    );
    let client = flow(PROTO_TCP, XB, 40_000, VIP, 8080);
    let ran = run_at(datapath.from_pod(), &tcp_packet(&client, TCP_SYN), None);
    assert_ne!(ran.return_value, TC_ACT_SHOT, "{:?}", ran.reason);
    let masqueraded = tuple_of(&ran.packet);
    assert_eq!(
        (masqueraded.src, masqueraded.dst, masqueraded.dport),
        (NODE_IP, XA, 80)
    );
    passes(datapath.to_pod(), &ran.packet);
    // A flow another node masqueraded arrives from that node's address: x/a denies it...
    let from_other_node = tcp_packet(&flow(PROTO_TCP, OTHER_NODE, 61_000, XA, 80), TCP_SYN);
    denied(
        datapath.to_pod(),
        &from_other_node,
        REASON_DROP_POLICY_INGRESS,
    );
    // ... x/b's own address would be allowed by a pod selector, the node's is not ...
    let mut datapath = datapath;
    program_policy(&mut datapath, ALLOW_B_TO_A_80);
    denied(
        datapath.to_pod(),
        &from_other_node,
        REASON_DROP_POLICY_INGRESS,
    );
    // ... and an ipBlock of that node's address admits it.
    program_policy(
        &mut datapath,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-node-2, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: 172.18.0.4/32}}]
"#,
    );
    passes(datapath.to_pod(), &from_other_node);
}

#[test]
fn the_reply_of_a_redirected_service_flow_passes_an_isolated_client() {
    // masqueradeAll to a backend on another node: the reply is reverse-translated where it
    // enters (from_world) and reaches x/b already from the ClusterIP.
    let svc = frontend(VIP, 8080, Protocol::Tcp);
    let datapath = policy_datapath(
        vec![(svc, entry(FrontendKind::ClusterIp, &[be(YC, 80)], &[]))],
        true,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {}}
"#,
    );
    let client = flow(PROTO_TCP, XB, 40_000, VIP, 8080);
    let ran = run_at(datapath.from_pod(), &tcp_packet(&client, TCP_SYN), None);
    assert_ne!(ran.return_value, TC_ACT_SHOT, "{:?}", ran.reason);
    let out = tuple_of(&ran.packet);
    let reply = run_at(
        datapath.from_world(),
        &tcp_packet(&out.reversed(), TCP_SYN | TCP_ACK),
        None,
    );
    assert_ne!(reply.return_value, TC_ACT_SHOT, "{:?}", reply.reason);
    assert_eq!(tuple_of(&reply.packet), client.reversed());
    passes(datapath.to_pod(), &reply.packet);
    // A new connection from the ClusterIP's address is not a reply.
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, VIP, 8080, XB, 40_001), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
}

#[test]
fn policy_drops_are_streamed_with_pod_peer_port_and_direction() {
    let mut datapath = policy_datapath(vec![], false, ALLOW_B_TO_A_80);
    let mut events = datapath.take_policy_events().expect("the ring buffer");
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA, 40_001, XA, 443), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    let item = events.next().expect("an event for the drop");
    assert_eq!(item.len(), std::mem::size_of::<PolicyEvent>());
    // SAFETY: the programs write whole PolicyEvents; read unaligned from the ring's bytes.
    let event: PolicyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    assert_eq!(
        (
            Ipv4Addr::from(event.pod.to_ne_bytes()),
            Ipv4Addr::from(event.peer.to_ne_bytes()),
            u16::from_be(event.pod_port),
            u16::from_be(event.peer_port),
            event.proto,
            event.way,
            event.reason
        ),
        (
            XA,
            YA,
            443,
            40_001,
            PROTO_TCP,
            WAY_INGRESS,
            REASON_DROP_POLICY_INGRESS
        )
    );
    assert!(events.next().is_none(), "one drop, one event");
    assert_ne!(WAY_INGRESS, WAY_EGRESS);
}

#[test]
fn a_restarted_agent_finds_the_policy_and_the_admitted_flows_and_resyncs_without_writes() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let admitted = flow(PROTO_TCP, XB, 40_000, XA, 80);
    {
        let mut datapath = Datapath::load(&pin_path).expect("load pinned");
        assert!(program_policy(&mut datapath, ALLOW_B_TO_A_80).map_writes > 0);
        for map in ["policy", "isolated", "policy_flows", "policy_events"] {
            assert!(pin_path.join(map).exists(), "{map} is not pinned");
        }
        passes(datapath.to_pod(), &tcp_packet(&admitted, TCP_SYN));
    }
    let mut datapath = Datapath::load(&pin_path).expect("reload pinned");
    assert!(!datapath.programmed_policy().entries.is_empty());
    assert_eq!(datapath.policy_flows().unwrap().len(), 1);
    assert_eq!(program_policy(&mut datapath, ALLOW_B_TO_A_80).map_writes, 0);
    passes(datapath.to_pod(), &tcp_packet(&admitted, TCP_PSH_ACK));
    denied(
        datapath.to_pod(),
        &tcp_packet(&flow(PROTO_TCP, YA, 40_001, XA, 80), TCP_SYN),
        REASON_DROP_POLICY_INGRESS,
    );
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
    assert!(!pin_path.exists());
}

#[test]
fn an_idle_udp_flow_is_checked_again_an_idle_tcp_connection_is_not() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let mut datapath = Datapath::load(&pin_path).expect("load pinned");
    program_policy(&mut datapath, ALLOW_B_TO_A_80);
    let udp = flow(PROTO_UDP, XA, 50_000, YC, 53);
    let tcp = flow(PROTO_TCP, XB, 40_000, XA, 80);
    passes(datapath.from_pod(), &udp_packet(&udp, true));
    passes(datapath.to_pod(), &tcp_packet(&tcp, TCP_SYN));
    program_policy(&mut datapath, DENY_ALL_X);
    // Both still flow while recent.
    passes(datapath.from_pod(), &udp_packet(&udp, true));
    passes(datapath.to_pod(), &tcp_packet(&tcp, TCP_PSH_ACK));

    // Make every admitted flow look idle for 121 s, through the pinned map.
    let path = pin_path.join("policy_flows");
    let data = aya::maps::MapData::from_pin(&path).expect("the pinned policy_flows");
    let mut flows: aya::maps::HashMap<_, sluice_common::PolicyFlowKey, u64> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    let entries: Vec<_> = flows.iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (key, seen) in entries {
        flows
            .insert(key, seen.saturating_sub(121_000_000_000), 0)
            .unwrap();
    }
    // The UDP flow is new again, and denied now; the TCP connection goes on.
    denied(
        datapath.from_pod(),
        &udp_packet(&udp, true),
        REASON_DROP_POLICY_EGRESS,
    );
    passes(datapath.to_pod(), &tcp_packet(&tcp, TCP_PSH_ACK));
    passes(
        datapath.from_pod(),
        &tcp_packet(&tcp.reversed(), TCP_PSH_ACK),
    );
    drop(flows);
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_node_traffic_to_its_ingress() {
    let node = FibNode::new();
    node.run(|ifs| {
        let itself = be(XA, 80);
        let vip = frontend(VIP, 8080, Protocol::Tcp);
        let datapath = policy_datapath(
            vec![(vip, entry(FrontendKind::ClusterIp, &[itself], &[itself]))],
            false,
            r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {}}
"#,
        );
        // Hairpin: masqueraded to the service loopback address, a masquerade of this node's.
        let client = flow(PROTO_TCP, XA, 40_000, VIP, 8080);
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, HAIRPIN_ADDR, 40_000, XA, 80)
        );
        passes(datapath.to_pod(), &out);
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), client.reversed());
        passes(datapath.to_pod(), &back);
        // x/b is no node: denied.
        denied(
            datapath.to_pod(),
            &tcp_packet(&flow(PROTO_TCP, XB, 40_001, XA, 80), TCP_SYN),
            REASON_DROP_POLICY_INGRESS,
        );
    });
}
