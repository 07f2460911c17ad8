//! `sluice state`: the running agent's pinned maps as tables, in the spirit of
//! `cilium bpf lb list` and `cilium bpf ct list`.
//!
//! The command opens the maps pinned under the pin directory read-only (`BPF_OBJ_GET` with
//! `BPF_F_RDONLY`): it loads no program, writes no map and works whether or not an agent is
//! running, as long as the datapath is pinned.
//!
//! Reading ([`read_pinned`]) is kept apart from the pure part that joins and formats the
//! entries ([`services_view`], [`conntrack_view`], [`render_services`], [`render_conntrack`],
//! [`to_json`]), which is unit-tested on given entries.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    ffi::CString,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray},
    Pod,
};
use serde_json::{json, Value};
use sluice_common::{
    policy6_prefix_len, policy_prefix_len, reason_name, Backend, Backend6, BackendKey, CtKey,
    CtKey6, CtValue, CtValue6, PolicyKey, PolicyKey6, PolicyValue, Reason, ServiceKey, ServiceKey6,
    ServiceValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, DEFAULT_PIN_PATH, ISOLATED_EGRESS,
    ISOLATED_INGRESS, MAP_BACKENDS, MAP_BACKENDS6, MAP_CONNTRACK, MAP_CONNTRACK6, MAP_CT_ANSWERED,
    MAP_CT_ANSWERED6, MAP_DROPS, MAP_ISOLATED, MAP_ISOLATED6, MAP_POLICY, MAP_POLICY6,
    MAP_SERVICES, MAP_SERVICES6, REASON_LAST, WAY_INGRESS,
};

use crate::{
    datapath::{sync6, wire},
    state::{BackendAddr, Frontend, Protocol},
};

/// Arguments of `sluice state`.
#[derive(clap::Args, Debug)]
pub struct StateArgs {
    /// Directory (on bpffs) where the agent pinned its maps.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Show only this table (default: both).
    #[arg(value_enum)]
    pub table: Option<Table>,
}

/// What `sluice state` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Service frontends with their backend slots (`services` and `backends` maps).
    Services,
    /// Translated flows (`conntrack` map).
    Conntrack,
    /// Packets the programs dropped or answered themselves, by reason (`drops` map).
    Drops,
    /// NetworkPolicy: isolated pods and what their entries allow (`isolated`, `policy`,
    /// `isolated6`, `policy6`).
    Policy,
    /// Every pinned map's capacity and kernel memory (only shown when asked for).
    Maps,
}

pub fn run(args: StateArgs) -> ExitCode {
    if args.table == Some(Table::Maps) {
        return print(read_map_sizes(&args.pin_path).map(|maps| {
            if args.json {
                let rows: Vec<Value> = maps
                    .iter()
                    .map(|m| {
                        json!({
                            "name": m.name,
                            "type": m.map_type,
                            "max_entries": m.max_entries,
                            "memlock_bytes": m.memlock_bytes,
                        })
                    })
                    .collect();
                let mut text = serde_json::to_string_pretty(&json!({ "maps": rows }))
                    .expect("a JSON value serialises");
                text.push('\n');
                text
            } else {
                render_map_sizes(&maps)
            }
        }));
    }
    let output = read_pinned(&args.pin_path, args.table).map(|snapshot| {
        // IPv4 frontends and flows first, then IPv6 ones.
        let services = wants(args.table, Table::Services).then(|| {
            let mut views = services_view(&snapshot.services, &snapshot.backends);
            views.extend(services6_view(&snapshot.services6, &snapshot.backends6));
            views
        });
        let flows = wants(args.table, Table::Conntrack).then(|| {
            let mut flows = conntrack_view(&snapshot.conntrack, snapshot.now_ns);
            flows.extend(conntrack6_view(&snapshot.conntrack6, snapshot.now_ns));
            flows
        });
        let drops = wants(args.table, Table::Drops).then_some(&snapshot.drops);
        let policy = wants(args.table, Table::Policy).then(|| policy_view(&snapshot));
        if args.json {
            let mut json = to_json(services.as_deref(), flows.as_deref());
            add_policy_json(&mut json, drops, policy.as_deref());
            let mut text = serde_json::to_string_pretty(&json).expect("a JSON value serialises");
            text.push('\n');
            text
        } else {
            let mut text = String::new();
            if let Some(services) = &services {
                text.push_str(&render_services(services));
            }
            if let Some(flows) = &flows {
                if services.is_some() {
                    text.push('\n');
                }
                text.push_str(&render_conntrack(flows));
            }
            if let Some(drops) = drops {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&render_drops(drops));
            }
            if let Some(policy) = &policy {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&render_policy(policy));
            }
            text
        }
    });
    print(output)
}

