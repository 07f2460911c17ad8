//! Incremental sync of the `services`, `backends` and `source_ranges` maps with a
//! [`DesiredState`].
//!
//! [`ServiceSync`] keeps a mirror of what the maps hold. It is read back from the kernel when
//! the datapath is loaded (a restarted agent diffs against what the kernel really has and keeps
//! the existing service ids) and afterwards updated after every successful write, so it stays
//! equal to the maps while the agent is their only writer. A sync computes, per frontend, the
//! writes that take the maps from the mirror to the desired state and applies only those:
//! resyncing an unchanged state writes nothing. A frontend's `services` value carries its
//! settings (flags, kind, affinity timeout) besides its id and backend count: a change of any
//! of them is an update; a backend's value carries whether it is local.
//!
//! The datapath reads a service's `backend_count`, then slot `prandom % count`, falling back to
//! slot 0 when that slot is missing; a service with `SVC_F_SOURCE_RANGES` drops every source
//! outside its ranges. So that a packet never meets a service without a backend behind its
//! count, nor a range check without the ranges, every frontend's writes are ordered:
//! * slots are written before the count that makes them visible is raised (growing, new service);
//! * the count is lowered before the slots above it are deleted (shrinking);
//! * new source ranges are written before the `services` entry, old ones deleted after it (a
//!   change of ranges briefly allows both; the flag is set after the first range and cleared
//!   before the last goes);
//! * a removed frontend loses its `services` entry before its slots and ranges.
//!
//! A slot whose backend stays keeps it, so replacing one backend rewrites one slot. A frontend
//! whose backends all went away stays programmed with `backend_count` 0.
//!
//! A failed write (a full map: E2BIG/ENOSPC, ...) stops that frontend only: it is reported in
//! [`SyncStats::failed`] and the next sync retries it from whatever the maps hold by then.
//!
//! Each sync also reports, per service, the backends that were reachable before and are not
//! any more ([`SyncStats::removed_backends`]), for the conntrack cleanup of
//! [`super::Datapath::purge_removed_backends`].
//!
//! This is the IPv4 maps' sync: IPv6 frontends of the desired state (dual-stack and IPv6
//! services, see `translate.rs`) go to their own maps (`sync6.rs`).
//!
//! The maps are reached through the [`ServiceMaps`] trait so this logic is unit-tested against an
//! in-memory fake that checks the ordering rules after every single write.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    sync::Arc,
};

use anyhow::{bail, Context as _};
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, MapData, MapError,
};
use ipnet::Ipv4Net;
use sluice_common::{
    source_range_prefix_len, Backend, BackendKey, ServiceKey, ServiceValue, SourceRangeKey,
    INLINE_BACKENDS,
};
use tracing::{debug, warn};

use super::{
    affinity::{self, AffinityGroup},
    wire::{self, ServiceSettings},
};
use crate::state::{BackendAddr, DesiredState, Frontend, ServiceEntry};

/// One loadBalancerSourceRange of a service, as `source_ranges` holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub service_id: u32,
    /// The range's prefix length (0..=32), without the service id's 32 bits.
    pub bits: u32,
    /// The network address, as the maps hold it.
    pub addr: u32,
}

impl SourceRange {
    pub fn new(service_id: u32, net: &Ipv4Net) -> SourceRange {
        let net = net.trunc();
        SourceRange {
            service_id,
            bits: u32::from(net.prefix_len()),
            addr: wire::addr_to_map(net.network()),
        }
    }

    pub fn net(&self) -> Ipv4Net {
        Ipv4Net::new(wire::addr_from_map(self.addr), self.bits.min(32) as u8)
            .expect("a prefix length of at most 32")
    }

    /// The LPM trie key.
    pub fn key(&self) -> LpmKey<SourceRangeKey> {
        LpmKey::new(
            source_range_prefix_len(self.bits),
            SourceRangeKey {
                service_id: self.service_id,
                addr: self.addr,
            },
        )
    }

    /// The range an LPM trie key stands for; `None` for a key the agent never writes.
    pub fn from_key(key: &LpmKey<SourceRangeKey>) -> Option<SourceRange> {
        let bits = key.prefix_len().checked_sub(32).filter(|b| *b <= 32)?;
        let data = key.data();
        Some(SourceRange {
            service_id: data.service_id,
            bits,
            addr: data.addr,
        })
    }
}

/// One write to the `services`, `backends` or `source_ranges` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(BackendKey, Backend),
    DeleteBackend(BackendKey),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    PutSourceRange(SourceRange),
    DeleteSourceRange(SourceRange),
}

impl std::fmt::Display for MapOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapOp::PutBackend(key, backend) => write!(
                f,
                "writing backend {} to slot {} of service id {}",
                wire::backend_addr(backend),
                key.slot,
                key.service_id
            ),
            MapOp::DeleteBackend(key) => write!(
                f,
                "deleting slot {} of service id {}",
                key.slot, key.service_id
            ),
            MapOp::PutService(key, value) => write!(
                f,
                "writing service {} (id {}, {} backends)",
                wire::describe_key(key),
                value.id,
                value.backend_count
            ),
            MapOp::DeleteService(key) => {
                write!(f, "deleting service {}", wire::describe_key(key))
            }
            MapOp::PutSourceRange(range) => write!(
                f,
                "writing source range {} of service id {}",
                range.net(),
                range.service_id
            ),
            MapOp::DeleteSourceRange(range) => write!(
                f,
                "deleting source range {} of service id {}",
                range.net(),
                range.service_id
            ),
        }
    }
}

/// The maps the agent programs, as the sync needs them.
pub trait ServiceMaps {
    /// Every entry of `services`.
    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>>;
    /// Every entry of `backends`.
    fn read_backends(&self) -> anyhow::Result<Vec<(BackendKey, Backend)>>;
    /// Every entry of `source_ranges`.
    fn read_source_ranges(&self) -> anyhow::Result<Vec<SourceRange>>;
    /// Applies one write. Deleting a key that is already absent succeeds: the goal is reached.
    fn apply(&mut self, op: &MapOp) -> anyhow::Result<()>;
}

/// The kernel's maps.
pub struct KernelServiceMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
}

pub(super) fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl ServiceMaps for KernelServiceMaps {
    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the services map")
    }

    fn read_backends(&self) -> anyhow::Result<Vec<(BackendKey, Backend)>> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the backends map")
    }

    fn read_source_ranges(&self) -> anyhow::Result<Vec<SourceRange>> {
        let mut ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.context("reading the source_ranges map")?;
            match SourceRange::from_key(&key) {
                Some(range) => ranges.push(range),
                None => warn!(
                    prefix_len = key.prefix_len(),
                    "ignoring a source_ranges entry Sluice does not write"
                ),
            }
        }
        Ok(ranges)
    }

    fn apply(&mut self, op: &MapOp) -> anyhow::Result<()> {
        let ignore_missing = |result: Result<(), MapError>| match result {
            Err(e) if is_not_found(&e) => Ok(()),
            other => other,
        };
        let result = match op {
            MapOp::PutBackend(key, value) => self.backends.insert(key, value, 0),
            MapOp::PutService(key, value) => self.services.insert(key, value, 0),
            MapOp::PutSourceRange(range) => self.source_ranges.insert(&range.key(), 1u8, 0),
            MapOp::DeleteBackend(key) => ignore_missing(self.backends.remove(key)),
            MapOp::DeleteService(key) => ignore_missing(self.services.remove(key)),
            MapOp::DeleteSourceRange(range) => {
                ignore_missing(self.source_ranges.remove(&range.key()))
            }
        };
        // MapError's Display omits the errno ("bpf_map_update_elem failed"); its source has it.
        result.map_err(|e| {
            let (map, capacity, flag) = match op {
                MapOp::PutBackend(..) | MapOp::DeleteBackend(_) => (
                    "backends",
                    super::resize::capacity_of(&self.backends),
                    Some("--max-backends"),
                ),
                MapOp::PutService(..) | MapOp::DeleteService(_) => (
                    "services",
                    super::resize::capacity_of(&self.services),
                    Some("--max-services"),
                ),
                MapOp::PutSourceRange(_) | MapOp::DeleteSourceRange(_) => {
                    ("source_ranges", None, None)
                }
            };
            super::resize::update_error(e, map, capacity, flag).context(op.to_string())
        })
    }
}

