//! Kernel-facing code: load the eBPF object, attach its programs to pod interfaces and to the
//! node's external interfaces, program the maps.
//!
//! A running node keeps everything under one pin directory on bpffs (default
//! [`sluice_common::DEFAULT_PIN_PATH`]):
//!
//! ```text
//! <pin>/services, backends, conntrack, affinity,    the maps (sluice-common documents them)
//!       source_ranges, config, drops,
//!       services6, backends6, conntrack6, config6,  (IPv6: sync6.rs)
//!       affinity6, source_ranges6
//!       policy, isolated, policy_flows,             (NetworkPolicy: policy_sync.rs)
//!       policy_events, policy6, isolated6,
//!       policy_flows6
//! <pin>/links/<ifindex>-ingress                     tcx link running `from_pod` on a pod veth
//! <pin>/links/<ifindex>-egress                      tcx link running `to_pod`
//! <pin>/links/<ifindex>-world-ingress               tcx link running `from_world` on an
//!                                                   external interface
//! <pin>/links/<ifindex>-world-egress                tcx link running `to_world`
//! <pin>/sock_config, sock_revnat, sock_revnat6,     host traffic: the socket programs' maps
//! <pin>/cgroup-links/<program>                      and cgroup links (sock.rs)
//! ```
//!
//! The services, backends and conntrack maps are sized at load time ([`MapSizes`]); a pinned
//! map of another size is replaced by a copy of the wanted size, pinned in its place
//! (`<pin>/resizing-<map>` for an instant; see resize.rs).
//!
//! Pins keep the datapath running while no agent runs: dropping a [`Datapath`] detaches nothing,
//! and a restarted agent reuses the maps (with their services, ids and conntrack entries) and
//! swaps its freshly loaded programs into the existing links atomically (`bpf_link_update`), so
//! an agent restart or upgrade never interrupts traffic. [`Datapath::cleanup`] is the way to
//! remove the datapath. [`Datapath::verify_and_repair`] (repair.rs) puts back an attachment or
//! pin something else removed or replaced.
//!
//! [`Datapath::load_unpinned`] loads the same object with private maps for `BPF_PROG_RUN` (tests,
//! `sluice trace`): it never touches a running agent's maps or bpffs at all.

pub mod affinity;
pub mod features;
mod flow_tables;
pub mod gc;
pub mod memory_maps;
pub mod policy_sync;
pub mod purge;
pub mod repair;
pub mod resize;
pub mod sock;
pub mod sync;
pub mod sync6;
pub mod verify;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    util::KernelVersion,
    Ebpf,
};
use sluice_common::{
    AffinityKey, AffinityKey6, AffinityValue, AffinityValue6, Backend, Backend6, BackendKey, CtKey,
    CtKey6, CtValue, CtValue6, NodeConfig, NodeConfig6, PolicyFlowKey, PolicyFlowKey6, PolicyKey,
    PolicyKey6, PolicyValue, Reason, ServiceKey, ServiceKey6, ServiceValue, SockConfig, SockRevKey,
    SockRevKey6, SockRevValue, SockRevValue6, SourceRangeKey, SourceRangeKey6, CB_REASON_MAGIC,
    CB_REASON_MASK, MAP_AFFINITY, MAP_AFFINITY6, MAP_BACKENDS, MAP_BACKENDS6, MAP_CONFIG,
    MAP_CONFIG6, MAP_CONNTRACK, MAP_CONNTRACK6, MAP_CT_ANSWERED, MAP_CT_ANSWERED6, MAP_DROPS,
    MAP_ISOLATED, MAP_ISOLATED6, MAP_POLICY, MAP_POLICY6, MAP_POLICY_EVENTS, MAP_POLICY_FLOWS,
    MAP_POLICY_FLOWS6, MAP_POLICY_REPLIED, MAP_POLICY_REPLIED6, MAP_SERVICES, MAP_SERVICES6,
    MAP_SOCK_CONFIG, MAP_SOCK_REVNAT, MAP_SOCK_REVNAT6, MAP_SOURCE_RANGES, MAP_SOURCE_RANGES6,
    MAX_AFFINITY, MAX_POLICY_ENTRIES, MAX_POLICY_PODS, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    POLICY_EVENTS_BYTES, REASON_COUNT,
};
use tracing::{debug, info, warn};

pub use policy_sync::PolicySyncStats;
use resize::{Capacity, Resized};
pub use resize::{CopyStats, MapSizes};
use sync::{KernelServiceMaps, ServiceSync};
pub use sync::{ProgrammedService, RemovedBackends, SyncStats};

use crate::{
    node::NodeContext,
    policy::WirePolicy,
    state::{DesiredState, Frontend},
};

/// Program run on tc ingress of a pod's host-side veth (packets the pod sends).
pub const PROGRAM_FROM_POD: &str = "from_pod";
/// Program run on tc egress of a pod's host-side veth (packets delivered to the pod).
pub const PROGRAM_TO_POD: &str = "to_pod";
/// Program run on tc ingress of the node's external interfaces (packets from outside).
pub const PROGRAM_FROM_WORLD: &str = "from_world";
/// Program run on tc egress of the node's external interfaces (packets leaving the node).
pub const PROGRAM_TO_WORLD: &str = "to_world";

/// Where bpffs is expected, and mounted when it is not.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
/// Subdirectory of the pin directory holding the tcx links.
const LINKS_DIR: &str = "links";

/// Netlink (pre-6.6 kernels) filters cannot be pinned; they are found again by this
/// priority/handle pair, chosen to be unlikely to collide with another tc user's filters.
const NETLINK_PRIORITY: u16 = 0x5c1;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x5c1);

/// Which program runs on which side of a pod interface.
const POD_HOOKS: [Hook; 2] = [
    Hook {
        program: PROGRAM_FROM_POD,
        attach_type: TcAttachType::Ingress,
        direction: "ingress",
    },
    Hook {
        program: PROGRAM_TO_POD,
        attach_type: TcAttachType::Egress,
        direction: "egress",
    },
];

/// Which program runs on which side of an external interface.
const WORLD_HOOKS: [Hook; 2] = [
    Hook {
        program: PROGRAM_FROM_WORLD,
        attach_type: TcAttachType::Ingress,
        direction: "world-ingress",
    },
    Hook {
        program: PROGRAM_TO_WORLD,
        attach_type: TcAttachType::Egress,
        direction: "world-egress",
    },
];

/// Every program of the object, loaded at once.
const ALL_HOOKS: [&Hook; 4] = [
    &POD_HOOKS[0],
    &POD_HOOKS[1],
    &WORLD_HOOKS[0],
    &WORLD_HOOKS[1],
];

/// What an attached interface is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side veth: `from_pod`, `to_pod`.
    Pod,
    /// An interface carrying a node IP: `from_world`, `to_world`.
    External,
}

impl Role {
    fn hooks(self) -> &'static [Hook; 2] {
        match self {
            Role::Pod => &POD_HOOKS,
            Role::External => &WORLD_HOOKS,
        }
    }
}

struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
    /// As in the link's pin name.
    direction: &'static str,
}

/// What the object declares for each map: a pinned map of another type, key size or value size
/// was created by another Sluice version and cannot be reused; one of another capacity is
/// replaced by one of the wanted capacity with its entries (resize.rs).
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    capacity: Capacity,
    /// The programs add entries to it (not only the agent): a resize copies those the old
    /// programs add until the swap once more ([`Datapath::finish_map_resize`]).
    written_by_programs: bool,
}

impl MapSpec {
    /// Hash maps and LPM tries can be copied entry by entry into a map of another size; the
    /// arrays and the ring buffer have the size the object gives them.
    fn resizable(&self) -> bool {
        matches!(
            self.map_type,
            MapType::Hash | MapType::LruHash | MapType::LpmTrie
        )
    }
}

/// An LPM trie's key: the prefix length, then the data.
const fn lpm_key_size<K>() -> usize {
    size_of::<u32>() + size_of::<K>()
}

