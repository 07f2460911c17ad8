//! Finding pod interfaces with rtnetlink.
//!
//! A pod interface is a veth that is the output device of a /32 host route in the main table:
//! the layout kindnet, Calico and the ptp CNI plugin all produce (`10.244.1.5 dev vethXYZ`).
//! [`watch`] reports every link and IPv4 route change, after which the caller scans again, so
//! pods are picked up as their routes appear and forgotten when they go.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo},
        route::{RouteAttribute, RouteMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
    RouteMessageBuilder,
};
use tokio::sync::mpsc;

const RT_TABLE_MAIN: u32 = 254;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

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

/// Dumps links and IPv4 routes of this network namespace and selects the pod interfaces.
pub async fn scan(handle: &rtnetlink::Handle) -> anyhow::Result<BTreeMap<u32, String>> {
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
    Ok(select_pod_interfaces(&routes, &links))
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

/// Subscribes to link and IPv4 route changes; a `()` is sent on `changed` for each batch of
/// notifications (the receiver rescans, so coalescing is harmless).
pub fn watch(changed: mpsc::Sender<()>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink for notifications")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE))
        .context("subscribing to link and route notifications")?;
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
}
