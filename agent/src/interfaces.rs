//! Finding the interfaces Sluice attaches to, with rtnetlink.
//!
//! * A pod interface is a veth that is the output device of a /32 host route in the main
//!   table: the layout kindnet, Calico and the ptp CNI plugin all produce
//!   (`10.244.1.5 dev vethXYZ`).
//! * An external interface carries one of the node's addresses (the Node object's InternalIP
//!   or ExternalIP): traffic from outside the node (NodePorts, load balancer and external IPs,
//!   replies from other nodes) arrives there. A pod interface never counts as external.
//!
//! [`watch`] reports every link, address and IPv4 route change, after which the caller scans
//! again, so interfaces are picked up as they appear and forgotten when they go.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkInfo},
        route::{RouteAttribute, RouteMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
    RouteMessageBuilder,
};
use tokio::sync::mpsc;

const RT_TABLE_MAIN: u32 = 254;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// A link as the selection needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub is_veth: bool,
}

/// A route as the selection needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix_len: u8,
    pub table: u32,
    pub oif: Option<u32>,
}

/// Pure selection: ifindex -> name of every veth that a /32 main-table route points at.
pub fn select_pod_interfaces(routes: &[Route], links: &[Link]) -> BTreeMap<u32, String> {
    let veths: BTreeMap<u32, &str> = links
        .iter()
        .filter(|l| l.is_veth)
        .map(|l| (l.index, l.name.as_str()))
        .collect();
    routes
        .iter()
        .filter(|r| r.prefix_len == 32 && r.table == RT_TABLE_MAIN)
        .filter_map(|r| r.oif)
        .filter_map(|oif| veths.get(&oif).map(|name| (oif, name.to_string())))
        .collect()
}

/// Pure selection: ifindex -> name of every interface (but loopback and pod interfaces) that
/// carries one of `node_ips`.
pub fn select_external_interfaces(
    links: &[Link],
    addresses: &[(u32, IpAddr)],
    node_ips: &[IpAddr],
    pods: &BTreeMap<u32, String>,
) -> BTreeMap<u32, String> {
    let names: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    addresses
        .iter()
        .filter(|(_, ip)| node_ips.contains(ip) && !ip.is_loopback())
        .filter(|(index, _)| !pods.contains_key(index))
        .filter_map(|(index, _)| {
            let name = names.get(index)?;
            (*name != "lo").then(|| (*index, name.to_string()))
        })
        .collect()
}

/// The interfaces of this node Sluice attaches to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interfaces {
    pub pods: BTreeMap<u32, String>,
    pub external: BTreeMap<u32, String>,
}

/// Dumps links, addresses and IPv4 routes of this network namespace and selects the pod and
/// external interfaces.
pub async fn scan(handle: &rtnetlink::Handle, node_ips: &[IpAddr]) -> anyhow::Result<Interfaces> {
    let mut links = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.context("dumping links")? {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            is_veth: false,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::LinkInfo(infos) => {
                    link.is_veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        links.push(link);
    }

    let mut routes = Vec::new();
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut dump = handle.route().get(filter).execute();
    while let Some(msg) = dump.try_next().await.context("dumping routes")? {
        routes.push(route_of(&msg));
    }
    let pods = select_pod_interfaces(&routes, &links);

    let mut addresses = Vec::new();
    if !node_ips.is_empty() {
        let mut dump = handle.address().get().execute();
        while let Some(msg) = dump.try_next().await.context("dumping addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                    addresses.push((msg.header.index, *ip));
                }
            }
        }
    }
    let external = select_external_interfaces(&links, &addresses, node_ips, &pods);
    Ok(Interfaces { pods, external })
}

fn route_of(msg: &RouteMessage) -> Route {
    let mut route = Route {
        prefix_len: msg.header.destination_prefix_length,
        table: msg.header.table as u32,
        oif: None,
    };
    for attr in &msg.attributes {
        match attr {
            // Tables above 255 only appear in the attribute.
            RouteAttribute::Table(t) => route.table = *t,
            RouteAttribute::Oif(oif) => route.oif = Some(*oif),
            _ => {}
        }
    }
    route
}

/// Opens a request connection for [`scan`]; the connection task runs on the runtime.
pub fn connect() -> anyhow::Result<rtnetlink::Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Subscribes to link, address and IPv4 route changes; a `()` is sent on `changed` for each
/// batch of notifications (the receiver rescans, so coalescing is harmless).
pub fn watch(changed: mpsc::Sender<()>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink for notifications")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
        ))
        .context("subscribing to link, address and route notifications")?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            // A full channel already holds a pending rescan.
            if let Err(mpsc::error::TrySendError::Closed(())) = changed.try_send(()) {
                break;
            }
        }
        tracing::warn!("rtnetlink notification stream ended");
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_veths_behind_main_table_host_routes() {
        let links = vec![
            Link {
                index: 1,
                name: "lo".into(),
                is_veth: false,
            },
            Link {
                index: 2,
                name: "eth0".into(),
                is_veth: false,
            },
            Link {
                index: 7,
                name: "veth1a2b".into(),
                is_veth: true,
            },
            Link {
                index: 8,
                name: "veth3c4d".into(),
                is_veth: true,
            },
            Link {
                index: 9,
                name: "vethnoroute".into(),
                is_veth: true,
            },
        ];
        let routes = vec![
            Route {
                prefix_len: 32,
                table: 254,
                oif: Some(7),
            },
            Route {
                prefix_len: 32,
                table: 254,
                oif: Some(8),
            },
            // A /32 to a non-veth (e.g. a tunnel peer) is not a pod.
            Route {
                prefix_len: 32,
                table: 254,
                oif: Some(2),
            },
            // A subnet route through a veth is not a pod host route.
            Route {
                prefix_len: 24,
                table: 254,
                oif: Some(9),
            },
            // Host routes of other tables (local, policy tables) are not pods.
            Route {
                prefix_len: 32,
                table: 255,
                oif: Some(9),
            },
            Route {
                prefix_len: 0,
                table: 254,
                oif: None,
            },
        ];
        let selected = select_pod_interfaces(&routes, &links);
        assert_eq!(
            selected.into_iter().collect::<Vec<_>>(),
            vec![(7, "veth1a2b".to_string()), (8, "veth3c4d".to_string())]
        );
    }

    #[test]
    fn external_interfaces_carry_a_node_ip() {
        let links = vec![
            Link {
                index: 1,
                name: "lo".into(),
                is_veth: false,
            },
            Link {
                index: 2,
                name: "eth0".into(),
                is_veth: true,
            },
            Link {
                index: 3,
                name: "eth1".into(),
                is_veth: false,
            },
            Link {
                index: 7,
                name: "veth1a2b".into(),
                is_veth: true,
            },
        ];
        let node_ips: Vec<IpAddr> = vec![
            "172.18.0.11".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
        ];
        let addresses: Vec<(u32, IpAddr)> = vec![
            (1, "127.0.0.1".parse().unwrap()),
            (2, "172.18.0.11".parse().unwrap()),
            (3, "192.168.7.1".parse().unwrap()),
            // A pod veth carrying the node's gateway address is still a pod interface.
            (7, "10.244.1.1".parse().unwrap()),
        ];
        let pods = BTreeMap::from([(7, "veth1a2b".to_string())]);
        let external = select_external_interfaces(&links, &addresses, &node_ips, &pods);
        // kind's node eth0 is itself a veth: what matters is the node IP on it.
        assert_eq!(
            external.into_iter().collect::<Vec<_>>(),
            vec![(2, "eth0".to_string())]
        );
    }
}
