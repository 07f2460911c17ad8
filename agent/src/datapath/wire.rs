//! Conversions between the agent's types (`crate::state`) and the map layout
//! (`sluice-common`). The maps hold addresses and ports in network byte order exactly as they sit
//! in a packet, so an address is the native-endian reading of its four octets and a port is
//! byte-swapped with `to_be`.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use sluice_common::{
    Backend, Cidr4, NodeConfig, ServiceKey, BACKEND_F_LOCAL, CONFIG_F_MASQUERADE_ALL,
    KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, MAX_CLUSTER_CIDRS,
    SCOPE_ALL, SCOPE_POD, SVC_F_AFFINITY, SVC_F_DROP_WHEN_EMPTY, SVC_F_EXTERNAL,
    SVC_F_EXTERNAL_LOCAL, SVC_F_SOURCE_RANGES,
};

use crate::{
    node::NodeContext,
    state::{BackendAddr, Frontend, FrontendKind, Protocol, ServiceEntry, WhenEmpty},
};

/// An IPv4 address as the maps (and the packet) hold it.
pub fn addr_to_map(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_map(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// A port as the maps (and the packet) hold it.
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// The IPv4 address of `ip`; `None` for IPv6, which the (IPv4) maps do not hold.
pub fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

/// The `services` key of an IPv4 frontend; `None` for an IPv6 one (`services6`, sync6.rs).
pub fn service_key(frontend: &Frontend) -> Option<ServiceKey> {
    Some(ServiceKey {
        addr: addr_to_map(ipv4(frontend.ip)?),
        port: port_to_map(frontend.port),
        proto: frontend.proto.number(),
        scope: SCOPE_ALL,
    })
}

/// The `services` key of the pods' entry of an IPv4 frontend (see [`SCOPE_POD`]).
pub fn pod_service_key(frontend: &Frontend) -> Option<ServiceKey> {
    Some(ServiceKey {
        scope: SCOPE_POD,
        ..service_key(frontend)?
    })
}

/// The frontend a `services` key stands for; `None` for a protocol the agent never writes.
pub fn frontend(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: addr_from_map(key.addr).into(),
        port: port_from_map(key.port),
        proto: Protocol::from_number(key.proto)?,
    })
}

/// An IPv4 backend as `backends` holds it, not marked local; `None` for IPv6.
pub fn backend_value(backend: &BackendAddr) -> Option<Backend> {
    backend_value_with(backend, false)
}

/// An IPv4 backend as `backends` holds it; `local`: it runs on this node. `None` for IPv6.
pub fn backend_value_with(backend: &BackendAddr, local: bool) -> Option<Backend> {
    Some(Backend {
        addr: addr_to_map(ipv4(backend.ip)?),
        port: port_to_map(backend.port),
        flags: if local { BACKEND_F_LOCAL } else { 0 },
        _pad: 0,
    })
}

/// What a [`sluice_common::ServiceValue`] says about a frontend besides its id and backend
/// count: the `SVC_F_*` flags, the `KIND_*`, the affinity timeout and affinity id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceSettings {
    pub flags: u16,
    pub kind: u8,
    pub affinity_timeout: u32,
    /// Given by the sync (`affinity.rs`); [`service_settings`] leaves it 0.
    pub affinity_id: u32,
}

pub fn kind_to_map(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => KIND_CLUSTER_IP,
        FrontendKind::NodePort => KIND_NODE_PORT,
        FrontendKind::ExternalIp => KIND_EXTERNAL_IP,
        FrontendKind::LoadBalancer => KIND_LOAD_BALANCER,
    }
}

pub fn kind_from_map(kind: u8) -> Option<FrontendKind> {
    match kind {
        KIND_CLUSTER_IP => Some(FrontendKind::ClusterIp),
        KIND_NODE_PORT => Some(FrontendKind::NodePort),
        KIND_EXTERNAL_IP => Some(FrontendKind::ExternalIp),
        KIND_LOAD_BALANCER => Some(FrontendKind::LoadBalancer),
        _ => None,
    }
}

