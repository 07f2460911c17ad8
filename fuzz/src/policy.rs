//! NetworkPolicy: `policy::resolve` then `compile` (and `to_wire`, the maps' form), checked
//! against the rule scan the unit tests use. For probe packets of every enforced pod, both
//! directions, each protocol, peers drawn from the pod IPs, the node's addresses and the
//! edges of every ipBlock and except (the network address, the last address and the addresses
//! just outside), and ports drawn from the policies (each port and endPort and their
//! neighbours, named ports' container port numbers, 0, 1, 65535):
//!
//! * the rule scan (`Direction::allows`, a connection from the pod's own node always allowed
//!   in) and `PolicyState::explain` agree;
//! * the compiled policy's longest-prefix answer (`CompiledPolicy::allows`) is the rule scan's;
//! * a longest-prefix lookup in the maps' form (`isolated`/`policy` and their IPv6 twins, as
//!   the kernel's LPM trie matches the key's bits) is the compiled answer, except for an
//!   entry reported as holding too many port ranges, which may only allow less.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice::{
    manifests::Objects,
    node::NodeContext,
    policy::{
        compile, resolve, to_wire, CompiledKey, Direction, Explained, Verdict, Way, WirePolicy,
    },
    state::Protocol,
};
use sluice_common::{
    PolicyValue, ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_POLICY_PORT_RANGES, WAY_EGRESS, WAY_INGRESS,
};

/// Bounds on the probes of one input, so an input runs in milliseconds.
const MAX_PODS: usize = 8;
const MAX_PEERS: usize = 48;
const MAX_PORTS: usize = 24;

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Every address of `pod`'s family: the shortest prefix, the first key of a pod's entries.
fn whole_family(pod: IpAddr) -> IpNet {
    match pod {
        IpAddr::V4(_) => IpNet::V4(Default::default()),
        IpAddr::V6(_) => IpNet::V6(Default::default()),
    }
}

pub fn check(data: &[u8]) {
    let (objects, _) = crate::objects(data);
    // Policies only matter with pods.
    if objects.pods.is_empty() {
        return;
    }
    for node in crate::node_contexts(&objects).iter().take(2) {
        check_node(&objects, node);
    }
}

