//! Programs the `policy` and `isolated` maps (and their IPv6 twins `policy6`, `isolated6`)
//! with the compiled NetworkPolicy ([`crate::policy::WirePolicy`]), writing only what differs
//! from what they hold.
//!
//! Order, so a packet never sees a state stricter or looser than either the old or the new
//! policy of a pod for longer than the sync itself:
//! 1. new and changed `policy`/`policy6` entries are written (an entry is replaced whole,
//!    atomically);
//! 2. `isolated`/`isolated6` bits are set: a pod becomes isolated only once its allow entries
//!    are in; bits are lowered here too, before
//! 3. the entries no longer wanted are deleted (a pod that stopped being isolated no longer
//!    looks them up).
//!
//! [`plan`] (pure, unit-tested) lists the writes; [`PolicySync::sync`] applies them. A change
//! never reloads programs; connections admitted before it stay admitted (`policy_flows`,
//! `policy_flows6`, `conntrack`, `conntrack6`).

use std::net::Ipv6Addr;

use anyhow::Context as _;
use aya::maps::{HashMap, LpmTrie, MapData};
use sluice_common::{policy6_prefix_len, policy_prefix_len, PolicyKey, PolicyKey6, PolicyValue};
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

/// The kernel's policy maps of both families.
pub struct PolicyMaps {
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub isolated: HashMap<MapData, u32, u8>,
    pub policy6: LpmTrie<MapData, PolicyKey6, PolicyValue>,
    pub isolated6: HashMap<MapData, [u32; 4], u8>,
}

/// The kernel's policy maps and what they hold.
pub struct PolicySync {
    maps: PolicyMaps,
    programmed: WirePolicy,
}

impl PolicySync {
    /// Reads back what the (possibly pinned, reused) maps hold, so the first sync after an
    /// agent restart writes only the differences.
    pub fn read_back(maps: PolicyMaps) -> anyhow::Result<PolicySync> {
        let mut programmed = WirePolicy::default();
        for item in maps.policy.iter() {
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
        for item in maps.isolated.iter() {
            let (pod, bits) = item.context("reading the isolated map")?;
            programmed.isolated.insert(pod, bits);
        }
        for item in maps.policy6.iter() {
            let (key, value) = item.context("reading the policy6 map")?;
            match key.prefix_len().checked_sub(policy6_prefix_len(0)) {
                Some(bits) if bits <= 128 => {
                    programmed.entries6.insert((key.data(), bits), value);
                }
                _ => warn!(
                    prefix_len = key.prefix_len(),
                    "ignoring a policy6 entry Sluice does not write"
                ),
            }
        }
        for item in maps.isolated6.iter() {
            let (pod, bits) = item.context("reading the isolated6 map")?;
            programmed.isolated6.insert(pod, bits);
        }
        Ok(PolicySync { maps, programmed })
    }

    /// What the maps hold.
    pub fn programmed(&self) -> &WirePolicy {
        &self.programmed
    }

    /// Makes the maps hold `desired`, in the order the module describes ([`plan`]).
    pub fn sync(&mut self, desired: &WirePolicy) -> PolicySyncStats {
        let mut stats = PolicySyncStats::default();
        let gone = |r: Result<(), aya::maps::MapError>| match r {
            Err(e) if is_not_found(&e) => Ok(()),
            other => other,
        };
        for op in plan(&self.programmed, desired) {
            let m = &mut self.maps;
            let result = match &op {
                PolicyOp::PutEntry(key, bits, value) => {
                    m.policy.insert(&WirePolicy::lpm_key(key, *bits), value, 0)
                }
                PolicyOp::DeleteEntry(key, bits) => {
                    gone(m.policy.remove(&WirePolicy::lpm_key(key, *bits)))
                }
                PolicyOp::SetIsolated(pod, bits) => m.isolated.insert(pod, bits, 0),
                PolicyOp::ClearIsolated(pod) => gone(m.isolated.remove(pod)),
                PolicyOp::PutEntry6(key, bits, value) => {
                    m.policy6
                        .insert(&WirePolicy::lpm_key6(key, *bits), value, 0)
                }
                PolicyOp::DeleteEntry6(key, bits) => {
                    gone(m.policy6.remove(&WirePolicy::lpm_key6(key, *bits)))
                }
                PolicyOp::SetIsolated6(pod, bits) => m.isolated6.insert(pod, bits, 0),
                PolicyOp::ClearIsolated6(pod) => gone(m.isolated6.remove(pod)),
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

/// One write to a policy map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    /// An entry (key, peer prefix bits) and its ports.
    PutEntry(PolicyKey, u32, PolicyValue),
    DeleteEntry(PolicyKey, u32),
    SetIsolated(u32, u8),
    ClearIsolated(u32),
    /// The same on `policy6` and `isolated6`.
    PutEntry6(PolicyKey6, u32, PolicyValue),
    DeleteEntry6(PolicyKey6, u32),
    SetIsolated6([u32; 4], u8),
    ClearIsolated6([u32; 4]),
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
            PolicyOp::PutEntry6(key, bits, value) => {
                programmed.entries6.insert((key, bits), value);
            }
            PolicyOp::DeleteEntry6(key, bits) => {
                programmed.entries6.remove(&(key, bits));
            }
            PolicyOp::SetIsolated6(pod, bits) => {
                programmed.isolated6.insert(pod, bits);
            }
            PolicyOp::ClearIsolated6(pod) => {
                programmed.isolated6.remove(&pod);
            }
        }
    }
}

/// An IPv6 address as the maps hold it.
fn addr6(addr: [u32; 4]) -> Ipv6Addr {
    super::sync6::addr6_from_map(addr)
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
            PolicyOp::PutEntry6(key, bits, _) => write!(
                f,
                "pod {}: writing the policy6 entry for peer {}/{bits}",
                addr6(key.pod),
                addr6(key.peer)
            ),
            PolicyOp::DeleteEntry6(key, bits) => write!(
                f,
                "pod {}: deleting the policy6 entry for peer {}/{bits}",
                addr6(key.pod),
                addr6(key.peer)
            ),
            PolicyOp::SetIsolated6(addr, bits) => write!(
                f,
                "pod {}: setting its isolation to {bits:#04b}",
                addr6(*addr)
            ),
            PolicyOp::ClearIsolated6(addr) => {
                write!(f, "pod {}: clearing its isolation", addr6(*addr))
            }
        }
    }
}