/// The settings a frontend's entry asks for.
pub fn service_settings(entry: &ServiceEntry) -> ServiceSettings {
    let mut flags = 0;
    if entry.kind.is_external() {
        flags |= SVC_F_EXTERNAL;
        if entry.external_local {
            flags |= SVC_F_EXTERNAL_LOCAL;
        }
    }
    if entry.when_empty == WhenEmpty::Drop {
        flags |= SVC_F_DROP_WHEN_EMPTY;
    }
    if entry.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if !entry.source_ranges.is_empty() {
        flags |= SVC_F_SOURCE_RANGES;
    }
    ServiceSettings {
        flags,
        kind: kind_to_map(entry.kind),
        affinity_timeout: entry.affinity_timeout.unwrap_or(0),
        affinity_id: 0,
    }
}

/// The settings of the pods' entry of a frontend with cluster-wide backends for pods
/// ([`SCOPE_POD`]): the frontend's, without the Local policy (pods are not masqueraded
/// anyway) and rejecting when empty (the cluster-wide set is empty only when the service has
/// no usable endpoint at all).
pub fn pod_service_settings(entry: &ServiceEntry) -> ServiceSettings {
    let settings = service_settings(entry);
    ServiceSettings {
        flags: settings.flags & !(SVC_F_EXTERNAL_LOCAL | SVC_F_DROP_WHEN_EMPTY),
        ..settings
    }
}

/// An IPv4 CIDR as the programs match it: `(addr & mask) == net`.
pub fn cidr_to_map(net: &Ipv4Net) -> Cidr4 {
    Cidr4 {
        net: addr_to_map(net.network()),
        mask: addr_to_map(net.netmask()),
    }
}

pub fn backend_addr(backend: &Backend) -> BackendAddr {
    BackendAddr {
        ip: addr_from_map(backend.addr).into(),
        port: port_from_map(backend.port),
    }
}

