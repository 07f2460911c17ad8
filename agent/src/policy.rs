//! NetworkPolicy -> what each pod may send and receive. Pure: no I/O, unit-tested.
//!
//! networking.k8s.io/v1 semantics, as the Kubernetes documentation and the upstream
//! network-policy tests define them:
//! * A policy selects the pods of its namespace matching `podSelector` (empty: all of them).
//! * `policyTypes`, when missing, is Ingress, plus Egress when the policy has egress rules (the
//!   API server's defaulting, applied here to objects read from files).
//! * A pod selected by any policy for a direction is isolated in that direction: only what one
//!   of those policies' rules allows gets through (the union). A pod no policy selects for a
//!   direction is open in it. An empty rule list allows nothing; a rule without `from`/`to`
//!   allows every peer, without `ports` every port.
//! * Peers: `podSelector` alone selects pods of the policy's namespace; `namespaceSelector`
//!   alone every pod of the matching namespaces; both in one peer, the matching pods of the
//!   matching namespaces; `ipBlock` a CIDR minus its `except` ranges (pod IPs included).
//! * Ports: protocol (TCP by default), a number with an optional `endPort` range, or a name
//!   resolved against the destination pod's container ports: the selected pod itself for
//!   ingress, each peer pod for egress (a named port cannot match an ipBlock peer).
//! * A policy the API server would refuse (an invalid selector, CIDR, port or peer:
//!   `policy_validation.rs`) is rejected whole and reported: it selects and isolates nothing,
//!   as it would not exist in a cluster.
//! * Pods without an IP yet and host-network pods are neither selected nor peers: policies do
//!   not apply to host-network pods.
//! * Both families: a pod's every address (`status.podIPs`) is enforced, each on its family's
//!   maps; pod peers contribute their address of the pod's family, an ipBlock (and its
//!   `except`s) applies to its own family only.
//! * Connections from the pod's own node (its node addresses: the kubelet's probes,
//!   host-network pods, and flows this node masqueraded, hairpin traffic from the service
//!   loopback address included) are always allowed in, as the Kubernetes documentation has it
//!   for an ingress-isolated pod.
//!
//! Replies of allowed connections are not policy's business here: the datapath lets them
//! through its conntrack.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::{
    api::{
        core::v1::Pod,
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use sluice_common::{
    policy6_prefix_len, policy_prefix_len, PolicyKey, PolicyKey6, PolicyPortRange, PolicyValue,
    ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_POLICY_PORT_RANGES, WAY_EGRESS, WAY_INGRESS,
};

use crate::{
    manifests::{ObjectRef, Objects},
    node::NodeContext,
    state::Protocol,
    translate::TranslateError,
};

/// A range of ports of one protocol, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub proto: Protocol,
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == 0 && self.last == u16::MAX {
            write!(f, "{}/*", self.proto)
        } else if self.first == self.last {
            write!(f, "{}/{}", self.proto, self.first)
        } else {
            write!(f, "{}/{}-{}", self.proto, self.first, self.last)
        }
    }
}

/// Which peers a rule admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// No `from`/`to`: every address.
    Any,
    /// Disjoint prefixes of either family (pod IPs as /32s and /128s, ipBlocks minus their
    /// exceptions).
    Prefixes(BTreeSet<IpNet>),
}

/// What one rule of one policy allows a pod in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// `namespace/name` of the policy, so a trace can say which policy allowed a packet.
    pub policy: String,
    /// Which rule of the policy's `ingress` or `egress` list, counted from 1.
    pub rule: usize,
    pub peers: Peers,
    /// `None`: every port of every protocol.
    pub ports: Option<BTreeSet<PortRange>>,
}

/// A pod's policy in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// No policy selects the pod for this direction: everything is allowed.
    Open,
    /// Only what one of these allows gets through (none: nothing does).
    Isolated {
        /// The policies that select the pod, for "denied by default because of ...".
        policies: BTreeSet<String>,
        allows: Vec<Allow>,
    },
}

impl Direction {
    /// Whether a connection with `peer` to `port` (of the pod for ingress, of the peer for
    /// egress) is allowed; the policy that allows it when isolated.
    pub fn allows(&self, peer: impl Into<IpAddr>, proto: Protocol, port: u16) -> Verdict<'_> {
        let Direction::Isolated { policies, .. } = self else {
            return Verdict::Open;
        };
        match self.allowing(peer, proto, port) {
            Some(allow) => Verdict::AllowedBy(&allow.policy),
            None => Verdict::Denied(policies),
        }
    }

    /// The first rule that allows the connection, when the direction is isolated.
    pub fn allowing(&self, peer: impl Into<IpAddr>, proto: Protocol, port: u16) -> Option<&Allow> {
        let Direction::Isolated { allows, .. } = self else {
            return None;
        };
        let peer: IpAddr = peer.into();
        allows.iter().find(|a| {
            let peer_ok = match &a.peers {
                Peers::Any => true,
                Peers::Prefixes(prefixes) => prefixes.iter().any(|p| p.contains(&peer)),
            };
            let port_ok = a.ports.as_ref().is_none_or(|ranges| {
                ranges
                    .iter()
                    .any(|r| r.proto == proto && (r.first..=r.last).contains(&port))
            });
            peer_ok && port_ok
        })
    }
}

/// The outcome of [`Direction::allows`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    Open,
    AllowedBy(&'a str),
    /// Isolated by these policies, and none of their rules allows it.
    Denied(&'a BTreeSet<String>),
}

/// One pod's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub pod: ObjectRef,
    pub ingress: Direction,
    pub egress: Direction,
}

/// The policy of every pod the node enforces, by pod IP (a dual-stack pod under both).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub pods: BTreeMap<IpAddr, PodPolicy>,
    /// This node's addresses (both families, and the hairpin addresses): connections from
    /// them to its pods are always allowed.
    pub node_addresses: BTreeSet<IpAddr>,
}

/// A pod as policy sees it.
struct PolicyPod<'a> {
    key: &'a ObjectRef,
    pod: &'a Pod,
    /// `status.podIPs` (or `status.podIP`): one per family at most.
    ips: Vec<IpAddr>,
}

impl PolicyPod<'_> {
    fn labels(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
    }

    /// The number of the container port named `name` for `proto`.
    fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        let containers = self.pod.spec.as_ref().map(|s| s.containers.as_slice());
        containers
            .unwrap_or_default()
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && parse_protocol(p.protocol.as_deref()) == Some(proto)
            })
            .and_then(|p| u16::try_from(p.container_port).ok())
    }
}

