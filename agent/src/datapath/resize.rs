//! Map sizes chosen at load time, and the replacement of a pinned map whose size differs.
//!
//! `services`/`services6`, `backends`/`backends6` and `conntrack`/`conntrack6` get their
//! capacity from [`MapSizes`] (`sluice agent --max-services/--max-backends/--max-conntrack`)
//! instead of the object's; every other map has the size the object declares. A hash map preallocates all its entries, so the size is kernel
//! memory whether used or not (README: "Map sizes").
//!
//! When a pinned map has another capacity than the agent wants (the flags changed, or a new
//! version sizes a map differently), [`super::Datapath::load_with`] does not reuse it: the
//! loader creates a new map of the wanted size, every entry of the pinned one is copied into it
//! (services and backends keep their ids, conntrack its flows), the new programs are loaded
//! with it, and only then is it pinned in place of the old one (pinned as `resizing-<name>`,
//! then renamed over the old pin: one atomic step). Until the agent swaps its programs into the
//! pinned links, the old programs keep running with the old map, so nothing stops working
//! meanwhile; the entries they add to the maps the programs write (conntrack, affinity, ...) in
//! that window are copied once more by [`super::Datapath::finish_map_resize`] after the swap.
//! A map whose type, key size or value size differs is a layout change: it is refused, naming
//! the map (`sluice cleanup` removes the old datapath).

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use sluice_common::{MAX_BACKENDS, MAX_CONNTRACK, MAX_POLICY_FLOWS, MAX_SERVICES};

use super::sock::{put_u32, put_u64, sys_bpf, ATTR_SIZE};

/// The capacities of the maps sized at load time. Both address families get the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of `services` and of `services6`: one per frontend (a service port on its
    /// ClusterIP, each external IP, NodePort, ...), plus one per frontend with
    /// externalTrafficPolicy Local (its pods' entry).
    pub services: u32,
    /// Entries of `backends` and of `backends6`: one per endpoint of each of those entries.
    pub backends: u32,
    /// Entries of `conntrack`, `ct_answered` and their IPv6 twins: two per translated flow.
    pub conntrack: u32,
    /// Entries of `policy_flows`, `policy_replied` and their IPv6 twins: one per direction
    /// of each flow a NetworkPolicy admitted.
    pub policy_flows: u32,
}

impl Default for MapSizes {
    /// The object's sizes: 65,536 services, 262,144 backends, 262,144 conntrack entries
    /// (`sluice-common`).
    fn default() -> MapSizes {
        MapSizes {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            conntrack: MAX_CONNTRACK,
            policy_flows: MAX_POLICY_FLOWS,
        }
    }
}

/// Largest size accepted: a hash map's buckets are a power of two the kernel must allocate in
/// one piece; beyond this a typo (an extra zero) would ask for gigabytes.
pub const MAX_MAP_SIZE: u32 = 1 << 26;

impl MapSizes {
    /// Room for `services` single-port ClusterIP services of `endpoints` endpoints each, and
    /// never less than the defaults.
    pub fn for_services(services: usize, endpoints: usize) -> MapSizes {
        let default = MapSizes::default();
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).min(MAX_MAP_SIZE);
        MapSizes {
            services: clamp(services).max(default.services),
            backends: clamp(services.saturating_mul(endpoints)).max(default.backends),
            ..default
        }
    }

    /// The `sluice agent` arguments asking for these sizes.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--max-services".into(),
            self.services.to_string(),
            "--max-backends".into(),
            self.backends.to_string(),
            "--max-conntrack".into(),
            self.conntrack.to_string(),
            "--max-policy-flows".into(),
            self.policy_flows.to_string(),
        ]
    }

    pub(super) fn check(&self) -> anyhow::Result<()> {
        for (flag, size) in [
            ("--max-services", self.services),
            ("--max-backends", self.backends),
            ("--max-conntrack", self.conntrack),
            ("--max-policy-flows", self.policy_flows),
        ] {
            if size == 0 || size > MAX_MAP_SIZE {
                bail!("{flag} {size}: must be between 1 and {MAX_MAP_SIZE}");
            }
        }
        Ok(())
    }
}

/// Where a map's capacity comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Capacity {
    /// The object's, fixed.
    Fixed(u32),
    /// [`MapSizes::services`].
    Services,
    /// [`MapSizes::backends`].
    Backends,
    /// [`MapSizes::conntrack`].
    Conntrack,
    /// [`MapSizes::policy_flows`].
    PolicyFlows,
}

impl Capacity {
    pub(super) fn of(self, sizes: &MapSizes) -> u32 {
        match self {
            Capacity::Fixed(n) => n,
            Capacity::Services => sizes.services,
            Capacity::Backends => sizes.backends,
            Capacity::Conntrack => sizes.conntrack,
            Capacity::PolicyFlows => sizes.policy_flows,
        }
    }

    /// The flag setting it, for error messages.
    pub(super) fn flag(self) -> Option<&'static str> {
        match self {
            Capacity::Fixed(_) => None,
            Capacity::Services => Some("--max-services"),
            Capacity::Backends => Some("--max-backends"),
            Capacity::Conntrack => Some("--max-conntrack"),
            Capacity::PolicyFlows => Some("--max-policy-flows"),
        }
    }
}