/// Backends a sync took away from a service: flows to them are purged
/// ([`super::Datapath::purge_removed_backends`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedBackends {
    /// `None` for a `services` key with a protocol the agent does not write.
    pub frontend: Option<Frontend>,
    pub service_id: u32,
    /// The frontend's affinity id before the sync (0: none).
    pub affinity_id: u32,
    /// The backends of `backends` whose affinity entries under `affinity_id` go: those no
    /// frontend with that id reaches after the sync (a ClusterIP keeps the affinity it shares
    /// with a removed NodePort).
    pub affinity_backends: BTreeSet<BackendAddr>,
    pub backends: BTreeSet<BackendAddr>,
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Frontends newly programmed.
    pub added: usize,
    /// Frontends whose backends or settings changed.
    pub updated: usize,
    /// Frontends removed from the maps.
    pub removed: usize,
    /// Frontends already as desired.
    pub unchanged: usize,
    /// Successful map writes and deletes.
    pub map_writes: usize,
    /// Frontends that could not be (fully) programmed or removed, with the error. The maps hold a
    /// consistent state for them (old or partly updated); the next sync retries.
    pub failed: Vec<(Frontend, String)>,
    /// Entries without a frontend of their own (slots of a service id no service uses any more,
    /// a `services` key with an unknown protocol) that could not be removed.
    pub leftovers_failed: Vec<String>,
    /// Per service, the backends that were reachable before this sync and are not any more
    /// (every backend of a removed frontend).
    pub removed_backends: Vec<RemovedBackends>,
    /// Conntrack and affinity entries of removed backends deleted after the sync
    /// ([`super::Datapath::sync`] fills it; the sync engine alone leaves it 0).
    pub purged: usize,
    /// IPv6 frontends in the IPv6 maps after the sync ([`super::Datapath::sync`] fills it).
    pub ipv6_programmed: usize,
    /// Affinity ids no frontend uses after this sync: their `affinity` entries are purged
    /// whole ([`super::affinity::retired`]).
    pub retired_affinity_ids: BTreeSet<u32>,
}

impl SyncStats {
    /// Everything desired is programmed.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty() && self.leftovers_failed.is_empty()
    }
}

/// A frontend as the maps hold it, for `sluice state` and `sluice trace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    /// `None` for a key with a protocol the agent does not write.
    pub frontend: Option<Frontend>,
    pub key: ServiceKey,
    pub id: u32,
    /// The backends of slots `0..backend_count`, in slot order; a missing slot is left out.
    pub backends: Vec<BackendAddr>,
    /// Those of `backends` marked local.
    pub local_backends: Vec<BackendAddr>,
    pub backend_count: u32,
    pub settings: ServiceSettings,
    pub source_ranges: Vec<Ipv4Net>,
}

/// A copy of the maps' content.
#[derive(Debug, Default)]
struct Mirror {
    services: BTreeMap<ServiceKey, ServiceValue>,
    /// Every slot present in `backends`, by service id, including slots of ids no service uses
    /// (left over by an interrupted removal) and slots at or above a service's count.
    slots: BTreeMap<u32, BTreeMap<u32, Backend>>,
    /// Every entry of `source_ranges`, by service id (leftovers included).
    ranges: BTreeMap<u32, BTreeSet<SourceRange>>,
    /// Service id -> the frontend using it.
    owner: BTreeMap<u32, ServiceKey>,
}

impl Mirror {
    fn record(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(key, backend) => {
                self.slots
                    .entry(key.service_id)
                    .or_default()
                    .insert(key.slot, backend);
            }
            MapOp::DeleteBackend(key) => {
                if let Some(slots) = self.slots.get_mut(&key.service_id) {
                    slots.remove(&key.slot);
                    if slots.is_empty() {
                        self.slots.remove(&key.service_id);
                    }
                }
            }
            MapOp::PutService(key, value) => {
                if let Some(old) = self.services.insert(key, value) {
                    if old.id != value.id && self.owner.get(&old.id) == Some(&key) {
                        self.owner.remove(&old.id);
                    }
                }
                self.owner.insert(value.id, key);
            }
            MapOp::DeleteService(key) => {
                if let Some(old) = self.services.remove(&key) {
                    if self.owner.get(&old.id) == Some(&key) {
                        self.owner.remove(&old.id);
                    }
                }
            }
            MapOp::PutSourceRange(range) => {
                self.ranges
                    .entry(range.service_id)
                    .or_default()
                    .insert(range);
            }
            MapOp::DeleteSourceRange(range) => {
                if let Some(ranges) = self.ranges.get_mut(&range.service_id) {
                    ranges.remove(&range);
                    if ranges.is_empty() {
                        self.ranges.remove(&range.service_id);
                    }
                }
            }
        }
    }

    fn id_in_use(&self, id: u32) -> bool {
        self.owner.contains_key(&id)
            || self.slots.contains_key(&id)
            || self.ranges.contains_key(&id)
    }

    fn slots_of(&self, id: u32) -> &BTreeMap<u32, Backend> {
        static NONE: BTreeMap<u32, Backend> = BTreeMap::new();
        self.slots.get(&id).unwrap_or(&NONE)
    }

    fn ranges_of(&self, id: u32) -> &BTreeSet<SourceRange> {
        static NONE: BTreeSet<SourceRange> = BTreeSet::new();
        self.ranges.get(&id).unwrap_or(&NONE)
    }

    /// The backends a packet can reach for the service with `value`.
    fn reachable(&self, value: &ServiceValue) -> BTreeSet<BackendAddr> {
        self.slots_of(value.id)
            .range(..value.backend_count)
            .map(|(_, b)| wire::backend_addr(b))
            .collect()
    }
}

/// One frontend as the maps should hold it.
#[derive(Clone)]
struct DesiredFrontend {
    frontend: Frontend,
    /// With sessionAffinity: the frontends it shares its affinity id with.
    affinity_group: Option<AffinityGroup>,
    settings: ServiceSettings,
    backends: BTreeSet<Backend>,
    /// Source ranges, without service id yet: (bits, addr).
    ranges: BTreeSet<(u32, u32)>,
}

impl DesiredFrontend {
    fn ranges_for(&self, id: u32) -> BTreeSet<SourceRange> {
        self.ranges
            .iter()
            .map(|&(bits, addr)| SourceRange {
                service_id: id,
                bits,
                addr,
            })
            .collect()
    }

    fn backend_addrs(&self) -> BTreeSet<BackendAddr> {
        self.backends.iter().map(wire::backend_addr).collect()
    }
}

