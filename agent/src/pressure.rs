//! Exhaustion and flood protection, as the log shows it: the programs count (in `drops`) the
//! new flows they could not masquerade, the answered flows they could not protect from
//! eviction, and the TCP segments of unknown connections they dropped; this reports each
//! counter that moved, with what to do about it, at most once per check (the agent checks at
//! every conntrack garbage collection, `--conntrack-gc-interval`).

use std::collections::BTreeMap;

use sluice_common::{
    reason_name, Reason, REASON_CT_ANSWERED_FULL, REASON_DROP_NO_SNAT_PORT,
    REASON_DROP_TCP_NO_FLOW, REASON_POLICY_REPLIED_FULL,
};

/// The counters reported, and what each means for an operator.
pub const WATCHED: [(Reason, &str); 4] = [
    (
        REASON_DROP_NO_SNAT_PORT,
        "new masqueraded flows dropped: no free masquerade port toward their backend \
         (--masquerade-port-range; each port is needed once per backend address and port)",
    ),
    (
        REASON_CT_ANSWERED_FULL,
        "answered flows left where new flows can evict them: ct_answered is full \
         (--max-conntrack)",
    ),
    (
        REASON_POLICY_REPLIED_FULL,
        "NetworkPolicy flows left where new flows can evict them: policy_replied is full \
         (--max-policy-flows)",
    ),
    (
        REASON_DROP_TCP_NO_FLOW,
        "TCP segments to a frontend of connections conntrack does not know dropped (their \
         entries expired, or were lost with the maps)",
    ),
];

/// What the watched counters were at the last check.
#[derive(Debug, Default)]
pub struct Pressure {
    last: BTreeMap<Reason, u64>,
}

/// One counter that moved.
#[derive(Debug, PartialEq, Eq)]
pub struct Moved {
    pub reason: &'static str,
    pub new: u64,
    pub total: u64,
    pub meaning: &'static str,
}

impl Pressure {
    /// Starts from `counts` (the pinned counters an earlier agent left are not news).
    pub fn new(counts: &BTreeMap<Reason, u64>) -> Pressure {
        let mut pressure = Pressure::default();
        pressure.check(counts);
        pressure
    }

    /// The watched counters that moved since the last check.
    pub fn check(&mut self, counts: &BTreeMap<Reason, u64>) -> Vec<Moved> {
        let mut moved = Vec::new();
        for (reason, meaning) in WATCHED {
            let total = counts.get(&reason).copied().unwrap_or(0);
            let before = self.last.insert(reason, total);
            match before {
                // A counter that went down: the map was replaced; start again from it.
                Some(before) if total > before => moved.push(Moved {
                    reason: reason_name(reason),
                    new: total - before,
                    total,
                    meaning,
                }),
                _ => {}
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_counters_that_moved_since_the_last_check_are_reported() {
        let mut counts = BTreeMap::from([(REASON_DROP_NO_SNAT_PORT, 7)]);
        let mut pressure = Pressure::new(&counts);
        assert!(pressure.check(&counts).is_empty());
        counts.insert(REASON_DROP_NO_SNAT_PORT, 10);
        counts.insert(REASON_CT_ANSWERED_FULL, 2);
        let moved = pressure.check(&counts);
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert_eq!(
            (moved[0].reason, moved[0].new, moved[0].total),
            ("drop-no-snat-port", 3, 10)
        );
        assert_eq!(
            (moved[1].reason, moved[1].new),
            ("conntrack-answered-full", 2)
        );
        assert!(pressure.check(&counts).is_empty());
        // A replaced map starts from zero: nothing to report until it moves again.
        let reset = BTreeMap::new();
        assert!(pressure.check(&reset).is_empty());
        assert_eq!(
            pressure.check(&BTreeMap::from([(REASON_DROP_TCP_NO_FLOW, 1)]))[0].new,
            1
        );
    }
}