const MAPS: [MapSpec; 27] = [
    MapSpec {
        name: MAP_SERVICES,
        map_type: MapType::Hash,
        key_size: size_of::<ServiceKey>(),
        value_size: size_of::<ServiceValue>(),
        capacity: Capacity::Services,
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_BACKENDS,
        map_type: MapType::Hash,
        key_size: size_of::<BackendKey>(),
        value_size: size_of::<Backend>(),
        capacity: Capacity::Backends,
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_CONNTRACK,
        map_type: MapType::LruHash,
        key_size: size_of::<CtKey>(),
        value_size: size_of::<CtValue>(),
        capacity: Capacity::Conntrack,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_AFFINITY,
        map_type: MapType::LruHash,
        key_size: size_of::<AffinityKey>(),
        value_size: size_of::<AffinityValue>(),
        capacity: Capacity::Fixed(MAX_AFFINITY),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_SOURCE_RANGES,
        map_type: MapType::LpmTrie,
        key_size: lpm_key_size::<SourceRangeKey>(),
        value_size: size_of::<u8>(),
        capacity: Capacity::Fixed(MAX_SOURCE_RANGES),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<NodeConfig>(),
        capacity: Capacity::Fixed(1),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_DROPS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>(),
        value_size: size_of::<u64>(),
        capacity: Capacity::Fixed(REASON_COUNT),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_SERVICES6,
        map_type: MapType::Hash,
        key_size: size_of::<ServiceKey6>(),
        value_size: size_of::<ServiceValue>(),
        capacity: Capacity::Services,
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_BACKENDS6,
        map_type: MapType::Hash,
        key_size: size_of::<BackendKey>(),
        value_size: size_of::<Backend6>(),
        capacity: Capacity::Backends,
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_CONNTRACK6,
        map_type: MapType::LruHash,
        key_size: size_of::<CtKey6>(),
        value_size: size_of::<CtValue6>(),
        capacity: Capacity::Conntrack,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_CONFIG6,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<NodeConfig6>(),
        capacity: Capacity::Fixed(1),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_SOCK_CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<SockConfig>(),
        capacity: Capacity::Fixed(1),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_SOCK_REVNAT,
        map_type: MapType::LruHash,
        key_size: size_of::<SockRevKey>(),
        value_size: size_of::<SockRevValue>(),
        capacity: Capacity::Fixed(MAX_SOCK_REVNAT),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_SOCK_REVNAT6,
        map_type: MapType::LruHash,
        key_size: size_of::<SockRevKey6>(),
        value_size: size_of::<SockRevValue6>(),
        capacity: Capacity::Fixed(MAX_SOCK_REVNAT),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_AFFINITY6,
        map_type: MapType::LruHash,
        key_size: size_of::<AffinityKey6>(),
        value_size: size_of::<AffinityValue6>(),
        capacity: Capacity::Fixed(MAX_AFFINITY),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_SOURCE_RANGES6,
        map_type: MapType::LpmTrie,
        key_size: lpm_key_size::<SourceRangeKey6>(),
        value_size: size_of::<u8>(),
        capacity: Capacity::Fixed(MAX_SOURCE_RANGES),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_POLICY,
        map_type: MapType::LpmTrie,
        key_size: lpm_key_size::<PolicyKey>(),
        value_size: size_of::<PolicyValue>(),
        capacity: Capacity::Fixed(MAX_POLICY_ENTRIES),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_ISOLATED,
        map_type: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<u8>(),
        capacity: Capacity::Fixed(MAX_POLICY_PODS),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_POLICY_FLOWS,
        map_type: MapType::LruHash,
        key_size: size_of::<PolicyFlowKey>(),
        value_size: size_of::<u64>(),
        capacity: Capacity::PolicyFlows,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_POLICY_EVENTS,
        map_type: MapType::RingBuf,
        key_size: 0,
        value_size: 0,
        capacity: Capacity::Fixed(POLICY_EVENTS_BYTES),
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_POLICY6,
        map_type: MapType::LpmTrie,
        key_size: lpm_key_size::<PolicyKey6>(),
        value_size: size_of::<PolicyValue>(),
        capacity: Capacity::Fixed(MAX_POLICY_ENTRIES),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_ISOLATED6,
        map_type: MapType::Hash,
        key_size: size_of::<[u32; 4]>(),
        value_size: size_of::<u8>(),
        capacity: Capacity::Fixed(MAX_POLICY_PODS),
        written_by_programs: false,
    },
    MapSpec {
        name: MAP_POLICY_FLOWS6,
        map_type: MapType::LruHash,
        key_size: size_of::<PolicyFlowKey6>(),
        value_size: size_of::<u64>(),
        capacity: Capacity::PolicyFlows,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_CT_ANSWERED,
        map_type: MapType::Hash,
        key_size: size_of::<CtKey>(),
        value_size: size_of::<CtValue>(),
        capacity: Capacity::Conntrack,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_CT_ANSWERED6,
        map_type: MapType::Hash,
        key_size: size_of::<CtKey6>(),
        value_size: size_of::<CtValue6>(),
        capacity: Capacity::Conntrack,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_POLICY_REPLIED,
        map_type: MapType::Hash,
        key_size: size_of::<PolicyFlowKey>(),
        value_size: size_of::<u64>(),
        capacity: Capacity::PolicyFlows,
        written_by_programs: true,
    },
    MapSpec {
        name: MAP_POLICY_REPLIED6,
        map_type: MapType::Hash,
        key_size: size_of::<PolicyFlowKey6>(),
        value_size: size_of::<u64>(),
        capacity: Capacity::PolicyFlows,
        written_by_programs: true,
    },
];

/// What of a pin directory existed before a load: the map pins, the links directory and the
/// pin directory itself.
struct PinsBefore {
    maps: Vec<bool>,
    links_dir: bool,
    dir: bool,
}

impl PinsBefore {
    fn take(pin_path: &Path) -> PinsBefore {
        let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
        PinsBefore {
            maps: MAPS
                .iter()
                .map(|m| exists(&pin_path.join(m.name)))
                .collect(),
            links_dir: exists(&pin_path.join(LINKS_DIR)),
            dir: exists(pin_path),
        }
    }

    /// Removes the map pins and directories that did not exist before; returns what it removed.
    fn remove_new(&self, pin_path: &Path) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for (spec, existed) in MAPS.iter().zip(&self.maps) {
            let pin = pin_path.join(spec.name);
            if !existed && fs::remove_file(&pin).is_ok() {
                removed.push(pin);
            }
        }
        // Directories only when empty: another process may have put something there.
        for (dir, existed) in [
            (pin_path.join(LINKS_DIR), self.links_dir),
            (pin_path.to_owned(), self.dir),
        ] {
            if !existed && fs::remove_dir(&dir).is_ok() {
                removed.push(dir);
            }
        }
        removed
    }
}

/// The eBPF object built by `build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"))
}

/// How an interface's programs are attached.
#[derive(Clone)]
enum Attachment {
    /// tcx links, pinned under `<pin>/links`.
    Tcx { ifname: String },
    /// clsact + netlink filters (kernels before 6.6); they live as long as the interface.
    Netlink { ifname: String },
}

impl Attachment {
    fn ifname(&self) -> &str {
        match self {
            Attachment::Tcx { ifname } | Attachment::Netlink { ifname } => ifname,
        }
    }
}

/// The loaded datapath: the programs, the maps and the interfaces this process attached.
pub struct Datapath {
    ebpf: Ebpf,
    services: ServiceSync<KernelServiceMaps>,
    services6: sync6::Ipv6Sync,
    conntrack: flow_tables::FlowTables<CtKey, CtValue>,
    conntrack6: flow_tables::FlowTables<CtKey6, CtValue6>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    affinity6: HashMap<MapData, AffinityKey6, AffinityValue6>,
    config: Array<MapData, NodeConfig>,
    drops: PerCpuArray<MapData, u64>,
    /// What `config` holds (read back at load, then as last written).
    node_config: NodeConfig,
    config6: Array<MapData, NodeConfig6>,
    node_config6: NodeConfig6,
    /// The socket programs' own maps (host traffic, sock.rs).
    sock: sock::SockMaps,
    policy: policy_sync::PolicySync,
    policy_flows: flow_tables::FlowTables<PolicyFlowKey, u64>,
    policy_flows6: flow_tables::FlowTables<PolicyFlowKey6, u64>,
    /// Taken by [`Datapath::take_policy_events`] (tests; `sluice monitor` opens the pin).
    policy_events: Option<RingBuf<MapData>>,
    /// `None` for a datapath with private maps.
    pin_path: Option<PathBuf>,
    attached: BTreeMap<u32, (Role, Attachment)>,
    /// The cgroup the socket programs were attached to ([`Datapath::attach_cgroup`]): what
    /// their pinned links must run on (repair.rs).
    cgroup: Option<PathBuf>,
    /// Every map's capacity and memory, as loaded.
    map_sizes: Vec<MapSize>,
    /// Every map's id, as loaded: what its pin must hold (repair.rs).
    map_ids: Vec<(&'static str, u32)>,
    /// Pinned maps this load replaced by maps of another size, until
    /// [`Datapath::finish_map_resize`].
    resized: Vec<Resized>,
}

/// A map's capacity and the kernel memory it is charged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSize {
    pub name: &'static str,
    pub max_entries: u32,
    /// `memlock` of the map's fdinfo (`None`: not readable).
    pub memlock_bytes: Option<u64>,
}