fn print(output: anyhow::Result<String>) -> ExitCode {
    match output {
        Ok(text) => {
            match io::stdout().lock().write_all(text.as_bytes()) {
                // `sluice state | head` is not an error.
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    eprintln!("sluice state: writing the output: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("sluice state: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn wants(selected: Option<Table>, table: Table) -> bool {
    match selected {
        // The maps' sizes are for whoever asks; the default shows the content.
        None => table != Table::Maps,
        Some(selected) => selected == table,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the pinned maps.

/// The raw content of the pinned maps, and the time it was read at.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(BackendKey, Backend)>,
    pub conntrack: Vec<(CtKey, CtValue)>,
    /// The IPv6 maps (empty when the pin directory has none: an older agent's).
    pub services6: Vec<(ServiceKey6, ServiceValue)>,
    pub backends6: Vec<(BackendKey, Backend6)>,
    pub conntrack6: Vec<(CtKey6, CtValue6)>,
    /// Packets by drop reason, summed over the CPUs (every reason, zeroes included).
    pub drops: BTreeMap<Reason, u64>,
    /// `isolated`: pod (as the maps hold it) -> `ISOLATED_*` bits.
    pub isolated: Vec<(u32, u8)>,
    /// `policy`: (key, peer prefix bits) -> allowed ports.
    pub policy: Vec<((PolicyKey, u32), PolicyValue)>,
    /// `isolated6` and `policy6`: the same for IPv6 pods.
    pub isolated6: Vec<([u32; 4], u8)>,
    pub policy6: Vec<((PolicyKey6, u32), PolicyValue)>,
    /// `CLOCK_MONOTONIC` (the clock of `bpf_ktime_get_ns`) when the maps were read.
    pub now_ns: u64,
}

/// Reads the maps pinned under `pin_path` without modifying anything. `only` restricts what is
/// read; every map is opened regardless, so a partial or foreign pin directory is reported.
pub fn read_pinned(pin_path: &Path, only: Option<Table>) -> anyhow::Result<Snapshot> {
    let not_pinned = || {
        format!(
            "no Sluice datapath pinned at {}: is the agent running?",
            pin_path.display()
        )
    };
    if !pin_path.is_dir() {
        bail!(not_pinned());
    }
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        open_read_only(pin_path, MAP_SERVICES).with_context(not_pinned)?;
    let backends: HashMap<MapData, BackendKey, Backend> =
        open_read_only(pin_path, MAP_BACKENDS).with_context(not_pinned)?;
    let conntrack: HashMap<MapData, CtKey, CtValue> =
        open_read_only(pin_path, MAP_CONNTRACK).with_context(not_pinned)?;

    let mut snapshot = Snapshot::default();
    if wants(only, Table::Services) {
        snapshot.services = read_all(&services, pin_path, MAP_SERVICES)?;
        snapshot.backends = read_all(&backends, pin_path, MAP_BACKENDS)?;
    }
    if wants(only, Table::Conntrack) {
        snapshot.conntrack =
            read_flow_tables(&conntrack, pin_path, MAP_CT_ANSWERED, MAP_CONNTRACK)?;
    }
    // The IPv6 maps, when pinned (an agent from before IPv6 support has none).
    if pin_path.join(MAP_SERVICES6).exists() {
        let services6: HashMap<MapData, ServiceKey6, ServiceValue> =
            open_read_only(pin_path, MAP_SERVICES6)?;
        let backends6: HashMap<MapData, BackendKey, Backend6> =
            open_read_only(pin_path, MAP_BACKENDS6)?;
        let conntrack6: HashMap<MapData, CtKey6, CtValue6> =
            open_read_only(pin_path, MAP_CONNTRACK6)?;
        if wants(only, Table::Services) {
            snapshot.services6 = read_all(&services6, pin_path, MAP_SERVICES6)?;
            snapshot.backends6 = read_all(&backends6, pin_path, MAP_BACKENDS6)?;
        }
        if wants(only, Table::Conntrack) {
            snapshot.conntrack6 =
                read_flow_tables(&conntrack6, pin_path, MAP_CT_ANSWERED6, MAP_CONNTRACK6)?;
        }
    }
    // The drops and NetworkPolicy maps, when pinned (an agent from before policy has none).
    if wants(only, Table::Drops) && pin_path.join(MAP_DROPS).exists() {
        let drops: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open_map_read_only(pin_path, MAP_DROPS)?).with_context(|| {
                format!(
                    "{}: not Sluice's drops map",
                    pin_path.join(MAP_DROPS).display()
                )
            })?;
        // A drops map pinned by an older agent may have fewer reasons.
        for reason in 1..=REASON_LAST.min(drops.len().saturating_sub(1)) {
            let per_cpu = drops
                .get(&reason, 0)
                .with_context(|| format!("reading {}", pin_path.join(MAP_DROPS).display()))?;
            snapshot.drops.insert(reason, per_cpu.iter().sum());
        }
    }
    if wants(only, Table::Policy) && pin_path.join(MAP_POLICY).exists() {
        let isolated: HashMap<MapData, u32, u8> = open_read_only(pin_path, MAP_ISOLATED)?;
        snapshot.isolated = read_all(&isolated, pin_path, MAP_ISOLATED)?;
        snapshot.policy = read_policy(pin_path, MAP_POLICY, policy_prefix_len(0))?;
    }
    if wants(only, Table::Policy) && pin_path.join(MAP_POLICY6).exists() {
        let isolated6: HashMap<MapData, [u32; 4], u8> = open_read_only(pin_path, MAP_ISOLATED6)?;
        snapshot.isolated6 = read_all(&isolated6, pin_path, MAP_ISOLATED6)?;
        snapshot.policy6 = read_policy(pin_path, MAP_POLICY6, policy6_prefix_len(0))?;
    }
    // After reading: an entry created meanwhile does not get a negative age.
    snapshot.now_ns = monotonic_now_ns()?;
    Ok(snapshot)
}

/// A pinned map's size (`sluice state maps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizeRow {
    pub name: String,
    pub map_type: String,
    pub max_entries: u32,
    /// Kernel memory charged to the map (`memlock` of its fdinfo).
    pub memlock_bytes: Option<u64>,
}

/// The size of every map pinned in `pin_path`, by name.
pub fn read_map_sizes(pin_path: &Path) -> anyhow::Result<Vec<MapSizeRow>> {
    if !pin_path.is_dir() {
        bail!(
            "no Sluice datapath pinned at {}: is the agent running?",
            pin_path.display()
        );
    }
    let mut rows = Vec::new();
    for entry in
        std::fs::read_dir(pin_path).with_context(|| format!("listing {}", pin_path.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", pin_path.display()))?;
        // The link directories.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let fd = bpf_obj_get_read_only(&path)
            .with_context(|| format!("opening {} as a pinned BPF map", path.display()))?;
        let memlock_bytes = crate::datapath::resize::memlock_bytes(std::os::fd::AsFd::as_fd(&fd));
        let data =
            MapData::from_fd(fd).with_context(|| format!("inspecting {}", path.display()))?;
        let info = data
            .info()
            .with_context(|| format!("inspecting {}", path.display()))?;
        rows.push(MapSizeRow {
            name,
            map_type: info
                .map_type()
                .map_or_else(|_| "unknown".into(), |t| format!("{t:?}")),
            max_entries: info.max_entries(),
            memlock_bytes,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// The `maps` table: name, type, capacity, memory (MiB).
pub fn render_map_sizes(maps: &[MapSizeRow]) -> String {
    let rows: Vec<Vec<String>> = maps
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.map_type.clone(),
                m.max_entries.to_string(),
                m.memlock_bytes
                    .map_or_else(|| "?".into(), |b| format!("{:.1}", b as f64 / MIB)),
            ]
        })
        .collect();
    let total: u64 = maps.iter().filter_map(|m| m.memlock_bytes).sum();
    let mut text = render_table(&["MAP", "TYPE", "MAX ENTRIES", "MEMORY MiB"], &rows);
    text.push_str(&format!(
        "{} {}, {:.1} MiB of kernel memory\n",
        maps.len(),
        plural(maps.len(), "map", "maps"),
        total as f64 / MIB
    ));
    text
}

const MIB: f64 = 1024.0 * 1024.0;

/// Every entry of a map. The agent and the programs keep writing while it is read, so a key
/// may be visited twice (the kernel restarts a walk whose current key was deleted); the last
/// value read wins.
/// A flow table's entries (datapath/flow_tables.rs): the answered map's pinned as
/// `answered` (an agent from before it has none), then those of `unanswered`, the LRU
/// pinned as `unanswered_name`.
fn read_flow_tables<K: Pod + Eq + std::hash::Hash, V: Pod>(
    unanswered: &HashMap<MapData, K, V>,
    pin_path: &Path,
    answered: &str,
    unanswered_name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    if pin_path.join(answered).exists() {
        let map: HashMap<MapData, K, V> = open_read_only(pin_path, answered)?;
        entries = read_all(&map, pin_path, answered)?;
    }
    entries.extend(read_all(unanswered, pin_path, unanswered_name)?);
    Ok(entries)
}

fn read_all<K, V>(
    map: &HashMap<MapData, K, V>,
    pin_path: &Path,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>>
where
    K: Pod + Eq + std::hash::Hash,
    V: Pod,
{
    let mut entries: Vec<(K, V)> = Vec::new();
    let mut index: StdHashMap<K, usize> = StdHashMap::new();
    for entry in map.iter() {
        let (key, value) =
            entry.with_context(|| format!("reading {}", pin_path.join(name).display()))?;
        match index.get(&key) {
            Some(&i) => entries[i].1 = value,
            None => {
                index.insert(key, entries.len());
                entries.push((key, value));
            }
        }
    }
    Ok(entries)
}

/// Opens the map pinned at `<pin_path>/<name>` read-only. The error's root cause says what is
/// wrong; the caller adds the context.
/// Every entry of a pinned policy trie (`policy` or `policy6`), with its peer prefix length:
/// the key's prefix length past `fixed_len`, the bits of the fixed fields.
fn read_policy<K: Pod>(
    pin_path: &Path,
    name: &str,
    fixed_len: u32,
) -> anyhow::Result<Vec<((K, u32), PolicyValue)>> {
    let path = pin_path.join(name);
    let trie: LpmTrie<MapData, K, PolicyValue> =
        LpmTrie::try_from(open_map_read_only(pin_path, name)?)
            .with_context(|| format!("{}: not Sluice's {name} map", path.display()))?;
    let mut entries = Vec::new();
    for item in trie.iter() {
        let (key, value) = item.with_context(|| format!("reading {}", path.display()))?;
        if let Some(bits) = key.prefix_len().checked_sub(fixed_len) {
            entries.push(((key.data(), bits), value));
        }
    }
    Ok(entries)
}

fn open_read_only<K: Pod, V: Pod>(
    pin_path: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let path = pin_path.join(name);
    let map = open_map_read_only(pin_path, name)?;
    if !matches!(map, Map::HashMap(_) | Map::LruHashMap(_)) {
        bail!("{} is not a hash map: not a Sluice map", path.display());
    }
    HashMap::try_from(map).with_context(|| {
        format!(
            "{}: its key or value size is not the one this Sluice version expects (pinned by \
             another version?)",
            path.display()
        )
    })
}

/// Opens the map pinned at `<pin_path>/<name>` read-only, whatever its type.
fn open_map_read_only(pin_path: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_path.join(name);
    let fd = match bpf_obj_get_read_only(&path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("{} does not exist", path.display())
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(e).with_context(|| {
                format!(
                    "opening {} (reading BPF maps needs root or CAP_BPF)",
                    path.display()
                )
            })
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening {} as a pinned BPF map", path.display()))
        }
    };
    let data = MapData::from_fd(fd).with_context(|| format!("inspecting {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("inspecting {}", path.display()))
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`: a file descriptor that can look up and walk the map but
/// not update or delete. (aya's `MapData::from_pin` asks for a read-write descriptor.)
fn bpf_obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    /// The `BPF_OBJ_*` member of `union bpf_attr`.
    #[repr(C)]
    struct BpfObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;

    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = BpfObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: attr is a valid, fully initialised BPF_OBJ_GET attribute whose pathname points to
    // a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const BpfObjAttr,
            std::mem::size_of::<BpfObjAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `CLOCK_MONOTONIC`, the clock `bpf_ktime_get_ns` reads, in nanoseconds.
fn monotonic_now_ns() -> anyhow::Result<u64> {
    // SAFETY: timespec is plain data; zeroed is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(io::Error::last_os_error()).context("clock_gettime(CLOCK_MONOTONIC)");
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

// ---------------------------------------------------------------------------------------------
// Joining and formatting (pure).

/// One programmed frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    /// The frontend: address (either family), port, protocol number.
    pub ip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// The pods' entry of an externalTrafficPolicy Local frontend (`SCOPE_POD`: the
    /// cluster-wide backends traffic from pods uses).
    pub from_pods: bool,
    /// The id in its family's maps (IPv4 and IPv6 frontends have separate id spaces).
    pub id: u32,
    pub backend_count: u32,
    /// Slots `0..backend_count` in order.
    pub slots: Vec<SlotView>,
}

/// One backend slot of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    pub slot: u32,
    /// `None` when the slot is missing from `backends` (the datapath then falls back to slot 0).
    pub backend: Option<BackendAddr>,
}

impl ServiceView {
    /// `ip:port/PROTO`, `[ip6]:port/PROTO`, followed by ` (from pods)` for a frontend's pods'
    /// entry.
    pub fn frontend(&self) -> String {
        let frontend = self.address();
        if self.from_pods {
            format!("{frontend} (from pods)")
        } else {
            frontend
        }
    }

    fn address(&self) -> String {
        match Protocol::from_number(self.proto) {
            Some(proto) => Frontend {
                ip: self.ip,
                port: self.port,
                proto,
            }
            .to_string(),
            None => format!(
                "{}/proto-{}",
                SocketAddr::new(self.ip, self.port),
                self.proto
            ),
        }
    }

    fn sort_key(&self) -> (IpAddr, u16, u8, bool) {
        (self.ip, self.port, self.proto, self.from_pods)
    }
}

/// The frontends in `services` with their slots from `backends`, sorted by frontend (address,
/// port, protocol).
pub fn services_view(
    services: &[(ServiceKey, ServiceValue)],
    backends: &[(BackendKey, Backend)],
) -> Vec<ServiceView> {
    views_of(
        services,
        backends,
        |key| {
            (
                wire::addr_from_map(key.addr).into(),
                key.port,
                key.proto,
                key.scope == sluice_common::SCOPE_POD,
            )
        },
        wire::backend_addr,
    )
}

/// [`services_view`] of the IPv6 maps (`services6`, `backends6`).
pub fn services6_view(
    services: &[(ServiceKey6, ServiceValue)],
    backends: &[(BackendKey, Backend6)],
) -> Vec<ServiceView> {
    views_of(
        services,
        backends,
        |key| {
            (
                sync6::addr6_from_map(key.addr).into(),
                key.port,
                key.proto,
                key.scope == sluice_common::SCOPE_POD,
            )
        },
        sync6::backend6_addr,
    )
}

/// Either family's maps as views: `frontend` gives a key's (address, port in network byte
/// order, protocol, whether it is a pods' entry), `backend` a slot's address.
fn views_of<K, B>(
    services: &[(K, ServiceValue)],
    backends: &[(BackendKey, B)],
    frontend: impl Fn(&K) -> (IpAddr, u16, u8, bool),
    backend: impl Fn(&B) -> crate::state::BackendAddr,
) -> Vec<ServiceView> {
    let slots: BTreeMap<(u32, u32), &B> = backends
        .iter()
        .map(|(key, b)| ((key.service_id, key.slot), b))
        .collect();
    let mut views: Vec<ServiceView> = services
        .iter()
        .map(|(key, value)| {
            let (ip, port, proto, from_pods) = frontend(key);
            ServiceView {
                ip,
                port: wire::port_from_map(port),
                proto,
                from_pods,
                id: value.id,
                backend_count: value.backend_count,
                slots: (0..value.backend_count)
                    .map(|slot| SlotView {
                        slot,
                        backend: slots.get(&(value.id, slot)).map(|b| backend(b)),
                    })
                    .collect(),
            }
        })
        .collect();
    views.sort_by_key(ServiceView::sort_key);
    views
}

/// Which conntrack entries of a flow exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEntries {
    /// The forward entry and the reply entry that reverses it.
    Both,
    /// A forward entry whose reply entry is gone (evicted by the LRU or overwritten).
    ForwardOnly,
    /// A reply entry no forward entry leads to: the client reused its port for a flow to
    /// another backend, or the forward entry was evicted.
    OrphanReply,
}

impl FlowEntries {
    fn label(self) -> &'static str {
        match self {
            FlowEntries::Both => "forward+reply",
            FlowEntries::ForwardOnly => "forward only",
            FlowEntries::OrphanReply => "orphan reply",
        }
    }
}

/// One translated flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    pub proto: u8,
    /// The client's own address (source of the forward direction).
    pub client: SocketAddr,
    /// The service address the client dialled.
    pub service: SocketAddr,
    /// The backend the flow is translated to.
    pub backend: SocketAddr,
    /// The source the flow is masqueraded to (SNAT), if it is.
    pub masquerade: Option<SocketAddr>,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the flow was balanced.
    pub created_ns: u64,
    /// Time from `created_ns` to when the map was read.
    pub age: Duration,
    /// The flow's `CT_S_*` bits ([`state_name`] names them).
    pub state: u8,
    /// Time since the flow's last packet (within a second, `CT_REFRESH_NS`); `None` for an
    /// entry the programs do not track (IPv6 today).
    pub idle: Option<Duration>,
    pub entries: FlowEntries,
}

/// The conntrack state of a flow of protocol `proto`, as nf_conntrack would name it: TCP
/// `syn-sent`, `established`, `closing` (FIN from one side), `closed` (FIN from both),
/// `reset`; UDP and SCTP `unreplied`, `replied`; `-` for an untracked entry.
pub fn state_name(proto: u8, state: u8, tracked: bool) -> &'static str {
    use sluice_common::{
        ct_closed, CT_S_FIN_BACKEND, CT_S_FIN_CLIENT, CT_S_RST, CT_S_SEEN_REPLY, PROTO_TCP,
    };
    if !tracked {
        return "-";
    }
    match proto {
        PROTO_TCP if state & CT_S_RST != 0 => "reset",
        PROTO_TCP if ct_closed(state) => "closed",
        PROTO_TCP if state & (CT_S_FIN_CLIENT | CT_S_FIN_BACKEND) != 0 => "closing",
        PROTO_TCP if state & CT_S_SEEN_REPLY != 0 => "established",
        PROTO_TCP => "syn-sent",
        _ if state & CT_S_SEEN_REPLY != 0 => "replied",
        _ => "unreplied",
    }
}

/// A conntrack key of either family, addresses as host values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AnyCtKey {
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    dir: u8,
}

/// A conntrack value of either family.
#[derive(Clone, Copy, Debug)]
struct AnyCtValue {
    nat_addr: IpAddr,
    nat_port: u16,
    flags: u16,
    snat_addr: IpAddr,
    snat_port: u16,
    service_id: u32,
    created_ns: u64,
    state: u8,
    /// 0: not tracked.
    last_seen_ns: u64,
}

fn sock(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

/// Joins the conntrack entries into flows: each forward entry with the reply entry that
/// reverses it, then the reply entries left over as orphans. Entries with an unknown direction
/// are left out. Sorted by protocol, client, service.
pub fn conntrack_view(entries: &[(CtKey, CtValue)], now_ns: u64) -> Vec<FlowView> {
    let v4 = |a: u32| IpAddr::V4(wire::addr_from_map(a));
    let p = wire::port_from_map;
    let entries: Vec<(AnyCtKey, AnyCtValue)> = entries
        .iter()
        .map(|(k, v)| {
            (
                AnyCtKey {
                    saddr: v4(k.saddr),
                    daddr: v4(k.daddr),
                    sport: p(k.sport),
                    dport: p(k.dport),
                    proto: k.proto,
                    dir: k.dir,
                },
                AnyCtValue {
                    nat_addr: v4(v.nat_addr),
                    nat_port: p(v.nat_port),
                    flags: v.flags,
                    snat_addr: v4(v.snat_addr),
                    snat_port: p(v.snat_port),
                    service_id: v.service_id,
                    created_ns: v.created_ns,
                    state: v.state,
                    last_seen_ns: v.last_seen_ns,
                },
            )
        })
        .collect();
    join_flows(&entries, now_ns)
}

/// [`conntrack_view`] of the `conntrack6` map.
pub fn conntrack6_view(entries: &[(CtKey6, CtValue6)], now_ns: u64) -> Vec<FlowView> {
    let v6 = |a: [u32; 4]| IpAddr::V6(sync6::addr6_from_map(a));
    let p = wire::port_from_map;
    let entries: Vec<(AnyCtKey, AnyCtValue)> = entries
        .iter()
        .map(|(k, v)| {
            (
                AnyCtKey {
                    saddr: v6(k.saddr),
                    daddr: v6(k.daddr),
                    sport: p(k.sport),
                    dport: p(k.dport),
                    proto: k.proto,
                    dir: k.dir,
                },
                AnyCtValue {
                    nat_addr: v6(v.nat_addr),
                    nat_port: p(v.nat_port),
                    flags: v.flags,
                    snat_addr: v6(v.snat_addr),
                    snat_port: p(v.snat_port),
                    service_id: v.service_id,
                    created_ns: v.created_ns,
                    state: v.state,
                    last_seen_ns: v.last_seen_ns,
                },
            )
        })
        .collect();
    join_flows(&entries, now_ns)
}

fn join_flows(entries: &[(AnyCtKey, AnyCtValue)], now_ns: u64) -> Vec<FlowView> {
    let replies: StdHashMap<AnyCtKey, AnyCtValue> = entries
        .iter()
        .filter(|(key, _)| key.dir == CT_DIR_REPLY)
        .copied()
        .collect();
    let mut joined: Vec<AnyCtKey> = Vec::new();
    let age = |created_ns: u64| Duration::from_nanos(now_ns.saturating_sub(created_ns));
    let idle = |last_seen_ns: u64| (last_seen_ns != 0).then(|| age(last_seen_ns));
    let mut flows: Vec<FlowView> = Vec::new();
    for (key, value) in entries.iter().filter(|(key, _)| key.dir == CT_DIR_FORWARD) {
        // What `conntrack::create` in the programs writes next to this forward entry: the
        // backend answers the client, or the masquerade address.
        let masquerade =
            (value.flags & CT_F_SNAT != 0).then(|| sock(value.snat_addr, value.snat_port));
        let (reply_daddr, reply_dport) = match masquerade {
            Some(_) => (value.snat_addr, value.snat_port),
            None => (key.saddr, key.sport),
        };
        let reply_key = AnyCtKey {
            saddr: value.nat_addr,
            daddr: reply_daddr,
            sport: value.nat_port,
            dport: reply_dport,
            proto: key.proto,
            dir: CT_DIR_REPLY,
        };
        let reverses = replies.get(&reply_key).is_some_and(|reply| {
            reply.nat_addr == key.daddr
                && reply.nat_port == key.dport
                && reply.service_id == value.service_id
        });
        if reverses {
            joined.push(reply_key);
        }
        flows.push(FlowView {
            proto: key.proto,
            client: sock(key.saddr, key.sport),
            service: sock(key.daddr, key.dport),
            backend: sock(value.nat_addr, value.nat_port),
            masquerade,
            service_id: value.service_id,
            created_ns: value.created_ns,
            age: age(value.created_ns),
            state: value.state,
            idle: idle(value.last_seen_ns),
            entries: if reverses {
                FlowEntries::Both
            } else {
                FlowEntries::ForwardOnly
            },
        });
    }
    for (key, value) in &replies {
        if joined.contains(key) {
            continue;
        }
        let masqueraded = value.flags & CT_F_SNAT != 0;
        flows.push(FlowView {
            proto: key.proto,
            client: if masqueraded {
                sock(value.snat_addr, value.snat_port)
            } else {
                sock(key.daddr, key.dport)
            },
            service: sock(value.nat_addr, value.nat_port),
            backend: sock(key.saddr, key.sport),
            masquerade: masqueraded.then(|| sock(key.daddr, key.dport)),
            service_id: value.service_id,
            created_ns: value.created_ns,
            age: age(value.created_ns),
            state: value.state,
            idle: idle(value.last_seen_ns),
            entries: FlowEntries::OrphanReply,
        });
    }
    flows.sort_by_key(|f| {
        (
            f.proto,
            f.client.ip(),
            f.client.port(),
            f.service.ip(),
            f.service.port(),
            f.entries != FlowEntries::Both,
            f.backend.ip(),
            f.backend.port(),
        )
    });
    flows
}

/// `TCP`, `UDP`, `SCTP` or `proto-<n>`.
pub fn proto_name(proto: u8) -> String {
    match Protocol::from_number(proto) {
        Some(p) => p.to_string(),
        None => format!("proto-{proto}"),
    }
}

/// A duration as `42s`, `3m05s`, `2h07m` or `4d03h`.
pub fn format_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Left-aligned columns two spaces apart, no trailing spaces.
fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The services table: one row per backend slot, the frontend on its first row, like
/// `cilium bpf lb list`. Ends with a summary line.
pub fn render_services(services: &[ServiceView]) -> String {
    let mut rows = Vec::new();
    for service in services {
        let first = [
            service.frontend(),
            service.id.to_string(),
            service.backend_count.to_string(),
        ];
        if service.slots.is_empty() {
            let mut row = first.to_vec();
            row.extend(["-".to_string(), "(no backends)".to_string()]);
            rows.push(row);
            continue;
        }
        for (i, slot) in service.slots.iter().enumerate() {
            let mut row = if i == 0 {
                first.to_vec()
            } else {
                vec![String::new(); 3]
            };
            row.push(slot.slot.to_string());
            row.push(match slot.backend {
                Some(backend) => backend.to_string(),
                None => "(missing slot)".to_string(),
            });
            rows.push(row);
        }
    }
    let mut out = render_table(
        &["FRONTEND", "SERVICE ID", "BACKENDS", "SLOT", "BACKEND"],
        &rows,
    );
    let slots: usize = services.iter().map(|s| s.slots.len()).sum();
    let empty = services.iter().filter(|s| s.slots.is_empty()).count();
    out.push_str(&format!(
        "{} {}, {slots} backend {}, {empty} without backends\n",
        services.len(),
        plural(services.len(), "frontend", "frontends"),
        plural(slots, "slot", "slots"),
    ));
    out
}

/// The conntrack table: one row per flow, like `cilium bpf ct list`. Ends with the counts.
pub fn render_conntrack(flows: &[FlowView]) -> String {
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            vec![
                proto_name(f.proto),
                match f.masquerade {
                    Some(snat) => format!("{} (as {snat})", f.client),
                    None => f.client.to_string(),
                },
                f.service.to_string(),
                f.backend.to_string(),
                f.service_id.to_string(),
                format_age(f.age),
                state_name(f.proto, f.state, f.idle.is_some()).to_string(),
                f.idle.map_or_else(|| "-".to_string(), format_age),
                f.entries.label().to_string(),
            ]
        })
        .collect();
    let mut out = render_table(
        &[
            "PROTO",
            "CLIENT",
            "SERVICE",
            "BACKEND",
            "SERVICE ID",
            "AGE",
            "STATE",
            "IDLE",
            "ENTRIES",
        ],
        &rows,
    );
    let count = |kind| flows.iter().filter(|f| f.entries == kind).count();
    let (both, forward, orphan) = (
        count(FlowEntries::Both),
        count(FlowEntries::ForwardOnly),
        count(FlowEntries::OrphanReply),
    );
    out.push_str(&format!(
        "{} {} ({both} forward+reply, {forward} forward only, {orphan} orphan {}), {} conntrack \
         {}\n",
        flows.len(),
        plural(flows.len(), "flow", "flows"),
        plural(orphan, "reply", "replies"),
        2 * both + forward + orphan,
        plural(2 * both + forward + orphan, "entry", "entries"),
    ));
    out
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// One row of the policy table: a pod's direction and one peer prefix it allows (`peer`
/// `None`: the pod is isolated in that direction and allows nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub pod: std::net::IpAddr,
    pub direction: &'static str,
    pub proto: u8,
    pub peer: Option<ipnet::IpNet>,
    pub ports: Vec<String>,
}

/// The `isolated`/`policy` and `isolated6`/`policy6` entries as rows, sorted by pod,
/// direction, peer.
pub fn policy_view(snapshot: &Snapshot) -> Vec<PolicyRow> {
    use std::net::IpAddr;
    let mut rows = Vec::new();
    let way_name = |way: u8| {
        if way == WAY_INGRESS {
            "ingress"
        } else {
            "egress"
        }
    };
    let ports = |value: &PolicyValue| {
        let count = (value.count as usize).min(value.ranges.len());
        value.ranges[..count]
            .iter()
            .map(|r| match (r.first, r.last) {
                (0, u16::MAX) => "*".to_string(),
                (a, b) if a == b => a.to_string(),
                (a, b) => format!("{a}-{b}"),
            })
            .collect()
    };
    for ((key, bits), value) in &snapshot.policy {
        let peer = ipnet::Ipv4Net::new(wire::addr_from_map(key.peer), (*bits).min(32) as u8)
            .expect("a prefix length of at most 32");
        rows.push(PolicyRow {
            pod: IpAddr::V4(wire::addr_from_map(key.pod)),
            direction: way_name(key.way),
            proto: key.proto,
            peer: Some(peer.into()),
            ports: ports(value),
        });
    }
    for ((key, bits), value) in &snapshot.policy6 {
        let peer = ipnet::Ipv6Net::new(sync6::addr6_from_map(key.peer), (*bits).min(128) as u8)
            .expect("a prefix length of at most 128");
        rows.push(PolicyRow {
            pod: IpAddr::V6(sync6::addr6_from_map(key.pod)),
            direction: way_name(key.way),
            proto: key.proto,
            peer: Some(peer.into()),
            ports: ports(value),
        });
    }
    let isolated = snapshot
        .isolated
        .iter()
        .map(|(pod, bits)| (IpAddr::V4(wire::addr_from_map(*pod)), bits))
        .chain(
            snapshot
                .isolated6
                .iter()
                .map(|(pod, bits)| (IpAddr::V6(sync6::addr6_from_map(*pod)), bits)),
        );
    for (pod, bits) in isolated {
        for (bit, direction) in [(ISOLATED_INGRESS, "ingress"), (ISOLATED_EGRESS, "egress")] {
            if bits & bit != 0
                && !rows
                    .iter()
                    .any(|r| r.pod == pod && r.direction == direction)
            {
                rows.push(PolicyRow {
                    pod,
                    direction,
                    proto: 0,
                    peer: None,
                    ports: Vec::new(),
                });
            }
        }
    }
    rows.sort_by_key(|r| (r.pod, r.direction, r.peer, r.proto));
    rows
}

/// The drops table: every reason and its packets.
pub fn render_drops(drops: &BTreeMap<Reason, u64>) -> String {
    let rows: Vec<Vec<String>> = drops
        .iter()
        .map(|(reason, n)| vec![reason_name(*reason).to_string(), n.to_string()])
        .collect();
    let total: u64 = drops.values().sum();
    let mut text = render_table(&["DROP REASON", "PACKETS"], &rows);
    text.push_str(&format!(
        "{total} {} dropped or answered\n",
        plural(total as usize, "packet", "packets")
    ));
    text
}

/// The policy table: one row per allowed peer prefix of each isolated pod and direction.
pub fn render_policy(rows: &[PolicyRow]) -> String {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.pod.to_string(),
                r.direction.to_string(),
                r.peer
                    .map_or("(nothing allowed)".to_string(), |p| p.to_string()),
                if r.peer.is_some() {
                    proto_name(r.proto)
                } else {
                    String::new()
                },
                r.ports.join(","),
            ]
        })
        .collect();
    let pods: std::collections::BTreeSet<_> = rows.iter().map(|r| r.pod).collect();
    let mut text = render_table(
        &["POLICY POD", "DIRECTION", "ALLOWED PEER", "PROTO", "PORTS"],
        &table,
    );
    text.push_str(&format!(
        "{} isolated {}\n",
        pods.len(),
        plural(pods.len(), "pod", "pods")
    ));
    text
}

/// Adds `"drops": {reason: packets}` and `"policy": [...]` to the JSON, when given.
pub fn add_policy_json(
    json: &mut Value,
    drops: Option<&BTreeMap<Reason, u64>>,
    policy: Option<&[PolicyRow]>,
) {
    let Some(out) = json.as_object_mut() else {
        return;
    };
    if let Some(drops) = drops {
        let drops: serde_json::Map<String, Value> = drops
            .iter()
            .map(|(reason, n)| (reason_name(*reason).to_string(), json!(n)))
            .collect();
        out.insert("drops".into(), Value::Object(drops));
    }
    if let Some(rows) = policy {
        let rows: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "pod": r.pod.to_string(),
                    "direction": r.direction,
                    "peer": r.peer.map(|p| p.to_string()),
                    "protocol": r.peer.map(|_| proto_name(r.proto)),
                    "ports": r.ports,
                })
            })
            .collect();
        out.insert("policy".into(), Value::Array(rows));
    }
}

/// `{"services": [...], "conntrack": [...]}`, each key only when its table is given.
pub fn to_json(services: Option<&[ServiceView]>, flows: Option<&[FlowView]>) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(services) = services {
        let services: Vec<Value> = services
            .iter()
            .map(|s| {
                json!({
                    "frontend": s.frontend(),
                    "ip": s.ip.to_string(),
                    "port": s.port,
                    "protocol": proto_name(s.proto),
                    "id": s.id,
                    "backend_count": s.backend_count,
                    "backends": s.slots.iter().map(|slot| json!({
                        "slot": slot.slot,
                        "address": slot.backend.map(|b| b.to_string()),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        out.insert("services".into(), Value::Array(services));
    }
    if let Some(flows) = flows {
        let flows: Vec<Value> = flows
            .iter()
            .map(|f| {
                json!({
                    "protocol": proto_name(f.proto),
                    "client": f.client.to_string(),
                    "service": f.service.to_string(),
                    "backend": f.backend.to_string(),
                    "masquerade": f.masquerade.map(|m| m.to_string()),
                    "service_id": f.service_id,
                    "created_ns": f.created_ns,
                    "age_seconds": f.age.as_secs(),
                    "state": state_name(f.proto, f.state, f.idle.is_some()),
                    "idle_seconds": f.idle.map(|d| d.as_secs()),
                    "forward": f.entries != FlowEntries::OrphanReply,
                    "reply": f.entries != FlowEntries::ForwardOnly,
                })
            })
            .collect();
        out.insert("conntrack".into(), Value::Array(flows));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use sluice_common::{PROTO_TCP, PROTO_UDP};

    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn frontend(ip: [u8; 4], port: u16, proto: Protocol) -> ServiceKey {
        wire::service_key(&Frontend {
            ip: Ipv4Addr::from(ip).into(),
            port,
            proto,
        })
        .unwrap()
    }

    fn backend(ip: [u8; 4], port: u16) -> Backend {
        wire::backend_value(&BackendAddr {
            ip: Ipv4Addr::from(ip).into(),
            port,
        })
        .unwrap()
    }

    fn service(id: u32, backend_count: u32) -> ServiceValue {
        ServiceValue {
            id,
            backend_count,
            flags: 0,
            kind: 0,
            _pad: 0,
            affinity_timeout: 0,
            affinity_id: 0,
            inline_backends: [sluice_common::Backend::NONE; sluice_common::INLINE_BACKENDS],
        }
    }

    fn slot(service_id: u32, slot: u32) -> BackendKey {
        BackendKey { service_id, slot }
    }

    /// Two services (one with an unsorted slot list), one without backends, one with a slot
    /// missing, and a leftover slot above a count.
    fn sample_services() -> Vec<ServiceView> {
        let services = [
            (frontend([10, 96, 0, 10], 80, Protocol::Tcp), service(1, 2)),
            (frontend([10, 96, 0, 10], 53, Protocol::Udp), service(2, 1)),
            (frontend([10, 96, 0, 2], 443, Protocol::Tcp), service(3, 0)),
            (frontend([10, 96, 0, 10], 53, Protocol::Tcp), service(4, 2)),
        ];
        let backends = [
            (slot(1, 1), backend([10, 244, 0, 22], 8080)),
            (slot(1, 0), backend([10, 244, 0, 21], 8080)),
            (slot(2, 0), backend([10, 244, 0, 21], 5353)),
            (slot(2, 1), backend([10, 244, 0, 99], 5353)), // above the count: not reachable
            (slot(4, 0), backend([10, 244, 0, 23], 53)),
        ];
        services_view(&services, &backends)
    }

    #[test]
    fn a_pods_entry_follows_its_frontend_and_is_named_so() {
        let nodeport = frontend([172, 18, 0, 3], 30080, Protocol::Tcp);
        let pods = ServiceKey {
            scope: sluice_common::SCOPE_POD,
            ..nodeport
        };
        let views = services_view(&[(pods, service(2, 1)), (nodeport, service(1, 0))], &[]);
        let frontends: Vec<String> = views.iter().map(ServiceView::frontend).collect();
        assert_eq!(
            frontends,
            ["172.18.0.3:30080/TCP", "172.18.0.3:30080/TCP (from pods)"]
        );
    }

    #[test]
    fn services_are_sorted_by_frontend_with_their_slots() {
        let views = sample_services();
        let frontends: Vec<String> = views.iter().map(ServiceView::frontend).collect();
        assert_eq!(
            frontends,
            [
                "10.96.0.2:443/TCP",
                "10.96.0.10:53/TCP",
                "10.96.0.10:53/UDP",
                "10.96.0.10:80/TCP"
            ]
        );
        let http = &views[3];
        assert_eq!(http.id, 1);
        assert_eq!(
            http.slots,
            [
                SlotView {
                    slot: 0,
                    backend: Some(BackendAddr {
                        ip: Ipv4Addr::new(10, 244, 0, 21).into(),
                        port: 8080
                    })
                },
                SlotView {
                    slot: 1,
                    backend: Some(BackendAddr {
                        ip: Ipv4Addr::new(10, 244, 0, 22).into(),
                        port: 8080
                    })
                },
            ]
        );
        // Slots at or above the count are not shown; missing slots are.
        assert_eq!(views[2].slots.len(), 1);
        assert_eq!(views[1].slots[1].backend, None);
        assert!(views[0].slots.is_empty());
    }

    #[test]
    fn services_table() {
        let table = render_services(&sample_services());
        let expected = "\
FRONTEND           SERVICE ID  BACKENDS  SLOT  BACKEND
10.96.0.2:443/TCP  3           0         -     (no backends)
10.96.0.10:53/TCP  4           2         0     10.244.0.23:53
                                         1     (missing slot)
10.96.0.10:53/UDP  2           1         0     10.244.0.21:5353
10.96.0.10:80/TCP  1           2         0     10.244.0.21:8080
                                         1     10.244.0.22:8080
4 frontends, 5 backend slots, 1 without backends
";
        assert_eq!(table, expected, "got:\n{table}");
    }

    #[test]
    fn empty_tables_still_have_headers_and_counts() {
        assert_eq!(
            render_services(&[]),
            "FRONTEND  SERVICE ID  BACKENDS  SLOT  BACKEND\n\
             0 frontends, 0 backend slots, 0 without backends\n"
        );
        assert_eq!(
            render_conntrack(&[]),
            "PROTO  CLIENT  SERVICE  BACKEND  SERVICE ID  AGE  STATE  IDLE  ENTRIES\n\
             0 flows (0 forward+reply, 0 forward only, 0 orphan replies), 0 conntrack entries\n"
        );
    }

    /// The two entries `conntrack::create` writes for client -> vip balanced to `backend`.
    fn flow(
        proto: u8,
        client: SocketAddrV4,
        vip: SocketAddrV4,
        backend: SocketAddrV4,
        service_id: u32,
        created_ns: u64,
    ) -> [(CtKey, CtValue); 2] {
        let a = |s: &SocketAddrV4| wire::addr_to_map(*s.ip());
        let p = |s: &SocketAddrV4| wire::port_to_map(s.port());
        let value = |nat: &SocketAddrV4| CtValue {
            nat_addr: a(nat),
            nat_port: p(nat),
            flags: 0,
            snat_addr: 0,
            snat_port: 0,
            state: 0,
            _pad: 0,
            service_id,
            backend_slot: 0,
            created_ns,
            last_seen_ns: created_ns,
        };
        [
            (
                CtKey {
                    saddr: a(&client),
                    daddr: a(&vip),
                    sport: p(&client),
                    dport: p(&vip),
                    proto,
                    dir: CT_DIR_FORWARD,
                    _pad: 0,
                },
                value(&backend),
            ),
            (
                CtKey {
                    saddr: a(&backend),
                    daddr: a(&client),
                    sport: p(&backend),
                    dport: p(&client),
                    proto,
                    dir: CT_DIR_REPLY,
                    _pad: 0,
                },
                value(&vip),
            ),
        ]
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// A complete TCP flow, a complete UDP flow, a TCP flow whose reply entry was evicted, and
    /// a client port reused for another backend (its old reply entry is an orphan).
    fn sample_entries() -> (Vec<(CtKey, CtValue)>, u64) {
        let vip80 = sa("10.96.0.10:80");
        let vip53 = sa("10.96.0.10:53");
        let now = 100_000 * SEC;
        let mut entries = Vec::new();
        entries.extend(flow(
            PROTO_UDP,
            sa("10.244.0.10:41000"),
            vip53,
            sa("10.244.0.22:5353"),
            2,
            now - 5 * SEC,
        ));
        entries.extend(flow(
            PROTO_TCP,
            sa("10.244.0.10:40000"),
            vip80,
            sa("10.244.0.21:8080"),
            1,
            now - 75 * SEC,
        ));
        let [forward, _evicted] = flow(
            PROTO_TCP,
            sa("10.244.0.11:40001"),
            vip80,
            sa("10.244.0.22:8080"),
            1,
            now - 4000 * SEC,
        );
        entries.push(forward);
        // 10.244.0.10:40002 went to web-1 first, then reused its port (a new SYN) and went to
        // web-2: the new pair overwrote the forward entry, the old reply entry stays.
        let [_, old_reply] = flow(
            PROTO_TCP,
            sa("10.244.0.10:40002"),
            vip80,
            sa("10.244.0.21:8080"),
            1,
            now - 10 * SEC,
        );
        entries.push(old_reply);
        entries.extend(flow(
            PROTO_TCP,
            sa("10.244.0.10:40002"),
            vip80,
            sa("10.244.0.22:8080"),
            1,
            now - 2 * SEC,
        ));
        (entries, now)
    }

    #[test]
    fn conntrack_joins_forward_and_reply_entries() {
        let (entries, now) = sample_entries();
        let flows = conntrack_view(&entries, now);
        let summary: Vec<(String, String, String, FlowEntries, u64)> = flows
            .iter()
            .map(|f| {
                (
                    proto_name(f.proto),
                    f.client.to_string(),
                    f.backend.to_string(),
                    f.entries,
                    f.age.as_secs(),
                )
            })
            .collect();
        let row = |p: &str, c: &str, b: &str, e, age| {
            (p.to_string(), c.to_string(), b.to_string(), e, age)
        };
        assert_eq!(
            summary,
            [
                row(
                    "TCP",
                    "10.244.0.10:40000",
                    "10.244.0.21:8080",
                    FlowEntries::Both,
                    75
                ),
                row(
                    "TCP",
                    "10.244.0.10:40002",
                    "10.244.0.22:8080",
                    FlowEntries::Both,
                    2
                ),
                row(
                    "TCP",
                    "10.244.0.10:40002",
                    "10.244.0.21:8080",
                    FlowEntries::OrphanReply,
                    10
                ),
                row(
                    "TCP",
                    "10.244.0.11:40001",
                    "10.244.0.22:8080",
                    FlowEntries::ForwardOnly,
                    4000
                ),
                row(
                    "UDP",
                    "10.244.0.10:41000",
                    "10.244.0.22:5353",
                    FlowEntries::Both,
                    5
                ),
            ]
        );
        // Every flow names the service address, also the orphan reply.
        assert!(flows
            .iter()
            .all(|f| f.service.ip() == IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))));
    }

    #[test]
    fn conntrack_joins_masqueraded_flows() {
        let a = |s: &str| wire::addr_to_map(*sa(s).ip());
        let p = |s: &str| wire::port_to_map(sa(s).port());
        let (client, nodeport, backend, masq) = (
            "192.0.2.10:40000",
            "172.18.0.3:30080",
            "10.244.2.11:8080",
            "172.18.0.3:61000",
        );
        let forward = CtValue {
            nat_addr: a(backend),
            nat_port: p(backend),
            flags: CT_F_SNAT,
            snat_addr: a(masq),
            snat_port: p(masq),
            state: 0,
            _pad: 0,
            service_id: 3,
            backend_slot: 0,
            created_ns: 5 * SEC,
            last_seen_ns: 5 * SEC,
        };
        let reply = CtValue {
            nat_addr: a(nodeport),
            nat_port: p(nodeport),
            snat_addr: a(client),
            snat_port: p(client),
            ..forward
        };
        let key = |src: &str, dst: &str, dir| CtKey {
            saddr: a(src),
            daddr: a(dst),
            sport: p(src),
            dport: p(dst),
            proto: PROTO_TCP,
            dir,
            _pad: 0,
        };
        let both = [
            (key(client, nodeport, CT_DIR_FORWARD), forward),
            (key(backend, masq, CT_DIR_REPLY), reply),
        ];
        let flows = conntrack_view(&both, 10 * SEC);
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].entries, FlowEntries::Both);
        assert_eq!(flows[0].masquerade, Some(sa(masq).into()));
        assert_eq!(
            (flows[0].client, flows[0].service, flows[0].backend),
            (sa(client).into(), sa(nodeport).into(), sa(backend).into())
        );
        assert!(render_conntrack(&flows).contains("192.0.2.10:40000 (as 172.18.0.3:61000)"));

        // The reply entry alone still names the client and the masquerade address.
        let orphan = conntrack_view(&both[1..], 10 * SEC);
        assert_eq!(orphan[0].entries, FlowEntries::OrphanReply);
        assert_eq!(orphan[0].client, sa(client).into());
        assert_eq!(orphan[0].masquerade, Some(sa(masq).into()));
    }

    #[test]
    fn flow_states_are_named_as_nf_conntrack_would() {
        use sluice_common::{CT_S_FIN_CLIENT, CT_S_RST, CT_S_SEEN_REPLY};
        let name = |proto, state| state_name(proto, state, true);
        assert_eq!(name(PROTO_TCP, 0), "syn-sent");
        assert_eq!(name(PROTO_TCP, CT_S_SEEN_REPLY), "established");
        assert_eq!(
            name(PROTO_TCP, CT_S_SEEN_REPLY | CT_S_FIN_CLIENT),
            "closing"
        );
        assert_eq!(
            name(PROTO_TCP, sluice_common::CT_S_CLOSED & !CT_S_RST),
            "closed"
        );
        assert_eq!(name(PROTO_TCP, CT_S_RST), "reset");
        assert_eq!(name(PROTO_UDP, 0), "unreplied");
        assert_eq!(name(PROTO_UDP, CT_S_SEEN_REPLY), "replied");
        assert_eq!(state_name(PROTO_UDP, 0, false), "-");
    }

    #[test]
    fn conntrack_table() {
        let (entries, now) = sample_entries();
        let table = render_conntrack(&conntrack_view(&entries, now));
        let expected = "\
PROTO  CLIENT             SERVICE        BACKEND           SERVICE ID  AGE    STATE      IDLE   ENTRIES
TCP    10.244.0.10:40000  10.96.0.10:80  10.244.0.21:8080  1           1m15s  syn-sent   1m15s  forward+reply
TCP    10.244.0.10:40002  10.96.0.10:80  10.244.0.22:8080  1           2s     syn-sent   2s     forward+reply
TCP    10.244.0.10:40002  10.96.0.10:80  10.244.0.21:8080  1           10s    syn-sent   10s    orphan reply
TCP    10.244.0.11:40001  10.96.0.10:80  10.244.0.22:8080  1           1h06m  syn-sent   1h06m  forward only
UDP    10.244.0.10:41000  10.96.0.10:53  10.244.0.22:5353  2           5s     unreplied  5s     forward+reply
5 flows (3 forward+reply, 1 forward only, 1 orphan reply), 8 conntrack entries
";
        assert_eq!(table, expected, "got:\n{table}");
    }

    #[test]
    fn an_entry_newer_than_now_has_age_zero() {
        let entries = flow(
            PROTO_TCP,
            sa("10.244.0.10:40000"),
            sa("10.96.0.10:80"),
            sa("10.244.0.21:8080"),
            1,
            5 * SEC,
        );
        let flows = conntrack_view(&entries, SEC);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].age, Duration::ZERO);
    }

    #[test]
    fn ages() {
        assert_eq!(format_age(Duration::from_millis(999)), "0s");
        assert_eq!(format_age(Duration::from_secs(59)), "59s");
        assert_eq!(format_age(Duration::from_secs(60)), "1m00s");
        assert_eq!(format_age(Duration::from_secs(3599)), "59m59s");
        assert_eq!(format_age(Duration::from_secs(3600 + 120)), "1h02m");
        assert_eq!(
            format_age(Duration::from_secs(2 * 86400 + 3 * 3600)),
            "2d03h"
        );
    }

    #[test]
    fn json_layout() {
        let (entries, now) = sample_entries();
        let services = sample_services();
        let flows = conntrack_view(&entries, now);
        let value = to_json(Some(&services), Some(&flows));
        assert_eq!(
            value["services"][3],
            json!({
                "frontend": "10.96.0.10:80/TCP",
                "ip": "10.96.0.10",
                "port": 80,
                "protocol": "TCP",
                "id": 1,
                "backend_count": 2,
                "backends": [
                    {"slot": 0, "address": "10.244.0.21:8080"},
                    {"slot": 1, "address": "10.244.0.22:8080"},
                ],
            })
        );
        assert_eq!(value["services"][1]["backends"][1]["address"], Value::Null);
        assert_eq!(
            value["conntrack"][0],
            json!({
                "protocol": "TCP",
                "client": "10.244.0.10:40000",
                "service": "10.96.0.10:80",
                "backend": "10.244.0.21:8080",
                "masquerade": null,
                "service_id": 1,
                "created_ns": now - 75 * SEC,
                "age_seconds": 75,
                "state": "syn-sent",
                "idle_seconds": 75,
                "forward": true,
                "reply": true,
            })
        );
        assert_eq!(value["conntrack"][2]["forward"], false);
        assert_eq!(value["conntrack"][3]["reply"], false);

        let only_services = to_json(Some(&services), None);
        assert!(only_services.get("conntrack").is_none());
        assert_eq!(only_services["services"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn policy_rows_and_drops() {
        use sluice_common::PolicyPortRange;
        let addr = |a: [u8; 4]| u32::from_ne_bytes(a);
        let mut value = PolicyValue {
            count: 2,
            ..Default::default()
        };
        value.ranges[0] = PolicyPortRange {
            first: 80,
            last: 80,
        };
        value.ranges[1] = PolicyPortRange {
            first: 8000,
            last: 8100,
        };
        let key = PolicyKey {
            pod: addr([10, 244, 1, 5]),
            way: WAY_INGRESS,
            proto: PROTO_TCP,
            _pad: 0,
            peer: addr([10, 244, 0, 0]),
        };
        let snapshot = Snapshot {
            policy: vec![((key, 16), value)],
            isolated: vec![(addr([10, 244, 1, 5]), ISOLATED_INGRESS | ISOLATED_EGRESS)],
            drops: BTreeMap::from([(1, 0), (7, 3), (8, 2)]),
            ..Default::default()
        };
        let rows = policy_view(&snapshot);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].direction, "egress");
        assert_eq!(rows[0].peer, None, "isolated for egress, nothing allowed");
        assert_eq!(rows[1].ports, ["80", "8000-8100"]);
        let table = render_policy(&rows);
        assert!(table.contains("10.244.1.5"), "{table}");
        assert!(table.contains("(nothing allowed)"), "{table}");
        assert!(table.contains("10.244.0.0/16"), "{table}");
        assert!(table.contains("80,8000-8100"), "{table}");
        assert!(table.ends_with("1 isolated pod\n"), "{table}");
        let drops = render_drops(&snapshot.drops);
        assert!(drops.contains("drop-policy-egress-denied"), "{drops}");
        assert!(
            drops.ends_with("5 packets dropped or answered\n"),
            "{drops}"
        );
        let mut json = to_json(None, None);
        add_policy_json(&mut json, Some(&snapshot.drops), Some(&rows));
        assert_eq!(json["drops"]["drop-policy-ingress-denied"], 2);
        assert_eq!(json["policy"][1]["peer"], "10.244.0.0/16");
        assert_eq!(json["policy"][0]["peer"], Value::Null);

        // IPv6 pods: their own maps, the same rows.
        let v6 = |s: &str| sync6::addr6_to_map(s.parse().unwrap());
        let key6 = PolicyKey6 {
            pod: v6("fd00:10:244:1::5"),
            way: WAY_INGRESS,
            proto: PROTO_TCP,
            _pad: 0,
            peer: v6("fd00:10:244::"),
        };
        let snapshot = Snapshot {
            policy6: vec![((key6, 48), value)],
            isolated6: vec![(v6("fd00:10:244:1::5"), ISOLATED_INGRESS)],
            ..snapshot
        };
        let rows = policy_view(&snapshot);
        assert_eq!(rows.len(), 3, "{rows:?}");
        let table = render_policy(&rows);
        assert!(table.contains("fd00:10:244:1::5"), "{table}");
        assert!(table.contains("fd00:10:244::/48"), "{table}");
        assert!(table.ends_with("2 isolated pods\n"), "{table}");
    }

    #[test]
    fn maps_table() {
        let maps = [
            MapSizeRow {
                name: "backends".into(),
                map_type: "Hash".into(),
                max_entries: 262_144,
                memlock_bytes: Some(20_972_560),
            },
            MapSizeRow {
                name: "services".into(),
                map_type: "Hash".into(),
                max_entries: 65_536,
                memlock_bytes: None,
            },
        ];
        assert_eq!(
            render_map_sizes(&maps),
            "MAP       TYPE  MAX ENTRIES  MEMORY MiB\n\
             backends  Hash  262144       20.0\n\
             services  Hash  65536        ?\n\
             2 maps, 20.0 MiB of kernel memory\n"
        );
    }

    #[test]
    fn unknown_protocols_are_named_by_number() {
        assert_eq!(proto_name(PROTO_TCP), "TCP");
        assert_eq!(proto_name(1), "proto-1");
    }

    #[test]
    fn ipv6_frontends_and_flows_are_shown_with_bracketed_addresses() {
        use crate::datapath::sync6::{addr6_to_map, backend6_value, service_key6};

        let vip: std::net::Ipv6Addr = "fd00:10:96::10".parse().unwrap();
        let backend = BackendAddr {
            ip: "fd00:10:244::7".parse().unwrap(),
            port: 8080,
        };
        let key = service_key6(&Frontend {
            ip: vip.into(),
            port: 80,
            proto: Protocol::Tcp,
        })
        .unwrap();
        let views = services6_view(
            &[(key, service(1, 1))],
            &[(slot(1, 0), backend6_value(&backend, false).unwrap())],
        );
        let table = render_services(&views);
        assert!(
            table.contains(
                "[fd00:10:96::10]:80/TCP  1           1         0     [fd00:10:244::7]:8080"
            ),
            "{table}"
        );

        // A masqueraded flow: client -> vip, as node:61000 -> backend, and its reply entry.
        let client: SocketAddr = "[2001:db8::5]:40000".parse().unwrap();
        let node: SocketAddr = "[fc00::3]:61000".parse().unwrap();
        let a = |s: &SocketAddr| match s.ip() {
            IpAddr::V6(v6) => addr6_to_map(v6),
            IpAddr::V4(_) => unreachable!(),
        };
        let p = |s: &SocketAddr| wire::port_to_map(s.port());
        let vip_sa: SocketAddr = SocketAddr::new(vip.into(), 80);
        let backend_sa: SocketAddr = "[fd00:10:244::7]:8080".parse().unwrap();
        let value = |nat: &SocketAddr, snat: &SocketAddr| CtValue6 {
            nat_addr: a(nat),
            nat_port: p(nat),
            flags: CT_F_SNAT,
            snat_addr: a(snat),
            snat_port: p(snat),
            state: 0,
            _pad: 0,
            service_id: 1,
            backend_slot: 0,
            created_ns: SEC,
            last_seen_ns: SEC,
        };
        let entries = [
            (
                CtKey6 {
                    saddr: a(&client),
                    daddr: a(&vip_sa),
                    sport: p(&client),
                    dport: p(&vip_sa),
                    proto: sluice_common::PROTO_TCP,
                    dir: CT_DIR_FORWARD,
                    _pad: 0,
                },
                value(&backend_sa, &node),
            ),
            (
                CtKey6 {
                    saddr: a(&backend_sa),
                    daddr: a(&node),
                    sport: p(&backend_sa),
                    dport: p(&node),
                    proto: sluice_common::PROTO_TCP,
                    dir: CT_DIR_REPLY,
                    _pad: 0,
                },
                value(&vip_sa, &client),
            ),
        ];
        let flows = conntrack6_view(&entries, 3 * SEC);
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].entries, FlowEntries::Both);
        assert_eq!(
            (flows[0].client, flows[0].service, flows[0].backend),
            (client, vip_sa, backend_sa)
        );
        assert_eq!(flows[0].masquerade, Some(node));
    }
}