/// The sync engine: the maps and the mirror of their content.
pub struct ServiceSync<M> {
    maps: M,
    mirror: Mirror,
    /// Where the search for a free service id starts. Ids are handed out round-robin so an id
    /// that was just freed is not given to another frontend at once (conntrack entries and
    /// `sluice state` output still name it for a while).
    next_id: u32,
    /// Where the search for a new affinity id starts (round-robin too, `affinity.rs`).
    next_affinity_id: u32,
    /// Each desired frontend's map entries as last computed, with the [`ServiceEntry`] they
    /// came from: an entry the translation handed out unchanged (the same `Arc`) is not
    /// converted again.
    converted: StdHashMap<Frontend, Converted>,
    /// The entries the maps hold exactly as last planned (every write succeeded): one handed
    /// out again (the same `Arc`) is not planned again. With thousands of services, planning
    /// each one on every change was most of a change's time.
    in_maps: StdHashMap<ServiceKey, Arc<DesiredFrontend>>,
    /// The ids of new frontends that could not be written (a full map), kept for their retry:
    /// a frontend is known by one id in logs and `sluice state` however many syncs it takes to
    /// fit. Given up when the frontend is no longer desired.
    reserved: BTreeMap<ServiceKey, u32>,
}

struct Converted {
    entry: Arc<ServiceEntry>,
    keys: Vec<(ServiceKey, Arc<DesiredFrontend>)>,
}

impl<M: ServiceMaps> ServiceSync<M> {
    /// Reads the maps' content back.
    pub fn read_back(maps: M) -> anyhow::Result<Self> {
        let mut mirror = Mirror::default();
        for (key, value) in maps.read_services()? {
            if let Some(other) = mirror.owner.get(&value.id) {
                // Only another writer can cause this; the two frontends share their slots.
                warn!(
                    "services {} and {} share service id {}",
                    wire::describe_key(other),
                    wire::describe_key(&key),
                    value.id
                );
            }
            mirror.record(&MapOp::PutService(key, value));
        }
        for (key, backend) in maps.read_backends()? {
            mirror.record(&MapOp::PutBackend(key, backend));
        }
        for range in maps.read_source_ranges()? {
            mirror.record(&MapOp::PutSourceRange(range));
        }
        let highest = mirror
            .owner
            .keys()
            .chain(mirror.slots.keys())
            .chain(mirror.ranges.keys())
            .max()
            .copied()
            .unwrap_or(0);
        let next_affinity_id = mirror
            .services
            .values()
            .map(|v| v.affinity_id)
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        Ok(ServiceSync {
            maps,
            mirror,
            next_id: highest.wrapping_add(1).max(1),
            next_affinity_id,
            converted: StdHashMap::new(),
            in_maps: StdHashMap::new(),
            reserved: BTreeMap::new(),
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// The service id the maps hold for `frontend`.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.mirror
            .services
            .get(&wire::service_key(frontend)?)
            .map(|v| v.id)
    }

    /// The affinity id the maps hold for `frontend` (0: no sessionAffinity).
    pub fn affinity_id(&self, frontend: &Frontend) -> Option<u32> {
        self.mirror
            .services
            .get(&wire::service_key(frontend)?)
            .map(|v| v.affinity_id)
    }

    /// Every frontend in the maps with the backends a packet can reach.
    pub fn programmed(&self) -> Vec<ProgrammedService> {
        self.mirror
            .services
            .iter()
            .map(|(key, value)| {
                let slots = self.mirror.slots_of(value.id);
                let reachable = || slots.range(..value.backend_count).map(|(_, b)| b);
                ProgrammedService {
                    frontend: wire::frontend(key),
                    key: *key,
                    id: value.id,
                    backends: reachable().map(wire::backend_addr).collect(),
                    local_backends: reachable()
                        .filter(|b| b.flags & sluice_common::BACKEND_F_LOCAL != 0)
                        .map(wire::backend_addr)
                        .collect(),
                    backend_count: value.backend_count,
                    settings: ServiceSettings {
                        flags: value.flags,
                        kind: value.kind,
                        affinity_timeout: value.affinity_timeout,
                        affinity_id: value.affinity_id,
                    },
                    source_ranges: self
                        .mirror
                        .ranges_of(value.id)
                        .iter()
                        .map(SourceRange::net)
                        .collect(),
                }
            })
            .collect()
    }

    /// Applies the differences between the maps and `desired`.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncStats {
        let mut stats = SyncStats::default();
        let mut wanted: BTreeMap<ServiceKey, Arc<DesiredFrontend>> = BTreeMap::new();
        for (frontend, entry) in &desired.services {
            let converted = match self.converted.get(frontend) {
                Some(c) if Arc::ptr_eq(&c.entry, entry) => c,
                _ => {
                    let keys = convert(frontend, entry)
                        .into_iter()
                        .map(|(key, want)| (key, Arc::new(want)))
                        .collect();
                    self.converted.insert(
                        *frontend,
                        Converted {
                            entry: Arc::clone(entry),
                            keys,
                        },
                    );
                    &self.converted[frontend]
                }
            };
            for (key, want) in &converted.keys {
                wanted.insert(*key, Arc::clone(want));
            }
        }
        self.converted
            .retain(|frontend, _| desired.services.contains_key(frontend));
        let members: Vec<(ServiceKey, AffinityGroup)> = wanted
            .iter()
            .filter_map(|(key, want)| Some((*key, want.affinity_group.clone()?)))
            .collect();
        let current: BTreeMap<ServiceKey, u32> = self
            .mirror
            .services
            .iter()
            .map(|(key, value)| (*key, value.affinity_id))
            .collect();
        for (key, id) in affinity::assign(&members, &current, &mut self.next_affinity_id) {
            let Some(want) = wanted.get_mut(&key) else {
                continue;
            };
            if want.settings.affinity_id != id {
                Arc::make_mut(want).settings.affinity_id = id;
                // Remembered with its id, so an unchanged frontend is the same `Arc` next time.
                if let Some(converted) = self.converted.get_mut(&want.frontend) {
                    for (k, remembered) in &mut converted.keys {
                        if *k == key {
                            *remembered = Arc::clone(want);
                        }
                    }
                }
            }
        }
        let desired = wanted;
        let ids_before: Vec<u32> = current.values().copied().collect();

        // Removals first: they free room in the maps for what is added next.
        self.remove_leftovers(&mut stats);
        self.remove_frontends(&desired, &mut stats);

        // Frontends already in the maps, those that shrink before those that grow (room again).
        let (shrinking, growing): (Vec<_>, Vec<_>) = desired
            .iter()
            .filter_map(|(key, want)| {
                let value = self.mirror.services.get(key)?;
                Some((*key, want, *value))
            })
            .partition(|(_, want, value)| want.backends.len() as u64 <= value.backend_count as u64);
        for (key, want, value) in shrinking.into_iter().chain(growing) {
            if self
                .in_maps
                .get(&key)
                .is_some_and(|programmed| Arc::ptr_eq(programmed, want))
            {
                stats.unchanged += 1;
                continue;
            }
            let ops = plan_frontend(
                key,
                Some(value),
                value.id,
                self.mirror.slots_of(value.id),
                self.mirror.ranges_of(value.id),
                want,
            );
            if ops.is_empty() {
                stats.unchanged += 1;
                self.in_maps.insert(key, Arc::clone(want));
                continue;
            }
            let before = self.mirror.reachable(&value);
            self.in_maps.remove(&key);
            match self.run(&ops, &mut stats) {
                Ok(()) => {
                    stats.updated += 1;
                    self.in_maps.insert(key, Arc::clone(want));
                    let removed: BTreeSet<BackendAddr> =
                        before.difference(&want.backend_addrs()).copied().collect();
                    if !removed.is_empty() {
                        stats.removed_backends.push(RemovedBackends {
                            frontend: Some(want.frontend),
                            service_id: value.id,
                            affinity_id: value.affinity_id,
                            affinity_backends: BTreeSet::new(), // below
                            backends: removed,
                        });
                    }
                }
                Err(e) => fail(&mut stats, want.frontend, e),
            }
        }

        // New frontends.
        self.reserved.retain(|key, _| desired.contains_key(key));
        for (key, want) in &desired {
            if self.mirror.services.contains_key(key) {
                continue;
            }
            let id = match self.reserved.remove(key) {
                Some(id) => id,
                None => self.allocate_id(),
            };
            let ops = plan_frontend(
                *key,
                None,
                id,
                self.mirror.slots_of(id),
                self.mirror.ranges_of(id),
                want,
            );
            match self.run(&ops, &mut stats) {
                Ok(()) => {
                    stats.added += 1;
                    self.in_maps.insert(*key, Arc::clone(want));
                }
                Err(e) => {
                    // Give back what was written under the id so it does not take room from
                    // other frontends; what cannot be deleted now is a leftover for next time.
                    let written = self.delete_all_of(id);
                    let _ = self.run(&written, &mut stats);
                    self.reserved.insert(*key, id);
                    fail(&mut stats, want.frontend, e);
                }
            }
        }
        let live: BTreeSet<(u32, BackendAddr)> = self
            .mirror
            .services
            .values()
            .filter(|v| v.affinity_id != 0)
            .flat_map(|v| {
                self.mirror
                    .reachable(v)
                    .into_iter()
                    .map(move |b| (v.affinity_id, b))
            })
            .collect();
        for removed in &mut stats.removed_backends {
            if removed.affinity_id != 0 {
                removed.affinity_backends = removed
                    .backends
                    .iter()
                    .filter(|b| !live.contains(&(removed.affinity_id, **b)))
                    .copied()
                    .collect();
            }
        }
        stats.retired_affinity_ids = affinity::retired(
            ids_before.into_iter(),
            self.mirror.services.values().map(|v| v.affinity_id),
        );
        debug!(?stats, "map sync done");
        stats
    }

    /// The deletes of every slot and range under `id`.
    fn delete_all_of(&self, id: u32) -> Vec<MapOp> {
        let mut ops = delete_slots(id, self.mirror.slots_of(id));
        ops.extend(
            self.mirror
                .ranges_of(id)
                .iter()
                .map(|r| MapOp::DeleteSourceRange(*r)),
        );
        ops
    }

    /// Deletes slots and ranges of ids no service uses: an agent stopped between deleting a
    /// service and its slots, or a new service whose slots were written but whose entry could
    /// not be.
    fn remove_leftovers(&mut self, stats: &mut SyncStats) {
        let leftovers: BTreeSet<u32> = self
            .mirror
            .slots
            .keys()
            .chain(self.mirror.ranges.keys())
            .filter(|id| !self.mirror.owner.contains_key(id))
            .copied()
            .collect();
        for id in leftovers {
            let ops = self.delete_all_of(id);
            if let Err(e) = self.run(&ops, stats) {
                let message = format!("leftover entries of service id {id}: {e:#}");
                warn!("{message}");
                stats.leftovers_failed.push(message);
            }
        }
    }

    fn remove_frontends(
        &mut self,
        desired: &BTreeMap<ServiceKey, Arc<DesiredFrontend>>,
        stats: &mut SyncStats,
    ) {
        self.in_maps.retain(|key, _| desired.contains_key(key));
        let removed: Vec<(ServiceKey, ServiceValue)> = self
            .mirror
            .services
            .iter()
            .filter(|(key, _)| !desired.contains_key(key))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, value) in removed {
            let before = self.mirror.reachable(&value);
            // The entry goes first: a packet that already read it may still pick a slot, which
            // is there until the entry is gone.
            let mut result = self.run(&[MapOp::DeleteService(key)], stats);
            if result.is_ok() && !self.mirror.owner.contains_key(&value.id) {
                let ops = self.delete_all_of(value.id);
                result = self.run(&ops, stats);
            }
            if result.is_ok() && !before.is_empty() {
                stats.removed_backends.push(RemovedBackends {
                    frontend: wire::frontend(&key),
                    service_id: value.id,
                    affinity_id: value.affinity_id,
                    affinity_backends: BTreeSet::new(), // below
                    backends: before,
                });
            }
            match (result, wire::frontend(&key)) {
                (Ok(()), _) => stats.removed += 1,
                (Err(e), Some(frontend)) => fail(stats, frontend, e),
                (Err(e), None) => {
                    let message = format!("{}: {e:#}", wire::describe_key(&key));
                    warn!("{message}");
                    stats.leftovers_failed.push(message);
                }
            }
        }
    }

