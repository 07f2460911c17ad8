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
//! [`plan`] (pure, unit-tested) lists the writes; [`PolicySync::sync`] applies them. A change
//! never reloads programs; connections admitted before it stay admitted (`policy_flows`,
//! `conntrack`).

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

    /// Makes the maps hold `desired`, in the order the module describes ([`plan`]).
    pub fn sync(&mut self, desired: &WirePolicy) -> PolicySyncStats {
        let mut stats = PolicySyncStats::default();
        for op in plan(&self.programmed, desired) {
            let result = match &op {
                PolicyOp::PutEntry(key, bits, value) => {
                    self.policy
                        .insert(&WirePolicy::lpm_key(key, *bits), value, 0)
                }
                PolicyOp::DeleteEntry(key, bits) => {
                    match self.policy.remove(&WirePolicy::lpm_key(key, *bits)) {
                        Err(e) if is_not_found(&e) => Ok(()),
                        other => other,
                    }
                }
                PolicyOp::SetIsolated(pod, bits) => self.isolated.insert(pod, bits, 0),
                PolicyOp::ClearIsolated(pod) => match self.isolated.remove(pod) {
                    Err(e) if is_not_found(&e) => Ok(()),
                    other => other,
                },
            };
            match result {
                Ok(()) => {
                    stats.map_writes += 1;
                    op.record(&mut self.programmed);
                }
                Err(e) => stats
                    .failed
                    .push(format!("{op}: {:#}", anyhow::Error::new(e))),
            }
        }
        stats
    }
}

/// One write to the `policy` or `isolated` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    /// An entry (key, peer prefix bits) and its ports.
    PutEntry(PolicyKey, u32, PolicyValue),
    DeleteEntry(PolicyKey, u32),
    SetIsolated(u32, u8),
    ClearIsolated(u32),
}

impl PolicyOp {
    /// Notes a successful write in what the maps hold.
    fn record(&self, programmed: &mut WirePolicy) {
        match *self {
            PolicyOp::PutEntry(key, bits, value) => {
                programmed.entries.insert((key, bits), value);
            }
            PolicyOp::DeleteEntry(key, bits) => {
                programmed.entries.remove(&(key, bits));
            }
            PolicyOp::SetIsolated(pod, bits) => {
                programmed.isolated.insert(pod, bits);
            }
            PolicyOp::ClearIsolated(pod) => {
                programmed.isolated.remove(&pod);
            }
        }
    }
}

impl std::fmt::Display for PolicyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pod = |addr: u32| wire::addr_from_map(addr);
        match self {
            PolicyOp::PutEntry(key, bits, _) => write!(
                f,
                "pod {}: writing the policy entry for peer {}/{bits}",
                pod(key.pod),
                pod(key.peer)
            ),
            PolicyOp::DeleteEntry(key, bits) => write!(
                f,
                "pod {}: deleting the policy entry for peer {}/{bits}",
                pod(key.pod),
                pod(key.peer)
            ),
            PolicyOp::SetIsolated(addr, bits) => {
                write!(
                    f,
                    "pod {}: setting its isolation to {bits:#04b}",
                    pod(*addr)
                )
            }
            PolicyOp::ClearIsolated(addr) => {
                write!(f, "pod {}: clearing its isolation", pod(*addr))
            }
        }
    }
}

/// The writes that turn `programmed` into `desired`, only the differences, in the order the
/// module describes: new and changed entries, then isolation bits, then stale entries.
pub fn plan(programmed: &WirePolicy, desired: &WirePolicy) -> Vec<PolicyOp> {
    let mut ops: Vec<PolicyOp> = desired
        .entries
        .iter()
        .filter(|(entry, value)| programmed.entries.get(entry) != Some(value))
        .map(|((key, bits), value)| PolicyOp::PutEntry(*key, *bits, *value))
        .collect();
    let pods: std::collections::BTreeSet<u32> = desired
        .isolated
        .keys()
        .chain(programmed.isolated.keys())
        .copied()
        .collect();
    for pod in pods {
        let want = desired.isolated.get(&pod).copied().unwrap_or(0);
        let have = programmed.isolated.get(&pod).copied().unwrap_or(0);
        if want == have {
            continue;
        }
        ops.push(if want == 0 {
            PolicyOp::ClearIsolated(pod)
        } else {
            PolicyOp::SetIsolated(pod, want)
        });
    }
    ops.extend(
        programmed
            .entries
            .keys()
            .filter(|entry| !desired.entries.contains_key(entry))
            .map(|(key, bits)| PolicyOp::DeleteEntry(*key, *bits)),
    );
    ops
}

#[cfg(test)]
mod tests {
    use sluice_common::{
        PolicyPortRange, ISOLATED_EGRESS, ISOLATED_INGRESS, PROTO_TCP, WAY_INGRESS,
    };

    use super::*;

    fn key(pod: u8, peer: u8) -> PolicyKey {
        PolicyKey {
            pod: u32::from_ne_bytes([10, 244, 0, pod]),
            way: WAY_INGRESS,
            proto: PROTO_TCP,
            _pad: 0,
            peer: u32::from_ne_bytes([10, 244, 1, peer]),
        }
    }

    fn ports(first: u16, last: u16) -> PolicyValue {
        let mut value = PolicyValue {
            count: 1,
            ..Default::default()
        };
        value.ranges[0] = PolicyPortRange { first, last };
        value
    }

    fn policy(entries: &[(PolicyKey, PolicyValue)], isolated: &[(u8, u8)]) -> WirePolicy {
        WirePolicy {
            entries: entries.iter().map(|(k, v)| ((*k, 32), *v)).collect(),
            isolated: isolated
                .iter()
                .map(|(pod, bits)| (u32::from_ne_bytes([10, 244, 0, *pod]), *bits))
                .collect(),
        }
    }

    #[test]
    fn policy_sync_writes_allows_before_isolating_and_deletes_after_opening() {
        let old = policy(&[(key(1, 1), ports(80, 80))], &[(1, ISOLATED_INGRESS)]);
        // Pod 1 opens, pod 2 becomes isolated with one entry, pod 3 changes its bits.
        let new = policy(
            &[(key(2, 1), ports(80, 81))],
            &[(2, ISOLATED_INGRESS), (3, ISOLATED_EGRESS)],
        );
        let ops = plan(&old, &new);
        let pod = |n: u8| u32::from_ne_bytes([10, 244, 0, n]);
        assert_eq!(
            ops,
            vec![
                PolicyOp::PutEntry(key(2, 1), 32, ports(80, 81)),
                PolicyOp::ClearIsolated(pod(1)),
                PolicyOp::SetIsolated(pod(2), ISOLATED_INGRESS),
                PolicyOp::SetIsolated(pod(3), ISOLATED_EGRESS),
                PolicyOp::DeleteEntry(key(1, 1), 32),
            ]
        );
        // Applied in order, they give the new policy; planning it again gives nothing.
        let mut applied = old.clone();
        for op in &ops {
            op.record(&mut applied);
        }
        assert_eq!(applied, new);
        assert!(plan(&new, &new).is_empty());
        // A changed entry is one overwrite, in place.
        let widened = policy(
            &[(key(2, 1), ports(80, 90))],
            &[(2, ISOLATED_INGRESS), (3, ISOLATED_EGRESS)],
        );
        assert_eq!(
            plan(&new, &widened),
            vec![PolicyOp::PutEntry(key(2, 1), 32, ports(80, 90))]
        );
        assert!(ops[0].to_string().contains("pod 10.244.0.2"), "{}", ops[0]);
    }
}