/// One `BPF_PROG_RUN` of a program ([`run_program`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRun {
    /// The program's return code (a tc action).
    pub return_value: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Why the program dropped the packet or answered it itself, when it says
    /// (`skb->cb[0]`, see `sluice-common`).
    pub reason: Option<Reason>,
}

/// Size of `struct __sk_buff` (uapi/linux/bpf.h) and the offsets `BPF_PROG_RUN` callers use.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;
const SK_BUFF_CB0: usize = 48;

/// Runs a loaded classifier on `packet` with `BPF_PROG_RUN`, as received on interface
/// `ifindex` (of the caller's network namespace; default: loopback), and returns what it did.
/// The programs' FIB lookups see that namespace's routes.
pub fn run_program(
    program: &SchedClassifier,
    packet: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<ProgramRun> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut ctx_in = [0u8; SK_BUFF_SIZE];
    if let Some(ifindex) = ifindex {
        ctx_in[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    }
    let mut ctx_out = [0u8; SK_BUFF_SIZE];
    // Room for whatever a program leaves: an ICMP answer grows the packet it quotes, and
    // BPF_PROG_RUN fails rather than truncate.
    let mut out = vec![0u8; packet.len() + 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_RUN")?;
    out.truncate(result.data_size_out as usize);
    let cb0 = u32::from_ne_bytes(
        ctx_out[SK_BUFF_CB0..SK_BUFF_CB0 + 4]
            .try_into()
            .expect("4 bytes"),
    );
    Ok(ProgramRun {
        return_value: result.return_value,
        packet: out,
        reason: (cb0 & !CB_REASON_MASK == CB_REASON_MAGIC).then_some(cb0 & CB_REASON_MASK),
    })
}

impl Datapath {
    /// [`Datapath::load_with`] the default map sizes.
    pub fn load(pin_path: &Path) -> anyhow::Result<Datapath> {
        Self::load_with(pin_path, &MapSizes::default())
    }

    /// Loads the programs with their maps pinned under `pin_path`, reusing maps already pinned
    /// there (an agent restart keeps services, ids and conntrack), the services, backends and
    /// conntrack maps sized by `sizes`. A pinned map of another size is replaced by one of the wanted
    /// size holding its entries (resize.rs; [`Datapath::finish_map_resize`] completes it after
    /// the programs were attached). Mounts bpffs at /sys/fs/bpf first when `pin_path` is below
    /// it and it is not mounted. Attaches nothing.
    pub fn load_with(pin_path: &Path, sizes: &MapSizes) -> anyhow::Result<Datapath> {
        sizes.check()?;
        if pin_path.starts_with(BPFFS_ROOT) {
            ensure_bpffs_mounted()?;
        }
        // Check before creating anything, so a wrong path leaves no directories behind.
        let existing = pin_path
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        ensure_on_bpffs(existing, pin_path)?;
        // A load that fails (a kernel whose verifier refuses a program, a full map...) removes
        // the pins it made itself, so nothing of it outlives the agent; pins an earlier agent
        // left are kept: its programs may still be running on them.
        let before = PinsBefore::take(pin_path);
        Self::load_pinned(pin_path, sizes).inspect_err(|_| {
            let removed = before.remove_new(pin_path);
            if !removed.is_empty() {
                warn!(
                    pin_path = %pin_path.display(),
                    removed = ?removed,
                    "the datapath did not load: removed the pins this load made"
                );
            }
        })
    }

    fn load_pinned(pin_path: &Path, sizes: &MapSizes) -> anyhow::Result<Datapath> {
        let links_dir = pin_path.join(LINKS_DIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating the pin directory {}", links_dir.display()))?;

        let map_pins: Vec<(&MapSpec, PathBuf)> = MAPS
            .iter()
            .map(|spec| (spec, pin_path.join(spec.name)))
            .collect();
        let mut loader = features::loader();
        // Pinned maps to be replaced: (spec, the pinned map, its capacity).
        let mut replaced = Vec::new();
        for (spec, path) in &map_pins {
            let capacity = spec.capacity.of(sizes);
            loader.map_max_entries(spec.name, capacity);
            if spec.name == MAP_DROPS {
                restart_counters_of_another_size(path, capacity)?;
            }
            match pinned_map(spec, path)? {
                Some((old, old_capacity)) if old_capacity != capacity => {
                    // Not given a pin path: the loader creates a new map of `capacity`.
                    replaced.push((*spec, path, old, old_capacity));
                }
                // Opens the map pinned at `path`, or creates and pins it there.
                _ => {
                    loader.map_pin_path(spec.name, path.as_path());
                }
            }
        }
        let ebpf = loader.load(object()).with_context(|| {
            format!(
                "loading the eBPF object with its maps pinned in {}",
                pin_path.display()
            )
        })?;

        // The new maps get the pinned ones' entries before anything reads them (the services'
        // ids are read back from them) or writes them.
        let mut resized = Vec::new();
        for (spec, path, old, old_capacity) in replaced {
            let new = ebpf
                .map(spec.name)
                .and_then(|map| map_data(map).ok())
                .with_context(|| format!("the eBPF object has no map `{}`", spec.name))?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating a map descriptor")?;
            let resize = Resized {
                name: spec.name,
                pin: path.clone(),
                old,
                new,
                old_capacity,
                new_capacity: spec.capacity.of(sizes),
                key_size: spec.key_size as u32,
                value_size: spec.value_size as u32,
                written_by_programs: spec.written_by_programs,
            };
            let copied = resize::copy_entries(
                resize.old_map(),
                resize.new_map(),
                resize.key_size,
                resize.value_size,
                old_capacity,
                false,
            )
            .map_err(|e| {
                let full = e.raw_os_error() == Some(libc::E2BIG);
                let hint = match (full, spec.capacity.flag()) {
                    (true, Some(flag)) => format!(
                        ": the pinned map holds more entries than {flag} {} leaves room for",
                        resize.new_capacity
                    ),
                    _ => String::new(),
                };
                anyhow::Error::new(e).context(format!(
                    "copying the entries of {} pinned at {} into its replacement{hint}",
                    resize.describe(),
                    path.display()
                ))
            })?;
            info!(
                map = spec.name,
                from = old_capacity,
                to = resize.new_capacity,
                entries = copied.copied,
                "resizing a pinned map: its entries are copied into a new one"
            );
            resized.push(resize);
        }

        let mut datapath = Self::from_loaded(ebpf, Some(pin_path.to_owned()), sizes, true)?;
        // The programs are loaded: the new maps take the old ones' pins.
        for resize in &resized {
            resize::pin_in_place(resize.new_map(), &resize.pin)
                .with_context(|| format!("pinning the resized {}", resize.describe()))?;
            info!(
                map = resize.name,
                pin = %resize.pin.display(),
                "resized map pinned in place of the old one"
            );
        }
        datapath.resized = resized;
        info!(
            pin_path = %pin_path.display(),
            services = datapath.services.programmed().len(),
            max_services = sizes.services,
            max_backends = sizes.backends,
            "datapath loaded"
        );
        Ok(datapath)
    }

    /// Loads the programs with private, unpinned maps, which disappear with the returned value.
    /// For `BPF_PROG_RUN` (tests, `sluice trace`); such a datapath cannot be attached.
    pub fn load_unpinned() -> anyhow::Result<Datapath> {
        Self::load_unpinned_with(&MapSizes::default())
    }

    /// [`Datapath::load_unpinned`] with the services, backends and conntrack maps sized by
    /// `sizes`.
    pub fn load_unpinned_with(sizes: &MapSizes) -> anyhow::Result<Datapath> {
        Self::load_private(sizes, true)
    }

    /// [`Datapath::load_unpinned`] whose programs are loaded when first asked for
    /// ([`Datapath::classifier`]): `sluice trace` runs two or three of the four, and a
    /// program's verification is most of a trace's time (seconds on older kernels' verifiers).
    pub fn load_unpinned_lazily() -> anyhow::Result<Datapath> {
        Self::load_private(&MapSizes::default(), false)
    }

    fn load_private(sizes: &MapSizes, load_programs: bool) -> anyhow::Result<Datapath> {
        sizes.check()?;
        // The object's maps are not marked as pinned (ebpf/src/maps.rs), so without a pin path
        // the loader creates fresh ones.
        let mut loader = features::loader();
        for spec in &MAPS {
            loader.map_max_entries(spec.name, spec.capacity.of(sizes));
        }
        let ebpf = loader
            .load(object())
            .context("loading the eBPF object with private maps")?;
        Self::from_loaded(ebpf, None, sizes, load_programs)
    }

    /// The tc program `name` (one of the hooks' programs), loaded into the kernel now if it
    /// was not yet.
    pub fn classifier(&mut self, name: &str) -> anyhow::Result<&SchedClassifier> {
        let program = classifier_mut(&mut self.ebpf, name);
        if program.fd().is_err() {
            load_program(program).map_err(|e| refused(name, &e))?;
        }
        Ok(classifier(&self.ebpf, name))
    }

    /// After a load that resized pinned maps, and once the programs are swapped into every
    /// pinned link ([`Datapath::attach`] of each interface): copies the entries the previous
    /// programs added to the old maps meanwhile (flows they created in conntrack, affinity,
    /// ...; what the new maps hold already wins), then lets the old maps go. Returns what it
    /// copied. Nothing to do without a resize.
    pub fn finish_map_resize(&mut self) -> anyhow::Result<CopyStats> {
        let mut total = CopyStats::default();
        for resize in std::mem::take(&mut self.resized) {
            if !resize.written_by_programs {
                // The agent writes it, and has rewritten it since: old entries would undo that.
                continue;
            }
            let stats = resize::copy_entries(
                resize.old_map(),
                resize.new_map(),
                resize.key_size,
                resize.value_size,
                resize.old_capacity,
                true,
            )
            .with_context(|| {
                format!(
                    "copying the late entries of {} into its replacement",
                    resize.describe()
                )
            })?;
            debug!(map = resize.name, ?stats, "resize finished");
            total.copied += stats.copied;
            total.kept += stats.kept;
        }
        Ok(total)
    }

    /// The maps' capacities and the kernel memory each was charged at load (memlock bytes).
    pub fn map_sizes(&self) -> &[MapSize] {
        &self.map_sizes
    }

    fn from_loaded(
        mut ebpf: Ebpf,
        pin_path: Option<PathBuf>,
        sizes: &MapSizes,
        load_programs: bool,
    ) -> anyhow::Result<Datapath> {
        let describe = |name: &str| match &pin_path {
            Some(dir) => format!("map `{name}` pinned at {}", dir.join(name).display()),
            None => format!("map `{name}`"),
        };
        let mut map_sizes = Vec::new();
        let mut map_ids = Vec::new();
        let maps = MAPS.map(|spec| {
            let map = ebpf
                .take_map(spec.name)
                .with_context(|| format!("the eBPF object has no map `{}`", spec.name))?;
            let data = map_data(&map).with_context(|| describe(spec.name))?;
            let info = data.info().with_context(|| describe(spec.name))?;
            // load_with checked the pinned maps already; this also holds MAPS to the object.
            check_layout(&spec, &info).with_context(|| describe(spec.name))?;
            let capacity = spec.capacity.of(sizes);
            if info.max_entries() != capacity {
                bail!(
                    "{} has {} entries, not {capacity}",
                    describe(spec.name),
                    info.max_entries()
                );
            }
            map_sizes.push(MapSize {
                name: spec.name,
                max_entries: capacity,
                memlock_bytes: resize::memlock_bytes(data.fd().as_fd()),
            });
            map_ids.push((spec.name, info.id()));
            Ok(map)
        });
        let [services, backends, conntrack, affinity, source_ranges, config, drops, services6, backends6, conntrack6, config6, sock_config, sock_revnat, sock_revnat6, affinity6, source_ranges6, policy, isolated, policy_flows, policy_events, policy6, isolated6, policy_flows6, ct_answered, ct_answered6, policy_replied, policy_replied6] =
            maps;
        let stale = |name| {
            format!(
                "{}: its key or value size is not the one this agent expects (created by another \
                 Sluice version? `sluice cleanup` removes the old datapath)",
                describe(name)
            )
        };
        let services = HashMap::try_from(services?).with_context(|| stale(MAP_SERVICES))?;
        let backends = HashMap::try_from(backends?).with_context(|| stale(MAP_BACKENDS))?;
        let conntrack = flow_tables::FlowTables {
            answered: HashMap::try_from(ct_answered?).with_context(|| stale(MAP_CT_ANSWERED))?,
            unanswered: HashMap::try_from(conntrack?).with_context(|| stale(MAP_CONNTRACK))?,
            names: [MAP_CT_ANSWERED, MAP_CONNTRACK],
        };
        let affinity = HashMap::try_from(affinity?).with_context(|| stale(MAP_AFFINITY))?;
        let source_ranges =
            LpmTrie::try_from(source_ranges?).with_context(|| stale(MAP_SOURCE_RANGES))?;
        let config: Array<MapData, NodeConfig> =
            Array::try_from(config?).with_context(|| stale(MAP_CONFIG))?;
        let drops = PerCpuArray::try_from(drops?).with_context(|| stale(MAP_DROPS))?;
        let services6 = HashMap::try_from(services6?).with_context(|| stale(MAP_SERVICES6))?;
        let backends6 = HashMap::try_from(backends6?).with_context(|| stale(MAP_BACKENDS6))?;
        let conntrack6 = flow_tables::FlowTables {
            answered: HashMap::try_from(ct_answered6?).with_context(|| stale(MAP_CT_ANSWERED6))?,
            unanswered: HashMap::try_from(conntrack6?).with_context(|| stale(MAP_CONNTRACK6))?,
            names: [MAP_CT_ANSWERED6, MAP_CONNTRACK6],
        };
        let config6: Array<MapData, NodeConfig6> =
            Array::try_from(config6?).with_context(|| stale(MAP_CONFIG6))?;
        let sock = sock::SockMaps {
            config: Array::try_from(sock_config?).with_context(|| stale(MAP_SOCK_CONFIG))?,
            _revnat: HashMap::try_from(sock_revnat?).with_context(|| stale(MAP_SOCK_REVNAT))?,
            _revnat6: HashMap::try_from(sock_revnat6?).with_context(|| stale(MAP_SOCK_REVNAT6))?,
        };
        let affinity6 = HashMap::try_from(affinity6?).with_context(|| stale(MAP_AFFINITY6))?;
        let source_ranges6 =
            LpmTrie::try_from(source_ranges6?).with_context(|| stale(MAP_SOURCE_RANGES6))?;
        let policy = policy_sync::PolicySync::read_back(policy_sync::PolicyMaps {
            policy: LpmTrie::try_from(policy?).with_context(|| stale(MAP_POLICY))?,
            isolated: HashMap::try_from(isolated?).with_context(|| stale(MAP_ISOLATED))?,
            policy6: LpmTrie::try_from(policy6?).with_context(|| stale(MAP_POLICY6))?,
            isolated6: HashMap::try_from(isolated6?).with_context(|| stale(MAP_ISOLATED6))?,
        })
        .with_context(|| {
            format!(
                "reading back {}, {}, {} and {}",
                describe(MAP_POLICY),
                describe(MAP_ISOLATED),
                describe(MAP_POLICY6),
                describe(MAP_ISOLATED6)
            )
        })?;
        let policy_flows = flow_tables::FlowTables {
            answered: HashMap::try_from(policy_replied?)
                .with_context(|| stale(MAP_POLICY_REPLIED))?,
            unanswered: HashMap::try_from(policy_flows?)
                .with_context(|| stale(MAP_POLICY_FLOWS))?,
            names: [MAP_POLICY_REPLIED, MAP_POLICY_FLOWS],
        };
        let policy_flows6 = flow_tables::FlowTables {
            answered: HashMap::try_from(policy_replied6?)
                .with_context(|| stale(MAP_POLICY_REPLIED6))?,
            unanswered: HashMap::try_from(policy_flows6?)
                .with_context(|| stale(MAP_POLICY_FLOWS6))?,
            names: [MAP_POLICY_REPLIED6, MAP_POLICY_FLOWS6],
        };
        let policy_events =
            RingBuf::try_from(policy_events?).with_context(|| stale(MAP_POLICY_EVENTS))?;
        let node_config6 = config6
            .get(&0, 0)
            .with_context(|| format!("reading {}", describe(MAP_CONFIG6)))?;
        let node_config = config
            .get(&0, 0)
            .with_context(|| format!("reading {}", describe(MAP_CONFIG)))?;

        for hook in ALL_HOOKS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(hook.program)
                .with_context(|| format!("the eBPF object has no program `{}`", hook.program))?
                .try_into()
                .with_context(|| format!("program `{}` is not a classifier", hook.program))?;
            if load_programs {
                load_program(program).map_err(|e| refused(hook.program, &e))?;
            }
        }

        let services = ServiceSync::read_back(KernelServiceMaps {
            services,
            backends,
            source_ranges,
        })
        .with_context(|| {
            format!(
                "reading back {}, {} and {}",
                describe(MAP_SERVICES),
                describe(MAP_BACKENDS),
                describe(MAP_SOURCE_RANGES)
            )
        })?;
        let services6 = sync6::Ipv6Sync::read_back(services6, backends6, source_ranges6)
            .with_context(|| {
                format!(
                    "reading back {}, {} and {}",
                    describe(MAP_SERVICES6),
                    describe(MAP_BACKENDS6),
                    describe(MAP_SOURCE_RANGES6)
                )
            })?;
        Ok(Datapath {
            ebpf,
            services,
            services6,
            conntrack,
            conntrack6,
            config6,
            node_config6,
            affinity,
            affinity6,
            config,
            drops,
            node_config,
            sock,
            policy,
            policy_flows,
            policy_flows6,
            policy_events: Some(policy_events),
            pin_path,
            attached: BTreeMap::new(),
            map_sizes,
            map_ids,
            cgroup: None,
            resized: Vec::new(),
        })
    }

    /// Runs `from_pod` on tc ingress and `to_pod` on tc egress of a pod's host-side veth. Uses
    /// tcx links (kernel >= 6.6) pinned at `<pin>/links/<ifindex>-{ingress,egress}`; a link
    /// already pinned there (an earlier agent) gets this agent's programs swapped in atomically.
    /// Older kernels get a clsact qdisc and netlink filters. Attaching an interface twice is a
    /// no-op.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
        self.attach_as(Role::Pod, ifindex, ifname)
    }

    /// Runs `from_world` on tc ingress and `to_world` on tc egress of one of the node's
    /// external interfaces (one carrying a node IP), with links pinned at
    /// `<pin>/links/<ifindex>-world-{ingress,egress}`; otherwise as [`Datapath::attach`].
    pub fn attach_external(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
        self.attach_as(Role::External, ifindex, ifname)
    }

    fn attach_as(&mut self, role: Role, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
        if let Some((attached_as, _)) = self.attached.get(&ifindex) {
            if *attached_as == role {
                return Ok(());
            }
            bail!(
                "interface {ifname} (ifindex {ifindex}) is attached as {attached_as:?}, not \
                 {role:?}: forget it first"
            );
        }
        let Some(pin_path) = self.pin_path.clone() else {
            bail!(
                "cannot attach to {ifname}: this datapath has private maps (load_unpinned) and its \
                 programs would be detached when it is dropped"
            );
        };
        // aya attaches by name; make sure the name still denotes the interface the caller found
        // (a pod can be deleted and its veth name reused in between).
        let current = ifindex_of(ifname)?;
        if current != ifindex {
            bail!("interface {ifname} has ifindex {current}, not {ifindex}: it was replaced");
        }

        let attachment = if use_tcx() {
            for hook in role.hooks() {
                let link_pin = link_pin_path(&pin_path, ifindex, hook.direction);
                let program = classifier_mut(&mut self.ebpf, hook.program);
                let attached = attach_tcx(program, ifname, ifindex, hook.attach_type, &link_pin);
                attached.with_context(|| {
                    format!(
                        "attaching `{}` to tcx {} of {ifname} (ifindex {ifindex}), link pinned \
                         at {}",
                        hook.program,
                        hook.direction,
                        link_pin.display()
                    )
                })?;
            }
            Attachment::Tcx {
                ifname: ifname.to_owned(),
            }
        } else {
            for hook in role.hooks() {
                let program = classifier_mut(&mut self.ebpf, hook.program);
                attach_netlink(program, ifname, hook.attach_type).with_context(|| {
                    format!(
                        "attaching `{}` to tc {} of {ifname} (ifindex {ifindex}) with netlink",
                        hook.program, hook.direction
                    )
                })?;
            }
            Attachment::Netlink {
                ifname: ifname.to_owned(),
            }
        };
        debug!(ifname, ifindex, ?role, "attached");
        self.attached.insert(ifindex, (role, attachment));
        Ok(())
    }

    /// Detaches the programs from every interface not in `present` (pod veths and external
    /// interfaces alike: `present` lists every interface still wanted): unpins their links,
    /// also those an earlier agent pinned for interfaces that have gone since. Returns the
    /// ifindexes forgotten. Errors are collected: one stuck pin does not keep the others.
    ///
    /// The kernel releases an unpinned link asynchronously (after an RCU grace period), so the
    /// programs of an interface that is still there stop running shortly after this returns.
    pub fn forget_interfaces_except(
        &mut self,
        present: &BTreeSet<u32>,
    ) -> anyhow::Result<Vec<u32>> {
        let mut forgotten = BTreeSet::new();
        let mut errors = Vec::new();

        for (ifindex, (role, attachment)) in &self.attached {
            if present.contains(ifindex) {
                continue;
            }
            forgotten.insert(*ifindex);
            if let Attachment::Netlink { ifname } = attachment {
                for hook in role.hooks() {
                    // The interface is usually gone, and its filters with it.
                    match tc::qdisc_detach_program(ifname, hook.attach_type, hook.program) {
                        Ok(()) => {}
                        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => errors.push(format!("detaching from {ifname}: {e}")),
                    }
                }
            }
        }
        self.attached.retain(|ifindex, _| present.contains(ifindex));

        if let Some(pin_path) = &self.pin_path {
            let links_dir = pin_path.join(LINKS_DIR);
            for (path, ifindex) in pinned_links(&links_dir)? {
                if present.contains(&ifindex) {
                    continue;
                }
                // Removing the last reference to a tcx link detaches it.
                match fs::remove_file(&path) {
                    Ok(()) => {
                        forgotten.insert(ifindex);
                    }
                    Err(e) => errors.push(format!("unpinning {}: {e}", path.display())),
                }
            }
        }
        if !errors.is_empty() {
            bail!("forgetting interfaces: {}", errors.join("; "));
        }
        Ok(forgotten.into_iter().collect())
    }

    /// Programs the `services`, `backends` and `source_ranges` maps with `desired`, writing
    /// only what differs, then purges the UDP/SCTP conntrack entries and the affinity entries
    /// of the backends the sync removed ([`Datapath::purge_removed_backends`];
    /// [`SyncStats::purged`] says how many). A frontend that cannot be programmed is reported
    /// in [`SyncStats::failed`] and does not stop the others; a failed purge is an error (the
    /// maps are programmed; the next sync does not retry the purge).
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<SyncStats> {
        let mut stats = self.services.sync(desired);
        let ipv6 = self
            .services6
            .sync(desired)
            .context("programming the IPv6 maps")?;
        stats.ipv6_programmed = ipv6.programmed;
        stats.map_writes += ipv6.map_writes;
        stats.failed.extend(ipv6.failed.iter().cloned());
        if !ipv6.removed_backends.is_empty() {
            stats.purged += self
                .purge_removed_conntrack6(&ipv6.removed_backends)
                .context("purging the IPv6 flows of removed backends")?;
        }
        if !ipv6.removed_affinity.is_empty() || !ipv6.retired_affinity_ids.is_empty() {
            stats.purged += self
                .purge_affinity6(|key, value| sync6::affinity_purged(&ipv6, key, value))
                .context("purging the IPv6 affinity of removed backends")?;
        }
        if !stats.removed_backends.is_empty() || !stats.retired_affinity_ids.is_empty() {
            stats.purged += self
                .purge_removed_backends_and_affinity(
                    &stats.removed_backends,
                    &stats.retired_affinity_ids.clone(),
                )
                .context("purging the flows of removed backends")?;
        }
        Ok(stats)
    }

    /// Writes this node's context to the `config` map: the first IPv4 node IP (the address
    /// masqueraded traffic gets), the IPv4 cluster CIDRs, masqueradeAll; and to `config6` the
    /// IPv6 ones (`sync6::node_config6`). Writes only when it changed; returns whether it
    /// wrote. Until it is called the programs masquerade nothing
    /// but hairpin traffic.
    pub fn set_node_config(&mut self, node: &NodeContext) -> anyhow::Result<bool> {
        let config6 = sync6::node_config6(node)?;
        let mut wrote = false;
        if config6 != self.node_config6 {
            self.config6
                .set(0, config6, 0)
                .context("writing the config6 map")?;
            self.node_config6 = config6;
            wrote = true;
        }
        let config = wire::node_config(node)?;
        if config == self.node_config {
            return Ok(wrote);
        }
        self.config
            .set(0, config, 0)
            .context("writing the config map")?;
        self.node_config = config;
        Ok(true)
    }

    /// Programs the `policy` and `isolated` maps with `desired`, writing only what differs
    /// (see policy_sync.rs): a policy change applies without reloading programs and without
    /// touching admitted flows.
    pub fn sync_policy(&mut self, desired: &WirePolicy) -> PolicySyncStats {
        self.policy.sync(desired)
    }

    /// What the `policy` and `isolated` maps hold.
    pub fn programmed_policy(&self) -> &WirePolicy {
        self.policy.programmed()
    }

    /// Every flow `policy_replied` and `policy_flows` remember, with its last-seen time.
    pub fn policy_flows(&self) -> anyhow::Result<Vec<(PolicyFlowKey, u64)>> {
        self.policy_flows.entries()
    }

    /// Every IPv6 flow `policy_replied6` and `policy_flows6` remember, with its last-seen time.
    pub fn policy_flows6(&self) -> anyhow::Result<Vec<(PolicyFlowKey6, u64)>> {
        self.policy_flows6.entries()
    }

    /// Forgets every admitted flow of both families (`sluice trace` between its runs).
    pub fn clear_policy_flows(&mut self) -> anyhow::Result<usize> {
        let keys: Vec<PolicyFlowKey> = self.policy_flows()?.into_iter().map(|(k, _)| k).collect();
        self.policy_flows.remove(&keys, "a policy_flows entry")?;
        let keys6: Vec<PolicyFlowKey6> =
            self.policy_flows6()?.into_iter().map(|(k, _)| k).collect();
        self.policy_flows6.remove(&keys6, "a policy_flows6 entry")?;
        Ok(keys.len() + keys6.len())
    }

    /// The `policy_events` ring buffer, once (the reader consumes what it reads).
    pub fn take_policy_events(&mut self) -> Option<RingBuf<MapData>> {
        self.policy_events.take()
    }

    /// What the `config` map holds.
    pub fn node_config(&self) -> NodeConfig {
        self.node_config
    }

    /// Deletes the conntrack entries of UDP and SCTP flows to the `removed` backends (forward
    /// and reply entries) and the affinity entries pointing to them, so the clients' next
    /// packets are balanced over the live backends (kube-proxy's conntrack cleanup; TCP flows
    /// drain). [`Datapath::sync`] calls it with what it removed. Returns how many entries went.
    pub fn purge_removed_backends(&mut self, removed: &[RemovedBackends]) -> anyhow::Result<usize> {
        self.purge_removed_backends_and_affinity(removed, &BTreeSet::new())
    }

    /// [`Datapath::purge_removed_backends`], and every affinity entry of the `retired`
    /// affinity ids.
    fn purge_removed_backends_and_affinity(
        &mut self,
        removed: &[RemovedBackends],
        retired: &BTreeSet<u32>,
    ) -> anyhow::Result<usize> {
        let selection = purge::Selection::new(removed).with_retired_affinity(retired);
        if selection.is_empty() {
            return Ok(0);
        }
        let flows = self.purge_conntrack(|key, value| selection.conntrack(key, value))?;
        let doomed: Vec<AffinityKey> = self
            .affinity_entries()?
            .into_iter()
            .filter(|(key, value)| selection.affinity(key, value))
            .map(|(key, _)| key)
            .collect();
        remove_keys(&mut self.affinity, &doomed, "an affinity entry")?;
        debug!(
            conntrack = flows,
            affinity = doomed.len(),
            "purged the entries of removed backends"
        );
        Ok(flows + doomed.len())
    }

    /// The frontends the maps hold, with their ids, settings and reachable backends.
    pub fn programmed_services(&self) -> Vec<ProgrammedService> {
        self.services.programmed()
    }

    /// The service id the maps hold for `frontend`.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.services.service_id(frontend)
    }

    /// The affinity id the maps hold for the IPv4 `frontend` (0: no sessionAffinity).
    pub fn affinity_id(&self, frontend: &Frontend) -> Option<u32> {
        self.services.affinity_id(frontend)
    }

    /// The IPv6 frontends the maps hold: (address, port, protocol number, id, backends).
    pub fn programmed_services6(
        &self,
    ) -> Vec<(
        std::net::Ipv6Addr,
        u16,
        u8,
        u32,
        Vec<crate::state::BackendAddr>,
    )> {
        self.services6.programmed()
    }

    /// How many backends the IPv6 `frontend`'s entry of `scope` (`SCOPE_ALL`, `SCOPE_POD`)
    /// has, if it is programmed.
    pub fn backend_count6(&self, frontend: &Frontend, scope: u8) -> Option<usize> {
        let key = sluice_common::ServiceKey6 {
            scope,
            ..sync6::service_key6(frontend)?
        };
        self.services6.backend_count(&key)
    }

    /// Deletes the `conntrack6` entries of UDP and SCTP flows to removed backends.
    fn purge_removed_conntrack6(
        &mut self,
        removed: &BTreeSet<(u32, [u32; 4], u16)>,
    ) -> anyhow::Result<usize> {
        self.purge_conntrack6(|key, value| sync6::purged(removed, key, value))
    }

    /// Every IPv6 conntrack entry (two per translated flow).
    pub fn conntrack6_entries(&self) -> anyhow::Result<Vec<(CtKey6, CtValue6)>> {
        self.conntrack6.entries()
    }

    /// Every conntrack entry (two per translated flow, see `sluice-common`).
    pub fn conntrack_entries(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        self.conntrack.entries()
    }

    /// Deletes the IPv6 conntrack entries `remove` picks; returns how many.
    pub fn purge_conntrack6(
        &mut self,
        mut remove: impl FnMut(&CtKey6, &CtValue6) -> bool,
    ) -> anyhow::Result<usize> {
        let doomed: Vec<CtKey6> = self
            .conntrack6_entries()?
            .into_iter()
            .filter(|(key, value)| remove(key, value))
            .map(|(key, _)| key)
            .collect();
        self.conntrack6.remove(&doomed, "an IPv6 conntrack entry")?;
        Ok(doomed.len())
    }

    /// Deletes the expired conntrack entries of both families (see [`gc`]), each with its
    /// flow's other entry, by the timeouts in the `config` map.
    pub fn collect_garbage(&mut self) -> anyhow::Result<gc::GcStats> {
        let now = gc::monotonic_now_ns();
        let timeouts = self.node_config.ct_timeouts;
        let entries = self.conntrack_entries()?;
        let doomed = gc::expired(&entries, &timeouts, now);
        self.conntrack
            .remove(&doomed, "an expired conntrack entry")?;
        let entries6 = self.conntrack6_entries()?;
        let doomed6 = gc::expired(&entries6, &timeouts, now);
        self.conntrack6
            .remove(&doomed6, "an expired IPv6 conntrack entry")?;
        // Replied NetworkPolicy flows: only the LRU forgets the others.
        let doomed_policy = self.policy_flows.remove_answered(|replied| {
            gc::expired_policy_flows(replied, |k| k.proto, &timeouts, now)
        })?;
        let doomed_policy6 = self.policy_flows6.remove_answered(|replied| {
            gc::expired_policy_flows(replied, |k| k.proto, &timeouts, now)
        })?;
        Ok(gc::GcStats {
            policy_removed: doomed_policy + doomed_policy6,
            removed: doomed.len(),
            removed6: doomed6.len(),
            live: entries.len() - doomed.len(),
            live6: entries6.len() - doomed6.len(),
        })
    }

    /// Every sessionAffinity entry.
    pub fn affinity_entries(&self) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>> {
        self.affinity
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the affinity map")
    }

    /// Deletes the conntrack entries `remove` selects (e.g. flows to a backend that went away).
    /// Returns how many were deleted.
    pub fn purge_conntrack(
        &mut self,
        mut remove: impl FnMut(&CtKey, &CtValue) -> bool,
    ) -> anyhow::Result<usize> {
        let doomed: Vec<CtKey> = self
            .conntrack_entries()?
            .into_iter()
            .filter(|(key, value)| remove(key, value))
            .map(|(key, _)| key)
            .collect();
        self.conntrack.remove(&doomed, "a conntrack entry")?;
        Ok(doomed.len())
    }

    /// Deletes every affinity entry of both families (`sluice trace` forgets its private
    /// clients with it).
    pub fn clear_affinity(&mut self) -> anyhow::Result<usize> {
        let keys: Vec<AffinityKey> = self
            .affinity_entries()?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        remove_keys(&mut self.affinity, &keys, "an affinity entry")?;
        Ok(keys.len() + self.purge_affinity6(|_, _| true)?)
    }

    /// Every IPv6 sessionAffinity entry.
    pub fn affinity6_entries(&self) -> anyhow::Result<Vec<(AffinityKey6, AffinityValue6)>> {
        self.affinity6
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the affinity6 map")
    }

    /// Deletes the IPv6 affinity entries `remove` picks; returns how many.
    fn purge_affinity6(
        &mut self,
        mut remove: impl FnMut(&AffinityKey6, &AffinityValue6) -> bool,
    ) -> anyhow::Result<usize> {
        let doomed: Vec<AffinityKey6> = self
            .affinity6_entries()?
            .into_iter()
            .filter(|(key, value)| remove(key, value))
            .map(|(key, _)| key)
            .collect();
        remove_keys(&mut self.affinity6, &doomed, "an IPv6 affinity entry")?;
        Ok(doomed.len())
    }

    /// Adds `n` to counter `reason` of the `drops` map (an event the agent counts itself, such
    /// as [`sluice_common::REASON_DATAPATH_REPAIRED`]), on the first CPU's slot.
    pub fn count_event(&mut self, reason: Reason, n: u64) -> anyhow::Result<()> {
        let mut values: Vec<u64> = self
            .drops
            .get(&reason, 0)
            .with_context(|| format!("reading the drops map at {reason}"))?
            .iter()
            .copied()
            .collect();
        if let Some(first) = values.first_mut() {
            *first += n;
        }
        let values = aya::maps::PerCpuValues::try_from(values)
            .context("building the drops map's per-CPU values")?;
        self.drops
            .set(reason, values, 0)
            .with_context(|| format!("writing the drops map at {reason}"))
    }

    /// Packets dropped or answered by the programs, by reason, summed over the CPUs; reasons
    /// that never happened are left out.
    pub fn drop_counts(&self) -> anyhow::Result<BTreeMap<Reason, u64>> {
        let mut counts = BTreeMap::new();
        for reason in 1..REASON_COUNT {
            let per_cpu = self
                .drops
                .get(&reason, 0)
                .with_context(|| format!("reading the drops map at {reason}"))?;
            let total: u64 = per_cpu.iter().sum();
            if total > 0 {
                counts.insert(reason, total);
            }
        }
        Ok(counts)
    }

    /// `from_pod`, loaded (for `BPF_PROG_RUN`: [`run_program`]).
    pub fn from_pod(&self) -> &SchedClassifier {
        classifier(&self.ebpf, PROGRAM_FROM_POD)
    }

    /// `to_pod`, loaded.
    pub fn to_pod(&self) -> &SchedClassifier {
        classifier(&self.ebpf, PROGRAM_TO_POD)
    }

    /// `from_world`, loaded.
    pub fn from_world(&self) -> &SchedClassifier {
        classifier(&self.ebpf, PROGRAM_FROM_WORLD)
    }

    /// `to_world`, loaded.
    pub fn to_world(&self) -> &SchedClassifier {
        classifier(&self.ebpf, PROGRAM_TO_WORLD)
    }

    /// The pin directory, `None` for private maps.
    pub fn pin_path(&self) -> Option<&Path> {
        self.pin_path.as_deref()
    }

    /// Interfaces this process attached to.
    pub fn attached_interfaces(&self) -> impl Iterator<Item = u32> + '_ {
        self.attached.keys().copied()
    }

    /// Interfaces this process attached to, with what they are.
    pub fn attached_roles(&self) -> impl Iterator<Item = (u32, Role)> + '_ {
        self.attached
            .iter()
            .map(|(ifindex, (role, _))| (*ifindex, *role))
    }

    /// Removes the datapath pinned under `pin_path`: unpins the links first (which detaches the
    /// programs from every interface), then the maps, then the directory. Succeeds when there is
    /// nothing to remove.
    pub fn cleanup(pin_path: &Path) -> anyhow::Result<()> {
        if !use_tcx() {
            detach_netlink_filters_everywhere();
        }
        if !pin_path.exists() {
            return Ok(());
        }
        let links_dir = pin_path.join(LINKS_DIR);
        if links_dir.exists() {
            for entry in fs::read_dir(&links_dir)
                .with_context(|| format!("listing {}", links_dir.display()))?
            {
                let path = entry
                    .with_context(|| format!("listing {}", links_dir.display()))?
                    .path();
                fs::remove_file(&path)
                    .with_context(|| format!("unpinning link {}", path.display()))?;
            }
            fs::remove_dir(&links_dir)
                .with_context(|| format!("removing {}", links_dir.display()))?;
        }
        sock::remove_cgroup_links(pin_path)?;
        for spec in &MAPS {
            let path = pin_path.join(spec.name);
            // A resize's temporary pin, left by an agent stopped in the middle of it.
            let temporary = resize::temporary_pin(&path)?;
            match fs::remove_file(&temporary) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("unpinning map {}", temporary.display()))
                }
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("unpinning map {}", path.display()))
                }
            }
        }
        fs::remove_dir(pin_path).with_context(|| {
            format!(
                "removing {} (does it hold files Sluice did not create?)",
                pin_path.display()
            )
        })?;
        info!(pin_path = %pin_path.display(), "datapath removed");
        Ok(())
    }
}