    /// Applies `ops` in order, mirroring each successful one; stops at the first failure.
    fn run(&mut self, ops: &[MapOp], stats: &mut SyncStats) -> anyhow::Result<()> {
        for op in ops {
            self.maps.apply(op)?;
            self.mirror.record(op);
            stats.map_writes += 1;
        }
        Ok(())
    }

    fn allocate_id(&mut self) -> u32 {
        // Ids in use are at most MAX_SERVICES + leftovers, far fewer than u32::MAX: this ends.
        loop {
            let id = self.next_id;
            // 0 is never handed out so a zeroed value is recognisably not a service.
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.mirror.id_in_use(id) && !self.reserved.values().any(|r| *r == id) {
                return id;
            }
        }
    }
}

/// The affinity group of a frontend of `entry` balancing over `backends` (`None` without
/// sessionAffinity).
pub(super) fn affinity_group(
    entry: &crate::state::ServiceEntry,
    frontend: &Frontend,
    backends: &[BackendAddr],
) -> Option<AffinityGroup> {
    entry.affinity_timeout?;
    let mut backends = backends.to_vec();
    backends.sort();
    backends.dedup();
    Some(AffinityGroup {
        service_port: entry.name.clone(),
        proto: frontend.proto.number(),
        timeout: entry.affinity_timeout.unwrap_or(0),
        backends,
    })
}

