//! Programming the IPv6 maps (`services6`, `backends6`, `source_ranges6`) with the IPv6
//! frontends of a [`DesiredState`], and `config6` with the node's IPv6 context.
//!
//! Every IPv6 frontend is programmed like an IPv4 one (ebpf/src/v6/mod.rs has the IPv4
//! behaviours): an externalTrafficPolicy Local frontend gets its pods' entry ([`SCOPE_POD`],
//! cluster-wide backends), sessionAffinity an affinity id (`affinity.rs`), and
//! loadBalancerSourceRanges their `source_ranges6` entries.
//!
//! A frontend's writes keep the IPv4 sync's ordering rules: slots and new source ranges are
//! written before the `services6` entry that makes them used, the count is lowered before
//! slots above it are deleted and old ranges are deleted after it, a removed frontend loses its
//! `services6` entry before its slots and ranges. Unlike the IPv4 sync a changed frontend has
//! all its slots rewritten.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData, MapError,
};
use ipnet::{IpNet, Ipv6Net};
use sluice_common::{
    source_range_prefix_len, AffinityKey6, AffinityValue6, Backend6, BackendKey, Cidr6, CtKey6,
    CtValue6, NodeConfig6, ServiceKey6, ServiceValue, SourceRangeKey6, BACKEND_F_LOCAL,
    CONFIG_F_MASQUERADE_ALL, CT_DIR_FORWARD, CT_DIR_REPLY, MAX_CLUSTER_CIDRS, PROTO_SCTP,
    PROTO_UDP, SCOPE_ALL, SCOPE_POD,
};

use super::{
    affinity::{self, AffinityGroup},
    sync::affinity_group,
    wire,
};
use crate::{
    node::NodeContext,
    state::{BackendAddr, DesiredState, Frontend},
};

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
        scope: SCOPE_ALL,
    })
}

/// The `services6` key of an IPv6 frontend's pods' entry ([`SCOPE_POD`]).
pub fn pod_service_key6(frontend: &Frontend) -> Option<ServiceKey6> {
    Some(ServiceKey6 {
        scope: SCOPE_POD,
        ..service_key6(frontend)?
    })
}

/// One loadBalancerSourceRange as `source_ranges6` holds it: (bits, network address).
pub type SourceRange6 = (u32, [u32; 4]);

fn source_range6(net: &Ipv6Net) -> SourceRange6 {
    let net = net.trunc();
    (u32::from(net.prefix_len()), addr6_to_map(net.network()))
}

fn range_key(service_id: u32, (bits, addr): SourceRange6) -> LpmKey<SourceRangeKey6> {
    LpmKey::new(
        source_range_prefix_len(bits),
        SourceRangeKey6 { service_id, addr },
    )
}

/// The node's IPv6 context as `config6` holds it: the first IPv6 node IP (the masquerade
/// address), the IPv6 cluster CIDRs (at most [`MAX_CLUSTER_CIDRS`]), masqueradeAll.
pub fn node_config6(node: &NodeContext) -> anyhow::Result<NodeConfig6> {
    let node_ip = node
        .node_ips
        .iter()
        .find_map(|ip| ipv6(*ip))
        .map(addr6_to_map)
        .unwrap_or_default();
    let cidrs: Vec<Ipv6Net> = node
        .cluster_cidrs
        .iter()
        .filter_map(|net| match net {
            IpNet::V6(v6) => Some(v6.trunc()),
            IpNet::V4(_) => None,
        })
        .collect();
    if cidrs.len() > MAX_CLUSTER_CIDRS {
        anyhow::bail!(
            "{} IPv6 cluster CIDRs given, the datapath checks at most {MAX_CLUSTER_CIDRS}",
            cidrs.len()
        );
    }
    let mut config = NodeConfig6 {
        node_ip,
        flags: if node.masquerade_all {
            CONFIG_F_MASQUERADE_ALL
        } else {
            0
        },
        cidr_count: cidrs.len() as u32,
        ..Default::default()
    };
    for (slot, cidr) in config.cluster_cidrs.iter_mut().zip(&cidrs) {
        *slot = Cidr6 {
            net: addr6_to_map(cidr.network()),
            mask: addr6_to_map(cidr.netmask()),
        };
    }
    Ok(config)
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

/// One programmed IPv6 frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    value: ServiceValue,
    backends: Vec<Backend6>,
    ranges: BTreeSet<SourceRange6>,
}

