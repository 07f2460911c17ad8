//! Programs the `policy` and `isolated` maps with the compiled NetworkPolicy
//! ([`crate::policy::WirePolicy`]), writing only what differs from what they hold.
//!
//! Order, so a packet never sees a state stricter or looser than either the old or the new
//! policy of a pod for longer than the sync itself:
//! 1. new and changed `policy` entries are written (an entry is replaced whole, atomically);
//! 2. `isolated` bits are set: a pod becomes isolated only once its allow entries are in;
//!    bits are lowered here too, before
//! 3. the entries no longer wanted are deleted (a pod that stopped being isolated no longer
//!    looks them up).
//!
//! A change never reloads programs; connections admitted before it stay admitted
//! (`policy_flows`, `conntrack`).

use anyhow::Context as _;
use aya::maps::{HashMap, LpmTrie, MapData};
use sluice_common::{policy_prefix_len, PolicyKey, PolicyValue};
use tracing::warn;

use super::{sync::is_not_found, wire};
use crate::policy::WirePolicy;

/// What a policy sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySyncStats {
    /// Successful writes and deletes.
    pub map_writes: usize,
    /// Writes that failed, each naming the pod; the rest of the policy is still programmed.
    /// A failed entry write fails closed (the pod's isolation is set regardless, and a shorter
    /// prefix never allows more).
    pub failed: Vec<String>,
}

/// The kernel's `policy` and `isolated` maps and what they hold.
pub struct PolicySync {
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    isolated: HashMap<MapData, u32, u8>,
    programmed: WirePolicy,
}

impl PolicySync {
    /// Reads back what the (possibly pinned, reused) maps hold, so the first sync after an
    /// agent restart writes only the differences.
    pub fn read_back(
        policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
        isolated: HashMap<MapData, u32, u8>,
    ) -> anyhow::Result<PolicySync> {
        let mut programmed = WirePolicy::default();
        for item in policy.iter() {
            let (key, value) = item.context("reading the policy map")?;
            match key.prefix_len().checked_sub(policy_prefix_len(0)) {
                Some(bits) if bits <= 32 => {
                    programmed.entries.insert((key.data(), bits), value);
                }
                _ => warn!(
                    prefix_len = key.prefix_len(),
                    "ignoring a policy entry Sluice does not write"
                ),
            }
        }
        for item in isolated.iter() {
            let (pod, bits) = item.context("reading the isolated map")?;
            programmed.isolated.insert(pod, bits);
        }
        Ok(PolicySync {
            policy,
            isolated,
            programmed,
        })
    }

    /// What the maps hold.
    pub fn programmed(&self) -> &WirePolicy {
        &self.programmed
    }

    /// Makes the maps hold `desired`, in the order the module describes.
    pub fn sync(&mut self, desired: &WirePolicy) -> PolicySyncStats {
        let mut stats = PolicySyncStats::default();
        let pod_of = |key: &PolicyKey| wire::addr_from_map(key.pod);

        for (entry, value) in &desired.entries {
            if self.programmed.entries.get(entry) == Some(value) {
                continue;
            }
            let (key, bits) = entry;
            match self
                .policy
                .insert(&WirePolicy::lpm_key(key, *bits), value, 0)
            {
                Ok(()) => {
                    stats.map_writes += 1;
                    self.programmed.entries.insert(*entry, *value);
                }
                Err(e) => stats.failed.push(format!(
                    "pod {}: writing a policy entry for peer {}/{bits}: {:#}",
                    pod_of(key),
                    wire::addr_from_map(key.peer),
                    anyhow::Error::new(e)
                )),
            }
        }

        let mut pods: Vec<u32> = desired.isolated.keys().copied().collect();
        pods.extend(self.programmed.isolated.keys().copied());
        pods.sort_unstable();
        pods.dedup();
        for pod in pods {
            let want = desired.isolated.get(&pod).copied().unwrap_or(0);
            let have = self.programmed.isolated.get(&pod).copied().unwrap_or(0);
            if want == have {
                continue;
            }
            let result = if want == 0 {
                match self.isolated.remove(&pod) {
                    Err(e) if is_not_found(&e) => Ok(()),
                    other => other,
                }
            } else {
                self.isolated.insert(pod, want, 0)
            };
            match result {
                Ok(()) => {
                    stats.map_writes += 1;
                    if want == 0 {
                        self.programmed.isolated.remove(&pod);
                    } else {
                        self.programmed.isolated.insert(pod, want);
                    }
                }
                Err(e) => stats.failed.push(format!(
                    "pod {}: setting its isolation: {:#}",
                    wire::addr_from_map(pod),
                    anyhow::Error::new(e)
                )),
            }
        }

        let stale: Vec<(PolicyKey, u32)> = self
            .programmed
            .entries
            .keys()
            .filter(|entry| !desired.entries.contains_key(entry))
            .copied()
            .collect();
        for entry in stale {
            let (key, bits) = entry;
            match self.policy.remove(&WirePolicy::lpm_key(&key, bits)) {
                Err(e) if !is_not_found(&e) => stats.failed.push(format!(
                    "pod {}: deleting the policy entry for peer {}/{bits}: {:#}",
                    pod_of(&key),
                    wire::addr_from_map(key.peer),
                    anyhow::Error::new(e)
                )),
                _ => {
                    stats.map_writes += 1;
                    self.programmed.entries.remove(&entry);
                }
            }
        }
        stats
    }
}
