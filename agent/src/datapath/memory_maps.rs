//! In-memory service maps for the sync engine's tests and the fuzz targets: the same
//! [`ServiceMaps`] the kernel's maps implement, checking the datapath's invariants after every
//! write.

use std::collections::{BTreeSet, HashMap};

use anyhow::bail;
use sluice_common::{Backend, BackendKey, ServiceKey, ServiceValue, SVC_F_SOURCE_RANGES};

use super::{
    sync::{MapOp, ServiceMaps, SourceRange},
    wire,
};

/// In-memory `services`, `backends` and `source_ranges` maps that record every write and
/// check, after each one, what the datapath relies on: every service id is non-zero, every
/// slot below a service's count exists, the entry's inline copies are its first slots, and a
/// service that checks source ranges has some. `max_*` make a map full, as the kernel's are.
#[derive(Default)]
pub struct MemoryMaps {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<BackendKey, Backend>,
    pub ranges: BTreeSet<SourceRange>,
    /// Every write, in order.
    pub log: Vec<MapOp>,
    pub max_services: Option<usize>,
    pub max_backends: Option<usize>,
}

impl MemoryMaps {
    /// Checks, for the service(s) `op` touched, the invariant the datapath relies on: every
    /// slot below a service's count exists. (Only the touched ones: checking every service
    /// after every write would make the 10,000-service test quadratic.)
    fn check_every_counted_slot_exists(&self, op: &MapOp) {
        let touched: Vec<(&ServiceKey, &ServiceValue)> = match op {
            MapOp::PutService(key, _) => self.services.get_key_value(key).into_iter().collect(),
            MapOp::DeleteBackend(BackendKey { service_id, .. })
            | MapOp::DeleteSourceRange(SourceRange { service_id, .. }) => self
                .services
                .iter()
                .filter(|(_, v)| v.id == *service_id)
                .collect(),
            MapOp::PutBackend(..) | MapOp::DeleteService(_) | MapOp::PutSourceRange(_) => {
                Vec::new()
            }
        };
        for (key, value) in touched {
            assert_ne!(
                value.id,
                0,
                "{op}: service {} has id 0",
                wire::describe_key(key)
            );
            if value.flags & SVC_F_SOURCE_RANGES != 0 {
                assert!(
                    self.ranges.iter().any(|r| r.service_id == value.id),
                    "service {} checks source ranges but has none; writes: {:?}",
                    wire::describe_key(key),
                    self.log
                );
            }
            for slot in 0..value.backend_count {
                assert!(
                    self.backends.contains_key(&BackendKey {
                        service_id: value.id,
                        slot
                    }),
                    "service {} counts {} backends but slot {slot} is missing; writes: {:?}",
                    wire::describe_key(key),
                    value.backend_count,
                    self.log
                );
            }
            // The entry's copies of its first slots are the slots (once it is written).
            if let MapOp::PutService(..) = op {
                for (i, copy) in value.inline_backends.iter().enumerate() {
                    let slot = BackendKey {
                        service_id: value.id,
                        slot: i as u32,
                    };
                    let want = match (i as u32) < value.backend_count {
                        true => self.backends.get(&slot).copied(),
                        false => Some(Backend::NONE),
                    };
                    assert_eq!(
                        Some(*copy),
                        want,
                        "service {} copies slot {i} wrong; writes: {:?}",
                        wire::describe_key(key),
                        self.log
                    );
                }
            }
        }
    }
}

impl ServiceMaps for MemoryMaps {
    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_backends(&self) -> anyhow::Result<Vec<(BackendKey, Backend)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_source_ranges(&self) -> anyhow::Result<Vec<SourceRange>> {
        Ok(self.ranges.iter().copied().collect())
    }

    fn apply(&mut self, op: &MapOp) -> anyhow::Result<()> {
        match *op {
            MapOp::PutService(key, value) => {
                if !self.services.contains_key(&key)
                    && Some(self.services.len()) == self.max_services
                {
                    bail!("{op}: Argument list too long (os error 7)");
                }
                self.services.insert(key, value);
            }
            MapOp::PutBackend(key, value) => {
                if !self.backends.contains_key(&key)
                    && Some(self.backends.len()) == self.max_backends
                {
                    bail!("{op}: Argument list too long (os error 7)");
                }
                self.backends.insert(key, value);
            }
            MapOp::DeleteService(key) => {
                self.services.remove(&key);
            }
            MapOp::DeleteBackend(key) => {
                self.backends.remove(&key);
            }
            MapOp::PutSourceRange(range) => {
                self.ranges.insert(range);
            }
            MapOp::DeleteSourceRange(range) => {
                self.ranges.remove(&range);
            }
        }
        self.log.push(*op);
        self.check_every_counted_slot_exists(op);
        Ok(())
    }
}
