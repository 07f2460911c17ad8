//! Programming the IPv6 maps (`services6`, `backends6`) with the IPv6 frontends of a
//! [`DesiredState`].
//!
//! The IPv6 datapath (ebpf/src/v6.rs) is a subset of the IPv4 one: destination NAT to a
//! random backend and reverse NAT, REJECT and DROP, masquerade of external traffic to remote
//! backends only; no affinity or source ranges. A frontend
//! is programmed only when that subset serves it as kube-proxy would ([`unsupported`]); the
//! others are left out (their traffic passes the programs untouched) and reported in
//! [`SyncStats::skipped_ipv6`](super::SyncStats::skipped_ipv6).
//!
//! A frontend's writes keep the IPv4 sync's ordering rules: slots are written before the count
//! that makes them visible, the count is lowered before slots above it are deleted, a removed
//! frontend loses its `services6` entry before its slots. Unlike the IPv4 sync a changed
//! frontend has all its slots rewritten.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, MapError};
use sluice_common::{
    Backend6, BackendKey, CtKey6, CtValue6, ServiceKey6, ServiceValue, BACKEND_F_LOCAL,
    CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_SCTP, PROTO_UDP,
};

use super::wire;
use crate::state::{BackendAddr, DesiredState, Frontend, ServiceEntry};

/// An IPv6 address as the maps (and the packet) hold it.
pub fn addr6_to_map(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn addr6_from_map(addr: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

fn ipv6(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    }
}

/// The `services6` key of an IPv6 frontend.
pub fn service_key6(frontend: &Frontend) -> Option<ServiceKey6> {
    Some(ServiceKey6 {
        addr: addr6_to_map(ipv6(frontend.ip)?),
        port: wire::port_to_map(frontend.port),
        proto: frontend.proto.number(),
        _pad: 0,
    })
}

pub fn backend6_value(backend: &BackendAddr, local: bool) -> Option<Backend6> {
    Some(Backend6 {
        addr: addr6_to_map(ipv6(backend.ip)?),
        port: wire::port_to_map(backend.port),
        flags: if local { BACKEND_F_LOCAL } else { 0 },
        _pad: 0,
    })
}

pub fn backend6_addr(backend: &Backend6) -> BackendAddr {
    BackendAddr {
        ip: addr6_from_map(backend.addr).into(),
        port: wire::port_from_map(backend.port),
    }
}

/// Why the IPv6 datapath cannot serve `entry` yet; `None`: it can.
pub fn unsupported(entry: &ServiceEntry) -> Option<&'static str> {
    if entry.affinity_timeout.is_some() {
        return Some("sessionAffinity is IPv4 only");
    }
    if !entry.source_ranges.is_empty() {
        return Some("loadBalancerSourceRanges are IPv4 only");
    }
    None
}

/// One programmed IPv6 frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    value: ServiceValue,
    backends: Vec<Backend6>,
}

/// The IPv6 maps and what they hold.
pub struct Ipv6Sync {
    services: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend6>,
    mirror: BTreeMap<ServiceKey6, Programmed>,
}

/// What an IPv6 sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipv6SyncStats {
    /// IPv6 frontends in the maps after the sync.
    pub programmed: usize,
    /// IPv6 frontends left out, with the reason.
    pub skipped: Vec<(Frontend, &'static str)>,
    pub map_writes: usize,
    /// (service id, backend address, port) that were reachable before the sync and are not
    /// any more: their UDP and SCTP flows are purged from `conntrack6` ([`purged`]).
    pub removed_backends: BTreeSet<(u32, [u32; 4], u16)>,
}

