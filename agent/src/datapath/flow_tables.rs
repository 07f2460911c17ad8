//! A flow table as the agent sees it: two maps, the flows that had an answer (`ct_answered`,
//! `policy_replied`, ...: never evicted, the agent's garbage collection deletes them) and the
//! others (`conntrack`, `policy_flows`, ...: an LRU), see `sluice-common`. Reading returns
//! both; deleting deletes from both, so callers never care which map a flow is in at the
//! moment.

use anyhow::Context;
use aya::maps::{HashMap, MapData};

use super::remove_keys;

pub(crate) struct FlowTables<K, V> {
    pub(crate) answered: HashMap<MapData, K, V>,
    pub(crate) unanswered: HashMap<MapData, K, V>,
    /// The map names, for messages (answered, unanswered).
    pub(crate) names: [&'static str; 2],
}

impl<K: aya::Pod, V: aya::Pod> FlowTables<K, V> {
    /// Every entry: the answered ones first. A flow the programs move between the two reads
    /// may be listed twice or not at all; callers act on keys, which is harmless either way.
    pub(crate) fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut entries: Vec<(K, V)> = self
            .answered
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading the {} map", self.names[0]))?;
        for entry in self.unanswered.iter() {
            entries.push(entry.with_context(|| format!("reading the {} map", self.names[1]))?);
        }
        Ok(entries)
    }

    /// Deletes the answered entries `pick` chooses from all of them (a key already gone is
    /// fine); returns how many.
    pub(crate) fn remove_answered(
        &mut self,
        pick: impl FnOnce(&[(K, V)]) -> Vec<K>,
    ) -> anyhow::Result<usize> {
        let answered: Vec<(K, V)> = self
            .answered
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading the {} map", self.names[0]))?;
        let doomed = pick(&answered);
        let what = format!("an entry of {}", self.names[0]);
        remove_keys(&mut self.answered, &doomed, &what)?;
        Ok(doomed.len())
    }

    /// Deletes `keys` from both maps (a key already gone is fine).
    pub(crate) fn remove(&mut self, keys: &[K], what: &str) -> anyhow::Result<()> {
        remove_keys(&mut self.answered, keys, what)?;
        remove_keys(&mut self.unanswered, keys, what)
    }
}