pub fn check_node(objects: &Objects, node: &NodeContext) {
    let (state, _errors) = resolve(objects, node);
    let compiled = compile(&state);
    let (wire, overflows) = to_wire(&state, &compiled);
    // The (pod, way, protocol) lookups whose entries were cut to MAX_POLICY_PORT_RANGES.
    let cut: BTreeSet<(IpAddr, Way, Protocol)> = compiled
        .entries
        .iter()
        .filter(|(_, ranges)| ranges.len() > MAX_POLICY_PORT_RANGES)
        .map(|(k, _)| (k.pod, k.way, k.proto))
        .collect();
    assert_eq!(
        overflows.len(),
        compiled
            .entries
            .values()
            .filter(|r| r.len() > MAX_POLICY_PORT_RANGES)
            .count(),
        "every cut entry is reported, and only those"
    );
    for (key, ranges) in &compiled.entries {
        assert!(!ranges.is_empty(), "{key:?}: an entry allowing nothing");
        assert!(
            ranges
                .windows(2)
                .all(|w| u32::from(w[0].1) + 1 < u32::from(w[1].0)),
            "{key:?}: ranges not sorted and merged: {ranges:?}"
        );
        assert!(ranges.iter().all(|(a, b)| a <= b), "{key:?}: {ranges:?}");
        assert_eq!(key.peer.trunc(), key.peer, "{key:?}: host bits");
        assert_eq!(key.pod.is_ipv4(), key.peer.addr().is_ipv4(), "{key:?}");
        assert!(compiled.isolated.contains(&(key.pod, key.way)), "{key:?}");
    }

    let (peers, ports) = probes(objects, &state.node_addresses);
    for (&pod, policy) in state.pods.iter().take(MAX_PODS) {
        for (way, direction) in [
            (Way::Ingress, &policy.ingress),
            (Way::Egress, &policy.egress),
        ] {
            assert_eq!(
                compiled.isolated.contains(&(pod, way)),
                matches!(direction, Direction::Isolated { .. }),
                "{pod} {way:?}"
            );
            let isolated = compiled.isolated.contains(&(pod, way));
            for (p, &peer) in peers
                .iter()
                .filter(|p| p.is_ipv4() == pod.is_ipv4())
                .enumerate()
            {
                for proto in PROTOCOLS {
                    // One longest-prefix lookup per peer and protocol, in the compiled entries
                    // (the lookup `CompiledPolicy::allows` makes, here on this pod's entries
                    // only; it is itself asked about one port of each) and in the maps' form.
                    let longest = isolated.then(|| {
                        compiled
                            .entries
                            .range(
                                CompiledKey {
                                    pod,
                                    way,
                                    proto,
                                    peer: whole_family(pod),
                                }..,
                            )
                            .take_while(|(k, _)| k.pod == pod && k.way == way && k.proto == proto)
                            .filter(|(k, _)| k.peer.contains(&peer))
                            .max_by_key(|(k, _)| k.peer.prefix_len())
                            .map(|(_, ranges)| ranges)
                    });
                    let in_maps = wire_lookup(&wire, pod, way, peer, proto);
                    let cut = cut.contains(&(pod, way, proto));
                    for (i, &port) in ports.iter().enumerate() {
                        let what = format!("{pod} {way:?} {peer} {proto} {port}");
                        let from_node = way == Way::Ingress && state.node_addresses.contains(&peer);
                        let by_rules = from_node
                            || !matches!(direction.allows(peer, proto, port), Verdict::Denied(_));
                        let explained = state
                            .explain(pod, way, peer, proto, port)
                            .expect("an enforced pod");
                        assert_eq!(
                            !matches!(explained.verdict, Explained::Denied(_)),
                            by_rules,
                            "explain: {what}: {explained:?}"
                        );
                        let by_lpm = match longest {
                            None => true,
                            Some(ranges) => ranges
                                .is_some_and(|r| r.iter().any(|(a, b)| (*a..=*b).contains(&port))),
                        };
                        if i == (p + proto.number() as usize) % ports.len() {
                            assert_eq!(
                                compiled.allows(pod, way, peer, proto, port),
                                by_lpm,
                                "CompiledPolicy::allows: {what}"
                            );
                        }
                        assert_eq!(by_lpm, by_rules, "compiled: {what}");
                        let by_maps = match in_maps {
                            None => true,
                            Some(value) => value.is_some_and(|v| {
                                v.ranges[..v.count as usize]
                                    .iter()
                                    .any(|r| (r.first..=r.last).contains(&port))
                            }),
                        };
                        if cut {
                            assert!(!by_maps || by_lpm, "maps allow more than the rules: {what}");
                        } else {
                            assert_eq!(by_maps, by_lpm, "maps: {what}");
                        }
                    }
                }
            }
        }
    }
    // Pods this node does not enforce have nothing in the maps.
    for key in compiled.entries.keys() {
        let CompiledKey { pod, .. } = key;
        assert!(state.pods.contains_key(pod), "{key:?}: not an enforced pod");
    }
}

/// Peers and ports worth probing.
fn probes(objects: &Objects, node_addresses: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<u16>) {
    let mut peers: Vec<IpAddr> = Vec::new();
    let add_peer = |ip: IpAddr, peers: &mut Vec<IpAddr>| {
        if !peers.contains(&ip) {
            peers.push(ip);
        }
    };
    let mut ports: BTreeSet<u16> = BTreeSet::from([0, 1, 65535]);
    let add_port = |n: i64, ports: &mut BTreeSet<u16>| {
        for p in [n - 1, n, n + 1] {
            if let Ok(p) = u16::try_from(p) {
                ports.insert(p);
            }
        }
    };
    for pod in objects.pods.values() {
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            add_peer(ip, &mut peers);
        }
        let containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
        for port in containers
            .unwrap_or_default()
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
        {
            add_port(i64::from(port.container_port), &mut ports);
        }
    }
    for ip in node_addresses {
        add_peer(*ip, &mut peers);
    }
    for policy in objects.network_policies.values() {
        let Some(spec) = &policy.spec else { continue };
        let rules = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref()))
            .chain(
                spec.egress
                    .iter()
                    .flatten()
                    .map(|r| (r.to.as_deref(), r.ports.as_deref())),
            );
        for (rule_peers, rule_ports) in rules {
            for block in rule_peers
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.ip_block.as_ref())
            {
                for cidr in std::iter::once(&block.cidr).chain(block.except.iter().flatten()) {
                    if let Ok(net) = cidr.parse::<IpNet>() {
                        for ip in edges(net) {
                            add_peer(ip, &mut peers);
                        }
                    }
                }
            }
            for port in rule_ports.unwrap_or_default() {
                if let Some(IntOrString::Int(n)) = port.port {
                    add_port(i64::from(n), &mut ports);
                }
                if let Some(end) = port.end_port {
                    add_port(i64::from(end), &mut ports);
                }
            }
        }
    }
    for ip in [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::BROADCAST),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::from(u128::MAX)),
    ] {
        add_peer(ip, &mut peers);
    }
    // Pods and node addresses first; the bounds keep an input's probes to milliseconds.
    peers.truncate(MAX_PEERS);
    let mut ports: Vec<u16> = ports.into_iter().collect();
    if ports.len() > MAX_PORTS {
        // Keep both ends and an even spread of the rest.
        let step = ports.len().div_ceil(MAX_PORTS);
        let last = *ports.last().expect("not empty");
        ports = ports.into_iter().step_by(step).collect();
        ports.push(last);
    }
    (peers, ports)
}