/// The `config` entry for this node: the first IPv4 node address (masqueraded traffic gets it
/// as source), the IPv4 cluster CIDRs, masqueradeAll. IPv6 addresses and CIDRs are for the
/// IPv6 datapath. More IPv4 cluster CIDRs than the map holds are an error: the programs would
/// masquerade pod traffic from the ones left out.
pub fn node_config(node: &NodeContext) -> anyhow::Result<NodeConfig> {
    let node_ip = node.node_ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(*v4),
        std::net::IpAddr::V6(_) => None,
    });
    let cidrs: Vec<Ipv4Net> = node
        .cluster_cidrs
        .iter()
        .filter_map(|net| match net {
            ipnet::IpNet::V4(v4) => Some(v4.trunc()),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    if cidrs.len() > MAX_CLUSTER_CIDRS {
        anyhow::bail!(
            "{} IPv4 cluster CIDRs given, the datapath holds at most {MAX_CLUSTER_CIDRS}",
            cidrs.len()
        );
    }
    let mut config = NodeConfig {
        node_ip: node_ip.map_or(0, addr_to_map),
        flags: if node.masquerade_all {
            CONFIG_F_MASQUERADE_ALL
        } else {
            0
        },
        cidr_count: cidrs.len() as u32,
        ct_timeouts: node.conntrack,
        snat_port_min: node.masquerade_ports.map_or(0, |r| r.first),
        snat_port_max: node.masquerade_ports.map_or(0, |r| r.last),
        skip_port_min: node.skip_ports.map_or(0, |r| r.first),
        skip_port_max: node.skip_ports.map_or(0, |r| r.last),
        ..NodeConfig::default()
    };
    for (slot, cidr) in config.cluster_cidrs.iter_mut().zip(&cidrs) {
        *slot = cidr_to_map(cidr);
    }
    Ok(config)
}

/// A `services` key for messages: the frontend when it is one, the raw fields otherwise.
pub fn describe_key(key: &ServiceKey) -> String {
    match frontend(key) {
        Some(frontend) if key.scope == SCOPE_POD => format!("{frontend} (from pods)"),
        Some(frontend) => frontend.to_string(),
        None => format!(
            "{}:{}/proto-{}",
            addr_from_map(key.addr),
            port_from_map(key.port),
            key.proto
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_are_stored_as_on_the_wire() {
        let frontend = Frontend {
            ip: Ipv4Addr::new(10, 96, 0, 1).into(),
            port: 443,
            proto: Protocol::Tcp,
        };
        let key = service_key(&frontend).unwrap();
        // The bytes in memory are the bytes in the packet.
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), 443u16.to_be_bytes());
        assert_eq!(super::frontend(&key), Some(frontend));

        let backend = BackendAddr {
            ip: Ipv4Addr::new(10, 244, 1, 7).into(),
            port: 8443,
        };
        assert_eq!(backend_addr(&backend_value(&backend).unwrap()), backend);
        assert_eq!(
            backend_value_with(&backend, true).unwrap().flags,
            BACKEND_F_LOCAL
        );
        // The maps are IPv4: IPv6 frontends and backends have no key or value there.
        let v6 = Frontend {
            ip: "fd00:10:96::1".parse().unwrap(),
            ..frontend
        };
        assert_eq!(service_key(&v6), None);
        let v6 = BackendAddr {
            ip: "fd00:10:244::5".parse().unwrap(),
            port: 80,
        };
        assert_eq!(backend_value(&v6), None);
    }

    #[test]
    fn settings_follow_the_entry() {
        let mut entry = ServiceEntry::cluster_ip("ns/svc", vec![]);
        assert_eq!(service_settings(&entry), ServiceSettings::default());
        entry.kind = FrontendKind::LoadBalancer;
        entry.external_local = true;
        entry.when_empty = WhenEmpty::Drop;
        entry.affinity_timeout = Some(30);
        entry.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let settings = service_settings(&entry);
        assert_eq!(
            settings.flags,
            SVC_F_EXTERNAL
                | SVC_F_EXTERNAL_LOCAL
                | SVC_F_DROP_WHEN_EMPTY
                | SVC_F_AFFINITY
                | SVC_F_SOURCE_RANGES
        );
        assert_eq!(settings.kind, KIND_LOAD_BALANCER);
        assert_eq!(settings.affinity_timeout, 30);
        assert_eq!(
            kind_from_map(settings.kind),
            Some(FrontendKind::LoadBalancer)
        );
        // externalTrafficPolicy means nothing to a ClusterIP.
        entry.kind = FrontendKind::ClusterIp;
        assert_eq!(service_settings(&entry).flags & SVC_F_EXTERNAL_LOCAL, 0);
    }

    #[test]
    fn node_config_takes_the_first_ipv4_address_and_the_ipv4_cidrs() {
        let node = NodeContext {
            node_ips: vec![
                "fc00::3".parse().unwrap(),
                "172.18.0.3".parse().unwrap(),
                "203.0.113.7".parse().unwrap(),
            ],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
                "10.245.1.7/24".parse().unwrap(),
            ],
            masquerade_all: true,
            ..Default::default()
        };
        let config = node_config(&node).unwrap();
        assert_eq!(config.node_ip.to_ne_bytes(), [172, 18, 0, 3]);
        assert_eq!(config.flags, CONFIG_F_MASQUERADE_ALL);
        assert_eq!(config.cidr_count, 2);
        assert_eq!(config.cluster_cidrs[0].net.to_ne_bytes(), [10, 244, 0, 0]);
        assert_eq!(config.cluster_cidrs[0].mask.to_ne_bytes(), [255, 255, 0, 0]);
        assert_eq!(config.cluster_cidrs[1].net.to_ne_bytes(), [10, 245, 1, 0]);
        assert_eq!(config.cluster_cidrs[2], Cidr4::default());

        assert_eq!(
            node_config(&NodeContext::default()).unwrap(),
            NodeConfig::default()
        );
        let too_many = NodeContext {
            cluster_cidrs: (0..9)
                .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
                .collect(),
            ..Default::default()
        };
        assert!(node_config(&too_many).is_err());
    }
}