/// A pinned map being replaced by one of another size.
pub(super) struct Resized {
    pub name: &'static str,
    pub pin: PathBuf,
    pub old: OwnedFd,
    pub new: OwnedFd,
    pub old_capacity: u32,
    pub new_capacity: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// The programs add entries to it (conntrack, ...): copied again after the swap.
    pub written_by_programs: bool,
}

// bpf(2) map commands (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// `BPF_MAP_*_ELEM` attributes: map_fd u32, pad, key u64, value/next_key u64, flags u64.
/// `key` and `value` are addresses (the kernel writes `value` of a lookup and `next_key`).
fn elem_attr(map: BorrowedFd<'_>, key: u64, value: u64, flags: u64) -> [u8; ATTR_SIZE] {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, key);
    put_u64(&mut attr, 16, value);
    put_u64(&mut attr, 24, flags);
    attr
}

/// How a copy went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries written to the new map.
    pub copied: usize,
    /// Entries the new map had already (the second pass keeps the new programs' entries).
    pub kept: usize,
}

/// Copies every entry of `from` into `to` (maps of the same key and value size, not per-CPU).
/// `only_missing`: keep the entries `to` has (`BPF_NOEXIST`). Entries deleted from `from`
/// meanwhile (LRU eviction, the old programs still run) are skipped. A full `to` is an error.
pub(super) fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: u32,
    value_size: u32,
    from_capacity: u32,
    only_missing: bool,
) -> io::Result<CopyStats> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut value = vec![0u8; value_size.max(1) as usize];
    let mut stats = CopyStats::default();
    let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
    let mut first = true;
    // A key deleted under the iteration restarts a hash map's walk from its first key: bound
    // the walk (entries seen twice are merely written twice).
    for _ in 0..(u64::from(from_capacity) * 2 + 16) {
        let key_addr = if first { 0 } else { key.as_ptr() as u64 };
        let mut attr = elem_attr(from, key_addr, next.as_mut_ptr() as u64, 0);
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(stats),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        let mut attr = elem_attr(from, key.as_ptr() as u64, value.as_mut_ptr() as u64, 0);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        let mut attr = elem_attr(to, key.as_ptr() as u64, value.as_ptr() as u64, flags);
        match sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(_) => stats.copied += 1,
            Err(e) if only_missing && e.raw_os_error() == Some(libc::EEXIST) => stats.kept += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(stats)
}

/// Pins `map` at `pin` in place of what is pinned there: pinned under a temporary name first,
/// then renamed over the old pin, so `pin` always names a map.
pub(super) fn pin_in_place(map: BorrowedFd<'_>, pin: &Path) -> anyhow::Result<()> {
    let temporary = temporary_pin(pin)?;
    // A leftover of an agent that stopped between the two steps.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", temporary.display())),
    }
    let owned = map
        .try_clone_to_owned()
        .context("duplicating the map's descriptor")?;
    aya::maps::MapData::from_fd(owned)
        .context("opening the new map")?
        .pin(&temporary)
        .with_context(|| format!("pinning the new map at {}", temporary.display()))?;
    fs::rename(&temporary, pin)
        .with_context(|| format!("renaming {} over {}", temporary.display(), pin.display()))?;
    Ok(())
}

/// Where [`pin_in_place`] pins a new map before renaming it over `pin`. (bpffs refuses names
/// with a dot.)
pub(super) fn temporary_pin(pin: &Path) -> anyhow::Result<PathBuf> {
    let name = pin
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", pin.display()))?;
    Ok(pin.with_file_name(format!("resizing-{name}")))
}

/// The kernel memory a map is charged (`memlock` of its fdinfo), in bytes.
pub fn memlock_bytes(map: BorrowedFd<'_>) -> Option<u64> {
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd())).ok()?;
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether an error of a map update says the map is full (`E2BIG`, as hash maps answer).
pub(super) fn is_map_full(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
        if matches!(io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

/// A map update's error, saying so plainly when the map is full: `map` has `capacity` entries,
/// all in use, and `flag` (if any) raises it. LPM tries answer `ENOSPC`.
pub(super) fn update_error(
    error: aya::maps::MapError,
    map: &str,
    capacity: Option<u32>,
    flag: Option<&str>,
) -> anyhow::Error {
    let full = is_map_full(&error);
    let error = anyhow::Error::new(error);
    if !full {
        return error;
    }
    let capacity = capacity.map_or_else(String::new, |n| format!(" (all {n} entries in use)"));
    let raise = flag.map_or_else(String::new, |flag| format!("; {flag} raises its size"));
    error.context(format!("the `{map}` map is full{capacity}{raise}"))
}

/// The capacity of the kernel map behind a typed aya map.
pub(super) fn capacity_of<K: aya::Pod, V>(map: &impl aya::maps::IterableMap<K, V>) -> Option<u32> {
    map.map().info().ok().map(|info| info.max_entries())
}

impl Resized {
    pub(super) fn describe(&self) -> String {
        format!(
            "map `{}` ({} -> {} entries)",
            self.name, self.old_capacity, self.new_capacity
        )
    }

    pub(super) fn old_map(&self) -> BorrowedFd<'_> {
        self.old.as_fd()
    }

    pub(super) fn new_map(&self) -> BorrowedFd<'_> {
        self.new.as_fd()
    }
}