/// A program the kernel would not load, in a few lines: the program, the kernel, the
/// verifier's last lines, and the kernels Sluice supports.
pub(crate) fn refused(program: &str, error: &ProgramError) -> anyhow::Error {
    anyhow!(
        "loading program `{program}` into the kernel (Linux {}; Sluice needs Linux 5.10 or \
         later) failed: {}",
        features::kernel_release(),
        verify::describe_load_error(program, error)
    )
}

/// How many times a program load interrupted by a signal is tried.
const LOAD_ATTEMPTS: usize = 5;

/// Loads a program, again when the verifier was interrupted by a signal (`EAGAIN`, as libbpf
/// retries it): a busy machine makes the larger programs' verification long enough to meet one.
fn load_program(program: &mut SchedClassifier) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match program.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                debug!(attempt, "program load interrupted (EAGAIN), trying again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &str) -> &'a SchedClassifier {
    ebpf.program(name)
        .and_then(|p| p.try_into().ok())
        .expect("from_loaded checked the object's classifiers")
}

/// Deletes `keys` from `map`. A key already gone is fine: the LRU may have evicted it, or
/// the programs replaced the flow, since the map was read.
fn remove_keys<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    what: &str,
) -> anyhow::Result<()> {
    for key in keys {
        match map.remove(key) {
            Ok(()) => {}
            Err(e) if sync::is_not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {what}")),
        }
    }
    Ok(())
}

