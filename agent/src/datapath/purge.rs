//! Which conntrack and affinity entries go when backends are removed from a service
//! (kube-proxy's conntrack cleanup of stale UDP endpoints).
//!
//! A UDP (or SCTP) client keeps sending on its tuple; its conntrack entry would keep it on the
//! removed backend, silently, until the entry is evicted. Deleting the flow's two entries makes
//! its next packet a new flow, balanced over the live backends at once. TCP flows are left to
//! drain (the client sees its connection fail and reconnects), as kube-proxy leaves them.
//! Affinity entries pointing to a removed backend go whatever the protocol, so a client's next
//! flow is balanced again instead of being sent to a backend that is gone.
//!
//! Pure: [`Selection`] decides per entry; `Datapath::purge_removed_backends` walks the maps.
//! It picks by backend alone, whatever the flows' conntrack state: a live UDP flow to a removed
//! backend goes at once, not when it would expire. Expired entries of any flow are the
//! periodic garbage collection's (`gc.rs`).

use std::collections::BTreeSet;

use sluice_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_SCTP, PROTO_UDP,
};

use super::{sync::RemovedBackends, wire};
use crate::state::BackendAddr;

/// The entries to delete for a set of removed backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// (service id, backend) pairs that went away.
    removed: BTreeSet<(u32, BackendAddr)>,
    /// (affinity id, backend) pairs that went away (`affinity.rs`: a frontend's affinity
    /// entries are keyed by its affinity id).
    removed_affinity: BTreeSet<(u32, BackendAddr)>,
    /// Affinity ids no frontend uses any more: all their entries go.
    retired_affinity: BTreeSet<u32>,
}

impl Selection {
    pub fn new(removed: &[RemovedBackends]) -> Selection {
        Selection {
            removed: removed
                .iter()
                .flat_map(|r| r.backends.iter().map(|b| (r.service_id, *b)))
                .collect(),
            removed_affinity: removed
                .iter()
                .filter(|r| r.affinity_id != 0)
                .flat_map(|r| r.affinity_backends.iter().map(|b| (r.affinity_id, *b)))
                .collect(),
            retired_affinity: BTreeSet::new(),
        }
    }

    /// Also every affinity entry of the `retired` ids.
    pub fn with_retired_affinity(mut self, retired: &BTreeSet<u32>) -> Selection {
        self.retired_affinity.extend(retired);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.retired_affinity.is_empty()
    }

    fn is_removed(&self, service_id: u32, addr: u32, port: u16) -> bool {
        self.removed.contains(&(service_id, backend(addr, port)))
    }

    /// A UDP or SCTP flow's entry whose backend was removed: the forward entry (the backend is
    /// its translation) and the reply entry (the backend is its source).
    pub fn conntrack(&self, key: &CtKey, value: &CtValue) -> bool {
        if key.proto != PROTO_UDP && key.proto != PROTO_SCTP {
            return false;
        }
        match key.dir {
            CT_DIR_FORWARD => self.is_removed(value.service_id, value.nat_addr, value.nat_port),
            CT_DIR_REPLY => self.is_removed(value.service_id, key.saddr, key.sport),
            _ => false,
        }
    }

    /// An affinity entry pointing to a removed backend, or of a retired affinity id.
    pub fn affinity(&self, key: &AffinityKey, value: &AffinityValue) -> bool {
        self.retired_affinity.contains(&key.affinity_id)
            || self.removed_affinity.contains(&(
                key.affinity_id,
                backend(value.backend.addr, value.backend.port),
            ))
    }
}

