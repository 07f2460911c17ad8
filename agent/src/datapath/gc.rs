//! Conntrack garbage collection: the entries whose flow has been silent longer than its
//! timeout (by protocol and TCP state, `sluice_common::CtTimeouts`) go, each with its flow's
//! other entry, so neither direction of a finished flow lingers until LRU eviction. The
//! programs already treat such entries as absent; deleting them frees the map (and the
//! masquerade ports their reply tuples hold) and keeps `sluice state` truthful.
//!
//! Pure: [`expired`] picks the keys from a snapshot of the map; `Datapath::collect_garbage`
//! reads the maps, deletes and counts. The agent runs it periodically
//! (`--conntrack-gc-interval`).

use std::collections::{HashMap, HashSet};

use sluice_common::{CtEntry, CtTimeouts};

/// The keys to delete at `now_ns` (CLOCK_MONOTONIC, the programs' bpf_ktime_get_ns()): every
/// expired entry and, when it still is that entry's peer, the other entry of its flow.
/// Entries with `last_seen_ns` 0 are not tracked (the programs no longer write such entries;
/// an older datapath did for IPv6) and are left to LRU eviction.
pub fn expired<V: CtEntry>(
    entries: &[(V::Key, V)],
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Vec<V::Key>
where
    V::Key: Eq + std::hash::Hash,
{
    let by_key: HashMap<V::Key, &V> = entries.iter().map(|(k, v)| (*k, v)).collect();
    let mut doomed: Vec<V::Key> = Vec::new();
    let mut seen: HashSet<V::Key> = HashSet::new();
    for (key, value) in entries {
        if value.last_seen_ns() == 0
            || !timeouts.expired(V::proto(key), value.state(), value.last_seen_ns(), now_ns)
        {
            continue;
        }
        if seen.insert(*key) {
            doomed.push(*key);
        }
        let peer = V::peer(key, value);
        if let Some(peer_value) = by_key.get(&peer) {
            if V::peer(&peer, peer_value) == *key && seen.insert(peer) {
                doomed.push(peer);
            }
        }
    }
    doomed
}

/// UDP and SCTP flows of `policy_replied` idle this long are over (the programs' own idle
/// timeout, ebpf/src/policy.rs).
pub const POLICY_IDLE_NS: u64 = 120_000_000_000;

/// The `policy_replied(6)` keys to delete at `now_ns`: TCP flows idle longer than the TCP
/// established timeout (a closing connection already went back to the LRU), others idle
/// longer than [`POLICY_IDLE_NS`]. `proto` reads a key's protocol.
pub fn expired_policy_flows<K: Copy>(
    entries: &[(K, u64)],
    proto: impl Fn(&K) -> u8,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Vec<K> {
    let established_ns =
        timeouts.timeout_ns(sluice_common::PROTO_TCP, sluice_common::CT_S_SEEN_REPLY);
    entries
        .iter()
        .filter(|(key, last_seen)| {
            let idle = now_ns.saturating_sub(*last_seen);
            if proto(key) == sluice_common::PROTO_TCP {
                idle > established_ns
            } else {
                idle > POLICY_IDLE_NS
            }
        })
        .map(|(key, _)| *key)
        .collect()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the programs' bpf_ktime_get_ns().
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Entries deleted from `conntrack` and `conntrack6`.
    pub removed: usize,
    pub removed6: usize,
    /// Entries left.
    pub live: usize,
    pub live6: usize,
    /// Entries deleted from `policy_replied` and `policy_replied6`.
    pub policy_removed: usize,
}

#[cfg(test)]
mod policy_tests {
    use sluice_common::{CtTimeouts, PROTO_TCP, PROTO_UDP};

    #[test]
    fn replied_policy_flows_expire_by_protocol() {
        let t = CtTimeouts::DEFAULT;
        let hour = 3_600_000_000_000u64;
        let now = 100 * hour;
        let entries = [
            ((PROTO_TCP, 1), now - 23 * hour), // established, 23 h idle: kept
            ((PROTO_TCP, 2), now - 25 * hour), // 25 h idle: over
            ((PROTO_UDP, 3), now - 60_000_000_000), // 60 s: kept
            ((PROTO_UDP, 4), now - 130_000_000_000), // 130 s: over
        ];
        let doomed = super::expired_policy_flows(&entries, |k| k.0, &t, now);
        assert_eq!(doomed, vec![(PROTO_TCP, 2), (PROTO_UDP, 4)]);
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::{CT_DIR_FORWARD, CT_S_CLOSED, CT_S_SEEN_REPLY, PROTO_TCP, PROTO_UDP};

    use super::*;
    use sluice_common::{CtKey, CtValue};

    const SEC: u64 = 1_000_000_000;

    fn flow(proto: u8, sport: u16, state: u8, last_seen_ns: u64) -> [(CtKey, CtValue); 2] {
        let forward = CtKey {
            saddr: 1,
            daddr: 2,
            sport,
            dport: 80,
            proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let value = CtValue {
            nat_addr: 3,
            nat_port: 8080,
            flags: 0,
            snat_addr: 0,
            snat_port: 0,
            state,
            _pad: 0,
            service_id: 1,
            backend_slot: 0,
            created_ns: 1,
            last_seen_ns,
        };
        let reply = forward.peer(&value);
        let reply_value = CtValue {
            nat_addr: 2,
            nat_port: 80,
            ..value
        };
        [(forward, value), (reply, reply_value)]
    }

    #[test]
    fn expired_flows_go_with_both_entries_and_live_ones_stay() {
        let timeouts = CtTimeouts {
            tcp_close_ms: 1_000,
            udp_ms: 2_000,
            ..CtTimeouts::default()
        };
        let now = 100 * SEC;
        let closed = flow(PROTO_TCP, 1, CT_S_CLOSED, now - 2 * SEC);
        let established = flow(PROTO_TCP, 2, CT_S_SEEN_REPLY, now - 2 * SEC);
        let udp_old = flow(PROTO_UDP, 3, 0, now - 3 * SEC);
        let udp_fresh = flow(PROTO_UDP, 4, 0, now - SEC);
        let untracked = flow(PROTO_UDP, 5, 0, 0);
        let entries: Vec<(CtKey, CtValue)> = [closed, established, udp_old, udp_fresh, untracked]
            .into_iter()
            .flatten()
            .collect();
        let doomed: HashSet<CtKey> = expired(&entries, &timeouts, now).into_iter().collect();
        let expected: HashSet<CtKey> = [closed, udp_old]
            .iter()
            .flatten()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(doomed, expected);
    }

    #[test]
    fn an_orphan_goes_alone_and_a_reused_peer_stays() {
        let now = 100 * SEC;
        let timeouts = CtTimeouts {
            udp_ms: 1_000,
            ..CtTimeouts::default()
        };
        // The old reply entry of a tuple whose forward entry now belongs to another flow (to
        // another backend): the forward entry is not its peer any more.
        let [_, (old_reply, old_reply_value)] = flow(PROTO_UDP, 7, 0, now - 5 * SEC);
        let [(forward, mut value), _] = flow(PROTO_UDP, 7, 0, now);
        value.nat_addr = 9;
        let entries = vec![(old_reply, old_reply_value), (forward, value)];
        assert_eq!(expired(&entries, &timeouts, now), vec![old_reply]);
    }
}