/// The IPv4 map entries one desired frontend needs: its own and, for an external frontend with
/// `externalTrafficPolicy: Local`, the pods' entry. None for an IPv6 frontend (sync6.rs).
fn convert(frontend: &Frontend, entry: &ServiceEntry) -> Vec<(ServiceKey, DesiredFrontend)> {
    let mut out = Vec::new();
    // IPv6 frontends have maps of their own (sync6.rs).
    let Some(key) = wire::service_key(frontend) else {
        return out;
    };
    // A frontend's backends are of its family (translate.rs); the filter is a
    // safety net.
    let backend_values = |backends: &[BackendAddr]| -> BTreeSet<Backend> {
        backends
            .iter()
            .filter_map(|b| wire::backend_value_with(b, entry.local_backends.contains(b)))
            .collect()
    };
    let ranges: BTreeSet<(u32, u32)> = entry
        .source_ranges
        .iter()
        .filter_map(|net| match net.trunc() {
            ipnet::IpNet::V4(net) => Some((
                u32::from(net.prefix_len()),
                wire::addr_to_map(net.network()),
            )),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    // An externalTrafficPolicy Local frontend's cluster-wide backends for pods: an
    // entry of its own (SCOPE_POD), synced like any frontend.
    if let (Some(cluster), Some(pod_key)) =
        (&entry.cluster_backends, wire::pod_service_key(frontend))
    {
        out.push((
            pod_key,
            DesiredFrontend {
                frontend: *frontend,
                affinity_group: affinity_group(entry, frontend, cluster),
                settings: wire::pod_service_settings(entry),
                backends: backend_values(cluster),
                ranges: ranges.clone(),
            },
        ));
    }
    out.push((
        key,
        DesiredFrontend {
            frontend: *frontend,
            affinity_group: affinity_group(entry, frontend, &entry.backends),
            settings: wire::service_settings(entry),
            backends: backend_values(&entry.backends),
            ranges,
        },
    ));
    out
}

fn fail(stats: &mut SyncStats, frontend: Frontend, error: anyhow::Error) {
    let message = format!("{error:#}");
    // Reported to the caller in `failed` (the daemon logs it); debug only, to not log twice.
    debug!("programming service {frontend} failed: {message}");
    stats.failed.push((frontend, message));
}

fn delete_slots(id: u32, slots: &BTreeMap<u32, Backend>) -> Vec<MapOp> {
    slots
        .keys()
        .map(|&slot| {
            MapOp::DeleteBackend(BackendKey {
                service_id: id,
                slot,
            })
        })
        .collect()
}

/// The writes that take one frontend from what the maps hold (`current` entry, if any, the
/// `present` slots and `present_ranges` under `id`) to `desired`, in the order described in the
/// module documentation. Empty when nothing differs.
fn plan_frontend(
    key: ServiceKey,
    current: Option<ServiceValue>,
    id: u32,
    present: &BTreeMap<u32, Backend>,
    present_ranges: &BTreeSet<SourceRange>,
    desired: &DesiredFrontend,
) -> Vec<MapOp> {
    let count = u32::try_from(desired.backends.len()).unwrap_or(u32::MAX);
    let slot_key = |slot| BackendKey {
        service_id: id,
        slot,
    };

    // Backends already in a slot below the new count stay where they are.
    let mut placed = BTreeSet::new();
    let mut kept_slots = BTreeSet::new();
    for (&slot, backend) in present.range(..count) {
        if desired.backends.contains(backend) && placed.insert(*backend) {
            kept_slots.insert(slot);
        }
    }
    // The others fill the remaining slots below the count, in ascending order.
    let mut to_place = desired.backends.iter().filter(|b| !placed.contains(*b));

    let mut ops = Vec::new();
    // The entry's copies of its first slots, as they are once the slots are written.
    let mut inline_backends = [Backend::NONE; INLINE_BACKENDS];
    for (&slot, backend) in present.range(..count) {
        if kept_slots.contains(&slot) && (slot as usize) < INLINE_BACKENDS {
            inline_backends[slot as usize] = *backend;
        }
    }
    for slot in (0..count).filter(|slot| !kept_slots.contains(slot)) {
        let backend = to_place
            .next()
            .expect("as many backends to place as free slots");
        ops.push(MapOp::PutBackend(slot_key(slot), *backend));
        if (slot as usize) < INLINE_BACKENDS {
            inline_backends[slot as usize] = *backend;
        }
    }
    let ranges = desired.ranges_for(id);
    for range in ranges.difference(present_ranges) {
        ops.push(MapOp::PutSourceRange(*range));
    }
    let value = ServiceValue {
        id,
        backend_count: count,
        flags: desired.settings.flags,
        kind: desired.settings.kind,
        _pad: 0,
        affinity_timeout: desired.settings.affinity_timeout,
        affinity_id: desired.settings.affinity_id,
        inline_backends,
    };
    if current != Some(value) {
        ops.push(MapOp::PutService(key, value));
    }
    for &slot in present.range(count..).map(|(slot, _)| slot) {
        ops.push(MapOp::DeleteBackend(slot_key(slot)));
    }
    for range in present_ranges.difference(&ranges) {
        ops.push(MapOp::DeleteSourceRange(*range));
    }
    ops
}

/// Fails with the frontend named when `stats` reports a failure (for callers that want a
/// `Result`).
pub fn ensure_complete(stats: &SyncStats) -> anyhow::Result<()> {
    if stats.is_complete() {
        return Ok(());
    }
    let failures: Vec<String> = stats
        .failed
        .iter()
        .map(|(frontend, error)| format!("{frontend}: {error}"))
        .chain(stats.leftovers_failed.iter().cloned())
        .collect();
    bail!("map sync incomplete: {}", failures.join("; "))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        datapath::memory_maps::MemoryMaps,
        state::{Protocol, ServiceEntry},
    };

    /// A `services` value with id 7, no backends and default settings, to fill in with `..`.
    fn value_of(backend_count: u32) -> ServiceValue {
        ServiceValue {
            id: 7,
            backend_count,
            flags: 0,
            kind: 0,
            _pad: 0,
            affinity_timeout: 0,
            affinity_id: 0,
            inline_backends: [Backend::NONE; INLINE_BACKENDS],
        }
    }

    fn frontend(i: u32, port: u16) -> Frontend {
        Frontend {
            ip: Ipv4Addr::from(0x0a60_0000 + i).into(),
            port,
            proto: Protocol::Tcp,
        }
    }

    /// A `services` entry's copies of its first slots holding `backend(i)` for each `i`.
    fn copies(backends: [u32; INLINE_BACKENDS]) -> [Backend; INLINE_BACKENDS] {
        backends.map(|i| wire::backend_value(&backend(i)).unwrap())
    }

    fn backend(i: u32) -> BackendAddr {
        BackendAddr {
            ip: Ipv4Addr::from(0x0af4_0000 + i).into(),
            port: 8080,
        }
    }

    fn entry(backends: impl IntoIterator<Item = u32>) -> ServiceEntry {
        let mut backends: Vec<BackendAddr> = backends.into_iter().map(backend).collect();
        backends.sort();
        ServiceEntry::cluster_ip("ns/svc:http", backends)
    }

    fn state(services: impl IntoIterator<Item = (Frontend, ServiceEntry)>) -> DesiredState {
        DesiredState {
            services: services
                .into_iter()
                .map(|(frontend, entry)| (frontend, entry.into()))
                .collect(),
            ..Default::default()
        }
    }

    fn new_sync() -> ServiceSync<MemoryMaps> {
        ServiceSync::read_back(MemoryMaps::default()).unwrap()
    }

    /// The sync engine after an agent restart: a fresh mirror read from the same maps.
    fn restart(sync: ServiceSync<MemoryMaps>) -> ServiceSync<MemoryMaps> {
        let mut maps = sync.maps;
        maps.log.clear();
        ServiceSync::read_back(maps).unwrap()
    }

    /// Backends a packet can reach for `f`, as a set.
    fn reachable(sync: &ServiceSync<MemoryMaps>, f: &Frontend) -> BTreeSet<BackendAddr> {
        let maps = sync.maps();
        let value = maps.services[&wire::service_key(f).unwrap()];
        (0..value.backend_count)
            .map(|slot| {
                wire::backend_addr(
                    &maps.backends[&BackendKey {
                        service_id: value.id,
                        slot,
                    }],
                )
            })
            .collect()
    }

    #[test]
    fn ipv6_frontends_stay_out_of_the_ipv4_maps() {
        let v6 = Frontend {
            ip: "fd00:10:96::1".parse().unwrap(),
            port: 80,
            proto: crate::state::Protocol::Tcp,
        };
        let v6_entry = ServiceEntry::cluster_ip(
            "ns/v6",
            vec![BackendAddr {
                ip: "fd00:10:244::5".parse().unwrap(),
                port: 8080,
            }],
        );
        let desired = state([(frontend(1, 80), entry([1])), (v6, v6_entry)]);
        let mut sync = new_sync();
        let stats = sync.sync(&desired);
        assert!(stats.is_complete(), "{stats:?}");
        assert_eq!(stats.added, 1);
        assert_eq!(sync.programmed().len(), 1);
        assert_eq!(sync.service_id(&v6), None);
        assert_eq!(
            reachable(&sync, &frontend(1, 80)),
            BTreeSet::from([backend(1)])
        );
    }

    #[test]
    fn a_local_policy_frontend_gets_a_second_entry_with_the_cluster_backends_for_pods() {
        use crate::state::FrontendKind;
        let f = frontend(1, 30080);
        let local_entry = |local: &[u32], cluster: &[u32]| {
            let mut e = entry(local.iter().copied());
            e.kind = FrontendKind::NodePort;
            e.external_local = true;
            e.when_empty = crate::state::WhenEmpty::Drop;
            e.cluster_backends = Some(cluster.iter().copied().map(backend).collect());
            e
        };
        let pod_reachable = |sync: &ServiceSync<MemoryMaps>| -> BTreeSet<BackendAddr> {
            let maps = sync.maps();
            let value = maps.services[&wire::pod_service_key(&f).unwrap()];
            (0..value.backend_count)
                .map(|slot| {
                    wire::backend_addr(
                        &maps.backends[&BackendKey {
                            service_id: value.id,
                            slot,
                        }],
                    )
                })
                .collect()
        };
        let mut sync = new_sync();
        let stats = sync.sync(&state([(f, local_entry(&[], &[2, 3]))]));
        assert!(stats.is_complete(), "{stats:?}");
        assert_eq!(stats.added, 2);
        assert!(reachable(&sync, &f).is_empty());
        assert_eq!(
            pod_reachable(&sync),
            BTreeSet::from([backend(2), backend(3)])
        );
        let maps = sync.maps();
        let all = maps.services[&wire::service_key(&f).unwrap()];
        let pods = maps.services[&wire::pod_service_key(&f).unwrap()];
        assert_ne!(all.id, pods.id);
        assert_ne!(all.flags & sluice_common::SVC_F_EXTERNAL_LOCAL, 0);
        assert_eq!(pods.flags & sluice_common::SVC_F_EXTERNAL_LOCAL, 0);
        assert_eq!(pods.flags & sluice_common::SVC_F_DROP_WHEN_EMPTY, 0);
        assert_ne!(pods.flags & sluice_common::SVC_F_EXTERNAL, 0);

        // Unchanged: nothing written, also after a restart.
        let again = sync.sync(&state([(f, local_entry(&[], &[2, 3]))]));
        assert_eq!(again.map_writes, 0, "{again:?}");
        let mut sync = restart(sync);
        let again = sync.sync(&state([(f, local_entry(&[], &[2, 3]))]));
        assert_eq!(again.map_writes, 0, "{again:?}");

        // Both sets grow and shrink under the ordering rules (MemoryMaps checks every write).
        sync.sync(&state([(f, local_entry(&[1], &[1, 2, 3, 4]))]));
        assert_eq!(reachable(&sync, &f), BTreeSet::from([backend(1)]));
        assert_eq!(pod_reachable(&sync).len(), 4);
        let stats = sync.sync(&state([(f, local_entry(&[1], &[4]))]));
        assert_eq!(pod_reachable(&sync), BTreeSet::from([backend(4)]));
        assert!(stats
            .removed_backends
            .iter()
            .any(|r| r.backends == BTreeSet::from([backend(1), backend(2), backend(3)])));

        // Back to the Cluster policy: the pods' entry and its slots go.
        let stats = sync.sync(&state([(f, entry([1, 4]))]));
        assert!(stats.is_complete(), "{stats:?}");
        assert_eq!(stats.removed, 1);
        assert_eq!(sync.maps().services.len(), 1);
        assert_eq!(sync.maps().backends.len(), 2);
    }

    #[test]
    fn unchanged_state_of_10000_services_writes_nothing() {
        let desired = state((0..10_000).map(|i| (frontend(i, 80), entry([i, i + 1, i + 2]))));
        let mut sync = new_sync();
        let first = sync.sync(&desired);
        assert_eq!(first.added, 10_000);
        assert_eq!(first.map_writes, 10_000 * 4);
        assert!(first.is_complete());

        let again = sync.sync(&desired);
        assert_eq!(again.map_writes, 0, "{again:?}");
        assert_eq!(again.unchanged, 10_000);

        // After a restart the state read back from the maps is diffed: still nothing to write.
        let mut sync = restart(sync);
        let after_restart = sync.sync(&desired);
        assert_eq!(after_restart.map_writes, 0);
        assert_eq!(after_restart.unchanged, 10_000);
        assert!(sync.maps().log.is_empty());
    }

    #[test]
    fn growing_writes_slots_before_raising_the_count() {
        let f = frontend(1, 80);
        let mut sync = new_sync();
        sync.sync(&state([(f, entry([1, 2]))]));
        let id = sync.service_id(&f).unwrap();
        sync.maps_mut().log.clear();

        let stats = sync.sync(&state([(f, entry([1, 2, 3, 4]))]));
        assert_eq!(stats.updated, 1);
        let key = wire::service_key(&f).unwrap();
        let slot = |slot| BackendKey {
            service_id: id,
            slot,
        };
        assert_eq!(
            sync.maps().log,
            vec![
                MapOp::PutBackend(slot(2), wire::backend_value(&backend(3)).unwrap()),
                MapOp::PutBackend(slot(3), wire::backend_value(&backend(4)).unwrap()),
                MapOp::PutService(
                    key,
                    ServiceValue {
                        id,
                        backend_count: 4,
                        inline_backends: copies([1, 2]),
                        ..value_of(0)
                    }
                ),
            ]
        );
        assert_eq!(
            reachable(&sync, &f),
            entry([1, 2, 3, 4]).backends.into_iter().collect()
        );
    }

    #[test]
    fn shrinking_lowers_the_count_before_deleting_slots() {
        let f = frontend(1, 80);
        let mut sync = new_sync();
        sync.sync(&state([(f, entry([1, 2, 3, 4]))]));
        let id = sync.service_id(&f).unwrap();
        sync.maps_mut().log.clear();

        // Backends 1 and 2 (slots 0 and 1) go, 3 (slot 2) stays, 5 comes. Slot 2 is above the
        // new count, so 3 is written again below it before the count drops.
        let stats = sync.sync(&state([(f, entry([3, 5]))]));
        assert_eq!(stats.updated, 1);
        let slot = |slot| BackendKey {
            service_id: id,
            slot,
        };
        assert_eq!(
            sync.maps().log,
            vec![
                MapOp::PutBackend(slot(0), wire::backend_value(&backend(3)).unwrap()),
                MapOp::PutBackend(slot(1), wire::backend_value(&backend(5)).unwrap()),
                MapOp::PutService(
                    wire::service_key(&f).unwrap(),
                    ServiceValue {
                        id,
                        backend_count: 2,
                        inline_backends: copies([3, 5]),
                        ..value_of(0)
                    }
                ),
                MapOp::DeleteBackend(slot(2)),
                MapOp::DeleteBackend(slot(3)),
            ]
        );
        assert_eq!(
            reachable(&sync, &f),
            entry([3, 5]).backends.into_iter().collect()
        );
        // The invariant (every counted slot present) was checked by the fake after each write,
        // so the service never lost all its backends in between.
    }

    #[test]
    fn replacing_one_backend_rewrites_one_slot_and_the_entry_when_it_copies_the_slot() {
        let f = frontend(1, 80);
        let mut sync = new_sync();
        sync.sync(&state([(f, entry([1, 2, 3]))]));
        // Slot 2 is not among the entry's copies (INLINE_BACKENDS = 2): one write.
        sync.maps_mut().log.clear();
        let stats = sync.sync(&state([(f, entry([1, 2, 4]))]));
        assert_eq!(stats.map_writes, 1);
        assert!(matches!(sync.maps().log[..], [MapOp::PutBackend(k, _)] if k.slot == 2));
        // Slot 1 is: the slot, then the entry with the new copy (MemoryMaps checks the copies).
        sync.maps_mut().log.clear();
        let stats = sync.sync(&state([(f, entry([1, 3, 4]))]));
        assert_eq!(stats.map_writes, 2);
        let log = &sync.maps().log;
        assert!(
            matches!(log[0], MapOp::PutBackend(k, _) if k.slot == 1),
            "{log:?}"
        );
        assert!(
            matches!(log[1], MapOp::PutService(_, v) if v.inline_backends[1] == wire::backend_value(&backend(3)).unwrap()),
            "{log:?}"
        );
    }

    #[test]
    fn a_frontend_without_backends_is_programmed_with_count_zero() {
        let f = frontend(1, 80);
        let mut sync = new_sync();
        let stats = sync.sync(&state([(f, entry([]))]));
        assert_eq!(stats.added, 1);
        let value = sync.maps().services[&wire::service_key(&f).unwrap()];
        assert_eq!(value.backend_count, 0);

        // Losing every backend keeps the entry with count 0: count first, then the slots.
        sync.sync(&state([(f, entry([1, 2]))]));
        sync.maps_mut().log.clear();
        sync.sync(&state([(f, entry([]))]));
        let log = &sync.maps().log;
        assert!(matches!(log[0], MapOp::PutService(_, v) if v.backend_count == 0));
        assert!(log[1..]
            .iter()
            .all(|op| matches!(op, MapOp::DeleteBackend(_))));
        assert_eq!(log.len(), 3);
        assert!(sync.maps().backends.is_empty());
    }

    #[test]
    fn ids_stay_stable_and_are_not_reused_while_present() {
        let (a, b, c) = (frontend(1, 80), frontend(2, 80), frontend(3, 80));
        let mut sync = new_sync();
        sync.sync(&state([(a, entry([1])), (b, entry([2]))]));
        let (id_a, id_b) = (sync.service_id(&a).unwrap(), sync.service_id(&b).unwrap());
        assert_ne!(id_a, id_b);

        // Other frontends coming and going, and backend changes, keep a's id.
        sync.sync(&state([(a, entry([1, 5])), (c, entry([3]))]));
        assert_eq!(sync.service_id(&a), Some(id_a));
        let id_c = sync.service_id(&c).unwrap();
        assert!(
            id_c != id_a && id_c != id_b,
            "b's id is not handed out again at once"
        );

        // A restarted agent keeps the ids the maps hold and hands out new ones above them.
        let mut sync = restart(sync);
        let d = frontend(4, 80);
        let stats = sync.sync(&state([
            (a, entry([1, 5])),
            (c, entry([3])),
            (d, entry([4])),
        ]));
        assert_eq!((stats.added, stats.unchanged, stats.map_writes), (1, 2, 2));
        assert_eq!(sync.service_id(&a), Some(id_a));
        assert_eq!(sync.service_id(&c), Some(id_c));
        let id_d = sync.service_id(&d).unwrap();
        assert!(![id_a, id_c].contains(&id_d));
    }

    #[test]
    fn removal_deletes_the_service_entry_then_its_slots() {
        let (a, b) = (frontend(1, 80), frontend(2, 80));
        let mut sync = new_sync();
        sync.sync(&state([(a, entry([1, 2])), (b, entry([3]))]));
        let id_a = sync.service_id(&a).unwrap();
        sync.maps_mut().log.clear();

        let stats = sync.sync(&state([(b, entry([3]))]));
        assert_eq!((stats.removed, stats.unchanged), (1, 1));
        let slot = |slot| BackendKey {
            service_id: id_a,
            slot,
        };
        assert_eq!(
            sync.maps().log,
            vec![
                MapOp::DeleteService(wire::service_key(&a).unwrap()),
                MapOp::DeleteBackend(slot(0)),
                MapOp::DeleteBackend(slot(1)),
            ]
        );
        assert_eq!(sync.maps().services.len(), 1);
        assert_eq!(sync.maps().backends.len(), 1);
    }

    #[test]
    fn a_full_map_fails_that_frontend_only_and_is_retried() {
        let fronts: Vec<Frontend> = (0..3).map(|i| frontend(i, 80)).collect();
        let desired = state(fronts.iter().map(|f| (*f, entry([1, 2]))));
        let mut sync = ServiceSync::read_back(MemoryMaps {
            max_services: Some(2),
            ..MemoryMaps::default()
        })
        .unwrap();

        let stats = sync.sync(&desired);
        assert_eq!(stats.added, 2);
        assert_eq!(stats.failed.len(), 1);
        let (failed_frontend, error) = &stats.failed[0];
        assert_eq!(*failed_frontend, fronts[2]);
        assert!(error.contains(&fronts[2].to_string()), "{error}");
        assert!(error.contains("Argument list too long"), "{error}");
        // The failed frontend's slots were given back.
        assert_eq!(sync.maps().backends.len(), 4);

        // Every retry that fails again tries it under the same id (logs and `sluice state`
        // keep naming one id for it), and no other frontend gets that id meanwhile.
        let tried_id = |sync: &ServiceSync<MemoryMaps>| {
            sync.maps()
                .log
                .iter()
                .rev()
                .find_map(|op| match op {
                    MapOp::PutBackend(key, _) => Some(key.service_id),
                    _ => None,
                })
                .unwrap()
        };
        let first_id = tried_id(&sync);
        for _ in 0..3 {
            let stats = sync.sync(&desired);
            assert_eq!(stats.failed.len(), 1);
            assert_eq!(tried_id(&sync), first_id);
        }

        // Once there is room, the next sync programs it (under that id) without touching the
        // others.
        sync.maps_mut().max_services = None;
        sync.maps_mut().log.clear();
        let stats = sync.sync(&desired);
        assert_eq!((stats.added, stats.unchanged, stats.map_writes), (1, 2, 3));
        assert!(stats.is_complete());
        assert_eq!(sync.service_id(&fronts[2]), Some(first_id));
    }

    /// An entry handed out again (the same `Arc`) is neither converted nor planned again; a
    /// new entry with the same content is planned and found unchanged.
    #[test]
    fn entries_handed_out_again_are_skipped() {
        let fronts: Vec<Frontend> = (0..3).map(|i| frontend(i, 80)).collect();
        let desired = state(fronts.iter().map(|f| (*f, entry([1, 2]))));
        let mut sync = new_sync();
        assert_eq!(sync.sync(&desired).added, 3);
        assert_eq!(sync.in_maps.len(), 3);
        let stats = sync.sync(&desired);
        assert_eq!((stats.unchanged, stats.map_writes), (3, 0));
        // One frontend changes: only it is written.
        let mut changed = desired.clone();
        changed.services.insert(fronts[1], entry([1, 2, 3]).into());
        sync.maps_mut().log.clear();
        let stats = sync.sync(&changed);
        assert_eq!((stats.updated, stats.unchanged), (1, 2));
        assert_eq!(reachable(&sync, &fronts[1]).len(), 3);
        assert!(Arc::ptr_eq(
            &sync.converted[&fronts[0]].entry,
            &desired.services[&fronts[0]]
        ));
        // Equal content in new entries: planned, nothing written.
        let stats = sync.sync(&state(fronts.iter().map(|f| (*f, entry([1, 2])))));
        assert_eq!((stats.updated, stats.unchanged), (1, 2));
        let stats = sync.sync(&state(fronts.iter().map(|f| (*f, entry([1, 2])))));
        assert_eq!((stats.unchanged, stats.map_writes), (3, 0));
        // Removed frontends are forgotten.
        sync.sync(&state([(fronts[0], entry([1, 2]))]));
        assert_eq!((sync.in_maps.len(), sync.converted.len()), (1, 1));
    }

    #[test]
    fn a_full_backends_map_leaves_a_growing_service_consistent() {
        let f = frontend(1, 80);
        let mut sync = ServiceSync::read_back(MemoryMaps {
            max_backends: Some(3),
            ..MemoryMaps::default()
        })
        .unwrap();
        sync.sync(&state([(f, entry([1, 2]))]));
        let grown = state([(f, entry([1, 2, 3, 4]))]);
        let stats = sync.sync(&grown);
        assert_eq!(stats.failed.len(), 1);
        // The count was not raised over the slot that could not be written.
        assert_eq!(reachable(&sync, &f).len(), 2);

        // The same entry handed out again (as the translator does for an unchanged service)
        // is retried: only what the maps hold exactly is skipped.
        sync.maps_mut().max_backends = None;
        let stats = sync.sync(&grown);
        assert!(stats.is_complete());
        // Slot 2 written by the failed attempt is reused, only slot 3 and the count are written.
        assert_eq!(stats.map_writes, 2);
        assert_eq!(reachable(&sync, &f).len(), 4);
    }

    #[test]
    fn leftovers_of_an_interrupted_agent_are_cleaned_up() {
        let f = frontend(1, 80);
        let mut maps = MemoryMaps::default();
        let key = wire::service_key(&f).unwrap();
        // An agent stopped in the middle of shrinking f from 4 to 2 backends ...
        maps.services.insert(
            key,
            ServiceValue {
                id: 7,
                backend_count: 2,
                inline_backends: copies([1, 2]),
                ..value_of(0)
            },
        );
        for slot in 0..4 {
            maps.backends.insert(
                BackendKey {
                    service_id: 7,
                    slot,
                },
                wire::backend_value(&backend(slot + 1)).unwrap(),
            );
        }
        // ... and in the middle of removing the service with id 9.
        maps.backends.insert(
            BackendKey {
                service_id: 9,
                slot: 0,
            },
            wire::backend_value(&backend(9)).unwrap(),
        );
        let mut sync = ServiceSync::read_back(maps).unwrap();
        let stats = sync.sync(&state([(f, entry([1, 2]))]));
        assert!(stats.is_complete());
        assert_eq!(stats.updated, 1);
        assert_eq!(stats.map_writes, 3, "{:?}", sync.maps().log);
        assert_eq!(sync.maps().backends.len(), 2);
        assert_eq!(sync.service_id(&f), Some(7));
        let new = frontend(2, 80);
        sync.sync(&state([(f, entry([1, 2])), (new, entry([1]))]));
        assert!(sync.service_id(&new).unwrap() > 9);
    }

    fn with_ranges(mut entry: ServiceEntry, ranges: &[&str]) -> ServiceEntry {
        entry.kind = crate::state::FrontendKind::LoadBalancer;
        entry.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        entry
    }

    #[test]
    fn a_settings_change_rewrites_the_service_entry_only() {
        let f = frontend(1, 80);
        let mut sync = new_sync();
        sync.sync(&state([(f, entry([1, 2]))]));
        sync.maps_mut().log.clear();

        let mut sticky = entry([1, 2]);
        sticky.affinity_timeout = Some(30);
        sticky.when_empty = crate::state::WhenEmpty::Drop;
        let stats = sync.sync(&state([(f, sticky.clone())]));
        assert_eq!((stats.updated, stats.map_writes), (1, 1));
        let MapOp::PutService(_, value) = sync.maps().log[0] else {
            panic!("{:?}", sync.maps().log);
        };
        assert_eq!(
            value.flags,
            sluice_common::SVC_F_AFFINITY | sluice_common::SVC_F_DROP_WHEN_EMPTY
        );
        assert_eq!(value.affinity_timeout, 30);
        assert!(stats.removed_backends.is_empty());

        // Unchanged, also after a restart: nothing written.
        let stats = sync.sync(&state([(f, sticky.clone())]));
        assert_eq!((stats.unchanged, stats.map_writes), (1, 0));
        let mut sync = restart(sync);
        assert_eq!(sync.sync(&state([(f, sticky)])).map_writes, 0);
    }

    #[test]
    fn source_ranges_are_written_before_the_flag_and_deleted_after_it() {
        let f = frontend(1, 443);
        let mut sync = new_sync();
        // New: ranges, then the entry with the flag (the fake checks the flag never points to
        // no ranges).
        let stats = sync.sync(&state([(f, with_ranges(entry([1]), &["192.0.2.0/24"]))]));
        assert!(stats.is_complete());
        let log = &sync.maps().log;
        let put_range = log
            .iter()
            .position(|op| matches!(op, MapOp::PutSourceRange(_)))
            .unwrap();
        let put_service = log
            .iter()
            .position(|op| matches!(op, MapOp::PutService(..)))
            .unwrap();
        assert!(put_range < put_service, "{log:?}");
        let id = sync.service_id(&f).unwrap();
        assert_eq!(
            sync.programmed()[0].source_ranges,
            vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]
        );

        // Replaced: the new range first, the old one after; the entry is untouched.
        sync.maps_mut().log.clear();
        let stats = sync.sync(&state([(
            f,
            with_ranges(entry([1]), &["198.51.100.0/24", "203.0.113.7/32"]),
        )]));
        assert_eq!(stats.map_writes, 3);
        let range = |net: &str| SourceRange::new(id, &net.parse().unwrap());
        assert_eq!(
            sync.maps().log,
            vec![
                MapOp::PutSourceRange(range("198.51.100.0/24")),
                MapOp::PutSourceRange(range("203.0.113.7/32")),
                MapOp::DeleteSourceRange(range("192.0.2.0/24")),
            ]
        );

        // A restart reads the ranges back: nothing to write.
        let mut sync = restart(sync);
        let desired = state([(
            f,
            with_ranges(entry([1]), &["198.51.100.0/24", "203.0.113.7/32"]),
        )]);
        assert_eq!(sync.sync(&desired).map_writes, 0);

        // No ranges: the flag goes first, then the ranges.
        sync.maps_mut().log.clear();
        sync.sync(&state([(f, with_ranges(entry([1]), &[]))]));
        let log = &sync.maps().log;
        assert!(
            matches!(log[0], MapOp::PutService(_, v) if v.flags == sluice_common::SVC_F_EXTERNAL)
        );
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(sync.maps().ranges.is_empty());

        // A removed frontend takes its ranges along; leftovers of another agent are cleaned.
        sync.sync(&state([(f, with_ranges(entry([1]), &["192.0.2.0/24"]))]));
        sync.sync(&state([]));
        assert!(sync.maps().ranges.is_empty());
        let mut maps = MemoryMaps::default();
        maps.ranges
            .insert(SourceRange::new(99, &"10.0.0.0/8".parse().unwrap()));
        let mut sync = ServiceSync::read_back(maps).unwrap();
        let stats = sync.sync(&state([]));
        assert_eq!(stats.map_writes, 1);
        assert!(sync.maps().ranges.is_empty());
    }

    #[test]
    fn removed_backends_are_reported_per_service() {
        let (a, b) = (frontend(1, 80), frontend(2, 80));
        let mut sync = new_sync();
        sync.sync(&state([(a, entry([1, 2, 3])), (b, entry([4]))]));
        let (id_a, id_b) = (sync.service_id(&a).unwrap(), sync.service_id(&b).unwrap());

        // a loses 1 and 3 (gains 5), b goes away with its backend.
        let stats = sync.sync(&state([(a, entry([2, 5]))]));
        let mut removed: Vec<(u32, Vec<BackendAddr>)> = stats
            .removed_backends
            .iter()
            .map(|r| (r.service_id, r.backends.iter().copied().collect()))
            .collect();
        removed.sort();
        let mut expected = vec![
            (id_a, vec![backend(1), backend(3)]),
            (id_b, vec![backend(4)]),
        ];
        expected.sort();
        assert_eq!(removed, expected);

        // A backend only changing its local flag is not removed; neither is anything when
        // nothing changes.
        let mut local = entry([2, 5]);
        local.local_backends = [backend(2)].into();
        let stats = sync.sync(&state([(a, local.clone())]));
        assert_eq!(stats.updated, 1);
        assert!(stats.removed_backends.is_empty(), "{stats:?}");
        assert!(sync.sync(&state([(a, local)])).removed_backends.is_empty());
    }
}