/// A prefix's first and last addresses and the ones just outside it (in its family).
fn edges(net: IpNet) -> Vec<IpAddr> {
    let net = net.trunc();
    let int = |a: IpAddr| match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let (max, addr): (u128, fn(u128) -> IpAddr) = match net {
        IpNet::V4(_) => (u128::from(u32::MAX), |n| {
            IpAddr::V4(Ipv4Addr::from(n as u32))
        }),
        IpNet::V6(_) => (u128::MAX, |n| IpAddr::V6(Ipv6Addr::from(n))),
    };
    let (first, last) = (int(net.network()), int(net.broadcast()));
    [
        Some(first),
        Some(last),
        first.checked_sub(1),
        last.checked_add(1).filter(|n| *n <= max),
    ]
    .into_iter()
    .flatten()
    .map(addr)
    .collect()
}

/// The datapath's lookup in the maps' form: `None` when the pod's isolation bits leave the
/// direction open, else the entry of the longest prefix of (pod, way, protocol, peer) as the
/// LPM trie matches it (`None`: no entry, denied).
fn wire_lookup(
    wire: &WirePolicy,
    pod: IpAddr,
    way: Way,
    peer: IpAddr,
    proto: Protocol,
) -> Option<Option<PolicyValue>> {
    let (bit, way_number) = match way {
        Way::Ingress => (ISOLATED_INGRESS, WAY_INGRESS),
        Way::Egress => (ISOLATED_EGRESS, WAY_EGRESS),
    };
    let value = match (pod, peer) {
        (IpAddr::V4(pod), IpAddr::V4(peer)) => {
            let pod_key = u32::from_ne_bytes(pod.octets());
            if wire.isolated.get(&pod_key).copied().unwrap_or(0) & bit == 0 {
                return None;
            }
            let peer = u32::from(peer);
            wire.entries
                .iter()
                .filter(|((key, bits), _)| {
                    assert!(*bits <= 32, "{key:?}/{bits}");
                    assert_eq!(key._pad, 0);
                    let net = u32::from(Ipv4Addr::from(key.peer.to_ne_bytes()));
                    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                    assert_eq!(net & !mask, 0, "{key:?}/{bits}: host bits");
                    key.pod == pod_key
                        && key.way == way_number
                        && key.proto == proto.number()
                        && peer & mask == net
                })
                .max_by_key(|((_, bits), _)| *bits)
                .map(|(_, value)| *value)
        }
        (IpAddr::V6(pod), IpAddr::V6(peer)) => {
            let to_map = |ip: Ipv6Addr| {
                let o = ip.octets();
                core::array::from_fn::<u32, 4, _>(|i| {
                    u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                })
            };
            let from_map = |a: [u32; 4]| {
                let mut o = [0u8; 16];
                for (i, w) in a.iter().enumerate() {
                    o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                }
                u128::from(Ipv6Addr::from(o))
            };
            let pod_key = to_map(pod);
            if wire.isolated6.get(&pod_key).copied().unwrap_or(0) & bit == 0 {
                return None;
            }
            let peer = u128::from(peer);
            wire.entries6
                .iter()
                .filter(|((key, bits), _)| {
                    assert!(*bits <= 128, "{key:?}/{bits}");
                    assert_eq!(key._pad, 0);
                    let net = from_map(key.peer);
                    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                    assert_eq!(net & !mask, 0, "{key:?}/{bits}: host bits");
                    key.pod == pod_key
                        && key.way == way_number
                        && key.proto == proto.number()
                        && peer & mask == net
                })
                .max_by_key(|((_, bits), _)| *bits)
                .map(|(_, value)| *value)
        }
        _ => unreachable!("probes are of the pod's family"),
    };
    if let Some(v) = &value {
        assert!(v.count as usize <= MAX_POLICY_PORT_RANGES, "{v:?}");
    }
    Some(value)
}
