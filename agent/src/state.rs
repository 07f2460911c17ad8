//! Desired datapath state: what the translation (`translate.rs`) produces from Kubernetes
//! objects and what the datapath sync (`datapath/`) programs into the maps. Plain data, no I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use crate::health::ServiceHealth;

/// L4 protocol of a service port, as Kubernetes names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as the datapath sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => sluice_common::PROTO_TCP,
            Protocol::Udp => sluice_common::PROTO_UDP,
            Protocol::Sctp => sluice_common::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            sluice_common::PROTO_TCP => Some(Protocol::Tcp),
            sluice_common::PROTO_UDP => Some(Protocol::Udp),
            sluice_common::PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// What a client addresses: a service's virtual IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// IPv4 or IPv6. A frontend's backends are always of its own family.
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.proto),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.proto),
        }
    }
}

/// A pod endpoint traffic is DNATed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // std's SocketAddr formatting: `10.0.0.1:80`, `[fd00::1]:80`.
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// Which Kubernetes address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// NodePort, external IP and load balancer addresses are reached from outside the
    /// cluster; externalTrafficPolicy applies to them.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// What a frontend without backends does to a packet, as kube-proxy decides it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhenEmpty {
    /// The service has no usable endpoint: answer with a TCP RST or ICMP port unreachable, so
    /// clients fail at once.
    #[default]
    Reject,
    /// A Local traffic policy left no endpoint on this node although there are some elsewhere:
    /// drop silently (a load balancer's health check steers traffic away from this node).
    Drop,
}

/// One frontend's programming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `namespace/name:port-name`, for logs and `sluice state`.
    pub name: String,
    pub kind: FrontendKind,
    /// The endpoints this frontend balances over on this node (traffic policy and topology
    /// applied), sorted, without duplicates. May be empty.
    pub backends: Vec<BackendAddr>,
    /// The backends of `backends` and `cluster_backends` running on this node. External
    /// traffic to a backend on another node is masqueraded so its replies come back through
    /// this node.
    pub local_backends: BTreeSet<BackendAddr>,
    /// An external frontend with `externalTrafficPolicy: Local`: the service's cluster-wide
    /// endpoints, sorted, which traffic from pods uses instead of `backends` (kube-proxy's
    /// "pod traffic for external destinations" rule). `None` for every other frontend.
    pub cluster_backends: Option<Vec<BackendAddr>>,
    pub when_empty: WhenEmpty,
    /// An external frontend with `externalTrafficPolicy: Local`: the client's address is kept
    /// (never masqueraded) and only local backends are used.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP`: a client keeps its backend for this many seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends): other sources are dropped. Empty
    /// means every source is allowed. Only ranges of the frontend's family (kube-proxy filters
    /// the ranges per family, so an IPv6 frontend of a service with IPv4 ranges only is open).
    pub source_ranges: Vec<IpNet>,
}

impl ServiceEntry {
    /// A ClusterIP frontend balancing over `backends` with kube-proxy's defaults, for tests.
    pub fn cluster_ip(name: impl Into<String>, backends: Vec<BackendAddr>) -> Self {
        ServiceEntry {
            name: name.into(),
            kind: FrontendKind::ClusterIp,
            backends,
            local_backends: BTreeSet::new(),
            cluster_backends: None,
            when_empty: WhenEmpty::Reject,
            external_local: false,
            affinity_timeout: None,
            source_ranges: Vec::new(),
        }
    }
}

/// Everything the node's datapath and health servers should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Shared, not copied: a translation reused from the last pass hands out the same entries
    /// (`translate::Translator`), and the datapath sync skips an entry it already programmed.
    pub services: BTreeMap<Frontend, Arc<ServiceEntry>>,
    /// healthCheckNodePort -> what its server reports.
    pub health_checks: BTreeMap<u16, ServiceHealth>,
}
