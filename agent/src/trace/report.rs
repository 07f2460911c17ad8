//! A [`Trace`] as `sluice trace` prints it: one JSON object (`--json`) or a short readable
//! block. The verdict and everything about the packet come from what the programs did; the
//! desired state only names the service matched and explains a verdict (`reason`).
//!
//! # JSON
//!
//! ```text
//! verdict     "DNAT" | "REJECT" | "DROP" | "PASS"
//! backend     "IP:PORT" the packet was DNATed to, else null
//! backends    with --all: every "IP:PORT" the programs chose over `runs` runs, sorted;
//!             without --all: null
//! runs        with --all: how many times the packet was run; without: null
//! masquerade  whether the source address was rewritten (SNAT)
//! snat_ip     the new source address, else null
//! reason      why, when the verdict needs explaining (PASS, DROP, REJECT, no hook,
//!             sessionAffinity), else null
//! drop_reason for DROP and REJECT, the datapath's own reason (sluice_common::reason_name,
//!             e.g. "drop-source-range", "reject-no-endpoints"), else null
//! packet      the packet as it leaves: "PROTO SRC:SPORT -> DST:DPORT" (the syntax trace reads;
//!             IPv6 addresses in brackets: "tcp [fd00::5]:40000 -> [fd00::1]:80");
//!             for REJECT the answer sent back (an ICMP answer reads
//!             "icmp SRC -> DST type T code C", an ICMPv6 one "icmpv6 SRC -> DST type T code C");
//!             null for DROP
//! redirected_by  the program that redirected the packet to another interface
//!             (TC_ACT_REDIRECT), else null
//! input       the packet traced, same syntax
//! from        "pod" | "host" | "external": where it entered
//! programs    the programs run on it, in order (empty: no Sluice hook on that path)
//! service     the frontend it matched in the manifests' state, else null:
//!             {"frontend": "IP:PORT/PROTO", "name": "namespace/name[:port]",
//!              "endpoints": ["IP:PORT", ...]}
//! reply       for a forwarded packet, its receiver's answer sent back, else null:
//!             {"packet": answer as sent, "programs": [...], "delivered": bool,
//!              "seen_as": answer as the sender gets it (null if not delivered),
//!              "from_original_destination": bool, "reason": string or null}
//! policy      the NetworkPolicy verdicts (egress of the sender, ingress of a receiver on
//!             this node), null when no end is a pod this node enforces policy for; format in
//!             policy_verdict.rs
//! warnings    odd things the programs did (broken checksums, --all surprises, a verdict the
//!             rules disagree with); usually []
//! socket      with --from host, what the socket programs (cgroup sock_addr, which balance the
//!             node's own sockets) decide, read from the same maps: BPF_PROG_RUN cannot run
//!             them, so `programs` stays empty and verdict, backend(s), packet and reason say
//!             this decision: DNAT (backends: those one is picked from; backend and packet only
//!             when there is one), REJECT or DROP (the call fails: no packet), PASS (not a
//!             frontend). Else null. (host.rs)
//!             {"programs": [...], "outcome": "translated" | "refused" | "untranslated",
//!              "errno": "ECONNREFUSED" | "EPERM" | null, "backends": ["IP:PORT", ...],
//!              "scope": "pod" | "all" | null, "affinity": bool}
//! ```

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;
use sluice_common::{reason_name, Reason, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{
    engine::{End, Outcome, ReplyCheck, Trace},
    hooks::EntryPoint,
    policy_verdict::{self, PolicyReport},
    verdict::Verdict,
};
use crate::{
    packet::{proto_name, IpFlow},
    policy::PolicyState,
    state::{DesiredState, Frontend, Protocol, ServiceEntry, WhenEmpty},
};

/// What the desired state has at the packet's destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceMatch<'a> {
    /// A frontend with exactly this address, port and protocol.
    Frontend {
        frontend: Frontend,
        entry: &'a ServiceEntry,
    },
    /// The address is a service's, the port or protocol is not.
    OtherPorts(Vec<Frontend>),
    NotAService,
}

