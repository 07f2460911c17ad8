//! The NetworkPolicy side of a trace: which policy allowed the packet, or why it was denied.
//! The programs decide (the trace's verdict is what they did); this names the policies, from
//! the same resolved policy the agent compiles (`policy::PolicyState`, whose rule scan is
//! proven equal to the compiled entries), and flags any disagreement as a warning.
//!
//! # JSON (`policy` in the trace report)
//!
//! ```text
//! policy   null when neither end is a pod this node enforces policy for, else
//!          {"egress": DIRECTION or null, "ingress": DIRECTION or null}
//! DIRECTION {"pod": "namespace/name", "pod_ip": "IP", "peer": "IP:PORT", "port": PORT,
//!            "verdict": "open" | "allowed" | "denied",
//!            "allowed_by": "namespace/policy (ingress|egress rule N)" (N counts from 1), or
//!                          "the pod's own node (always allowed in)", or null,
//!            "isolated_by": ["namespace/policy", ...]}
//! ```
//!
//! Egress is judged against the peer after DNAT (the backend), ingress against the client as
//! delivered (after any masquerade). Both families: an IPv6 packet is judged on the pods'
//! IPv6 addresses and the IPv6 rules (`policy6`). Ingress is only known for a receiver on this node (a pod
//! whose `spec.nodeName` is `--node-name`): its `to_pod` is then on the packet's way.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use sluice_common::{REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS};

use super::engine::{End, Trace};
use crate::{
    policy::{Explained, PolicyState, Way},
    state::{BackendAddr, Protocol},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    pub egress: Option<DirectionReport>,
    pub ingress: Option<DirectionReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionReport {
    pub pod: String,
    pub pod_ip: IpAddr,
    pub peer: SocketAddr,
    /// The destination port the rules were matched on (the peer's for egress, the pod's for
    /// ingress).
    pub port: u16,
    pub verdict: &'static str,
    pub allowed_by: Option<String>,
    pub isolated_by: Vec<String>,
    #[serde(skip)]
    way: Way,
    #[serde(skip)]
    proto: Protocol,
}

impl DirectionReport {
    /// `pod`'s `way` policy on a new connection with `peer` (shown as is) to port `port` (the
    /// destination's: the peer's for egress, the pod's own for ingress).
    fn new(
        state: &PolicyState,
        pod: IpAddr,
        way: Way,
        peer: SocketAddr,
        port: u16,
        proto: Protocol,
    ) -> Option<DirectionReport> {
        if pod.is_ipv4() != peer.is_ipv4() {
            return None;
        }
        let explained = state.explain(pod, way, peer.ip(), proto, port)?;
        let (verdict, allowed_by, isolated_by) = match explained.verdict {
            Explained::Open => ("open", None, Vec::new()),
            Explained::AllowedBy(policy) => ("allowed", Some(policy), Vec::new()),
            Explained::Denied(policies) => ("denied", None, policies),
        };
        Some(DirectionReport {
            pod: explained.pod,
            pod_ip: pod,
            peer,
            port,
            verdict,
            allowed_by,
            isolated_by,
            way,
            proto,
        })
    }

    pub fn denied(&self) -> bool {
        self.verdict == "denied"
    }

    /// One sentence: who allowed it, or why it is denied.
    pub fn sentence(&self) -> String {
        let way = match self.way {
            Way::Ingress => "ingress",
            Way::Egress => "egress",
        };
        let connection = match self.way {
            Way::Egress => format!("{} to {}", self.proto, self.peer),
            Way::Ingress => format!("{} from {} to port {}", self.proto, self.peer, self.port),
        };
        let pod = format!("pod {} ({})", self.pod, self.pod_ip);
        match (&self.allowed_by, self.denied()) {
            (Some(policy), _) => format!("{way} of {pod}: {connection} allowed by {policy}"),
            (None, true) => format!(
                "{way} of {pod} is isolated by {} and no rule of theirs allows {connection}",
                self.isolated_by.join(", ")
            ),
            (None, false) => format!("{way} of {pod}: no policy selects it, {connection} is open"),
        }
    }
}

/// The policy verdicts of `trace`'s first packet. `backends` are the matched service's
/// endpoints, to name the backend an egress drop was about (the programs drop it before the
/// chosen backend shows in the packet).
pub fn report(
    trace: &Trace,
    state: &PolicyState,
    backends: &[BackendAddr],
) -> Option<PolicyReport> {
    let src = trace.input.src;
    let proto = Protocol::from_number(trace.input.proto)?;
    let dropped_for = match &trace.first.end {
        End::Dropped { reason, .. } => *reason,
        _ => None,
    };
    // Egress: against the backend the packet went to; for an egress drop of a service flow,
    // the first endpoint policy denies (any of them could have been chosen).
    let egress = match (&trace.forwarded, dropped_for) {
        (Some(rewrite), _) => {
            let peer = SocketAddr::new(rewrite.flow.dst, rewrite.flow.dport);
            DirectionReport::new(state, src, Way::Egress, peer, peer.port(), proto)
        }
        (None, Some(REASON_DROP_POLICY_EGRESS)) => {
            let mut peers: Vec<SocketAddr> = backends
                .iter()
                .map(|b| SocketAddr::new(b.ip, b.port))
                .collect();
            peers.push(trace.input.destination());
            peers
                .into_iter()
                .filter_map(|peer| {
                    DirectionReport::new(state, src, Way::Egress, peer, peer.port(), proto)
                })
                .find(DirectionReport::denied)
        }
        (None, _) => None,
    };
    // Ingress: only when the receiver's to_pod ran.
    let ingress = match (&trace.forwarded, trace.receiver_hop) {
        (Some(rewrite), Some(_)) => {
            let client = SocketAddr::new(rewrite.flow.src, rewrite.flow.sport);
            let port = rewrite.flow.dport;
            DirectionReport::new(state, rewrite.flow.dst, Way::Ingress, client, port, proto)
        }
        _ => None,
    };
    if egress.is_none() && ingress.is_none() {
        return None;
    }
    Some(PolicyReport { egress, ingress })
}

impl PolicyReport {
    /// Why the programs dropped the packet for policy, in words.
    pub fn drop_reason(&self, reason: u32) -> Option<String> {
        let direction = match reason {
            REASON_DROP_POLICY_EGRESS => self.egress.as_ref(),
            REASON_DROP_POLICY_INGRESS => self.ingress.as_ref(),
            _ => None,
        }?;
        Some(direction.sentence())
    }

    /// Disagreements between the programs' verdict and the rules (a datapath bug, reported).
    pub fn disagreements(&self, trace: &Trace) -> Vec<String> {
        let dropped_for = match &trace.first.end {
            End::Dropped { reason, .. } => *reason,
            _ => None,
        };
        let mut warnings = Vec::new();
        for (direction, reason) in [
            (&self.egress, REASON_DROP_POLICY_EGRESS),
            (&self.ingress, REASON_DROP_POLICY_INGRESS),
        ] {
            let Some(direction) = direction else {
                continue;
            };
            let dropped = dropped_for == Some(reason);
            if direction.denied() != dropped {
                warnings.push(format!(
                    "the programs {} the packet, but the rules say: {}",
                    if dropped { "dropped" } else { "did not drop" },
                    direction.sentence()
                ));
            }
        }
        warnings
    }
}
