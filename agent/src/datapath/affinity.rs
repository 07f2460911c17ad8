//! Affinity ids: which frontends share a client's sessionAffinity.
//!
//! kube-proxy keeps a client's affinity per service port (in its KUBE-SVC chain, by endpoint),
//! so a client that reached a backend through the ClusterIP keeps it through the NodePort, an
//! external IP or a load balancer IP of the same port. The datapath keys affinity entries by
//! [`sluice_common::ServiceValue::affinity_id`]; this module gives one id to the frontends of a
//! service port (and family: each family has its own map and ids) that balance over the same
//! backends: an [`AffinityGroup`]. A frontend with another backend set (a Local traffic
//! policy's node-local endpoints) is a group of its own, so the backend an entry names is
//! always one of the frontend's backends.
//!
//! Ids stay with a group as its backends change: a group takes the id its members already
//! have (the most common one; a group that split keeps it in the part that had it most). A new
//! group gets an id that no frontend had before this sync. An entry can only name a backend of
//! its group: when a frontend loses backends the sync reports them with the frontend's old
//! affinity id and their entries are purged (`purge.rs`), and the entries of an id no frontend
//! uses any more are purged whole ([`retired`]).
//! (Where kube-proxy would let a ClusterIP client keep a local endpoint through a Local
//! NodePort, Sluice balances that client again: the two sets differ.)

use std::collections::{BTreeMap, BTreeSet};

use crate::state::BackendAddr;

/// What frontends with the same affinity id have in common.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AffinityGroup {
    /// The service port, `namespace/name:port-name` (`ServiceEntry::name`).
    pub service_port: String,
    pub proto: u8,
    /// The timeout, in seconds (the same for a service's frontends).
    pub timeout: u32,
    /// The backends, sorted.
    pub backends: Vec<BackendAddr>,
}

/// The affinity id of each member (frontend key `K` with affinity), given the ids the maps
/// hold now (`current`, by key; 0 or absent: none). `next` is where the search for a new id
/// starts (round-robin, so an id just given up is not handed out at once); it moves on.
pub fn assign<K: Ord + Copy>(
    members: &[(K, AffinityGroup)],
    current: &BTreeMap<K, u32>,
    next: &mut u32,
) -> BTreeMap<K, u32> {
    let mut groups: BTreeMap<&AffinityGroup, Vec<K>> = BTreeMap::new();
    for (key, group) in members {
        groups.entry(group).or_default().push(*key);
    }
    let used_before: BTreeSet<u32> = current.values().copied().filter(|id| *id != 0).collect();
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    let mut ids: BTreeMap<&AffinityGroup, u32> = BTreeMap::new();
    // Biggest groups first, so a split group's id goes with most of its frontends.
    let mut order: Vec<(&AffinityGroup, &Vec<K>)> = groups.iter().map(|(g, k)| (*g, k)).collect();
    order.sort_by_key(|(_, keys)| std::cmp::Reverse(keys.len()));
    for (group, keys) in &order {
        let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
        for key in keys.iter() {
            if let Some(&id) = current.get(key) {
                if id != 0 && !claimed.contains(&id) {
                    *votes.entry(id).or_default() += 1;
                }
            }
        }
        // The most common id; the smallest on a tie.
        if let Some((&id, _)) = votes.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) {
            claimed.insert(id);
            ids.insert(group, id);
        }
    }
    for (group, _) in &order {
        if ids.contains_key(group) {
            continue;
        }
        let id = loop {
            let id = *next;
            *next = next.wrapping_add(1).max(1);
            if id != 0 && !used_before.contains(&id) && !claimed.contains(&id) {
                break id;
            }
        };
        claimed.insert(id);
        ids.insert(group, id);
    }
    members
        .iter()
        .map(|(key, group)| (*key, ids[group]))
        .collect()
}

/// The affinity ids in use before a sync and not after: their entries are purged whole.
pub fn retired(
    before: impl Iterator<Item = u32>,
    after: impl Iterator<Item = u32>,
) -> BTreeSet<u32> {
    let after: BTreeSet<u32> = after.collect();
    before
        .filter(|id| *id != 0 && !after.contains(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, backends: &[u16]) -> AffinityGroup {
        AffinityGroup {
            service_port: name.into(),
            proto: 6,
            timeout: 10_800,
            backends: backends
                .iter()
                .map(|p| BackendAddr {
                    ip: "10.244.1.2".parse().unwrap(),
                    port: *p,
                })
                .collect(),
        }
    }

    #[test]
    fn frontends_of_a_service_port_with_the_same_backends_share_an_id() {
        let members = vec![
            ("clusterip", group("ns/a:http", &[1, 2])),
            ("nodeport", group("ns/a:http", &[1, 2])),
            ("local-lb", group("ns/a:http", &[1])),
            ("other", group("ns/b:http", &[1, 2])),
        ];
        let mut next = 1;
        let ids = assign(&members, &BTreeMap::new(), &mut next);
        assert_eq!(ids["clusterip"], ids["nodeport"]);
        assert_ne!(ids["clusterip"], ids["local-lb"]);
        assert_ne!(ids["clusterip"], ids["other"]);
        assert_ne!(ids["local-lb"], ids["other"]);
        assert!(ids.values().all(|id| *id != 0));
    }

    #[test]
    fn ids_stay_as_backends_change_and_new_groups_never_take_an_id_in_use() {
        let mut next = 1;
        let first = assign(
            &[
                ("clusterip", group("ns/a:http", &[1, 2])),
                ("nodeport", group("ns/a:http", &[1, 2])),
            ],
            &BTreeMap::new(),
            &mut next,
        );
        let current: BTreeMap<_, _> = first.clone();
        // A backend goes: the same id.
        let second = assign(
            &[
                ("clusterip", group("ns/a:http", &[1])),
                ("nodeport", group("ns/a:http", &[1])),
            ],
            &current,
            &mut next,
        );
        assert_eq!(second, first);
        // The NodePort becomes Local (other backends): the ClusterIP keeps the id, the
        // NodePort gets one no frontend had.
        let mut next = first["clusterip"]; // even when the search starts at the id in use
        let third = assign(
            &[
                ("clusterip", group("ns/a:http", &[1, 2])),
                ("nodeport", group("ns/a:http", &[2])),
                ("new", group("ns/c:http", &[2])),
            ],
            &current,
            &mut next,
        );
        assert_eq!(third["clusterip"], first["clusterip"]);
        assert_ne!(third["nodeport"], first["clusterip"]);
        assert_ne!(third["new"], first["clusterip"]);
        assert_ne!(third["new"], third["nodeport"]);
    }

    #[test]
    fn ids_no_frontend_uses_any_more_are_retired() {
        assert_eq!(
            retired([1, 2, 0, 3].into_iter(), [2, 3, 4].into_iter()),
            BTreeSet::from([1])
        );
    }
}
