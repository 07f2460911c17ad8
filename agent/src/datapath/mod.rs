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
//! Pins keep the datapath running while no agent runs: dropping a [`Datapath`] detaches nothing,
//! and a restarted agent reuses the maps (with their services, ids and conntrack entries) and
//! swaps its freshly loaded programs into the existing links atomically (`bpf_link_update`), so
//! an agent restart or upgrade never interrupts traffic. [`Datapath::cleanup`] is the way to
//! remove the datapath.
//!
//! [`Datapath::load_unpinned`] loads the same object with private maps for `BPF_PROG_RUN` (tests,
//! `sluice trace`): it never touches a running agent's maps or bpffs at all.

pub mod affinity;
pub mod gc;
pub mod policy_sync;
pub mod purge;
pub mod sock;
pub mod sync;
pub mod sync6;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use sluice_common::{
    AffinityKey, AffinityKey6, AffinityValue, AffinityValue6, CtKey, CtKey6, CtValue, CtValue6,
    NodeConfig, NodeConfig6, PolicyFlowKey, PolicyFlowKey6, Reason, ServiceValue, CB_REASON_MAGIC,
    CB_REASON_MASK, MAP_AFFINITY, MAP_AFFINITY6, MAP_BACKENDS, MAP_BACKENDS6, MAP_CONFIG,
    MAP_CONFIG6, MAP_CONNTRACK, MAP_CONNTRACK6, MAP_DROPS, MAP_ISOLATED, MAP_ISOLATED6, MAP_POLICY,
    MAP_POLICY6, MAP_POLICY_EVENTS, MAP_POLICY_FLOWS, MAP_POLICY_FLOWS6, MAP_SERVICES,
    MAP_SERVICES6, MAP_SOCK_CONFIG, MAP_SOCK_REVNAT, MAP_SOCK_REVNAT6, MAP_SOURCE_RANGES,
    MAP_SOURCE_RANGES6, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_POLICY_ENTRIES,
    MAX_POLICY_FLOWS, MAX_POLICY_PODS, MAX_SERVICES, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    POLICY_EVENTS_BYTES, REASON_COUNT,
};
use tracing::{debug, info, warn};

pub use policy_sync::PolicySyncStats;
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

/// What the object declares for each map. A pinned map that differs was created by another
/// Sluice version and cannot be reused.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    max_entries: u32,
}

const MAPS: [MapSpec; 23] = [
    MapSpec {
        name: MAP_SERVICES,
        map_type: MapType::Hash,
        max_entries: MAX_SERVICES,
    },
    MapSpec {
        name: MAP_BACKENDS,
        map_type: MapType::Hash,
        max_entries: MAX_BACKENDS,
    },
    MapSpec {
        name: MAP_CONNTRACK,
        map_type: MapType::LruHash,
        max_entries: MAX_CONNTRACK,
    },
    MapSpec {
        name: MAP_AFFINITY,
        map_type: MapType::LruHash,
        max_entries: MAX_AFFINITY,
    },
    MapSpec {
        name: MAP_SOURCE_RANGES,
        map_type: MapType::LpmTrie,
        max_entries: MAX_SOURCE_RANGES,
    },
    MapSpec {
        name: MAP_CONFIG,
        map_type: MapType::Array,
        max_entries: 1,
    },
    MapSpec {
        name: MAP_DROPS,
        map_type: MapType::PerCpuArray,
        max_entries: REASON_COUNT,
    },
    MapSpec {
        name: MAP_SERVICES6,
        map_type: MapType::Hash,
        max_entries: MAX_SERVICES,
    },
    MapSpec {
        name: MAP_BACKENDS6,
        map_type: MapType::Hash,
        max_entries: MAX_BACKENDS,
    },
    MapSpec {
        name: MAP_CONNTRACK6,
        map_type: MapType::LruHash,
        max_entries: MAX_CONNTRACK,
    },
    MapSpec {
        name: MAP_CONFIG6,
        map_type: MapType::Array,
        max_entries: 1,
    },
    MapSpec {
        name: MAP_SOCK_CONFIG,
        map_type: MapType::Array,
        max_entries: 1,
    },
    MapSpec {
        name: MAP_SOCK_REVNAT,
        map_type: MapType::LruHash,
        max_entries: MAX_SOCK_REVNAT,
    },
    MapSpec {
        name: MAP_SOCK_REVNAT6,
        map_type: MapType::LruHash,
        max_entries: MAX_SOCK_REVNAT,
    },
    MapSpec {
        name: MAP_AFFINITY6,
        map_type: MapType::LruHash,
        max_entries: MAX_AFFINITY,
    },
    MapSpec {
        name: MAP_SOURCE_RANGES6,
        map_type: MapType::LpmTrie,
        max_entries: MAX_SOURCE_RANGES,
    },
    MapSpec {
        name: MAP_POLICY,
        map_type: MapType::LpmTrie,
        max_entries: MAX_POLICY_ENTRIES,
    },
    MapSpec {
        name: MAP_ISOLATED,
        map_type: MapType::Hash,
        max_entries: MAX_POLICY_PODS,
    },
    MapSpec {
        name: MAP_POLICY_FLOWS,
        map_type: MapType::LruHash,
        max_entries: MAX_POLICY_FLOWS,
    },
    MapSpec {
        name: MAP_POLICY_EVENTS,
        map_type: MapType::RingBuf,
        max_entries: POLICY_EVENTS_BYTES,
    },
    MapSpec {
        name: MAP_POLICY6,
        map_type: MapType::LpmTrie,
        max_entries: MAX_POLICY_ENTRIES,
    },
    MapSpec {
        name: MAP_ISOLATED6,
        map_type: MapType::Hash,
        max_entries: MAX_POLICY_PODS,
    },
    MapSpec {
        name: MAP_POLICY_FLOWS6,
        map_type: MapType::LruHash,
        max_entries: MAX_POLICY_FLOWS,
    },
];