/// Resolves every NetworkPolicy for the pods this node enforces: the pods scheduled on it
/// (`spec.nodeName`), or every pod when the node has no name. A policy the API server would
/// refuse (an invalid selector, CIDR, port: `policy_validation`) is rejected whole and
/// reported: it selects no pod, as it would not exist in a cluster.
pub fn resolve(objects: &Objects, node: &NodeContext) -> (PolicyState, Vec<TranslateError>) {
    let mut errors = Vec::new();
    let pods: Vec<PolicyPod> = objects
        .pods
        .iter()
        .filter_map(|(key, pod)| {
            let spec = pod.spec.as_ref();
            if spec.and_then(|s| s.host_network).unwrap_or(false) {
                return None;
            }
            let status = pod.status.as_ref()?;
            let listed: Vec<&str> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(status.pod_ip.as_deref())
                .collect();
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in listed {
                match ip.parse::<IpAddr>() {
                    Ok(ip) => {
                        if !ips.contains(&ip) {
                            ips.push(ip)
                        }
                    }
                    Err(_) => errors.push(TranslateError {
                        object: format!("Pod {key}"),
                        message: format!("invalid pod IP {ip:?} in status"),
                    }),
                }
            }
            (!ips.is_empty()).then_some(PolicyPod { key, pod, ips })
        })
        .collect();
    let namespace_labels = |namespace: &str| -> BTreeMap<String, String> {
        let mut labels = objects
            .namespaces
            .get(namespace)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        // Set by the API server on every namespace.
        labels.insert(
            "kubernetes.io/metadata.name".to_string(),
            namespace.to_string(),
        );
        labels
    };

    let mut state = PolicyState {
        // The node's addresses, and the one hairpin traffic is masqueraded to (a pod reaching
        // itself through its service arrives from it).
        node_addresses: node
            .node_ips
            .iter()
            .copied()
            .chain([
                IpAddr::V4(Ipv4Addr::from(sluice_common::HAIRPIN_SNAT_ADDR)),
                IpAddr::V6(Ipv6Addr::from(sluice_common::HAIRPIN6_SNAT_ADDR)),
            ])
            .collect(),
        ..PolicyState::default()
    };
    for pod in &pods {
        let local = match &node.name {
            Some(name) => {
                pod.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
            }
            None => true,
        };
        if local {
            for ip in &pod.ips {
                state.pods.insert(
                    *ip,
                    PodPolicy {
                        pod: pod.key.clone(),
                        ingress: Direction::Open,
                        egress: Direction::Open,
                    },
                );
            }
        }
    }

    for (policy_key, policy) in &objects.network_policies {
        let name = policy_key.to_string();
        let object = format!("NetworkPolicy {policy_key}");
        // Checked whatever pods exist: the API server refuses such a policy whole, and so
        // does Sluice (policy_validation.rs). What follows may take every CIDR, port, protocol
        // and selector as valid.
        let refusals = crate::policy_validation::refusals(policy);
        if !refusals.is_empty() {
            errors.push(TranslateError {
                object,
                message: format!(
                    "rejected whole, as the API server would refuse it: {}; it selects no pod \
                     and isolates nothing",
                    refusals.join("; ")
                ),
            });
            continue;
        }
        let Some(spec) = &policy.spec else {
            continue;
        };
        let (ingress_type, egress_type) = policy_types(policy);
        let empty = LabelSelector::default();
        let selector = spec.pod_selector.as_ref().unwrap_or(&empty);
        let selected: Vec<&PolicyPod> = pods
            .iter()
            .filter(|p| p.key.namespace == policy_key.namespace && matches(selector, p.labels()))
            .filter(|p| p.ips.iter().any(|ip| state.pods.contains_key(ip)))
            .collect();
        if selected.is_empty() {
            continue;
        }

        // A rule's `from`/`to`: None (missing or empty) admits every peer.
        let peer_sets = |peers: Option<&[NetworkPolicyPeer]>| {
            peers.filter(|p| !p.is_empty()).map(|peers| {
                peers
                    .iter()
                    .map(|peer| resolve_peer(peer, &policy_key.namespace, &pods, &namespace_labels))
                    .collect::<Vec<PeerSet>>()
            })
        };

        for pod in &selected {
            // Resolved once per pod, applied to each of its addresses (the peers keep both
            // families; compile() keeps the pod's own).
            let ingress = ingress_type.then(|| {
                let mut allows = Vec::new();
                for (index, rule) in spec.ingress.iter().flatten().enumerate() {
                    let peers = peer_sets(rule.from.as_deref());
                    let ports = rule.ports.as_deref();
                    let rule = (name.as_str(), index + 1);
                    allows.extend(rule_allows(rule, peers, ports, Some(pod)));
                }
                allows
            });
            let egress = egress_type.then(|| {
                let mut allows = Vec::new();
                for (index, rule) in spec.egress.iter().flatten().enumerate() {
                    let peers = peer_sets(rule.to.as_deref());
                    let ports = rule.ports.as_deref();
                    let rule = (name.as_str(), index + 1);
                    allows.extend(rule_allows(rule, peers, ports, None));
                }
                allows
            });
            for ip in &pod.ips {
                let Some(entry) = state.pods.get_mut(ip) else {
                    continue;
                };
                if let Some(allows) = &ingress {
                    isolate(&mut entry.ingress, &name, allows.clone());
                }
                if let Some(allows) = &egress {
                    isolate(&mut entry.egress, &name, allows.clone());
                }
            }
        }
    }
    (state, errors)
}

fn isolate(direction: &mut Direction, policy: &str, mut new: Vec<Allow>) {
    match direction {
        Direction::Open => {
            *direction = Direction::Isolated {
                policies: BTreeSet::from([policy.to_string()]),
                allows: new,
            }
        }
        Direction::Isolated { policies, allows } => {
            policies.insert(policy.to_string());
            allows.append(&mut new);
        }
    }
}

/// (Ingress, Egress) the policy applies to, with the API server's defaulting.
fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.as_ref();
    let types = spec.and_then(|s| s.policy_types.as_ref());
    match types.filter(|t| !t.is_empty()) {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    }
}

/// The peers of one `from`/`to` entry: the pods it selects, or address prefixes.
struct PeerSet<'a> {
    pods: Vec<&'a PolicyPod<'a>>,
    prefixes: BTreeSet<IpNet>,
}

fn resolve_peer<'a>(
    peer: &NetworkPolicyPeer,
    policy_namespace: &str,
    pods: &'a [PolicyPod<'a>],
    namespace_labels: &dyn Fn(&str) -> BTreeMap<String, String>,
) -> PeerSet<'a> {
    let mut set = PeerSet {
        pods: Vec::new(),
        prefixes: BTreeSet::new(),
    };
    if let Some(block) = &peer.ip_block {
        // Valid (policy_validation.rs); an invalid one would admit nothing.
        set.prefixes = ip_block(&block.cidr, block.except.iter().flatten()).unwrap_or_default();
        return set;
    }
    set.pods = pods
        .iter()
        .filter(|pod| {
            let namespace_ok = match &peer.namespace_selector {
                Some(selector) => matches(selector, &namespace_labels(&pod.key.namespace)),
                None => pod.key.namespace == policy_namespace,
            };
            let pod_ok = peer
                .pod_selector
                .as_ref()
                .is_none_or(|selector| matches(selector, pod.labels()));
            namespace_ok && pod_ok
        })
        .collect();
    set
}

