//! The datapath's maps. Layout and meaning: `sluice-common` (common/src/lib.rs).
//! All are pinned by name, so a restarted agent finds them again and traffic keeps flowing.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use sluice_common::{
    Backend, BackendKey, CtKey, CtValue, ServiceKey, ServiceValue, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_SERVICES,
};

#[map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "backends")]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

#[map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);