/// Whether a `conntrack6` entry belongs to a UDP or SCTP flow to a removed backend (as the
/// IPv4 purge, `purge.rs`: TCP flows drain): the forward entry (the backend is its
/// translation) and the reply entry (the backend is its source).
pub fn purged(removed: &BTreeSet<(u32, [u32; 4], u16)>, key: &CtKey6, value: &CtValue6) -> bool {
    if key.proto != PROTO_UDP && key.proto != PROTO_SCTP {
        return false;
    }
    match key.dir {
        CT_DIR_FORWARD => removed.contains(&(value.service_id, value.nat_addr, value.nat_port)),
        CT_DIR_REPLY => removed.contains(&(value.service_id, key.saddr, key.sport)),
        _ => false,
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl Ipv6Sync {
    /// Reads back what the maps hold (an earlier agent's frontends keep their ids).
    pub fn read_back(
        services: HashMap<MapData, ServiceKey6, ServiceValue>,
        backends: HashMap<MapData, BackendKey, Backend6>,
    ) -> anyhow::Result<Ipv6Sync> {
        let mut slots: BTreeMap<u32, BTreeMap<u32, Backend6>> = BTreeMap::new();
        for entry in backends.iter() {
            let (key, backend) = entry.context("reading the backends6 map")?;
            slots
                .entry(key.service_id)
                .or_default()
                .insert(key.slot, backend);
        }
        let mut mirror = BTreeMap::new();
        for entry in services.iter() {
            let (key, value) = entry.context("reading the services6 map")?;
            let of_id = slots.get(&value.id);
            let backends = (0..value.backend_count)
                .filter_map(|slot| of_id.and_then(|s| s.get(&slot)).copied())
                .collect();
            mirror.insert(key, Programmed { value, backends });
        }
        Ok(Ipv6Sync {
            services,
            backends,
            mirror,
        })
    }

    /// Programs the supported IPv6 frontends of `desired` and removes the others.
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<Ipv6SyncStats> {
        let mut stats = Ipv6SyncStats::default();
        let mut want: BTreeMap<ServiceKey6, (ServiceValue, Vec<Backend6>)> = BTreeMap::new();
        for (frontend, entry) in &desired.services {
            let Some(key) = service_key6(frontend) else {
                continue;
            };
            if let Some(reason) = unsupported(entry) {
                stats.skipped.push((*frontend, reason));
                continue;
            }
            let backends: Vec<Backend6> = entry
                .backends
                .iter()
                .filter_map(|b| backend6_value(b, entry.local_backends.contains(b)))
                .collect();
            let settings = wire::service_settings(entry);
            let value = ServiceValue {
                id: 0, // assigned below
                backend_count: backends.len() as u32,
                flags: settings.flags,
                kind: settings.kind,
                _pad: 0,
                affinity_timeout: 0,
            };
            want.insert(key, (value, backends));
        }

        // Removals first.
        let gone: Vec<ServiceKey6> = self
            .mirror
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let old = self.mirror[&key].clone();
            for b in &old.backends {
                stats
                    .removed_backends
                    .insert((old.value.id, b.addr, b.port));
            }
            ignore_missing(self.services.remove(&key)).context("deleting from services6")?;
            stats.map_writes += 1;
            self.mirror.remove(&key);
            self.delete_slots(old.value.id, 0, old.backends.len() as u32, &mut stats)?;
        }

        let mut used: BTreeSet<u32> = self.mirror.values().map(|p| p.value.id).collect();
        for (key, (mut value, backends)) in want {
            let old = self.mirror.get(&key).cloned();
            value.id = match &old {
                Some(old) => old.value.id,
                None => (1..).find(|id| !used.contains(id)).expect("a free id"),
            };
            used.insert(value.id);
            let new = Programmed { value, backends };
            if old.as_ref() == Some(&new) {
                continue;
            }
            for (slot, backend) in new.backends.iter().enumerate() {
                let slot_key = BackendKey {
                    service_id: value.id,
                    slot: slot as u32,
                };
                self.backends
                    .insert(slot_key, backend, 0)
                    .context("writing backends6")?;
                stats.map_writes += 1;
            }
            self.services
                .insert(key, value, 0)
                .context("writing services6")?;
            stats.map_writes += 1;
            if let Some(old) = &old {
                for b in &old.backends {
                    if !new
                        .backends
                        .iter()
                        .any(|n| (n.addr, n.port) == (b.addr, b.port))
                    {
                        stats.removed_backends.insert((value.id, b.addr, b.port));
                    }
                }
            }
            let old_count = old.map_or(0, |o| o.backends.len() as u32);
            self.mirror.insert(key, new);
            self.delete_slots(value.id, value.backend_count, old_count, &mut stats)?;
        }
        stats.programmed = self.mirror.len();
        Ok(stats)
    }

    fn delete_slots(
        &mut self,
        id: u32,
        from: u32,
        to: u32,
        stats: &mut Ipv6SyncStats,
    ) -> anyhow::Result<()> {
        for slot in from..to {
            let key = BackendKey {
                service_id: id,
                slot,
            };
            ignore_missing(self.backends.remove(&key)).context("deleting from backends6")?;
            stats.map_writes += 1;
        }
        Ok(())
    }

    /// The IPv6 frontends the maps hold with their backends, for `sluice state` and tests.
    pub fn programmed(&self) -> Vec<(Ipv6Addr, u16, u8, u32, Vec<BackendAddr>)> {
        self.mirror
            .iter()
            .map(|(key, p)| {
                (
                    addr6_from_map(key.addr),
                    wire::port_from_map(key.port),
                    key.proto,
                    p.value.id,
                    p.backends.iter().map(backend6_addr).collect(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{FrontendKind, Protocol};

    #[test]
    fn addresses_are_stored_as_on_the_wire() {
        let ip: Ipv6Addr = "fd00:10:96::1".parse().unwrap();
        let map = addr6_to_map(ip);
        let bytes: Vec<u8> = map.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, ip.octets());
        assert_eq!(addr6_from_map(map), ip);
        let f = Frontend {
            ip: ip.into(),
            port: 80,
            proto: Protocol::Tcp,
        };
        assert_eq!(service_key6(&f).unwrap().port.to_ne_bytes(), [0, 80]);
        let v4 = Frontend {
            ip: "10.96.0.1".parse().unwrap(),
            ..f
        };
        assert_eq!(service_key6(&v4), None);
    }

    #[test]
    fn udp_and_sctp_flows_of_removed_backends_are_purged() {
        let gone = addr6_to_map("fd00:10:244::9".parse().unwrap());
        let live = addr6_to_map("fd00:10:244::8".parse().unwrap());
        let client = addr6_to_map("fd00:10:244::5".parse().unwrap());
        let port = 8080u16.to_be();
        let removed = BTreeSet::from([(7, gone, port)]);
        let entry = |proto, dir, backend: [u32; 4]| {
            let key = CtKey6 {
                saddr: if dir == CT_DIR_REPLY { backend } else { client },
                daddr: client,
                sport: if dir == CT_DIR_REPLY { port } else { 1 },
                dport: 1,
                proto,
                dir,
                _pad: 0,
            };
            let value = CtValue6 {
                nat_addr: backend,
                nat_port: port,
                flags: 0,
                snat_addr: [0; 4],
                snat_port: 0,
                state: 0,
                _pad: 0,
                service_id: 7,
                backend_slot: 0,
                created_ns: 0,
                last_seen_ns: 0,
            };
            (key, value)
        };
        for dir in [CT_DIR_FORWARD, CT_DIR_REPLY] {
            let (k, v) = entry(PROTO_UDP, dir, gone);
            assert!(purged(&removed, &k, &v));
            let (k, v) = entry(PROTO_SCTP, dir, gone);
            assert!(purged(&removed, &k, &v));
            // TCP drains; live backends stay.
            let (k, v) = entry(sluice_common::PROTO_TCP, dir, gone);
            assert!(!purged(&removed, &k, &v));
            let (k, v) = entry(PROTO_UDP, dir, live);
            assert!(!purged(&removed, &k, &v));
        }
    }

    #[test]
    fn only_what_the_ipv6_datapath_serves_is_programmed() {
        let local = BackendAddr {
            ip: "fd00:10:244:1::5".parse().unwrap(),
            port: 8080,
        };
        let remote = BackendAddr {
            ip: "fd00:10:244:2::5".parse().unwrap(),
            port: 8080,
        };
        let mut e = ServiceEntry::cluster_ip("ns/s", vec![local, remote]);
        e.local_backends = [local].into();
        assert_eq!(unsupported(&e), None);
        // External traffic to a remote backend is masqueraded.
        let mut ext = e.clone();
        ext.kind = FrontendKind::NodePort;
        assert_eq!(unsupported(&ext), None);
        let mut aff = e.clone();
        aff.affinity_timeout = Some(10);
        assert!(unsupported(&aff).is_some());
        let mut ranges = e.clone();
        ranges.source_ranges = vec!["2001:db8::/32".parse().unwrap()];
        assert!(unsupported(&ranges).is_some());
        // REJECT and DROP are served.
        let empty = ServiceEntry::cluster_ip("ns/s", vec![]);
        assert_eq!(unsupported(&empty), None);
    }
}