/// The IPv6 maps and what they hold.
pub struct Ipv6Sync {
    services: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend6>,
    source_ranges: LpmTrie<MapData, SourceRangeKey6, u8>,
    mirror: BTreeMap<ServiceKey6, Programmed>,
    next_affinity_id: u32,
}

/// What an IPv6 sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipv6SyncStats {
    /// IPv6 frontends in the maps after the sync (pods' entries included).
    pub programmed: usize,
    pub map_writes: usize,
    /// (service id, backend address, port) that were reachable before the sync and are not
    /// any more: their UDP and SCTP flows are purged from `conntrack6` ([`purged`]).
    pub removed_backends: BTreeSet<(u32, [u32; 4], u16)>,
    /// The same backends under the frontend's affinity id before the sync: their `affinity6`
    /// entries are purged ([`affinity_purged`]).
    pub removed_affinity: BTreeSet<(u32, [u32; 4], u16)>,
    /// Affinity ids no IPv6 frontend uses any more: their entries go whole.
    pub retired_affinity_ids: BTreeSet<u32>,
    /// Frontends that could not be programmed (a full map), with the error; the others are.
    pub failed: Vec<(Frontend, String)>,
}

/// Whether an `affinity6` entry goes after a sync (its backend was removed under its
/// affinity id, or its id is retired).
pub fn affinity_purged(stats: &Ipv6SyncStats, key: &AffinityKey6, value: &AffinityValue6) -> bool {
    stats.retired_affinity_ids.contains(&key.affinity_id)
        || stats.removed_affinity.contains(&(
            key.affinity_id,
            value.backend.addr,
            value.backend.port,
        ))
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
        source_ranges: LpmTrie<MapData, SourceRangeKey6, u8>,
    ) -> anyhow::Result<Ipv6Sync> {
        let mut slots: BTreeMap<u32, BTreeMap<u32, Backend6>> = BTreeMap::new();
        for entry in backends.iter() {
            let (key, backend) = entry.context("reading the backends6 map")?;
            slots
                .entry(key.service_id)
                .or_default()
                .insert(key.slot, backend);
        }
        let mut ranges: BTreeMap<u32, BTreeSet<SourceRange6>> = BTreeMap::new();
        for key in source_ranges.keys() {
            let key = key.context("reading the source_ranges6 map")?;
            if let Some(bits) = key.prefix_len().checked_sub(32).filter(|b| *b <= 128) {
                let data = key.data();
                ranges
                    .entry(data.service_id)
                    .or_default()
                    .insert((bits, data.addr));
            }
        }
        let mut mirror = BTreeMap::new();
        for entry in services.iter() {
            let (key, value) = entry.context("reading the services6 map")?;
            let of_id = slots.get(&value.id);
            let backends = (0..value.backend_count)
                .filter_map(|slot| of_id.and_then(|s| s.get(&slot)).copied())
                .collect();
            let ranges = ranges.remove(&value.id).unwrap_or_default();
            mirror.insert(
                key,
                Programmed {
                    value,
                    backends,
                    ranges,
                },
            );
        }
        let next_affinity_id = mirror
            .values()
            .map(|p: &Programmed| p.value.affinity_id)
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        Ok(Ipv6Sync {
            services,
            backends,
            source_ranges,
            mirror,
            next_affinity_id,
        })
    }

    /// Programs the IPv6 frontends of `desired` and removes the others.
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<Ipv6SyncStats> {
        let mut stats = Ipv6SyncStats::default();
        let mut want: BTreeMap<ServiceKey6, (ServiceValue, Vec<Backend6>, BTreeSet<SourceRange6>)> =
            BTreeMap::new();
        let mut members: Vec<(ServiceKey6, AffinityGroup)> = Vec::new();
        // Which frontend each entry is for, to report a failure by it.
        let mut frontends: BTreeMap<ServiceKey6, Frontend> = BTreeMap::new();
        for (frontend, entry) in &desired.services {
            let (Some(key), Some(pod_key)) = (service_key6(frontend), pod_service_key6(frontend))
            else {
                continue;
            };
            frontends.insert(key, *frontend);
            frontends.insert(pod_key, *frontend);
            let backend_values = |backends: &[BackendAddr]| -> Vec<Backend6> {
                backends
                    .iter()
                    .filter_map(|b| backend6_value(b, entry.local_backends.contains(b)))
                    .collect()
            };
            let ranges: BTreeSet<SourceRange6> = entry
                .source_ranges
                .iter()
                .filter_map(|net| match net {
                    IpNet::V6(v6) => Some(source_range6(v6)),
                    IpNet::V4(_) => None,
                })
                .collect();
            let value = |settings: wire::ServiceSettings, count: usize| ServiceValue {
                id: 0, // assigned below
                backend_count: count as u32,
                flags: settings.flags,
                kind: settings.kind,
                _pad: 0,
                affinity_timeout: settings.affinity_timeout,
                affinity_id: 0, // assigned below
                // IPv4 only (an IPv6 backend does not fit): the IPv6 programs use `backends6`.
                inline_backends: [sluice_common::Backend::NONE; sluice_common::INLINE_BACKENDS],
            };
            // An externalTrafficPolicy Local frontend's cluster-wide backends for pods.
            if let Some(cluster) = &entry.cluster_backends {
                let backends = backend_values(cluster);
                let settings = wire::pod_service_settings(entry);
                want.insert(
                    pod_key,
                    (value(settings, backends.len()), backends, ranges.clone()),
                );
                members.extend(affinity_group(entry, frontend, cluster).map(|g| (pod_key, g)));
            }
            let backends = backend_values(&entry.backends);
            let settings = wire::service_settings(entry);
            want.insert(key, (value(settings, backends.len()), backends, ranges));
            members.extend(affinity_group(entry, frontend, &entry.backends).map(|g| (key, g)));
        }
        let current: BTreeMap<ServiceKey6, u32> = self
            .mirror
            .iter()
            .map(|(key, p)| (*key, p.value.affinity_id))
            .collect();
        for (key, id) in affinity::assign(&members, &current, &mut self.next_affinity_id) {
            if let Some(w) = want.get_mut(&key) {
                w.0.affinity_id = id;
            }
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
                if old.value.affinity_id != 0 {
                    stats
                        .removed_affinity
                        .insert((old.value.affinity_id, b.addr, b.port));
                }
            }
            ignore_missing(self.services.remove(&key)).context("deleting from services6")?;
            stats.map_writes += 1;
            self.mirror.remove(&key);
            self.delete_slots(old.value.id, 0, old.backends.len() as u32, &mut stats)?;
            self.delete_ranges(old.value.id, &old.ranges, &mut stats)?;
        }

        let mut used: BTreeSet<u32> = self.mirror.values().map(|p| p.value.id).collect();
        for (key, (mut value, backends, ranges)) in want {
            let old = self.mirror.get(&key).cloned();
            value.id = match &old {
                Some(old) => old.value.id,
                None => (1..).find(|id| !used.contains(id)).expect("a free id"),
            };
            used.insert(value.id);
            let new = Programmed {
                value,
                backends,
                ranges,
            };
            if old.as_ref() == Some(&new) {
                continue;
            }
            // A frontend that cannot be written (a full map) fails alone, as in sync.rs; the
            // next sync retries it.
            if let Err(e) = self.program_frontend(key, &new, old.as_ref(), &mut stats) {
                if old.is_none() {
                    // Give back the room its slots and ranges took.
                    let _ = self.delete_slots(value.id, 0, new.backends.len() as u32, &mut stats);
                    let _ = self.delete_ranges(value.id, &new.ranges, &mut stats);
                }
                // Every wanted key was put there with its frontend.
                let frontend = frontends[&key];
                tracing::debug!(%frontend, "programming an IPv6 frontend failed: {e:#}");
                stats.failed.push((frontend, format!("{e:#}")));
            }
        }
        // A backend another frontend with the same affinity id still has keeps its entries.
        let live: BTreeSet<(u32, [u32; 4], u16)> = self
            .mirror
            .values()
            .filter(|p| p.value.affinity_id != 0)
            .flat_map(|p| {
                p.backends
                    .iter()
                    .map(move |b| (p.value.affinity_id, b.addr, b.port))
            })
            .collect();
        stats.removed_affinity.retain(|r| !live.contains(r));
        stats.retired_affinity_ids = affinity::retired(
            current.values().copied(),
            self.mirror.values().map(|p| p.value.affinity_id),
        );
        stats.programmed = self.mirror.len();
        Ok(stats)
    }

    /// Writes `new` for the frontend `key` (its slots, its ranges, then its entry), updates the
    /// mirror, then deletes the slots and ranges it no longer has.
    fn program_frontend(
        &mut self,
        key: ServiceKey6,
        new: &Programmed,
        old: Option<&Programmed>,
        stats: &mut Ipv6SyncStats,
    ) -> anyhow::Result<()> {
        let value = new.value;
        for (slot, backend) in new.backends.iter().enumerate() {
            let slot_key = BackendKey {
                service_id: value.id,
                slot: slot as u32,
            };
            self.backends
                .insert(slot_key, backend, 0)
                .map_err(|e| {
                    let capacity = super::resize::capacity_of(&self.backends);
                    super::resize::update_error(e, "backends6", capacity, Some("--max-backends"))
                })
                .context("writing backends6")?;
            stats.map_writes += 1;
        }
        let old_ranges = old.map(|o| o.ranges.clone()).unwrap_or_default();
        for range in new.ranges.difference(&old_ranges) {
            self.source_ranges
                .insert(&range_key(value.id, *range), 1, 0)
                .context("writing source_ranges6")?;
            stats.map_writes += 1;
        }
        self.services
            .insert(key, value, 0)
            .map_err(|e| {
                let capacity = super::resize::capacity_of(&self.services);
                super::resize::update_error(e, "services6", capacity, Some("--max-services"))
            })
            .context("writing services6")?;
        stats.map_writes += 1;
        if let Some(old) = old {
            for b in &old.backends {
                if !new
                    .backends
                    .iter()
                    .any(|n| (n.addr, n.port) == (b.addr, b.port))
                {
                    stats.removed_backends.insert((value.id, b.addr, b.port));
                    if old.value.affinity_id != 0 {
                        stats
                            .removed_affinity
                            .insert((old.value.affinity_id, b.addr, b.port));
                    }
                }
            }
        }
        let old_count = old.map_or(0, |o| o.backends.len() as u32);
        let stale_ranges: BTreeSet<SourceRange6> =
            old_ranges.difference(&new.ranges).copied().collect();
        self.mirror.insert(key, new.clone());
        self.delete_slots(value.id, value.backend_count, old_count, stats)?;
        self.delete_ranges(value.id, &stale_ranges, stats)?;
        Ok(())
    }

    fn delete_ranges(
        &mut self,
        id: u32,
        ranges: &BTreeSet<SourceRange6>,
        stats: &mut Ipv6SyncStats,
    ) -> anyhow::Result<()> {
        for range in ranges {
            ignore_missing(self.source_ranges.remove(&range_key(id, *range)))
                .context("deleting from source_ranges6")?;
            stats.map_writes += 1;
        }
        Ok(())
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

    /// How many backends the entry `key` of `services6` has, if it is programmed.
    pub fn backend_count(&self, key: &ServiceKey6) -> Option<usize> {
        self.mirror.get(key).map(|p| p.backends.len())
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
    use crate::state::Protocol;

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
    fn the_node_config6_holds_the_ipv6_address_cidrs_and_masquerade_all() {
        let node = NodeContext {
            node_ips: vec!["172.18.0.3".parse().unwrap(), "fc00::3".parse().unwrap()],
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::7/56".parse().unwrap(),
            ],
            masquerade_all: true,
            ..Default::default()
        };
        let config = node_config6(&node).unwrap();
        assert_eq!(
            addr6_from_map(config.node_ip),
            "fc00::3".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(config.flags, CONFIG_F_MASQUERADE_ALL);
        assert_eq!(config.cidr_count, 1);
        let cidr = config.cluster_cidrs[0];
        assert_eq!(
            addr6_from_map(cidr.net),
            "fd00:10:244::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            addr6_from_map(cidr.mask),
            "ffff:ffff:ffff:ff00::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(config.cluster_cidrs[1], Cidr6::default());
        let too_many = NodeContext {
            cluster_cidrs: (0..9)
                .map(|i| format!("fd00:{i}::/64").parse().unwrap())
                .collect(),
            ..Default::default()
        };
        assert!(node_config6(&too_many).is_err());
    }
}