/// The allows of one rule (`(policy, rule number)`). `ingress_pod` is the selected pod for
/// ingress rules (named ports resolve against it); for egress rules named ports resolve per
/// peer pod, so such a rule becomes one allow per peer.
fn rule_allows(
    (policy, rule): (&str, usize),
    peers: Option<Vec<PeerSet>>,
    ports: Option<&[NetworkPolicyPort]>,
    ingress_pod: Option<&PolicyPod>,
) -> Vec<Allow> {
    let ports = ports.filter(|p| !p.is_empty());
    let Some(ports) = ports else {
        return vec![Allow {
            policy: policy.to_string(),
            rule,
            peers: peers_of(peers.as_deref()),
            ports: None,
        }];
    };
    let mut numeric = BTreeSet::new();
    let mut named = Vec::new();
    for port in ports {
        // Protocols and numbers are valid (policy_validation.rs); an invalid one would allow
        // nothing.
        let Some(proto) = parse_protocol(port.protocol.as_deref()) else {
            continue;
        };
        match &port.port {
            None => {
                numeric.insert(PortRange {
                    proto,
                    first: 0,
                    last: u16::MAX,
                });
            }
            Some(IntOrString::Int(number)) => {
                let first = u16::try_from(*number).ok().filter(|p| *p != 0);
                let last = match port.end_port {
                    Some(end) => u16::try_from(end).ok().filter(|e| Some(*e) >= first),
                    None => first,
                };
                if let (Some(first), Some(last)) = (first, last) {
                    numeric.insert(PortRange { proto, first, last });
                }
            }
            Some(IntOrString::String(name)) => match ingress_pod {
                Some(pod) => {
                    if let Some(number) = pod.named_port(name, proto) {
                        numeric.insert(PortRange {
                            proto,
                            first: number,
                            last: number,
                        });
                    }
                }
                None => named.push((name.as_str(), proto)),
            },
        }
    }

    let mut allows = Vec::new();
    if !numeric.is_empty() {
        allows.push(Allow {
            policy: policy.to_string(),
            rule,
            peers: peers_of(peers.as_deref()),
            ports: Some(numeric),
        });
    }
    if !named.is_empty() {
        // Egress to named ports: each peer pod's own numbers. Without `to` every pod of the
        // cluster is a peer; ipBlock peers have no named ports.
        let peer_pods: Vec<&PolicyPod> = match &peers {
            Some(sets) => sets.iter().flat_map(|s| s.pods.iter().copied()).collect(),
            None => Vec::new(),
        };
        for pod in peer_pods {
            let ranges: BTreeSet<PortRange> = named
                .iter()
                .filter_map(|(name, proto)| {
                    pod.named_port(name, *proto).map(|n| PortRange {
                        proto: *proto,
                        first: n,
                        last: n,
                    })
                })
                .collect();
            if !ranges.is_empty() {
                allows.push(Allow {
                    policy: policy.to_string(),
                    rule,
                    peers: Peers::Prefixes(pod.ips.iter().map(|ip| IpNet::from(*ip)).collect()),
                    ports: Some(ranges),
                });
            }
        }
    }
    allows
}

fn peers_of(sets: Option<&[PeerSet]>) -> Peers {
    match sets {
        None => Peers::Any,
        Some(sets) => Peers::Prefixes(
            sets.iter()
                .flat_map(|s| {
                    s.pods
                        .iter()
                        .flat_map(|p| p.ips.iter().map(|ip| IpNet::from(*ip)))
                        .chain(s.prefixes.iter().copied())
                })
                .collect(),
        ),
    }
}

/// `cidr` minus `except`, as disjoint prefixes of the cidr's family (an `except` of the
/// other family cannot be inside it and removes nothing).
fn ip_block<'s>(
    cidr: &str,
    except: impl Iterator<Item = &'s String>,
) -> Result<BTreeSet<IpNet>, String> {
    let net: IpNet = match cidr.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(e) => return Err(format!("invalid cidr: {e}")),
    };
    let mut prefixes = BTreeSet::from([net]);
    for hole in except {
        let hole: IpNet = match hole.parse::<IpNet>() {
            Ok(h) => h.trunc(),
            Err(e) => return Err(format!("invalid except {hole:?}: {e}")),
        };
        prefixes = prefixes
            .into_iter()
            .flat_map(|p| subtract(p, hole))
            .collect();
    }
    Ok(prefixes)
}

/// `net` minus `hole`, as disjoint prefixes.
fn subtract(net: IpNet, hole: IpNet) -> Vec<IpNet> {
    if hole.contains(&net) {
        return Vec::new();
    }
    if !net.contains(&hole) {
        return vec![net];
    }
    // Split net in halves until the hole is one of them; keep the other halves.
    let mut kept = Vec::new();
    let mut current = net;
    while current != hole {
        let halves: Vec<IpNet> = current
            .subnets(current.prefix_len() + 1)
            .expect("a prefix containing a longer one can be split")
            .collect();
        let (with_hole, without): (Vec<IpNet>, Vec<IpNet>) =
            halves.into_iter().partition(|h| h.contains(&hole));
        kept.extend(without);
        current = with_hole[0];
    }
    kept
}

/// Label selector matching: every matchLabels pair and every matchExpression must hold; an
/// empty selector matches everything.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs_ok && expressions_ok
}

fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Ingress or egress, as the compiled policy keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Way {
    Ingress,
    Egress,
}

/// One entry of the compiled policy: for `pod` in direction `way`, connections of `proto`
/// with peers in `peer` (longest prefix wins) may use these ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CompiledKey {
    pub pod: IpAddr,
    pub way: Way,
    pub proto: Protocol,
    /// Of the pod's family.
    pub peer: IpNet,
}

/// The policy in the shape an LPM-trie datapath needs: one lookup of the longest prefix
/// containing the peer gives every port range allowed to it, so the cost of a lookup does not
/// depend on how many policies or pods there are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// (pod, direction) pairs that are isolated: without a matching entry, denied.
    pub isolated: BTreeSet<(IpAddr, Way)>,
    /// Merged, sorted, non-overlapping port ranges per prefix (see [`compile`]).
    pub entries: BTreeMap<CompiledKey, Vec<(u16, u16)>>,
}