pub fn match_service<'a>(state: &'a DesiredState, flow: &IpFlow) -> ServiceMatch<'a> {
    if let Some(proto) = Protocol::from_number(flow.proto) {
        let frontend = Frontend {
            ip: flow.dst,
            port: flow.dport,
            proto,
        };
        if let Some(entry) = state.services.get(&frontend) {
            return ServiceMatch::Frontend { frontend, entry };
        }
    }
    let same_ip: Vec<Frontend> = state
        .services
        .keys()
        .filter(|f| f.ip == flow.dst)
        .copied()
        .collect();
    if same_ip.is_empty() {
        ServiceMatch::NotAService
    } else {
        ServiceMatch::OtherPorts(same_ip)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub backend: Option<String>,
    pub backends: Option<Vec<String>>,
    pub runs: Option<usize>,
    pub masquerade: bool,
    pub snat_ip: Option<IpAddr>,
    pub reason: Option<String>,
    pub drop_reason: Option<&'static str>,
    pub packet: Option<String>,
    pub redirected_by: Option<&'static str>,
    pub input: String,
    pub from: EntryPoint,
    pub programs: Vec<&'static str>,
    pub service: Option<ServiceReport>,
    pub reply: Option<ReplyReport>,
    pub policy: Option<PolicyReport>,
    pub warnings: Vec<String>,
    pub socket: Option<super::host::SocketReport>,
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub frontend: String,
    pub name: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ReplyReport {
    pub packet: String,
    pub programs: Vec<&'static str>,
    pub delivered: bool,
    pub seen_as: Option<String>,
    pub from_original_destination: bool,
    pub reason: Option<String>,
}

impl Report {
    pub fn new(trace: &Trace, state: &DesiredState) -> Report {
        let matched = match_service(state, &trace.input);
        let end = &trace.first.end;
        let (masquerade, snat_ip, packet) = match end {
            End::Forwarded { rewrite, .. } => (
                rewrite.snat.is_some(),
                rewrite.snat,
                Some(rewrite.flow.to_string()),
            ),
            End::Rejected { answer, .. } => (false, None, Some(answer.to_string())),
            End::Dropped { .. } => (false, None, None),
        };
        let mut warnings = trace.first.warnings.clone();
        if let Some(reply) = &trace.reply {
            warnings.extend(reply.outcome.warnings.iter().cloned());
        }
        let affinity = match &matched {
            ServiceMatch::Frontend { entry, .. } => entry.affinity_timeout,
            _ => None,
        };
        if let Some(choices) = &trace.choices {
            if affinity.is_some() && choices.backends.len() > 1 {
                warnings.push(format!(
                    "--all: sessionAffinity ClientIP, yet the programs chose {} backends for \
                     one client in {} runs",
                    choices.backends.len(),
                    choices.runs
                ));
            }
            if let (Some(expected), None) = (choices.expected, affinity) {
                if !choices.backends.is_empty() && choices.backends.len() < expected {
                    warnings.push(format!(
                        "--all: the programs chose only {} of the frontend's {expected} backends \
                         in {} runs",
                        choices.backends.len(),
                        choices.runs
                    ));
                }
            }
            for (verdict, count) in &choices.other_verdicts {
                warnings.push(format!(
                    "--all: {count} of {} runs ended in {verdict}",
                    choices.runs
                ));
            }
        }
        Report {
            verdict: end.verdict(),
            backend: end.backend().map(|b| b.to_string()),
            backends: trace
                .choices
                .as_ref()
                .map(|c| c.backends.iter().map(ToString::to_string).collect()),
            runs: trace.choices.as_ref().map(|c| c.runs),
            masquerade,
            snat_ip,
            reason: reason(trace, &matched),
            drop_reason: match end {
                End::Dropped { reason, .. } | End::Rejected { reason, .. } => {
                    reason.map(reason_name)
                }
                End::Forwarded { .. } => None,
            },
            packet,
            redirected_by: match end {
                End::Forwarded { redirected_by, .. } => *redirected_by,
                End::Dropped { .. } | End::Rejected { .. } => None,
            },
            input: trace.input.to_string(),
            from: trace.entry,
            programs: trace
                .path
                .forward
                .iter()
                .chain(trace.receiver_hop.as_ref())
                .map(|h| h.program.name())
                .collect(),
            service: match &matched {
                ServiceMatch::Frontend { frontend, entry } => Some(ServiceReport {
                    frontend: frontend.to_string(),
                    name: entry.name.clone(),
                    endpoints: entry.backends.iter().map(ToString::to_string).collect(),
                }),
                _ => None,
            },
            reply: trace.reply.as_ref().map(reply_report),
            policy: None,
            warnings,
            socket: None,
        }
    }

    /// Adds the NetworkPolicy verdicts (see policy_verdict.rs): which policy allowed the
    /// packet or why it was denied, as the reason of a policy drop, and a warning when the
    /// programs and the rules disagree.
    pub fn with_policy(
        mut self,
        trace: &Trace,
        state: &DesiredState,
        policy: &PolicyState,
    ) -> Report {
        let backends = match match_service(state, &trace.input) {
            ServiceMatch::Frontend { entry, .. } => entry.backends.clone(),
            _ => Vec::new(),
        };
        self.policy = policy_verdict::report(trace, policy, &backends);
        if let Some(report) = &self.policy {
            if let End::Dropped {
                by,
                action,
                reason: Some(reason),
            } = &trace.first.end
            {
                if let Some(why) = report.drop_reason(*reason) {
                    self.reason = Some(format!(
                        "{by} dropped the packet ({}): {why}",
                        action_and_reason(action, Some(*reason))
                    ));
                }
            }
            self.warnings.extend(report.disagreements(trace));
        }
        self
    }

    /// The readable block.
    pub fn human(&self, trace: &Trace) -> String {
        let mut out = String::new();
        let mut line = |label: &str, text: &str| {
            let _ = writeln!(out, "{label:<11}{text}");
        };
        line(
            "packet",
            &format!("{} ({})", self.input, first_packet_kind(trace.input.proto)),
        );
        let hooks = if trace.path.forward.is_empty() {
            "no Sluice program on this path".to_string()
        } else {
            join(
                trace
                    .path
                    .forward
                    .iter()
                    .chain(trace.receiver_hop.as_ref())
                    .map(ToString::to_string),
                ", then ",
            )
        };
        line("from", &format!("{}: {hooks}", self.from));
        if let Some(socket) = &self.socket {
            let decision = match (socket.outcome, socket.errno) {
                (_, Some(errno)) => format!("the call fails with {errno}"),
                ("translated", _) => format!("the socket gets {}", socket.backends.join(" or ")),
                _ => "the socket keeps its address".to_string(),
            };
            line(
                "socket",
                &format!(
                    "{}: {decision} (read from the maps, not run)",
                    socket.programs.join(", ")
                ),
            );
        }
        line(
            "service",
            &match &self.service {
                Some(s) => format!(
                    "{} -> {} ({})",
                    s.frontend,
                    s.name,
                    count(s.endpoints.len(), "endpoint")
                ),
                None => "none matches".to_string(),
            },
        );
        line(
            "verdict",
            &match (&self.backend, self.redirected_by) {
                (Some(backend), None) => format!("{} to {backend}", self.verdict),
                (Some(backend), Some(by)) => {
                    format!("{} to {backend}, redirected by {by}", self.verdict)
                }
                (None, None) => self.verdict.to_string(),
                (None, Some(by)) => format!("{}, redirected by {by}", self.verdict),
            },
        );
        if let Some(reason) = &self.reason {
            line("reason", reason);
        }
        if let (Some(backends), Some(runs)) = (&self.backends, self.runs) {
            let text = if backends.is_empty() {
                "none chosen".to_string()
            } else {
                format!(
                    "{} ({} chosen in {})",
                    backends.join(", "),
                    count(backends.len(), "backend"),
                    count(runs, "run")
                )
            };
            line("backends", &text);
        }
        if let Some(packet) = &self.packet {
            let label = if self.verdict == Verdict::Reject {
                "answer"
            } else {
                "leaves as"
            };
            line(label, packet);
        }
        if self.verdict != Verdict::Drop && self.verdict != Verdict::Reject {
            line(
                "masquerade",
                &match self.snat_ip {
                    Some(ip) => format!("yes, source rewritten to {ip}"),
                    None => "no".to_string(),
                },
            );
        }
        if let Some(reply) = &self.reply {
            let via = if reply.programs.is_empty() {
                "no Sluice program on the way".to_string()
            } else {
                format!("through {}", reply.programs.join(", then "))
            };
            line("reply", &format!("{} (the answer, {via})", reply.packet));
            let fate = match (&reply.seen_as, reply.from_original_destination) {
                (Some(seen), true) => format!(
                    "arrives as {seen}: from the original destination, as the client expects"
                ),
                (Some(seen), false) => format!(
                    "arrives as {seen}: NOT from the original destination, the client will not \
                     match it to its connection"
                ),
                (None, _) => format!(
                    "is not delivered: {}",
                    reply.reason.as_deref().unwrap_or("dropped")
                ),
            };
            line("", &fate);
        }
        if let Some(policy) = &self.policy {
            for direction in policy.egress.iter().chain(&policy.ingress) {
                let sentence = direction.sentence();
                // A policy drop's reason already says it.
                if !self.reason.as_ref().is_some_and(|r| r.ends_with(&sentence)) {
                    line("policy", &sentence);
                }
            }
        }
        for warning in &self.warnings {
            line("warning", warning);
        }
        out
    }
}

fn first_packet_kind(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP SYN",
        PROTO_UDP => "UDP datagram",
        PROTO_SCTP => "SCTP INIT",
        _ => "packet",
    }
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn join(items: impl Iterator<Item = String>, separator: &str) -> String {
    items.collect::<Vec<_>>().join(separator)
}

fn reply_report(reply: &ReplyCheck) -> ReplyReport {
    let (seen_as, reason) = match &reply.outcome.end {
        End::Forwarded { rewrite, .. } => (Some(rewrite.flow.to_string()), None),
        End::Dropped { by, action, reason } => (
            None,
            Some(format!(
                "{by} dropped it ({})",
                action_and_reason(action, *reason)
            )),
        ),
        End::Rejected { by, how, .. } => (None, Some(format!("{by} answered with {how}"))),
    };
    ReplyReport {
        packet: reply.sent.to_string(),
        programs: reply.programs.clone(),
        delivered: seen_as.is_some(),
        seen_as,
        from_original_destination: reply.from_original_destination,
        reason,
    }
}

/// `TC_ACT_SHOT, drop-source-range`: the tc action and the datapath's reason, if it gave one.
fn action_and_reason(action: &str, reason: Option<Reason>) -> String {
    match reason {
        Some(reason) => format!("{action}, {}", reason_name(reason)),
        None => action.to_string(),
    }
}

/// Why the packet got its verdict, in words: the program's action and, from the desired state,
/// what the destination is.
fn reason(trace: &Trace, matched: &ServiceMatch) -> Option<String> {
    if let Some(unhooked) = trace.path.unhooked {
        return Some(unhooked.to_string());
    }
    let no_endpoints = match matched {
        ServiceMatch::Frontend { frontend, entry } if entry.backends.is_empty() => {
            Some(match entry.when_empty {
                WhenEmpty::Reject => {
                    format!("service {} ({frontend}) has no endpoints", entry.name)
                }
                WhenEmpty::Drop => format!(
                    "service {} ({frontend}) has no endpoints on this node, and its {} traffic \
                     policy is Local",
                    entry.name,
                    if entry.kind.is_external() {
                        "external"
                    } else {
                        "internal"
                    }
                ),
            })
        }
        _ => None,
    };
    let programs = join(
        trace
            .path
            .forward
            .iter()
            .map(|h| h.program.name().to_string()),
        " and ",
    );
    let Outcome { end, .. } = &trace.first;
    let action = match end {
        End::Forwarded { rewrite, .. } if rewrite.verdict() == Verdict::Dnat => {
            return affinity_reason(trace, matched)
        }
        End::Forwarded { .. } => {
            let why = match matched {
                ServiceMatch::Frontend { frontend, entry } => match &no_endpoints {
                    Some(no_endpoints) => no_endpoints.clone(),
                    None => format!(
                        "although it matches service {} ({frontend}, {})",
                        entry.name,
                        count(entry.backends.len(), "endpoint")
                    ),
                },
                ServiceMatch::OtherPorts(frontends) => format!(
                    "{} is a service address, but has no service port {}/{} (it has {})",
                    trace.input.dst,
                    trace.input.dport,
                    proto_name(trace.input.proto).to_uppercase(),
                    join(
                        frontends.iter().map(|f| format!("{}/{}", f.port, f.proto)),
                        ", "
                    )
                ),
                ServiceMatch::NotAService => format!(
                    "{}/{} is not a service frontend",
                    trace.input.destination(),
                    proto_name(trace.input.proto).to_uppercase()
                ),
            };
            let separator = if why.starts_with("although") {
                " "
            } else {
                ": "
            };
            return Some(format!(
                "{programs} left the packet untouched{separator}{why}"
            ));
        }
        End::Dropped { by, action, reason } => {
            let dropped = format!(
                "{by} dropped the packet ({})",
                action_and_reason(action, *reason)
            );
            if *reason == Some(sluice_common::REASON_DROP_SOURCE_RANGE) {
                if let ServiceMatch::Frontend { frontend, entry } = matched {
                    return Some(format!(
                        "{dropped}: {} is not in the loadBalancerSourceRanges of service {} \
                         ({frontend}: {})",
                        trace.input.src,
                        entry.name,
                        join(entry.source_ranges.iter().map(ToString::to_string), ", ")
                    ));
                }
            }
            dropped
        }
        End::Rejected { by, how, .. } => format!("{by} answered with {how}"),
    };
    Some(match no_endpoints {
        Some(no_endpoints) => format!("{action}: {no_endpoints}"),
        None => action,
    })
}

/// A DNAT of a service with sessionAffinity: the client keeps its backend, and `--all` shows
/// it did.
fn affinity_reason(trace: &Trace, matched: &ServiceMatch) -> Option<String> {
    let ServiceMatch::Frontend { entry, .. } = matched else {
        return None;
    };
    let timeout = entry.affinity_timeout?;
    let mut reason = format!(
        "sessionAffinity ClientIP (timeout {timeout}s): new connections from {} go to the \
         backend it was given",
        trace.input.src
    );
    if let Some(choices) = &trace.choices {
        if choices.backends.len() == 1 {
            let _ = write!(
                reason,
                "; all {} runs (new connections) went to the same backend",
                choices.runs
            );
        }
    }
    Some(reason)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        state::BackendAddr,
        trace::{engine::Choices, hooks, verdict::Rewrite},
    };

    fn flow(dst: &str, dport: u16, proto: u8) -> IpFlow {
        IpFlow {
            proto,
            src: "10.244.0.5".parse().unwrap(),
            sport: 40_000,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    fn state() -> DesiredState {
        let mut state = DesiredState::default();
        let web = Frontend {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
        };
        state.services.insert(
            web,
            ServiceEntry::cluster_ip(
                "shop/web:http",
                vec![BackendAddr {
                    ip: "10.244.1.10".parse().unwrap(),
                    port: 8080,
                }],
            )
            .into(),
        );
        state.services.insert(
            Frontend { port: 443, ..web },
            ServiceEntry::cluster_ip("shop/web:https", vec![]).into(),
        );
        state
    }

    /// A trace of `input` entering from a pod that ended in `end`.
    fn trace_of(input: IpFlow, end: End) -> Trace {
        Trace {
            input,
            entry: EntryPoint::Pod,
            path: hooks::path(EntryPoint::Pod),
            forwarded: match &end {
                End::Forwarded { rewrite, .. } => Some(*rewrite),
                _ => None,
            },
            receiver_hop: None,
            first: Outcome {
                end,
                warnings: vec![],
            },
            reply: None,
            choices: None,
        }
    }

    fn untouched(input: IpFlow) -> End {
        End::Forwarded {
            rewrite: Rewrite {
                flow: input,
                dnat: None,
                snat: None,
            },
            redirected_by: None,
        }
    }

    #[test]
    fn trace_report_of_a_dnat() {
        let input = flow("10.96.0.1", 80, PROTO_TCP);
        let out = IpFlow {
            dst: "10.244.1.10".parse().unwrap(),
            dport: 8080,
            ..input
        };
        let mut trace = trace_of(
            input,
            End::Forwarded {
                rewrite: Rewrite {
                    flow: out,
                    dnat: Some(out.destination()),
                    snat: None,
                },
                redirected_by: None,
            },
        );
        trace.choices = Some(Choices {
            backends: [out.destination()].into(),
            runs: 1,
            expected: Some(1),
            other_verdicts: Default::default(),
        });
        let json = serde_json::to_value(Report::new(&trace, &state())).unwrap();
        assert_eq!(json["verdict"], "DNAT");
        assert_eq!(json["backend"], "10.244.1.10:8080");
        assert_eq!(json["backends"], serde_json::json!(["10.244.1.10:8080"]));
        assert_eq!(json["masquerade"], false);
        assert_eq!(json["snat_ip"], serde_json::Value::Null);
        assert_eq!(json["reason"], serde_json::Value::Null);
        assert_eq!(json["packet"], "tcp 10.244.0.5:40000 -> 10.244.1.10:8080");
        assert_eq!(json["from"], "pod");
        assert_eq!(json["programs"], serde_json::json!(["from_pod"]));
        assert_eq!(json["service"]["name"], "shop/web:http");
        assert_eq!(json["service"]["frontend"], "10.96.0.1:80/TCP");
        assert_eq!(json["redirected_by"], serde_json::Value::Null);

        // A program that sends the packet straight to the backend's interface says so.
        if let End::Forwarded { redirected_by, .. } = &mut trace.first.end {
            *redirected_by = Some("from_pod");
        }
        let report = Report::new(&trace, &state());
        assert_eq!(report.redirected_by, Some("from_pod"));
        let human = report.human(&trace);
        assert!(
            human.contains("verdict    DNAT to 10.244.1.10:8080, redirected by from_pod\n"),
            "{human}"
        );
        assert!(
            human.contains("backends   10.244.1.10:8080 (1 backend chosen in 1 run)\n"),
            "{human}"
        );
    }

    #[test]
    fn trace_report_explains_a_pass() {
        let cases = [
            (
                flow("10.96.0.1", 443, PROTO_TCP),
                "from_pod left the packet untouched: service shop/web:https (10.96.0.1:443/TCP) \
                 has no endpoints",
            ),
            (
                flow("10.96.0.1", 80, PROTO_UDP),
                "from_pod left the packet untouched: 10.96.0.1 is a service address, but has no \
                 service port 80/UDP (it has 80/TCP, 443/TCP)",
            ),
            (
                flow("10.244.1.7", 5432, PROTO_TCP),
                "from_pod left the packet untouched: 10.244.1.7:5432/TCP is not a service \
                 frontend",
            ),
            (
                flow("10.96.0.1", 80, PROTO_TCP),
                "from_pod left the packet untouched although it matches service shop/web:http \
                 (10.96.0.1:80/TCP, 1 endpoint)",
            ),
        ];
        for (input, reason) in cases {
            let report = Report::new(&trace_of(input, untouched(input)), &state());
            assert_eq!(report.verdict, Verdict::Pass);
            assert_eq!(report.reason.as_deref(), Some(reason));
            assert_eq!(report.packet, Some(input.to_string()));
        }
    }

    #[test]
    fn trace_report_of_a_drop_names_the_program_and_the_missing_endpoints() {
        let input = flow("10.96.0.1", 443, PROTO_TCP);
        let trace = trace_of(
            input,
            End::Dropped {
                by: "from_pod",
                action: "TC_ACT_SHOT".into(),
                reason: None,
            },
        );
        let report = Report::new(&trace, &state());
        assert_eq!(report.verdict, Verdict::Drop);
        assert_eq!(report.packet, None);
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "from_pod dropped the packet (TC_ACT_SHOT): service shop/web:https \
                 (10.96.0.1:443/TCP) has no endpoints"
            )
        );
        let human = report.human(&trace);
        assert!(human.contains("verdict    DROP\n"), "{human}");
        assert!(!human.contains("masquerade"), "{human}");
    }

    #[test]
    fn trace_report_without_a_hook_says_so() {
        let input = flow("10.96.0.1", 80, PROTO_TCP);
        let mut trace = trace_of(input, untouched(input));
        trace.entry = EntryPoint::Host;
        trace.path = hooks::path(EntryPoint::Host);
        let report = Report::new(&trace, &state());
        assert_eq!(report.verdict, Verdict::Pass);
        assert!(report.programs.is_empty());
        assert_eq!(report.reason.as_deref(), Some(hooks::HOST_UNHOOKED));
    }

    #[test]
    fn trace_report_from_the_host_is_the_socket_programs_decision() {
        use crate::datapath::sock::SocketDecision;
        use crate::trace::host;
        let input = flow("10.96.0.1", 80, PROTO_TCP);
        let mut trace = trace_of(input, untouched(input));
        trace.entry = EntryPoint::Host;
        trace.path = hooks::path(EntryPoint::Host);
        let with = |decision: SocketDecision| {
            let mut report = Report::new(&trace, &state());
            host::apply(&mut report, &input, &decision);
            report
        };
        let b1: std::net::SocketAddr = "10.244.1.5:8080".parse().unwrap();
        let b2: std::net::SocketAddr = "10.244.2.5:8080".parse().unwrap();

        let one = with(SocketDecision::Translated {
            backends: vec![b1],
            pod_scope: false,
            affinity: false,
        });
        assert_eq!(one.verdict, Verdict::Dnat);
        assert!(one.programs.is_empty(), "no program ran");
        assert_eq!(one.backend.as_deref(), Some("10.244.1.5:8080"));
        assert_eq!(
            one.packet.as_deref(),
            Some("tcp 10.244.0.5:40000 -> 10.244.1.5:8080")
        );
        let socket = one.socket.as_ref().unwrap();
        assert_eq!(socket.programs, ["sock_connect4", "sock_getpeername4"]);
        assert_eq!((socket.outcome, socket.scope), ("translated", Some("all")));

        let two = with(SocketDecision::Translated {
            backends: vec![b1, b2],
            pod_scope: true,
            affinity: true,
        });
        assert_eq!((two.verdict, two.backend.as_deref()), (Verdict::Dnat, None));
        assert_eq!(
            two.packet, None,
            "which backend is the programs' pick at connect()"
        );
        assert_eq!(two.backends, Some(vec![b1.to_string(), b2.to_string()]));
        assert!(two.reason.as_ref().unwrap().contains("sessionAffinity"));
        assert!(two
            .human(&trace)
            .contains("the socket gets 10.244.1.5:8080 or 10.244.2.5:8080"));

        let refused = with(SocketDecision::Refused {
            errno: libc::ECONNREFUSED,
        });
        assert_eq!(
            (refused.verdict, refused.packet.as_deref()),
            (Verdict::Reject, None)
        );
        assert!(refused
            .reason
            .unwrap()
            .ends_with("connect() fails at once with ECONNREFUSED (the service has no endpoints)"));
        let dropped = with(SocketDecision::Refused { errno: libc::EPERM });
        assert_eq!(dropped.verdict, Verdict::Drop);
        assert_eq!(dropped.socket.unwrap().errno, Some("EPERM"));

        let untranslated = with(SocketDecision::Untranslated);
        assert_eq!(untranslated.verdict, Verdict::Pass);
        assert!(untranslated
            .reason
            .unwrap()
            .ends_with("not a frontend, the socket keeps its address"));
    }

    #[test]
    fn trace_report_names_the_datapath_reason_and_the_source_ranges() {
        let lb = Frontend {
            ip: "198.51.100.7".parse().unwrap(),
            port: 443,
            proto: Protocol::Tcp,
        };
        let mut entry = ServiceEntry::cluster_ip(
            "shop/lb:https",
            vec![BackendAddr {
                ip: "10.244.1.10".parse().unwrap(),
                port: 8443,
            }],
        );
        entry.kind = crate::state::FrontendKind::LoadBalancer;
        entry.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        let mut state = DesiredState::default();
        state.services.insert(lb, entry.into());
        let input = IpFlow {
            src: "203.0.113.5".parse().unwrap(),
            ..flow("198.51.100.7", 443, PROTO_TCP)
        };
        let mut trace = trace_of(
            input,
            End::Dropped {
                by: "from_world",
                action: "TC_ACT_SHOT".into(),
                reason: Some(sluice_common::REASON_DROP_SOURCE_RANGE),
            },
        );
        trace.entry = EntryPoint::External;
        trace.path = hooks::path(EntryPoint::External);
        let report = Report::new(&trace, &state);
        assert_eq!(report.drop_reason, Some("drop-source-range"));
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "from_world dropped the packet (TC_ACT_SHOT, drop-source-range): 203.0.113.5 is \
                 not in the loadBalancerSourceRanges of service shop/lb:https \
                 (198.51.100.7:443/TCP: 192.0.2.0/24)"
            )
        );
    }

    #[test]
    fn trace_report_explains_session_affinity() {
        let input = flow("10.96.0.1", 80, PROTO_TCP);
        let mut state = state();
        let web = Frontend {
            ip: input.dst,
            port: 80,
            proto: Protocol::Tcp,
        };
        std::sync::Arc::make_mut(state.services.get_mut(&web).unwrap()).affinity_timeout = Some(60);
        let chosen = SocketAddr::new("10.244.1.10".parse().unwrap(), 8080);
        let mut trace = trace_of(
            input,
            End::Forwarded {
                rewrite: Rewrite {
                    flow: IpFlow {
                        dst: chosen.ip(),
                        dport: chosen.port(),
                        ..input
                    },
                    dnat: Some(chosen),
                    snat: None,
                },
                redirected_by: None,
            },
        );
        trace.choices = Some(Choices {
            backends: [chosen].into(),
            runs: 200,
            expected: Some(2),
            other_verdicts: Default::default(),
        });
        let report = Report::new(&trace, &state);
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "sessionAffinity ClientIP (timeout 60s): new connections from 10.244.0.5 go to \
                 the backend it was given; all 200 runs (new connections) went to the same \
                 backend"
            )
        );
        // One backend out of two is what affinity does: no warning.
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        // Two backends for one client would be a datapath bug.
        trace
            .choices
            .as_mut()
            .unwrap()
            .backends
            .insert(SocketAddr::new("10.244.1.11".parse().unwrap(), 8080));
        let report = Report::new(&trace, &state);
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    }
}