fn classifier_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("from_loaded checked the object's classifiers")
}

/// The kernel map behind one of the object's maps.
fn map_data(map: &aya::maps::Map) -> anyhow::Result<&MapData> {
    match map {
        aya::maps::Map::HashMap(data)
        | aya::maps::Map::LruHashMap(data)
        | aya::maps::Map::LpmTrie(data)
        | aya::maps::Map::Array(data)
        | aya::maps::Map::PerCpuArray(data)
        | aya::maps::Map::RingBuf(data) => Ok(data),
        other => bail!("unexpected map kind {other:?}"),
    }
}

/// Fails unless the kernel's map has the type, key size and value size of `spec` (a pinned
/// map may have been created by another Sluice version).
fn check_layout(spec: &MapSpec, info: &aya::maps::MapInfo) -> anyhow::Result<()> {
    let map_type = info.map_type()?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    if map_type != spec.map_type || key_size != spec.key_size || value_size != spec.value_size {
        bail!(
            "it is a {map_type:?} with {key_size}-byte keys and {value_size}-byte values, this \
             agent needs a {:?} with {}-byte keys and {}-byte values: it was created by another \
             Sluice version with another map layout; `sluice cleanup` removes the old datapath",
            spec.map_type,
            spec.key_size,
            spec.value_size
        );
    }
    Ok(())
}