/// A rule reduced to one protocol: the peer prefixes and the port ranges it allows them.
type PrefixesAndPorts = (Vec<IpNet>, Vec<(u16, u16)>);

/// Every address of `pod`'s family.
fn whole_family(pod: IpAddr) -> IpNet {
    match pod {
        IpAddr::V4(_) => IpNet::V4(Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(Ipv6Net::default()),
    }
}

fn same_family(net: &IpNet, pod: IpAddr) -> bool {
    matches!(
        (net, pod),
        (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
    )
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Compiles [`PolicyState`] into longest-prefix entries. For one pod, direction and protocol,
/// every prefix any rule names becomes an entry whose ports are the union over the rules that
/// cover the whole prefix. The longest listed prefix containing an address is then covered by
/// exactly the rules that contain the address (a rule prefix containing the address is either
/// listed and longer, which contradicts "longest", or contains the listed one), so one lookup
/// answers what a scan of every rule would.
pub fn compile(state: &PolicyState) -> CompiledPolicy {
    let mut compiled = CompiledPolicy::default();
    for (&pod, policy) in &state.pods {
        for (way, direction) in [
            (Way::Ingress, &policy.ingress),
            (Way::Egress, &policy.egress),
        ] {
            let Direction::Isolated { allows, .. } = direction else {
                continue;
            };
            compiled.isolated.insert((pod, way));
            for proto in PROTOCOLS {
                // (prefixes, ranges) of every allow, for this protocol.
                let rules: Vec<PrefixesAndPorts> = allows
                    .iter()
                    .filter_map(|allow| {
                        let ranges: Vec<(u16, u16)> = match &allow.ports {
                            None => vec![(0, u16::MAX)],
                            Some(ports) => ports
                                .iter()
                                .filter(|r| r.proto == proto)
                                .map(|r| (r.first, r.last))
                                .collect(),
                        };
                        let prefixes: Vec<IpNet> = match &allow.peers {
                            Peers::Any => vec![whole_family(pod)],
                            Peers::Prefixes(p) => {
                                p.iter().copied().filter(|n| same_family(n, pod)).collect()
                            }
                        };
                        (!ranges.is_empty() && !prefixes.is_empty()).then_some((prefixes, ranges))
                    })
                    .chain(
                        // The pod's own node may always connect in.
                        (way == Way::Ingress)
                            .then(|| {
                                let node: Vec<IpNet> = state
                                    .node_addresses
                                    .iter()
                                    .map(|a| IpNet::from(*a))
                                    .filter(|n| same_family(n, pod))
                                    .collect();
                                (node, vec![(0, u16::MAX)])
                            })
                            .filter(|(node, _)| !node.is_empty()),
                    )
                    .collect();
                let listed: BTreeSet<IpNet> =
                    rules.iter().flat_map(|(p, _)| p.iter().copied()).collect();
                for peer in listed {
                    let ranges: Vec<(u16, u16)> = rules
                        .iter()
                        .filter(|(prefixes, _)| prefixes.iter().any(|p| p.contains(&peer)))
                        .flat_map(|(_, ranges)| ranges.iter().copied())
                        .collect();
                    compiled.entries.insert(
                        CompiledKey {
                            pod,
                            way,
                            proto,
                            peer,
                        },
                        merge(ranges),
                    );
                }
            }
        }
    }
    compiled
}

/// Sorted, merged port ranges.
fn merge(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (first, last) in ranges {
        match merged.last_mut() {
            Some(previous) if u32::from(first) <= u32::from(previous.1) + 1 => {
                previous.1 = previous.1.max(last)
            }
            _ => merged.push((first, last)),
        }
    }
    merged
}

impl CompiledPolicy {
    /// The datapath's decision, computed the way the datapath computes it: isolated?, then
    /// one longest-prefix lookup, then the port ranges. Used by tests and by `sluice trace`
    /// to explain a verdict.
    pub fn allows(
        &self,
        pod: impl Into<IpAddr>,
        way: Way,
        peer: impl Into<IpAddr>,
        proto: Protocol,
        port: u16,
    ) -> bool {
        let (pod, peer): (IpAddr, IpAddr) = (pod.into(), peer.into());
        if !self.isolated.contains(&(pod, way)) {
            return true;
        }
        let longest = self
            .entries
            .iter()
            .filter(|(k, _)| {
                k.pod == pod && k.way == way && k.proto == proto && k.peer.contains(&peer)
            })
            .max_by_key(|(k, _)| k.peer.prefix_len());
        longest.is_some_and(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&port)))
    }
}

/// The compiled policy as the `isolated` and `policy` maps (and `isolated6`, `policy6`) hold
/// it (see `sluice-common`, "NetworkPolicy"): addresses in network byte order, ports in host
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WirePolicy {
    /// Pod address (as the maps hold it) -> `ISOLATED_*` bits; pods open both ways are left out.
    pub isolated: BTreeMap<u32, u8>,
    /// (key data, peer prefix bits) -> the allowed port ranges.
    pub entries: BTreeMap<(PolicyKey, u32), PolicyValue>,
    /// The same for IPv6 pods.
    pub isolated6: BTreeMap<[u32; 4], u8>,
    pub entries6: BTreeMap<(PolicyKey6, u32), PolicyValue>,
}

impl WirePolicy {
    /// The LPM trie key of an entry.
    pub fn lpm_key(key: &PolicyKey, bits: u32) -> aya::maps::lpm_trie::Key<PolicyKey> {
        aya::maps::lpm_trie::Key::new(policy_prefix_len(bits), *key)
    }

    /// The LPM trie key of a `policy6` entry.
    pub fn lpm_key6(key: &PolicyKey6, bits: u32) -> aya::maps::lpm_trie::Key<PolicyKey6> {
        aya::maps::lpm_trie::Key::new(policy6_prefix_len(bits), *key)
    }
}

/// An IPv6 address as the maps hold it (the 16 bytes as in the packet).
fn addr6_to_map(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn way_number(way: Way) -> u8 {
    match way {
        Way::Ingress => WAY_INGRESS,
        Way::Egress => WAY_EGRESS,
    }
}

/// The maps' form of the compiled policy. An entry with more than [`MAX_POLICY_PORT_RANGES`]
/// ranges keeps the first ones (it allows less, never more) and is reported by pod and
/// policies, so the agent's log says which policy to simplify.
pub fn to_wire(
    state: &PolicyState,
    compiled: &CompiledPolicy,
) -> (WirePolicy, Vec<TranslateError>) {
    let mut wire = WirePolicy::default();
    let mut errors = Vec::new();
    for (pod, way) in &compiled.isolated {
        let bit = match way {
            Way::Ingress => ISOLATED_INGRESS,
            Way::Egress => ISOLATED_EGRESS,
        };
        match pod {
            IpAddr::V4(v4) => {
                *wire
                    .isolated
                    .entry(u32::from_ne_bytes(v4.octets()))
                    .or_default() |= bit
            }
            IpAddr::V6(v6) => *wire.isolated6.entry(addr6_to_map(*v6)).or_default() |= bit,
        }
    }
    for (key, ranges) in &compiled.entries {
        let mut value = PolicyValue::default();
        for (slot, (first, last)) in value.ranges.iter_mut().zip(ranges) {
            *slot = PolicyPortRange {
                first: *first,
                last: *last,
            };
        }
        value.count = ranges.len().min(MAX_POLICY_PORT_RANGES) as u32;
        if ranges.len() > MAX_POLICY_PORT_RANGES {
            let policies = state.pods.get(&key.pod).map(|p| match key.way {
                Way::Ingress => &p.ingress,
                Way::Egress => &p.egress,
            });
            let names = match policies {
                Some(Direction::Isolated { policies, .. }) => {
                    policies.iter().cloned().collect::<Vec<_>>().join(", ")
                }
                _ => String::new(),
            };
            let pod = state.pods.get(&key.pod).map_or_else(
                || key.pod.to_string(),
                |p| format!("{} ({})", p.pod, key.pod),
            );
            errors.push(TranslateError {
                object: format!("Pod {pod}"),
                message: format!(
                    "{:?} {} from {}: the policies {names} allow {} separate port ranges, the \
                     datapath holds {MAX_POLICY_PORT_RANGES} per peer: only the first \
                     {MAX_POLICY_PORT_RANGES} are allowed (fails closed)",
                    key.way,
                    key.proto,
                    key.peer,
                    ranges.len()
                ),
            });
        }
        let bits = u32::from(key.peer.prefix_len());
        match (key.pod, key.peer) {
            (IpAddr::V4(pod), IpNet::V4(peer)) => {
                let data = PolicyKey {
                    pod: u32::from_ne_bytes(pod.octets()),
                    way: way_number(key.way),
                    proto: key.proto.number(),
                    _pad: 0,
                    peer: u32::from_ne_bytes(peer.network().octets()),
                };
                wire.entries.insert((data, bits), value);
            }
            (IpAddr::V6(pod), IpNet::V6(peer)) => {
                let data = PolicyKey6 {
                    pod: addr6_to_map(pod),
                    way: way_number(key.way),
                    proto: key.proto.number(),
                    _pad: 0,
                    peer: addr6_to_map(peer.network()),
                };
                wire.entries6.insert((data, bits), value);
            }
            // compile() keeps the pod's family only.
            _ => {}
        }
    }
    (wire, errors)
}

/// Everything the agent programs for NetworkPolicy from the objects: resolved, compiled and in
/// the maps' form, with the problems found on the way (by object).
pub fn program(objects: &Objects, node: &NodeContext) -> (WirePolicy, Vec<TranslateError>) {
    let (state, mut errors) = resolve(objects, node);
    let (wire, overflows) = to_wire(&state, &compile(&state));
    errors.extend(overflows);
    (wire, errors)
}

/// What [`Explained::AllowedBy`] names for a connection from the pod's own node.
pub const NODE_ALLOWED: &str = "the pod's own node (always allowed in)";

/// The policy verdict for one new connection as `sluice trace` explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The pod of this node whose policy applies, `namespace/name`.
    pub pod: String,
    pub way: Way,
    pub verdict: Explained,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explained {
    /// No policy selects the pod for this direction.
    Open,
    /// Allowed by this rule: `namespace/policy (ingress rule N)`, or [`NODE_ALLOWED`].
    AllowedBy(String),
    /// Isolated by these policies, and no rule of theirs allows the connection.
    Denied(Vec<String>),
}

impl PolicyState {
    /// How `way` policy of the pod at `pod` (if this node enforces it) judges a new connection
    /// with `peer` to `port`.
    pub fn explain(
        &self,
        pod: impl Into<IpAddr>,
        way: Way,
        peer: impl Into<IpAddr>,
        proto: Protocol,
        port: u16,
    ) -> Option<Explanation> {
        let (pod, peer): (IpAddr, IpAddr) = (pod.into(), peer.into());
        let policy = self.pods.get(&pod)?;
        let direction = match way {
            Way::Ingress => &policy.ingress,
            Way::Egress => &policy.egress,
        };
        let from_node = way == Way::Ingress && self.node_addresses.contains(&peer);
        let side = match way {
            Way::Ingress => "ingress",
            Way::Egress => "egress",
        };
        let verdict = match (direction, direction.allowing(peer, proto, port)) {
            (Direction::Open, _) => Explained::Open,
            (_, Some(allow)) => {
                Explained::AllowedBy(format!("{} ({side} rule {})", allow.policy, allow.rule))
            }
            (_, None) if from_node => Explained::AllowedBy(NODE_ALLOWED.to_string()),
            (Direction::Isolated { policies, .. }, None) => {
                Explained::Denied(policies.iter().cloned().collect())
            }
        };
        Some(Explanation {
            pod: policy.pod.to_string(),
            way,
            verdict,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pods a, b, c in namespaces x, y, z (labels pod=<name>, namespaces ns=<name>), as in
    /// Kubernetes' own network-policy tests; pod IPs 10.244.<ns>.<pod>, each with container
    /// ports serve-80-tcp and serve-81-udp.
    fn model(policies: &str) -> Objects {
        let mut yaml = String::new();
        for (n, ns) in ["x", "y", "z"].iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
            ));
            for (p, pod) in ["a", "b", "c"].iter().enumerate() {
                yaml.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                     spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\n\
                     status: {{podIP: 10.244.{}.{}}}\n",
                    n + 1,
                    p + 1
                ));
            }
        }
        yaml.push_str(policies);
        crate::manifests::parse_valid(&yaml)
    }

    fn ip(ns: usize, pod: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 244, ns as u8, pod as u8))
    }

    /// Whether `from` may open a connection to `to`:port, checked on both ends.
    fn reachable(
        state: &PolicyState,
        from: IpAddr,
        to: IpAddr,
        proto: Protocol,
        port: u16,
    ) -> bool {
        let egress_ok = state
            .pods
            .get(&from)
            .is_none_or(|p| !matches!(p.egress.allows(to, proto, port), Verdict::Denied(_)));
        let ingress_ok = state
            .pods
            .get(&to)
            .is_none_or(|p| !matches!(p.ingress.allows(from, proto, port), Verdict::Denied(_)));
        egress_ok && ingress_ok
    }

    /// The 9x9 matrix as a string: one line per source, `X` reachable, `.` not.
    fn matrix(state: &PolicyState, proto: Protocol, port: u16) -> String {
        let all: Vec<IpAddr> = (1..=3)
            .flat_map(|n| (1..=3).map(move |p| ip(n, p)))
            .collect();
        all.iter()
            .map(|from| {
                all.iter()
                    .map(|to| {
                        if reachable(state, *from, *to, proto, port) {
                            'X'
                        } else {
                            '.'
                        }
                    })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn resolved(policies: &str) -> PolicyState {
        let (state, errors) = resolve(&model(policies), &NodeContext::default());
        assert!(errors.is_empty(), "{errors:?}");
        state
    }

    const ALL: &str = "XXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX\nXXXXXXXXX";

    #[test]
    fn no_policy_everything_reaches_everything() {
        assert_eq!(matrix(&resolved(""), Protocol::Tcp, 80), ALL);
    }

    #[test]
    fn deny_all_ingress_in_x() {
        let state = resolved(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
        );
        // Columns x/a..x/c (the first three) are closed to everyone, even x's own pods.
        let expected = "...XXXXXX\n".repeat(9);
        assert_eq!(matrix(&state, Protocol::Tcp, 80), expected.trim_end());
    }

    #[test]
    fn deny_all_egress_and_implied_types() {
        // policyTypes [Egress] with no rules: x's pods reach nothing; ingress stays open.
        let state = resolved(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-egress, namespace: x}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
        );
        let rows: Vec<&str> = vec![
            ".........",
            ".........",
            ".........",
            "XXXXXXXXX",
            "XXXXXXXXX",
            "XXXXXXXXX",
            "XXXXXXXXX",
            "XXXXXXXXX",
            "XXXXXXXXX",
        ];
        assert_eq!(matrix(&state, Protocol::Tcp, 80), rows.join("\n"));
        // Egress rules without policyTypes imply Egress (and Ingress).
        let state = resolved(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
        );
        let a = &state.pods[&ip(1, 1)];
        assert!(matches!(a.egress, Direction::Isolated { .. }));
        assert!(matches!(a.ingress, Direction::Isolated { .. }));
        assert_eq!(
            a.egress.allows(ip(1, 2), Protocol::Tcp, 80),
            Verdict::AllowedBy("x/p")
        );
        assert!(matches!(
            a.egress.allows(ip(2, 2), Protocol::Tcp, 80),
            Verdict::Denied(_)
        ));
    }

    #[test]
    fn allow_from_a_namespace_and_combined_selector() {
        let state = resolved(
            r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [z]}]}
      podSelector: {matchLabels: {pod: c}}
"#,
        );
        let a = &state.pods[&ip(1, 1)].ingress;
        for pod in 1..=3 {
            assert_eq!(
                a.allows(ip(2, pod), Protocol::Tcp, 80),
                Verdict::AllowedBy("x/allow-y")
            );
        }
        // Only z/c of z; nothing of x, not even x/a itself.
        assert!(matches!(
            a.allows(ip(3, 1), Protocol::Tcp, 80),
            Verdict::Denied(_)
        ));
        assert_eq!(
            a.allows(ip(3, 3), Protocol::Tcp, 80),
            Verdict::AllowedBy("x/allow-y")
        );
        assert!(matches!(
            a.allows(ip(1, 2), Protocol::Tcp, 80),
            Verdict::Denied(_)
        ));
    }

    #[test]
    fn ip_block_with_except_named_ports_and_ranges() {
        let state = resolved(
            r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: mixed, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]
    ports: [{port: serve-80-tcp}, {port: 8000, endPort: 8100}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-81-udp, protocol: UDP}]
