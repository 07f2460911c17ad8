//! The datapath's maps. Layout and meaning: `sluice-common` (common/src/lib.rs).
//!
//! The object does not mark the maps as pinned: where (and whether) they are pinned is the
//! loader's decision. The agent pins them by name under its pin directory (`<pin>/services`, ...)
//! so a restarted agent finds them again and traffic keeps flowing; `sluice trace` and the tests
//! load the same object with private maps. Marking them pinned here would make every loader that
//! forgets a pin directory create or reuse `/sys/fs/bpf/<name>`, i.e. touch a running agent's maps.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use sluice_common::{
    Backend, BackendKey, CtKey, CtValue, ServiceKey, ServiceValue, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_SERVICES,
};

#[map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "backends")]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);