/// One family's maps as [`plan`] compares them.
struct Family<'a, P: Ord + Copy, K: Ord + Copy> {
    entries: &'a std::collections::BTreeMap<(K, u32), PolicyValue>,
    isolated: &'a std::collections::BTreeMap<P, u8>,
}

/// The (puts, isolation changes, deletes) that turn one family's `have` into `want`.
fn plan_family<P: Ord + Copy, K: Ord + Copy>(
    have: Family<P, K>,
    want: Family<P, K>,
    put: impl Fn(K, u32, PolicyValue) -> PolicyOp,
    set: impl Fn(P, u8) -> PolicyOp,
    clear: impl Fn(P) -> PolicyOp,
    delete: impl Fn(K, u32) -> PolicyOp,
) -> [Vec<PolicyOp>; 3] {
    let puts = want
        .entries
        .iter()
        .filter(|(entry, value)| have.entries.get(entry) != Some(value))
        .map(|((key, bits), value)| put(*key, *bits, *value))
        .collect();
    let pods: std::collections::BTreeSet<P> = want
        .isolated
        .keys()
        .chain(have.isolated.keys())
        .copied()
        .collect();
    let mut isolation = Vec::new();
    for pod in pods {
        let wanted = want.isolated.get(&pod).copied().unwrap_or(0);
        let had = have.isolated.get(&pod).copied().unwrap_or(0);
        if wanted == had {
            continue;
        }
        isolation.push(if wanted == 0 {
            clear(pod)
        } else {
            set(pod, wanted)
        });
    }
    let deletes = have
        .entries
        .keys()
        .filter(|entry| !want.entries.contains_key(entry))
        .map(|(key, bits)| delete(*key, *bits))
        .collect();
    [puts, isolation, deletes]
}

/// The writes that turn `programmed` into `desired`, only the differences, in the order the
/// module describes: new and changed entries, then isolation bits, then stale entries (each
/// step IPv4 first, then IPv6).
pub fn plan(programmed: &WirePolicy, desired: &WirePolicy) -> Vec<PolicyOp> {
    let v4 = plan_family(
        Family {
            entries: &programmed.entries,
            isolated: &programmed.isolated,
        },
        Family {
            entries: &desired.entries,
            isolated: &desired.isolated,
        },
        PolicyOp::PutEntry,
        PolicyOp::SetIsolated,
        PolicyOp::ClearIsolated,
        PolicyOp::DeleteEntry,
    );
    let v6 = plan_family(
        Family {
            entries: &programmed.entries6,
            isolated: &programmed.isolated6,
        },
        Family {
            entries: &desired.entries6,
            isolated: &desired.isolated6,
        },
        PolicyOp::PutEntry6,
        PolicyOp::SetIsolated6,
        PolicyOp::ClearIsolated6,
        PolicyOp::DeleteEntry6,
    );
    v4.into_iter()
        .zip(v6)
        .flat_map(|(a, b)| a.into_iter().chain(b))
        .collect()
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
            ..WirePolicy::default()
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

    #[test]
    fn ipv6_entries_follow_the_same_order_after_the_ipv4_ones_of_each_step() {
        use sluice_common::PolicyKey6;
        let addr = |s: &str| crate::datapath::sync6::addr6_to_map(s.parse().unwrap());
        let pod6 = addr("fd00::a");
        let key6 = PolicyKey6 {
            pod: pod6,
            way: WAY_INGRESS,
            proto: PROTO_TCP,
            _pad: 0,
            peer: addr("fd00::b"),
        };
        let old = WirePolicy {
            entries6: [((key6, 128), ports(80, 80))].into(),
            isolated6: [(pod6, ISOLATED_INGRESS)].into(),
            ..policy(&[], &[])
        };
        let mut new = policy(&[(key(1, 1), ports(80, 80))], &[(1, ISOLATED_INGRESS)]);
        new.entries6 = [((key6, 64), ports(81, 81))].into();
        new.isolated6 = [(pod6, ISOLATED_INGRESS | ISOLATED_EGRESS)].into();
        let ops = plan(&old, &new);
        assert_eq!(
            ops,
            vec![
                PolicyOp::PutEntry(key(1, 1), 32, ports(80, 80)),
                PolicyOp::PutEntry6(key6, 64, ports(81, 81)),
                PolicyOp::SetIsolated(u32::from_ne_bytes([10, 244, 0, 1]), ISOLATED_INGRESS),
                PolicyOp::SetIsolated6(pod6, ISOLATED_INGRESS | ISOLATED_EGRESS),
                PolicyOp::DeleteEntry6(key6, 128),
            ]
        );
        let mut applied = old.clone();
        for op in &ops {
            op.record(&mut applied);
        }
        assert_eq!(applied, new);
        assert!(plan(&new, &new).is_empty());
        assert_eq!(
            PolicyOp::ClearIsolated6(pod6).to_string(),
            "pod fd00::a: clearing its isolation"
        );
    }
}