"#,
        );
        let a = &state.pods[&ip(1, 1)];
        // The named ingress port resolves against x/a's own container ports.
        assert_eq!(
            a.ingress.allows(ip(3, 2), Protocol::Tcp, 80),
            Verdict::AllowedBy("x/mixed")
        );
        assert_eq!(
            a.ingress.allows(ip(3, 2), Protocol::Tcp, 8050),
            Verdict::AllowedBy("x/mixed")
        );
        assert!(matches!(
            a.ingress.allows(ip(3, 2), Protocol::Tcp, 8101),
            Verdict::Denied(_)
        ));
        assert!(matches!(
            a.ingress.allows(ip(3, 2), Protocol::Udp, 80),
            Verdict::Denied(_)
        ));
        // y's pods fall in the except range.
        assert!(matches!(
            a.ingress.allows(ip(2, 2), Protocol::Tcp, 80),
            Verdict::Denied(_)
        ));
        // Egress to y on the peers' named UDP port only.
        assert_eq!(
            a.egress.allows(ip(2, 3), Protocol::Udp, 81),
            Verdict::AllowedBy("x/mixed")
        );
        assert!(matches!(
            a.egress.allows(ip(2, 3), Protocol::Tcp, 81),
            Verdict::Denied(_)
        ));
        assert!(matches!(
            a.egress.allows(ip(3, 3), Protocol::Udp, 81),
            Verdict::Denied(_)
        ));
    }

    #[test]
    fn except_ranges_become_disjoint_prefixes() {
        let prefixes = ip_block(
            "10.0.0.0/8",
            ["10.1.0.0/16".to_string(), "10.2.3.0/24".to_string()].iter(),
        )
        .unwrap();
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        let covered = |a: IpAddr| prefixes.iter().filter(|p| p.contains(&a)).count();
        assert_eq!(covered(addr("10.0.0.1")), 1);
        assert_eq!(covered(addr("10.1.2.3")), 0);
        assert_eq!(covered(addr("10.2.3.4")), 0);
        assert_eq!(covered(addr("10.2.4.4")), 1);
        assert_eq!(covered(addr("10.255.0.1")), 1);
        assert_eq!(covered(addr("11.0.0.1")), 0);
        assert!(ip_block("10.0.0.0/33", std::iter::empty()).is_err());
    }

    #[test]
    fn empty_rule_list_versus_empty_rule() {
        // ingress: [] allows nothing; ingress: [{}] allows everything.
        let deny = resolved(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: []}\n",
        );
        assert!(matches!(
            deny.pods[&ip(1, 1)]
                .ingress
                .allows(ip(2, 1), Protocol::Tcp, 80),
            Verdict::Denied(_)
        ));
        let allow = resolved(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{}]}\n",
        );
        assert_eq!(
            allow.pods[&ip(1, 1)]
                .ingress
                .allows(ip(2, 1), Protocol::Udp, 9),
            Verdict::AllowedBy("x/p")
        );
    }

    /// A policy the API server would refuse is rejected whole, named with every reason, and
    /// isolates nothing: not the pods it selects (so no half-applied policy cuts them off from
    /// what it meant to allow), even when no pod exists at all.
    #[test]
    fn a_policy_the_api_server_would_refuse_is_rejected_whole() {
        const BAD: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchExpressions: [{key: pod, operator: Within, values: [a]}]}}]
  - ports: [{port: 0}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-cidr, namespace: x}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]