/// The map pinned at `path` and its capacity, `None` when nothing is pinned there. Fails,
/// naming the map, when its layout is not `spec`'s, or when it is an array or ring buffer of
/// another size (those are never resized: another size is another version).
fn pinned_map(spec: &MapSpec, path: &Path) -> anyhow::Result<Option<(OwnedFd, u32)>> {
    let describe = || format!("map `{}` pinned at {}", spec.name, path.display());
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(describe),
    }
    repair::refuse_non_map_pin(path).with_context(describe)?;
    let map = MapData::from_pin(path).with_context(describe)?;
    let info = map.info().with_context(describe)?;
    check_layout(spec, &info).with_context(describe)?;
    if !spec.resizable() {
        if let Capacity::Fixed(capacity) = spec.capacity {
            if info.max_entries() != capacity {
                bail!(
                    "{} has {} entries, this agent needs {capacity}: it was created by another \
                     Sluice version; `sluice cleanup` removes the old datapath",
                    describe(),
                    info.max_entries()
                );
            }
        }
    }
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(describe)?;
    Ok(Some((fd, info.max_entries())))
}

/// An earlier agent's `drops` map with another number of reasons: only counters, so it is
/// unpinned (the programs still running on it keep it until they are replaced) and a new one
/// of this agent's size is made; the counts start again from zero, and the log says so.
fn restart_counters_of_another_size(path: &Path, capacity: u32) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let describe = || format!("map `{MAP_DROPS}` pinned at {}", path.display());
    let map = MapData::from_pin(path).with_context(describe)?;
    let info = map.info().with_context(describe)?;
    if info.map_type()? == MapType::PerCpuArray && info.max_entries() != capacity {
        fs::remove_file(path).with_context(|| format!("unpinning {}", describe()))?;
        warn!(
            pin = %path.display(),
            from = info.max_entries(),
            to = capacity,
            "the drop counters of an earlier agent have another number of reasons: they \
             start again from zero"
        );
    }
    Ok(())
}