fn backend(addr: u32, port: u16) -> BackendAddr {
    BackendAddr {
        ip: wire::addr_from_map(addr).into(),
        port: wire::port_from_map(port),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use sluice_common::{Backend, CT_F_SNAT, PROTO_TCP};

    use super::*;

    const LIVE: BackendAddr = BackendAddr {
        ip: std::net::IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
        port: 53,
    };
    const GONE: BackendAddr = BackendAddr {
        ip: std::net::IpAddr::V4(Ipv4Addr::new(10, 244, 2, 3)),
        port: 53,
    };
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

    fn a(ip: impl Into<std::net::IpAddr>) -> u32 {
        wire::addr_to_map(wire::ipv4(ip.into()).expect("an IPv4 address"))
    }

    fn p(port: u16) -> u16 {
        wire::port_to_map(port)
    }

    /// The two entries of a flow of `proto` from CLIENT:40000 to VIP:53 on `backend` of
    /// service `id`, optionally masqueraded to NODE:61000.
    fn flow(proto: u8, id: u32, backend: BackendAddr, snat: bool) -> [(CtKey, CtValue); 2] {
        let value = CtValue {
            nat_addr: a(backend.ip),
            nat_port: p(backend.port),
            flags: if snat { CT_F_SNAT } else { 0 },
            snat_addr: if snat { a(NODE) } else { 0 },
            snat_port: if snat { p(61_000) } else { 0 },
            state: 0,
            _pad: 0,
            service_id: id,
            backend_slot: 0,
            created_ns: 1,
            last_seen_ns: 1,
        };
        let forward = CtKey {
            saddr: a(CLIENT),
            daddr: a(VIP),
            sport: p(40_000),
            dport: p(53),
            proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let reply = CtKey {
            saddr: a(backend.ip),
            daddr: if snat { a(NODE) } else { a(CLIENT) },
            sport: p(backend.port),
            dport: if snat { p(61_000) } else { p(40_000) },
            proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let reply_value = CtValue {
            nat_addr: a(VIP),
            nat_port: p(53),
            snat_addr: if snat { a(CLIENT) } else { 0 },
            snat_port: if snat { p(40_000) } else { 0 },
            ..value
        };
        [(forward, value), (reply, reply_value)]
    }

    fn selection() -> Selection {
        Selection::new(&[RemovedBackends {
            frontend: None,
            service_id: 7,
            affinity_id: 3,
            affinity_backends: [GONE].into(),
            backends: [GONE].into(),
        }])
    }

    #[test]
    fn udp_and_sctp_flows_of_a_removed_backend_go_both_entries() {
        let selection = selection();
        for proto in [PROTO_UDP, PROTO_SCTP] {
            for snat in [false, true] {
                for (key, value) in flow(proto, 7, GONE, snat) {
                    assert!(selection.conntrack(&key, &value), "{key:?}");
                }
            }
        }
    }

    #[test]
    fn tcp_flows_live_backends_and_other_services_stay() {
        let selection = selection();
        let kept = [
            flow(PROTO_TCP, 7, GONE, false),
            flow(PROTO_UDP, 7, LIVE, false),
            flow(PROTO_UDP, 7, LIVE, true),
            // The same backend address under another service stays in that service.
            flow(PROTO_UDP, 8, GONE, false),
        ];
        for (key, value) in kept.iter().flatten() {
            assert!(!selection.conntrack(key, value), "{key:?} {value:?}");
        }
        assert!(Selection::new(&[]).is_empty());
    }

    #[test]
    fn affinity_to_a_removed_backend_goes_whatever_the_protocol() {
        let selection = selection();
        let entry = |id, backend: BackendAddr| {
            (
                AffinityKey {
                    affinity_id: id,
                    client: a(CLIENT),
                },
                AffinityValue {
                    backend: Backend {
                        addr: a(backend.ip),
                        port: p(backend.port),
                        flags: 0,
                        _pad: 0,
                    },
                    last_used_ns: 1,
                },
            )
        };
        // Affinity entries are keyed by the frontend's affinity id (3), not its service id.
        let (key, value) = entry(3, GONE);
        assert!(selection.affinity(&key, &value));
        let (key, value) = entry(3, LIVE);
        assert!(!selection.affinity(&key, &value));
        let (key, value) = entry(7, GONE);
        assert!(!selection.affinity(&key, &value));
        // A retired id loses every entry.
        let selection = selection.with_retired_affinity(&BTreeSet::from([9]));
        let (key, value) = entry(9, LIVE);
        assert!(selection.affinity(&key, &value));
    }
}
