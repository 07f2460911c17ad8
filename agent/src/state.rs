//! Desired datapath state: what the translation (`translate.rs`) produces from Kubernetes
//! objects and what the datapath sync (`datapath/`) programs into the maps. Plain data, no I/O.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

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
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// A pod endpoint traffic is DNATed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// One frontend's programming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `namespace/name:port-name`, for logs and `sluice state`.
    pub name: String,
    /// Sorted, without duplicates. May be empty (a service without ready endpoints).
    pub backends: Vec<BackendAddr>,
}

/// Everything the node's datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServiceEntry>,
}