fn link_pin_path(pin_path: &Path, ifindex: u32, direction: &str) -> PathBuf {
    pin_path
        .join(LINKS_DIR)
        .join(format!("{ifindex}-{direction}"))
}

/// The links pinned in `links_dir`, with the ifindex their name says.
fn pinned_links(links_dir: &Path) -> anyhow::Result<Vec<(PathBuf, u32)>> {
    let mut links = Vec::new();
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(links),
        Err(e) => return Err(e).with_context(|| format!("listing {}", links_dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", links_dir.display()))?
            .path();
        let ifindex = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split_once('-'))
            .and_then(|(ifindex, _)| ifindex.parse().ok());
        match ifindex {
            Some(ifindex) => links.push((path, ifindex)),
            None => warn!("ignoring {}: not a link pinned by Sluice", path.display()),
        }
    }
    Ok(links)
}

fn tcx_supported() -> bool {
    // If the version cannot be read, try tcx: attaching then fails with a clear error.
    KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0))
}

/// `SLUICE_TC_ATTACH=netlink` attaches with clsact and tc filters, the path of kernels before
/// 6.6, on any kernel (for tests of that path on a newer machine).
pub const TC_ATTACH_ENV: &str = "SLUICE_TC_ATTACH";

/// Whether programs are attached with tcx links: the kernel has them and [`TC_ATTACH_ENV`] does
/// not ask for netlink.
pub fn use_tcx() -> bool {
    tcx_supported() && std::env::var_os(TC_ATTACH_ENV).is_none_or(|v| v != "netlink")
}

