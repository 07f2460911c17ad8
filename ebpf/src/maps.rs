//! The datapath's maps. Layout and meaning: `sluice-common` (common/src/lib.rs).
//!
//! The object does not mark the maps as pinned: where (and whether) they are pinned is the
//! loader's decision. The agent pins them by name under its pin directory (`<pin>/services`, ...)
//! so a restarted agent finds them again and traffic keeps flowing; `sluice trace` and the tests
//! load the same object with private maps. Marking them pinned here would make every loader that
//! forgets a pin directory create or reuse `/sys/fs/bpf/<name>`, i.e. touch a running agent's maps.
//!
//! The sizes of `services*`, `backends*` and `conntrack*` below are defaults: the agent sets
//! them at load time (`--max-services`, `--max-backends`, `--max-conntrack`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sluice_common::{
    AffinityKey, AffinityKey6, AffinityValue, AffinityValue6, Backend, Backend6, BackendKey, CtKey,
    CtKey6, CtValue, CtValue6, NodeConfig, NodeConfig6, PolicyFlowKey, PolicyFlowKey6, PolicyKey,
    PolicyKey6, PolicyValue, ServiceKey, ServiceKey6, ServiceValue, SockConfig, SockRevKey,
    SockRevKey6, SockRevValue, SockRevValue6, SourceRangeKey, SourceRangeKey6, MAX_AFFINITY,
    MAX_BACKENDS, MAX_CONNTRACK, MAX_POLICY_ENTRIES, MAX_POLICY_FLOWS, MAX_POLICY_PODS,
    MAX_SERVICES, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, POLICY_EVENTS_BYTES, REASON_COUNT,
};

use crate::v6::Scratch6;

#[map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "backends")]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Flows until their backend answers (evictable: a flood of new flows evicts only these).
#[map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// Flows the backend answered: never evicted; the agent deletes them when they expire.
#[map(name = "ct_answered")]
pub static CT_ANSWERED: HashMap<CtKey, CtValue> = HashMap::with_max_entries(MAX_CONNTRACK, 0);

#[map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);

#[map(name = "source_ranges")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);

#[map(name = "config")]
pub static CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

#[map(name = "drops")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

#[map(name = "services6")]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "backends6")]
pub static BACKENDS6: HashMap<BackendKey, Backend6> = HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "conntrack6")]
pub static CONNTRACK6: LruHashMap<CtKey6, CtValue6> =
    LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

#[map(name = "ct_answered6")]
pub static CT_ANSWERED6: HashMap<CtKey6, CtValue6> = HashMap::with_max_entries(MAX_CONNTRACK, 0);

#[map(name = "config6")]
pub static CONFIG6: Array<NodeConfig6> = Array::with_max_entries(1, 0);

#[map(name = "sock_config")]
pub static SOCK_CONFIG: Array<SockConfig> = Array::with_max_entries(1, 0);

#[map(name = "sock_revnat")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(MAX_SOCK_REVNAT, 0);

#[map(name = "sock_revnat6")]
pub static SOCK_REVNAT6: LruHashMap<SockRevKey6, SockRevValue6> =
    LruHashMap::with_max_entries(MAX_SOCK_REVNAT, 0);

#[map(name = "affinity6")]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue6> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);

#[map(name = "source_ranges6")]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);

/// The IPv6 path's working space (v6/mod.rs), one per CPU; never pinned.
#[map(name = "scratch6")]
pub static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "policy")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map(name = "isolated")]
pub static ISOLATED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_POLICY_PODS, 0);

#[map(name = "policy_flows")]
pub static POLICY_FLOWS: LruHashMap<PolicyFlowKey, u64> =
    LruHashMap::with_max_entries(MAX_POLICY_FLOWS, 0);

#[map(name = "policy_events")]
pub static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(POLICY_EVENTS_BYTES, 0);

#[map(name = "policy6")]
pub static POLICY6: LpmTrie<PolicyKey6, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);

#[map(name = "isolated6")]
pub static ISOLATED6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(MAX_POLICY_PODS, 0);

#[map(name = "policy_flows6")]
pub static POLICY_FLOWS6: LruHashMap<PolicyFlowKey6, u64> =
    LruHashMap::with_max_entries(MAX_POLICY_FLOWS, 0);

/// Admitted flows that had a reply: never evicted (policy.rs `known_in`); the agent expires
/// them.
#[map(name = "policy_replied")]
pub static POLICY_REPLIED: HashMap<PolicyFlowKey, u64> =
    HashMap::with_max_entries(MAX_POLICY_FLOWS, 0);

#[map(name = "policy_replied6")]
pub static POLICY_REPLIED6: HashMap<PolicyFlowKey6, u64> =
    HashMap::with_max_entries(MAX_POLICY_FLOWS, 0);
