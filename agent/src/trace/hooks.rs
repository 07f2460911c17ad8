//! Where a traced packet enters the node, and which of the datapath's programs it meets on the
//! way there and back. One table ([`path`], [`reply_path`]): a new hook is a new [`Program`]
//! and a line in it.

use std::{fmt, net::IpAddr};

use serde::Serialize;

use crate::{
    datapath::{PROGRAM_FROM_POD, PROGRAM_FROM_WORLD, PROGRAM_TO_POD, PROGRAM_TO_WORLD},
    node::NodeContext,
};

/// Where the packet enters (`--from`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryPoint {
    /// Sent by a pod on this node, through its veth.
    Pod,
    /// Sent by the node itself (a host-network process).
    Host,
    /// Arriving from outside the node, on its uplink.
    External,
}

impl fmt::Display for EntryPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryPoint::Pod => "pod",
            EntryPoint::Host => "host",
            EntryPoint::External => "external",
        })
    }
}

impl EntryPoint {
    /// Where a packet from `src` comes from when `--from` is not given: the host for one of this
    /// node's addresses, a pod for an address in the cluster CIDRs (every address when none is
    /// configured, as kube-proxy has it), outside the node otherwise.
    pub fn default_for(src: IpAddr, node: &NodeContext) -> EntryPoint {
        if node.node_ips.contains(&src) {
            EntryPoint::Host
        } else if node.is_pod_ip(src) {
            EntryPoint::Pod
        } else {
            EntryPoint::External
        }
    }
}

/// A program of the datapath that a trace can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    FromPod,
    ToPod,
    FromWorld,
    ToWorld,
}

impl Program {
    /// The program's name in the eBPF object.
    pub fn name(self) -> &'static str {
        match self {
            Program::FromPod => PROGRAM_FROM_POD,
            Program::ToPod => PROGRAM_TO_POD,
            Program::FromWorld => PROGRAM_FROM_WORLD,
            Program::ToWorld => PROGRAM_TO_WORLD,
        }
    }

    /// Whether the program runs where packets enter the node (tc ingress): the interface a
    /// trace gives `BPF_PROG_RUN` for the FIB lookups of its redirects.
    pub fn at_ingress(self) -> bool {
        matches!(self, Program::FromPod | Program::FromWorld)
    }
}

/// A program where it runs on a packet's way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub program: Program,
    /// Where it is attached, for the human output.
    pub at: &'static str,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.program.name(), self.at)
    }
}

/// The programs a packet from an entry point meets, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketPath {
    pub forward: &'static [Hop],
    /// Why no program runs on the forward way, when none does.
    pub unhooked: Option<&'static str>,
}

const FROM_POD: Hop = Hop {
    program: Program::FromPod,
    at: "tc ingress of the client pod's veth",
};
const TO_POD: Hop = Hop {
    program: Program::ToPod,
    at: "tc egress of the client pod's veth",
};
const FROM_WORLD: Hop = Hop {
    program: Program::FromWorld,
    at: "tc ingress of the node's external interface",
};
const TO_WORLD: Hop = Hop {
    program: Program::ToWorld,
    at: "tc egress of the node's external interface",
};
/// The receiving pod's `to_pod` on a forwarded packet (its ingress policy), when the receiver
/// is a pod on this node.
pub const TO_RECEIVER_POD: Hop = Hop {
    program: Program::ToPod,
    at: "tc egress of the receiving pod's veth",
};
const FROM_BACKEND_POD: Hop = Hop {
    program: Program::FromPod,
    at: "tc ingress of the backend pod's veth",
};
const FROM_BACKEND_NODE: Hop = Hop {
    program: Program::FromWorld,
    at: "tc ingress of the node's external interface, from the backend's node",
};

/// Why a trace runs no program on a packet the host sends.
pub const HOST_UNHOOKED: &str = "sent by the host: its sockets are translated at connect() and \
    sendmsg() by the socket programs (cgroup sock_addr, with `sluice agent --cgroup-root`), \
    which BPF_PROG_RUN cannot run; their decision is read from the same maps";