fn attach_tcx(
    program: &mut SchedClassifier,
    ifname: &str,
    ifindex: u32,
    attach_type: TcAttachType,
    link_pin: &Path,
) -> anyhow::Result<()> {
    repair::refuse_foreign_link_pin(link_pin, ifindex, attach_type)?;
    let reused = match PinnedLink::from_pin(link_pin) {
        Ok(pinned) => {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not a tcx link", link_pin.display()))?;
            match program.attach_to_link(link) {
                Ok(link_id) => Some(link_id),
                // The interface the link was created for is gone (and its ifindex reused): the
                // link is defunct. Replace it.
                Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    fs::remove_file(link_pin).with_context(|| {
                        format!("unpinning the defunct link {}", link_pin.display())
                    })?;
                    None
                }
                Err(e) => return Err(e).context("replacing the program of the pinned link"),
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(e).context("opening the pinned link"),
    };

    match reused {
        Some(link_id) => {
            // The pin already holds this link; our handle only closes our file descriptor.
            let link: FdLink = program.take_link(link_id)?.try_into()?;
            drop(link);
        }
        None => {
            let link_id = program.attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?;
            let link: FdLink = program.take_link(link_id)?.try_into()?;
            // Should pinning fail, `link` is dropped and the program detached again: no
            // attachment outlives the agent without a pin to find it by.
            link.pin(link_pin)?;
        }
    }
    Ok(())
}

fn attach_netlink(
    program: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
) -> anyhow::Result<()> {
    let exists = |e: &TcError| matches!(e, TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EEXIST));
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(e) if exists(&e) => {}
        Err(e) => return Err(e).context("adding the clsact qdisc"),
    }
    let options = NlOptions {
        priority: NETLINK_PRIORITY,
        handle: NETLINK_HANDLE,
        classid: None,
    };
    let link_id =
        match program.attach_with_options(ifname, attach_type, TcAttachOptions::Netlink(options)) {
            Ok(link_id) => link_id,
            // An earlier agent's filter: replace its program in place, without a gap.
            Err(ProgramError::TcError(e)) if exists(&e) => {
                let existing = SchedClassifierLink::attached(
                    ifname,
                    attach_type,
                    NETLINK_PRIORITY,
                    NETLINK_HANDLE,
                    None,
                )?;
                program.attach_to_link(existing)?
            }
            Err(e) => return Err(e.into()),
        };
    // aya removes a netlink filter when its handle is dropped; the filter must outlive the agent
    // as a pinned tcx link does, so the handle is leaked on purpose.
    std::mem::forget(program.take_link(link_id)?);
    Ok(())
}

/// Netlink filters cannot be pinned, so cleanup on a pre-6.6 kernel looks for Sluice's programs
/// on every interface of the network namespace.
fn detach_netlink_filters_everywhere() {
    let Ok(entries) = fs::read_dir("/sys/class/net") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(ifname) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        for hook in ALL_HOOKS {
            if let Err(e) = tc::qdisc_detach_program(&ifname, hook.attach_type, hook.program) {
                debug!("detaching {} from {ifname}: {e}", hook.program);
            }
        }
    }
}

fn ifindex_of(ifname: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(ifname).with_context(|| format!("bad interface name {ifname:?}"))?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("looking up interface {ifname}"));
    }
    Ok(ifindex)
}

/// Mounts bpffs at /sys/fs/bpf unless one is mounted there.
pub fn ensure_bpffs_mounted() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.nth(1) == Some(BPFFS_ROOT) && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    info!("mounting bpffs at {BPFFS_ROOT}");
    fs::create_dir_all(BPFFS_ROOT).with_context(|| format!("creating {BPFFS_ROOT}"))?;
    let source = CString::new("bpf").expect("no NUL");
    let target = CString::new(BPFFS_ROOT).expect("no NUL");
    let options = CString::new("mode=0700").expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {BPFFS_ROOT}"));
    }
    Ok(())
}

/// Pins only work on bpffs; say so plainly instead of failing with EPERM at the first pin.
/// `path` is the existing directory `pin_path` is (or will be created) in.
fn ensure_on_bpffs(path: &Path, pin_path: &Path) -> anyhow::Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("bad path {}", path.display()))?;
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated, stat is a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    if stat.f_type as u32 != BPF_FS_MAGIC {
        bail!(
            "pin directory {} is not on a bpf filesystem ({} is not; mount one with \
             `mount -t bpf bpf <dir>`)",
            pin_path.display(),
            path.display()
        );
    }
    Ok(())
}
