//! Which new flows are source-NATed (masqueraded), as kube-proxy decides it, and to what.

use sluice_common::{
    Backend, NodeConfig, ServiceValue, BACKEND_F_LOCAL, CONFIG_F_MASQUERADE_ALL, CT_F_HAIRPIN,
    CT_F_REDIRECT, HAIRPIN_SNAT_ADDR, MAX_CLUSTER_CIDRS, SVC_F_EXTERNAL, SVC_F_EXTERNAL_LOCAL,
};

use crate::{conntrack::Snat, maps::CONFIG, parse::Ipv4Packet, Hook};

/// The node's configuration (`config` map); all zeroes until the agent writes it.
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    CONFIG.get(0)
}

/// Whether `addr` is in one of the cluster CIDRs (`false` when none is configured).
#[inline(always)]
fn in_cluster(config: &NodeConfig, addr: u32) -> bool {
    for i in 0..MAX_CLUSTER_CIDRS {
        if i as u32 >= config.cidr_count {
            break;
        }
        let cidr = config.cluster_cidrs[i];
        if addr & cidr.mask == cidr.net {
            return true;
        }
    }
    false
}

/// The source NAT of a new flow of `service` from the packet's source to `backend`, entering
/// at `hook`, with the conntrack flags that go with it:
/// * hairpin (a pod reaching itself through a service): the service loopback address, sent
///   back out the pod's interface;
/// * externalTrafficPolicy Local: never (the client's address is the point of it);
/// * masqueradeAll: every flow;
/// * an external frontend reached from outside the node, balanced to a backend on another
///   node: the node, so the reply comes back through this node to be reverse-translated
///   (externalTrafficPolicy Cluster; a local backend keeps the client's address);
/// * a source outside the cluster CIDRs (when some are configured), except external traffic
///   to a local backend: the node (kube-proxy's `! -s clusterCIDR` masquerade).
///
/// Without a node address (`config.node_ip` 0) nothing but hairpin traffic is masqueraded.
/// Masquerade ports come from the configured range ([`NodeConfig::snat_ports`]), outside the
/// node's ephemeral ports; hairpin flows keep the client's port when it is free.
/// Flows entering from outside the node, and every masqueraded flow, get
/// [`CT_F_REDIRECT`].
#[inline(always)]
pub fn decide(
    config: Option<&NodeConfig>,
    service: &ServiceValue,
    backend: &Backend,
    pkt: &Ipv4Packet,
    hook: Hook,
) -> (Snat, u16) {
    let base = if hook == Hook::World {
        CT_F_REDIRECT
    } else {
        0
    };
    if hook == Hook::Pod && backend.addr == pkt.saddr {
        return (
            Snat {
                addr: u32::from_ne_bytes(HAIRPIN_SNAT_ADDR),
                keep_client_port: true,
            },
            CT_F_HAIRPIN | CT_F_REDIRECT,
        );
    }
    let Some(config) = config else {
        return (Snat::NONE, base);
    };
    if service.flags & SVC_F_EXTERNAL_LOCAL != 0 || config.node_ip == 0 {
        return (Snat::NONE, base);
    }
    let external = service.flags & SVC_F_EXTERNAL != 0;
    let local = backend.flags & BACKEND_F_LOCAL != 0;
    let masquerade = config.flags & CONFIG_F_MASQUERADE_ALL != 0
        || (external && hook == Hook::World && !local)
        || (config.cidr_count > 0 && !(external && local) && !in_cluster(config, pkt.saddr));
    if masquerade {
        (
            Snat {
                addr: config.node_ip,
                keep_client_port: false,
            },
            CT_F_REDIRECT,
        )
    } else {
        (Snat::NONE, base)
    }
}