"#;
        let (state, errors) = resolve(&model(BAD), &NodeContext::default());
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("NetworkPolicy x/bad-cidr: rejected whole")
                && messages[0].contains("10.0.0.0/33")
                && messages[0].contains("isolates nothing"),
            "{messages:?}"
        );
        assert!(
            messages[1].starts_with("NetworkPolicy x/typo: rejected whole")
                && messages[1].contains("Within")
                && messages[1].contains("ports[0].port: invalid value 0"),
            "{messages:?}"
        );
        assert_eq!(
            state.pods[&ip(1, 1)]
                .ingress
                .allows(ip(1, 2), Protocol::Tcp, 80),
            Verdict::Open
        );
        // Reported without any pod to select.
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        crate::manifests::parse_into(
            std::path::Path::new("p.yaml"),
            BAD,
            &mut objects,
            &mut errors,
        );
        assert!(errors.is_empty() && objects.pods.is_empty(), "{errors:?}");
        let (_, errors) = resolve(&objects, &NodeContext::default());
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn only_this_nodes_pods_are_enforced() {
        let node = NodeContext {
            name: Some("node-2".into()),
            ..Default::default()
        };
        let (state, _) = resolve(&model(""), &node);
        assert!(state.pods.is_empty());
    }

    #[test]
    fn the_seed_platform_policies() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: frontend-1, namespace: ecommerce, labels: {app: frontend}}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-1, namespace: ecommerce, labels: {app: backend}}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: postgres-0, namespace: ecommerce, labels: {app: postgres}}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: redis-0, namespace: ecommerce, labels: {app: redis}}