/// The table. A packet a pod sends meets `from_pod` as it leaves the pod; a packet from outside
/// the node meets `from_world` on the external interface it arrives on. (A forwarded packet also
/// crosses `to_pod` of a local backend's veth or `to_world` on its way out; those translate
/// only answers of known flows, so these hops are left out.)
pub fn path(entry: EntryPoint) -> PacketPath {
    match entry {
        EntryPoint::Pod => PacketPath {
            forward: &[FROM_POD],
            unhooked: None,
        },
        EntryPoint::Host => PacketPath {
            forward: &[],
            unhooked: Some(HOST_UNHOOKED),
        },
        EntryPoint::External => PacketPath {
            forward: &[FROM_WORLD],
            unhooked: None,
        },
    }
}

/// The programs the answer of the packet's receiver meets on its way back to the sender: where
/// it enters the datapath (the backend's veth for a backend on this node, the external
/// interface for one elsewhere), then where it leaves toward the sender.
pub fn reply_path(entry: EntryPoint, receiver_local: bool) -> &'static [Hop] {
    match (entry, receiver_local) {
        (EntryPoint::Pod, true) => &[FROM_BACKEND_POD, TO_POD],
        (EntryPoint::Pod, false) => &[FROM_BACKEND_NODE, TO_POD],
        (EntryPoint::External, true) => &[FROM_BACKEND_POD, TO_WORLD],
        (EntryPoint::External, false) => &[FROM_BACKEND_NODE, TO_WORLD],
        (EntryPoint::Host, _) => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_entry_point_defaults_follow_the_node_context() {
        let node = NodeContext {
            node_ips: vec!["172.18.0.3".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let at = |ip: &str| EntryPoint::default_for(ip.parse().unwrap(), &node);
        assert_eq!(at("10.244.3.4"), EntryPoint::Pod);
        assert_eq!(at("172.18.0.3"), EntryPoint::Host);
        assert_eq!(at("192.0.2.7"), EntryPoint::External);
        // Without cluster CIDRs every source but the node's own addresses is a pod.
        let open = NodeContext {
            cluster_cidrs: vec![],
            ..node
        };
        assert_eq!(
            EntryPoint::default_for("192.0.2.7".parse().unwrap(), &open),
            EntryPoint::Pod
        );
        assert_eq!(
            EntryPoint::default_for("172.18.0.3".parse().unwrap(), &open),
            EntryPoint::Host
        );
    }

    #[test]
    fn trace_entry_point_defaults_for_ipv6_sources() {
        let node = NodeContext {
            node_ips: vec![
                "172.18.0.3".parse().unwrap(),
                "fc00:f853:ccd:e793::3".parse().unwrap(),
            ],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
            ],
            ..Default::default()
        };
        let at = |ip: &str| EntryPoint::default_for(ip.parse().unwrap(), &node);
        assert_eq!(at("fd00:10:244:1::5"), EntryPoint::Pod);
        assert_eq!(at("fc00:f853:ccd:e793::3"), EntryPoint::Host);
        assert_eq!(at("2001:db8::10"), EntryPoint::External);
        assert_eq!(at("10.244.3.4"), EntryPoint::Pod);
    }

    #[test]
    fn trace_paths_without_hooks_say_why() {
        for entry in [EntryPoint::Pod, EntryPoint::Host, EntryPoint::External] {
            let path = path(entry);
            assert_eq!(path.forward.is_empty(), path.unhooked.is_some(), "{entry}");
        }
        assert_eq!(path(EntryPoint::Pod).forward[0].program.name(), "from_pod");
        assert_eq!(
            path(EntryPoint::External).forward[0].program.name(),
            "from_world"
        );
        let names = |hops: &[Hop]| hops.iter().map(|h| h.program.name()).collect::<Vec<_>>();
        assert_eq!(
            names(reply_path(EntryPoint::Pod, true)),
            ["from_pod", "to_pod"]
        );
        assert_eq!(
            names(reply_path(EntryPoint::Pod, false)),
            ["from_world", "to_pod"]
        );
        assert_eq!(
            names(reply_path(EntryPoint::External, true)),
            ["from_pod", "to_world"]
        );
        assert_eq!(
            names(reply_path(EntryPoint::External, false)),
            ["from_world", "to_world"]
        );
        assert!(reply_path(EntryPoint::Host, true).is_empty());
    }
}