/// The eBPF object built by `build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"))
}

/// How an interface's programs are attached.
enum Attachment {
    /// tcx links, pinned under `<pin>/links`.
    Tcx,
    /// clsact + netlink filters (kernels before 6.6); they live as long as the interface.
    Netlink { ifname: String },
}

/// The loaded datapath: the programs, the maps and the interfaces this process attached.
pub struct Datapath {
    ebpf: Ebpf,
    services: ServiceSync<KernelServiceMaps>,
    services6: sync6::Ipv6Sync,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack6: HashMap<MapData, CtKey6, CtValue6>,
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
    policy_flows: HashMap<MapData, PolicyFlowKey, u64>,
    policy_flows6: HashMap<MapData, PolicyFlowKey6, u64>,
    /// Taken by [`Datapath::take_policy_events`] (tests; `sluice monitor` opens the pin).
    policy_events: Option<RingBuf<MapData>>,
    /// `None` for a datapath with private maps.
    pin_path: Option<PathBuf>,
    attached: BTreeMap<u32, (Role, Attachment)>,
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
    /// Loads the programs with their maps pinned under `pin_path`, reusing maps already pinned
    /// there (an agent restart keeps services, ids and conntrack). Mounts bpffs at /sys/fs/bpf
    /// first when `pin_path` is below it and it is not mounted. Attaches nothing.
    pub fn load(pin_path: &Path) -> anyhow::Result<Datapath> {
        if pin_path.starts_with(BPFFS_ROOT) {
            ensure_bpffs_mounted()?;
        }
        // Check before creating anything, so a wrong path leaves no directories behind.
        let existing = pin_path
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        ensure_on_bpffs(existing, pin_path)?;
        let links_dir = pin_path.join(LINKS_DIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating the pin directory {}", links_dir.display()))?;

        let map_pins: Vec<(&str, PathBuf)> = MAPS
            .iter()
            .map(|spec| (spec.name, pin_path.join(spec.name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            // Opens the map pinned at `path`, or creates and pins it there.
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(object()).with_context(|| {
            format!(
                "loading the eBPF object with its maps pinned in {}",
                pin_path.display()
            )
        })?;
        let datapath = Self::from_loaded(ebpf, Some(pin_path.to_owned()))?;
        info!(
            pin_path = %pin_path.display(),
            services = datapath.services.programmed().len(),
            "datapath loaded"
        );
        Ok(datapath)
    }

    /// Loads the programs with private, unpinned maps, which disappear with the returned value.
    /// For `BPF_PROG_RUN` (tests, `sluice trace`); such a datapath cannot be attached.
    pub fn load_unpinned() -> anyhow::Result<Datapath> {
        // The object's maps are not marked as pinned (ebpf/src/maps.rs), so without a pin path
        // the loader creates fresh ones.
        let ebpf = EbpfLoader::new()
            .load(object())
            .context("loading the eBPF object with private maps")?;
        Self::from_loaded(ebpf, None)
    }

    fn from_loaded(mut ebpf: Ebpf, pin_path: Option<PathBuf>) -> anyhow::Result<Datapath> {
        let describe = |name: &str| match &pin_path {
            Some(dir) => format!("map `{name}` pinned at {}", dir.join(name).display()),
            None => format!("map `{name}`"),
        };
        let maps = MAPS.map(|spec| {
            let map = ebpf
                .take_map(spec.name)
                .with_context(|| format!("the eBPF object has no map `{}`", spec.name))?;
            let info = map_info(&map).with_context(|| describe(spec.name))?;
            if info.0 != spec.map_type || info.1 != spec.max_entries {
                bail!(
                    "{} is a {:?} of {} entries, this agent needs a {:?} of {}: it was created by \
                     another Sluice version; `sluice cleanup` removes the old datapath",
                    describe(spec.name),
                    info.0,
                    info.1,
                    spec.map_type,
                    spec.max_entries
                );
            }
            // aya reuses a pinned map without comparing its layout, and the programs would
            // then fail the verifier without naming it.
            if let Some(want) = value_size_of(spec.name) {
                if info.2 != want {
                    bail!(
                        "{} has values of {} bytes, this agent needs {}: it was created by \
                         another Sluice version; `sluice cleanup` removes the old datapath",
                        describe(spec.name),
                        info.2,
                        want
                    );
                }
            }
            Ok(map)
        });
        let [services, backends, conntrack, affinity, source_ranges, config, drops, services6, backends6, conntrack6, config6, sock_config, sock_revnat, sock_revnat6, affinity6, source_ranges6, policy, isolated, policy_flows, policy_events, policy6, isolated6, policy_flows6] =
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
        let conntrack = HashMap::try_from(conntrack?).with_context(|| stale(MAP_CONNTRACK))?;
        let affinity = HashMap::try_from(affinity?).with_context(|| stale(MAP_AFFINITY))?;
        let source_ranges =
            LpmTrie::try_from(source_ranges?).with_context(|| stale(MAP_SOURCE_RANGES))?;
        let config: Array<MapData, NodeConfig> =
            Array::try_from(config?).with_context(|| stale(MAP_CONFIG))?;
        let drops = PerCpuArray::try_from(drops?).with_context(|| stale(MAP_DROPS))?;
        let services6 = HashMap::try_from(services6?).with_context(|| stale(MAP_SERVICES6))?;
        let backends6 = HashMap::try_from(backends6?).with_context(|| stale(MAP_BACKENDS6))?;
        let conntrack6 = HashMap::try_from(conntrack6?).with_context(|| stale(MAP_CONNTRACK6))?;
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
        let policy_flows =
            HashMap::try_from(policy_flows?).with_context(|| stale(MAP_POLICY_FLOWS))?;
        let policy_flows6 =
            HashMap::try_from(policy_flows6?).with_context(|| stale(MAP_POLICY_FLOWS6))?;
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
            load_program(program)
                .with_context(|| format!("loading program `{}` into the kernel", hook.program))?;
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

        let attachment = if tcx_supported() {
            for hook in role.hooks() {
                let link_pin = link_pin_path(&pin_path, ifindex, hook.direction);
                let program = classifier_mut(&mut self.ebpf, hook.program);
                attach_tcx(program, ifname, hook.attach_type, &link_pin).with_context(|| {
                    format!(
                        "attaching `{}` to tcx {} of {ifname} (ifindex {ifindex}), link pinned \
                         at {}",
                        hook.program,
                        hook.direction,
                        link_pin.display()
                    )
                })?;
            }
            Attachment::Tcx
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

    /// Every flow `policy_flows` remembers, with its creation time.
    pub fn policy_flows(&self) -> anyhow::Result<Vec<(PolicyFlowKey, u64)>> {
        self.policy_flows
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the policy_flows map")
    }

    /// Every IPv6 flow `policy_flows6` remembers, with its last-seen time.
    pub fn policy_flows6(&self) -> anyhow::Result<Vec<(PolicyFlowKey6, u64)>> {
        self.policy_flows6
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the policy_flows6 map")
    }

    /// Forgets every admitted flow of both families (`sluice trace` between its runs).
    pub fn clear_policy_flows(&mut self) -> anyhow::Result<usize> {
        let keys: Vec<PolicyFlowKey> = self.policy_flows()?.into_iter().map(|(k, _)| k).collect();
        for key in &keys {
            match self.policy_flows.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting a policy_flows entry"),
            }
        }
        let keys6: Vec<PolicyFlowKey6> =
            self.policy_flows6()?.into_iter().map(|(k, _)| k).collect();
        for key in &keys6 {
            match self.policy_flows6.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting a policy_flows6 entry"),
            }
        }
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
        for key in &doomed {
            match self.affinity.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an affinity entry"),
            }
        }
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
        self.conntrack6
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the conntrack6 map")
    }

    /// Every conntrack entry (two per translated flow, see `sluice-common`).
    pub fn conntrack_entries(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        self.conntrack
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the conntrack map")
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
        for key in &doomed {
            match self.conntrack6.remove(key) {
                Ok(()) => {}
                // Evicted by the LRU meanwhile.
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an IPv6 conntrack entry"),
            }
        }
        Ok(doomed.len())
    }

    /// Deletes the expired conntrack entries of both families (see [`gc`]), each with its
    /// flow's other entry, by the timeouts in the `config` map.
    pub fn collect_garbage(&mut self) -> anyhow::Result<gc::GcStats> {
        let now = gc::monotonic_now_ns();
        let timeouts = self.node_config.ct_timeouts;
        let entries = self.conntrack_entries()?;
        let doomed = gc::expired(&entries, &timeouts, now);
        for key in &doomed {
            match self.conntrack.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an expired conntrack entry"),
            }
        }
        let entries6 = self.conntrack6_entries()?;
        let doomed6 = gc::expired(&entries6, &timeouts, now);
        for key in &doomed6 {
            match self.conntrack6.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an expired IPv6 conntrack entry"),
            }
        }
        Ok(gc::GcStats {
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
        for key in &doomed {
            match self.conntrack.remove(key) {
                Ok(()) => {}
                // Evicted by the LRU meanwhile.
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting a conntrack entry"),
            }
        }
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
        for key in &keys {
            match self.affinity.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an affinity entry"),
            }
        }
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
        for key in &doomed {
            match self.affinity6.remove(key) {
                Ok(()) => {}
                Err(e) if sync::is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting an IPv6 affinity entry"),
            }
        }
        Ok(doomed.len())
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
        if !tcx_supported() {
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

fn classifier_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("from_loaded checked the object's classifiers")
}

/// Type and capacity of a map as the kernel created it (a reused pinned map may differ from the
/// object's definition).
/// The value size of the maps whose values grew since pinned maps could be left by an older
/// agent (`services` and `services6`: [`ServiceValue::inline_backends`]); extend this when
/// another map's value changes.
fn value_size_of(name: &str) -> Option<u32> {
    match name {
        MAP_SERVICES | MAP_SERVICES6 => Some(std::mem::size_of::<ServiceValue>() as u32),
        _ => None,
    }
}

/// A map's type, max_entries and value size as the kernel has them.
fn map_info(map: &aya::maps::Map) -> anyhow::Result<(MapType, u32, u32)> {
    let data = match map {
        aya::maps::Map::HashMap(data)
        | aya::maps::Map::LruHashMap(data)
        | aya::maps::Map::LpmTrie(data)
        | aya::maps::Map::Array(data)
        | aya::maps::Map::PerCpuArray(data)
        | aya::maps::Map::RingBuf(data) => data,
        other => bail!("unexpected map kind {other:?}"),
    };
    let info = data.info()?;
    Ok((info.map_type()?, info.max_entries(), info.value_size()))
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

fn attach_tcx(
    program: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
    link_pin: &Path,
) -> anyhow::Result<()> {
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

fn ensure_bpffs_mounted() -> anyhow::Result<()> {
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