status: {podIP: 10.244.2.8}
---
apiVersion: v1
kind: Pod
metadata: {name: ingress-nginx, namespace: ingress-nginx, labels: {app: ingress}}
status: {podIP: 10.244.1.100}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-all, namespace: ecommerce}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: frontend-policy, namespace: ecommerce}
spec:
  podSelector: {matchLabels: {app: frontend}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{protocol: TCP, port: 3000}]
  egress:
  - to: [{podSelector: {matchLabels: {app: backend}}}]
    ports: [{protocol: TCP, port: 8080}]
  - to: [{namespaceSelector: {}}]
    ports: [{protocol: TCP, port: 53}, {protocol: UDP, port: 53}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-policy, namespace: ecommerce}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{protocol: TCP, port: 8080}]
  egress:
  - to: [{podSelector: {matchLabels: {app: postgres}}}]
    ports: [{protocol: TCP, port: 5432}]
  - to: [{podSelector: {matchLabels: {app: redis}}}]
    ports: [{protocol: TCP, port: 6379}]
"#;
        let (state, errors) = resolve(
            &crate::manifests::parse_valid(yaml),
            &NodeContext::default(),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let (ingress, frontend, backend, postgres, redis) = (
            a("10.244.1.100"),
            a("10.244.1.5"),
            a("10.244.1.10"),
            a("10.244.1.7"),
            a("10.244.2.8"),
        );
        let tcp = Protocol::Tcp;
        // The guide: anyone reaches the frontend on 3000; the frontend reaches the backend on
        // 8080 and DNS; the backend reaches postgres and redis; nothing else.
        assert!(reachable(&state, ingress, frontend, tcp, 3000));
        assert!(!reachable(&state, ingress, frontend, tcp, 8080));
        assert!(reachable(&state, frontend, backend, tcp, 8080));
        assert!(!reachable(&state, ingress, backend, tcp, 8080));
        assert!(
            !reachable(&state, frontend, a("10.96.0.10"), Protocol::Udp, 53),
            "namespaceSelector {{}} selects pods, not the DNS service address"
        );
        // default-deny-all isolates postgres and redis for ingress with no rule allowing the
        // backend: the guide's flow needs a postgres/redis policy the seed does not define.
        assert!(!reachable(&state, backend, postgres, tcp, 5432));
        assert!(!reachable(&state, backend, redis, tcp, 6379));
        assert!(!reachable(&state, frontend, postgres, tcp, 5432));
        assert_eq!(
            state.pods[&frontend].ingress.allows(ingress, tcp, 3000),
            Verdict::AllowedBy("ecommerce/frontend-policy")
        );
        // The explanation names the rule: DNS is the frontend's second egress rule.
        let dns = state
            .explain(frontend, Way::Egress, ingress, Protocol::Udp, 53)
            .unwrap();
        assert_eq!(
            dns.verdict,
            Explained::AllowedBy("ecommerce/frontend-policy (egress rule 2)".into())
        );
        match state.pods[&postgres].ingress.allows(backend, tcp, 5432) {
            Verdict::Denied(policies) => assert_eq!(
                policies.iter().collect::<Vec<_>>(),
                vec!["ecommerce/default-deny-all"]
            ),
            other => panic!("{other:?}"),
        }
    }

    /// The compiled (longest-prefix) form answers exactly like the rule scan, for every pair of
    /// model pods, outside addresses, both directions, several ports and protocols.
    #[test]
    fn compiled_policy_agrees_with_the_rules() {
        let state = resolved(
            r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: one, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]
    ports: [{port: 80}, {port: 8000, endPort: 8100}]
  - from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81, protocol: UDP}]
  - from: [{ipBlock: {cidr: 10.244.2.2/32}}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]
    ports: [{port: serve-80-tcp}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: two, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]
