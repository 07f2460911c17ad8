//! In-memory `services`, `backends` and `source_ranges` maps for the IPv4 sync engine, checking
//! after every write what the datapath relies on (as the sync's own unit tests do): every slot
//! below a service's count exists, the entry's inline copies are its first slots, and a service
//! that checks source ranges has some.

use std::collections::{BTreeMap, BTreeSet};

use sluice::datapath::sync::{MapOp, ServiceMaps, SourceRange};
use sluice_common::{
    Backend, BackendKey, ServiceKey, ServiceValue, INLINE_BACKENDS, SVC_F_SOURCE_RANGES,
};

#[derive(Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    pub ranges: BTreeSet<SourceRange>,
    pub writes: usize,
}

impl FakeMaps {
    fn check(&self, op: &MapOp) {
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
            assert_ne!(value.id, 0, "{op}: service id 0 ({key:?})");
            if value.flags & SVC_F_SOURCE_RANGES != 0 {
                assert!(
                    self.ranges.iter().any(|r| r.service_id == value.id),
                    "{op}: service id {} checks source ranges but has none",
                    value.id
                );
            }
            for slot in 0..value.backend_count {
                assert!(
                    self.backends.contains_key(&BackendKey {
                        service_id: value.id,
                        slot
                    }),
                    "{op}: service id {} counts {} backends but slot {slot} is missing",
                    value.id,
                    value.backend_count
                );
            }
            if let MapOp::PutService(..) = op {
                for (i, copy) in value.inline_backends.iter().enumerate() {
                    let slot = BackendKey {
                        service_id: value.id,
                        slot: i as u32,
                    };
                    let want = if (i as u32) < value.backend_count {
                        self.backends.get(&slot).copied()
                    } else {
                        Some(Backend::NONE)
                    };
                    assert_eq!(
                        Some(*copy),
                        want,
                        "{op}: inline copy {i} of {INLINE_BACKENDS}"
                    );
                }
            }
        }
    }
}

impl ServiceMaps for FakeMaps {
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
                self.services.insert(key, value);
            }
            MapOp::PutBackend(key, value) => {
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
        self.writes += 1;
        self.check(op);
        Ok(())
    }
}
