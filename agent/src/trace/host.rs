//! `--from host`: the node's own sockets are balanced by the socket programs
//! (ebpf/src/sock.rs) when they are addressed, not per packet, and `BPF_PROG_RUN` cannot run
//! cgroup `sock_addr` programs. So no program runs on such a trace: its verdict and backends
//! are the socket programs' decision read from the same private maps
//! ([`Datapath::socket_decision`](crate::datapath::Datapath::socket_decision)), reported as
//! such (`socket` in the JSON, `programs` stays empty).

use serde::Serialize;
use sluice_common::PROTO_TCP;

use super::{hooks::HOST_UNHOOKED, report::Report, verdict::Verdict};
use crate::{datapath::sock::SocketDecision, packet::IpFlow};

/// `socket` in the JSON report of a `--from host` trace.
#[derive(Debug, Serialize)]
pub struct SocketReport {
    /// The socket programs that would handle the connection (not run).
    pub programs: Vec<&'static str>,
    /// "translated", "refused" or "untranslated".
    pub outcome: &'static str,
    /// With "refused": the error the call fails with ("ECONNREFUSED", "EPERM").
    pub errno: Option<&'static str>,
    /// With "translated": the backends one is picked from.
    pub backends: Vec<String>,
    /// With "translated": which `services` entry ("pod": the frontend's pods' entry).
    pub scope: Option<&'static str>,
    /// sessionAffinity: the node's later connections keep the first backend chosen.
    pub affinity: bool,
}

/// Rewrites the report of a `--from host` trace (which ran no program) with the socket
/// programs' decision.
pub fn apply(report: &mut Report, flow: &IpFlow, decision: &SocketDecision) {
    let v4 = flow.dst.is_ipv4();
    let programs: Vec<&'static str> = match (flow.proto == PROTO_TCP, v4) {
        (true, true) => vec!["sock_connect4", "sock_getpeername4"],
        (true, false) => vec!["sock_connect6", "sock_getpeername6"],
        (false, true) => vec!["sock_connect4/sock_sendmsg4", "sock_recvmsg4"],
        (false, false) => vec!["sock_connect6/sock_sendmsg6", "sock_recvmsg6"],
    };
    let call = if flow.proto == PROTO_TCP {
        "connect()"
    } else {
        "connect()/sendmsg()"
    };
    let mut socket = SocketReport {
        programs,
        outcome: "untranslated",
        errno: None,
        backends: Vec::new(),
        scope: None,
        affinity: false,
    };
    report.masquerade = false;
    report.snat_ip = None;
    report.redirected_by = None;
    report.drop_reason = None;
    match decision {
        SocketDecision::Untranslated => {
            report.verdict = Verdict::Pass;
            report.reason = Some(format!(
                "{HOST_UNHOOKED}: not a frontend, the socket keeps its address"
            ));
        }
        SocketDecision::Refused { errno } => {
            let (name, why) = if *errno == libc::ECONNREFUSED {
                ("ECONNREFUSED", "the service has no endpoints")
            } else {
                (
                    "EPERM",
                    "no endpoint this node may use, or the node is outside the \
                     loadBalancerSourceRanges",
                )
            };
            socket.outcome = "refused";
            socket.errno = Some(name);
            report.verdict = if *errno == libc::ECONNREFUSED {
                Verdict::Reject
            } else {
                Verdict::Drop
            };
            report.backend = None;
            report.packet = None;
            report.reply = None;
            report.reason = Some(format!(
                "{HOST_UNHOOKED}: {call} fails at once with {name} ({why})"
            ));
        }
        SocketDecision::Translated {
            backends,
            pod_scope,
            affinity,
        } => {
            socket.outcome = "translated";
            socket.backends = backends.iter().map(ToString::to_string).collect();
            socket.scope = Some(if *pod_scope { "pod" } else { "all" });
            socket.affinity = *affinity;
            report.verdict = Verdict::Dnat;
            // One backend is the socket's for certain; of several, the programs pick one when
            // the call is made, which a trace cannot do for them.
            let only = match backends.as_slice() {
                [only] => Some(*only),
                _ => None,
            };
            report.backend = only.map(|b| b.to_string());
            report.packet = only.map(|b| {
                IpFlow {
                    dst: b.ip(),
                    dport: b.port(),
                    ..*flow
                }
                .to_string()
            });
            report.backends = Some(socket.backends.clone());
            report.runs = None;
            report.reason = Some(format!(
                "{HOST_UNHOOKED}: {call} gets {} instead of {}, the application keeps \
                 seeing the service address{}",
                match only {
                    Some(b) => b.to_string(),
                    None => format!("one of {} backends", backends.len()),
                },
                std::net::SocketAddr::new(flow.dst, flow.dport),
                if *affinity {
                    " (sessionAffinity: the node's later connections keep the same backend)"
                } else {
                    ""
                }
            ));
        }
    }
    report.socket = Some(socket);
}