"#,
        );
        let compiled = compile(&state);
        let mut peers: Vec<IpAddr> = (1..=3)
            .flat_map(|n| (1..=3).map(move |p| ip(n, p)))
            .collect();
        peers.extend(
            ["192.0.2.1", "10.1.2.3", "10.244.2.200"].map(|a| a.parse::<IpAddr>().unwrap()),
        );
        let mut checked = 0;
        for (&pod, policy) in &state.pods {
            for peer in &peers {
                for proto in PROTOCOLS {
                    for port in [1, 80, 81, 8000, 8050, 8100, 8101, 65535] {
                        for (way, direction) in [
                            (Way::Ingress, &policy.ingress),
                            (Way::Egress, &policy.egress),
                        ] {
                            let by_rules =
                                !matches!(direction.allows(*peer, proto, port), Verdict::Denied(_));
                            assert_eq!(
                                compiled.allows(pod, way, *peer, proto, port),
                                by_rules,
                                "{pod} {way:?} {peer} {proto} {port}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1000);
        assert_eq!(
            merge(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]),
            vec![(1, 9), (20, 30)]
        );
    }

    /// The model with every pod dual-stack: `status.podIPs` adds fd00:10:244:<ns>::<pod>.
    fn model_dual_stack(policies: &str) -> Objects {
        let mut yaml = String::new();
        for (n, ns) in ["x", "y", "z"].iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
            ));
            for (p, pod) in ["a", "b", "c"].iter().enumerate() {
                let (n, p) = (n + 1, p + 1);
                yaml.push_str(&format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                     spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n\
                     status: {{podIP: 10.244.{n}.{p}, podIPs: [{{ip: 10.244.{n}.{p}}}, {{ip: 'fd00:10:244:{n}::{p}'}}]}}\n"
                ));
            }
        }
        yaml.push_str(policies);
        crate::manifests::parse_valid(&yaml)
    }

    fn ip6(ns: usize, pod: usize) -> IpAddr {
        format!("fd00:10:244:{ns}::{pod}").parse().unwrap()
    }

    #[test]
    fn dual_stack_pods_get_both_families_and_ip_blocks_apply_to_their_own() {
        let node = NodeContext {
            node_ips: vec!["172.18.0.2".parse().unwrap(), "fd00:18::2".parse().unwrap()],
            ..Default::default()
        };
        let (state, errors) = resolve(
            &model_dual_stack(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
                 spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n\
                 \x20   - ipBlock: {cidr: 'fd00:99::/64', except: ['fd00:99::/120']}\n\
                 \x20   - ipBlock: {cidr: 192.0.2.0/24}\n    ports: [{port: named-nothing}, {port: 80}]\n",
            ),
            &node,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.pods.len(), 18, "9 pods, 2 addresses each");
        let compiled = compile(&state);
        let tcp = Protocol::Tcp;
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        // IPv6: pods of y by their IPv6 addresses, the IPv6 block minus its IPv6 except.
        assert!(compiled.allows(ip6(1, 1), Way::Ingress, ip6(2, 3), tcp, 80));
        assert!(!compiled.allows(ip6(1, 1), Way::Ingress, ip6(2, 3), tcp, 81));
        assert!(!compiled.allows(ip6(1, 1), Way::Ingress, ip6(3, 1), tcp, 80));
        assert!(!compiled.allows(ip6(1, 1), Way::Ingress, ip6(1, 2), tcp, 80));
        assert!(compiled.allows(ip6(1, 1), Way::Ingress, a("fd00:99::1:7"), tcp, 80));
        assert!(!compiled.allows(ip6(1, 1), Way::Ingress, a("fd00:99::7"), tcp, 80));
        // The node's IPv6 address and the IPv6 hairpin address are let in.
        assert!(compiled.allows(ip6(1, 1), Way::Ingress, a("fd00:18::2"), tcp, 9));
        assert!(compiled.allows(ip6(1, 1), Way::Ingress, a("fd00:a9fe:2a01::1"), tcp, 9));
        // IPv4 as before: the IPv4 block is whole.
        assert!(compiled.allows(ip(1, 1), Way::Ingress, ip(2, 3), tcp, 80));
        assert!(compiled.allows(ip(1, 1), Way::Ingress, a("192.0.2.5"), tcp, 80));
        assert!(!compiled.allows(ip(1, 1), Way::Ingress, ip(3, 1), tcp, 80));
        // No entry of one family names an address of the other.
        assert!(compiled
            .entries
            .keys()
            .all(|k| k.pod.is_ipv4() == matches!(k.peer, IpNet::V4(_))));
        let (wire, overflows) = to_wire(&state, &compiled);
        assert!(overflows.is_empty());
        let pod6 = addr6_to_map("fd00:10:244:1::1".parse().unwrap());
        assert_eq!(wire.isolated6.get(&pod6), Some(&ISOLATED_INGRESS));
        assert_eq!(wire.isolated.len(), 1);
        assert!(wire
            .entries6
            .keys()
            .any(|(k, bits)| k.pod == pod6 && *bits == 120));
        let explained = state
            .explain(ip6(1, 1), Way::Ingress, ip6(3, 1), tcp, 80)
            .unwrap();
        assert_eq!(explained.verdict, Explained::Denied(vec!["x/p".into()]));
        assert_eq!(explained.pod, "x/a");
    }

    #[test]
    fn connections_from_the_pods_own_node_are_always_allowed_in() {
        let node = NodeContext {
            node_ips: vec!["172.18.0.2".parse().unwrap()],
            ..Default::default()
        };
        let (state, errors) = resolve(
            &model(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n",
            ),
            &node,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let compiled = compile(&state);
        let node_ip: IpAddr = "172.18.0.2".parse().unwrap();
        for proto in PROTOCOLS {
            assert!(compiled.allows(ip(1, 1), Way::Ingress, node_ip, proto, 9));
            assert!(!compiled.allows(ip(1, 1), Way::Ingress, ip(2, 1), proto, 9));
            // Only in: the pod's egress to its node stays denied.
            assert!(!compiled.allows(ip(1, 1), Way::Egress, node_ip, proto, 9));
        }
        let explained = state
            .explain(ip(1, 1), Way::Ingress, node_ip, Protocol::Tcp, 80)
            .unwrap();
        assert_eq!(explained.verdict, Explained::AllowedBy(NODE_ALLOWED.into()));
        assert_eq!(explained.pod, "x/a");
        // An open pod of y needs no entry for it.
        assert!(!compiled.isolated.contains(&(ip(2, 1), Way::Ingress)));
    }

    #[test]
    fn more_port_ranges_than_an_entry_holds_fail_closed_naming_the_pod_and_policies() {
        let ports: Vec<String> = (1..=20).map(|n| format!("{{port: {}}}", n * 10)).collect();
        let state = resolved(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: many, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{ports: [{}]}}]\n",
            ports.join(", ")
        ));
        let (wire, errors) = to_wire(&state, &compile(&state));
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            message.contains("Pod x/a (10.244.1.1)")
                && message.contains("x/many")
                && message.contains("20 separate port ranges"),
            "{message}"
        );
        let pod = u32::from_ne_bytes([10, 244, 1, 1]);
        let (_, value) = wire
            .entries
            .iter()
            .find(|((key, _), _)| key.pod == pod && key.proto == PROTO_TCP_NUMBER)
            .expect("the TCP entry");
        // The first 16 ranges (10..160) are kept: 170 and above are denied, not allowed.
        assert_eq!(value.count as usize, MAX_POLICY_PORT_RANGES);
        assert_eq!(
            value.ranges[0],
            PolicyPortRange {
                first: 10,
                last: 10
            }
        );
        assert_eq!(
            value.ranges[MAX_POLICY_PORT_RANGES - 1],
            PolicyPortRange {
                first: 160,
                last: 160
            }
        );
        assert_eq!(wire.isolated.get(&pod), Some(&ISOLATED_INGRESS));
    }

    const PROTO_TCP_NUMBER: u8 = sluice_common::PROTO_TCP;
}
