//! Sluice's datapath. This file lists every hook in the order a packet meets it; each step is a
//! small module of its own.
//!
//! Pods reach the node through their veth, the world through the node's external interfaces
//! (every interface carrying a node IP):
//!
//! ```text
//!  pod ──veth──> [tc ingress: from_pod] ──┐               ┌──> [tc egress: to_pod] ──veth──> pod
//!                                         ├─ node routing ┤
//!  world ─eth──> [tc ingress: from_world] ┘  (or redirect) └──> [tc egress: to_world] ──eth──> world
//! ```
//!
//! `from_pod` (tc ingress of every pod veth: packets a pod sends) and `from_world` (tc ingress of
//! the external interfaces: packets from outside the node) run the same steps:
//!
//! ```text
//!  1. parse::parse              IPv4 TCP/UDP/SCTP, or an ICMP error quoting such a packet
//!                               (steps 1-12 run in `ingress4`); IPv6 TCP/UDP/SCTP goes to
//!                               v6::ingress (in `ingress6`: the same steps on the IPv6 maps, a
//!                               subset: see v6.rs); everything else passes untouched. Each
//!                               family's path is a BPF-to-BPF call with its own stack frame
//!  2. icmp::ingress             an ICMP error about a translated flow is translated like the
//!                               flow's packets (its reply, or its client's packet)
//!  3. conntrack::lookup (reply) a reply of a flow that skips the host's routing
//!                               (CT_F_REDIRECT: entered from outside, or masqueraded); an
//!                               expired entry (timeouts by protocol and TCP state, see
//!                               sluice-common) counts as absent here and below:
//!     conntrack::seen           the flow's state (reply seen, FIN, RST) and last-seen time,
//!                               in both its entries,
//!     nat::reverse              source back to the frontend, destination back to the client,
//!     route::send               then redirected (FIB, TTL decremented; TTL spent: to the
//!                               stack) or, hairpin, back out its interface.
//!                               Replies of other flows pass: to_pod/to_world translate them
//!                               after the host's routing
//!  4. conntrack::lookup (fwd)   a flow already balanced keeps its backend (a TCP SYN is
//!                               balanced again unless lb::keep_on_syn: a retransmission, or
//!                               the client's affinity backend; never when the connection is
//!                               over: RST or FIN both ways); conntrack::seen records it
//!  5. lb::service               (address, port, proto) in `services`; not a frontend: pass.
//!                               from_pod first tries the frontend's pods' entry (SCOPE_POD:
//!                               an externalTrafficPolicy Local frontend's cluster-wide
//!                               backends)
//!  6. lb::source_allowed        loadBalancerSourceRanges: other sources are dropped
//!  7. no backends               reject::build (TCP RST, ICMP port unreachable, sent back by
//!                               route::bounce) or drop, as the service says
//!  8. lb::select                sessionAffinity's backend, else a random slot of `backends`
//!  9. masq::decide              source NAT: hairpin, masqueradeAll, external traffic to a
//!                               remote backend, sources outside the cluster CIDRs
//! 10. conntrack::create         forward + reply entries (with a unique masquerade port from
//!                               the masquerade range; a re-balanced tuple's old reply entry
//!                               goes)
//! 11. nat::forward              destination to the backend (and source to the masquerade
//!                               address), checksums by kernel helpers
//! 12. route::send               flows entering from outside or masqueraded: redirected to the
//!                               FIB's egress interface; hairpin: back out the pod's veth (both
//!                               with the TTL decremented; a spent TTL goes to the stack for
//!                               its time exceeded); the rest: through the host's routing
//!                               (TC_ACT_OK)
//! ```
//!
//! `to_pod` (tc egress of every pod veth) and `to_world` (tc egress of the external
//! interfaces): packets leaving the node's routing
//!
//! ```text
//!  1. parse::parse              (IPv6: v6::egress)
//!  2. icmp::egress              an ICMP error about a flow, toward its client
//!  3. conntrack::lookup (reply) a reply of a translated flow that went through the host's
//!     conntrack::seen           routing: its state and last-seen time recorded,
//!     nat::reverse              source back to the frontend (and the client)
//! ```
//!
//! Drops and the programs' own answers are counted by reason in `drops` (`stats::record`).
//! The maps and their layout are described in `sluice-common` (common/src/lib.rs).
#![no_std]
#![no_main]

mod conntrack;
mod icmp;
mod lb;
mod maps;
mod masq;
mod nat;
mod parse;
mod reject;
mod route;
mod stats;
mod v6;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use sluice_common::{
    ct_closed, Reason, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, REASON_DROP_NO_LOCAL_ENDPOINTS,
    REASON_DROP_REJECT_FAILED, REASON_DROP_REWRITE_FAILED, REASON_DROP_SOURCE_RANGE,
    REASON_REJECT_NO_ENDPOINTS, SVC_F_DROP_WHEN_EMPTY, SVC_F_SOURCE_RANGES,
};

use parse::{Ipv4Packet, Packet};

/// Where an ingress program runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A pod's veth.
    Pod,
    /// An external interface of the node.
    World,
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, ingress(&ctx, Hook::Pod))
}

#[classifier]
pub fn from_world(ctx: TcContext) -> i32 {
    verdict(&ctx, ingress(&ctx, Hook::World))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, egress(&ctx))
}

#[classifier]
pub fn to_world(ctx: TcContext) -> i32 {
    verdict(&ctx, egress(&ctx))
}

/// A packet a program could not handle is dropped (and counted): one the helpers could not
/// rewrite would reach its destination with a wrong address or checksum; dropping it lets the
/// sender retransmit.
#[inline(always)]
fn verdict(ctx: &TcContext, result: Result<i32, Reason>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            stats::record(ctx, reason);
            TC_ACT_SHOT
        }
    }
}

/// The helpers' failures, as a drop reason.
#[inline(always)]
fn rewrite_failed(_: ()) -> Reason {
    REASON_DROP_REWRITE_FAILED
}

/// The ingress steps for an IPv4 packet, else for an IPv6 one. Each family's path is a
/// function of its own (a BPF-to-BPF call): inlined together they need more than the 512 bytes
/// of stack a program has, while each call only adds its own frame to this small one. They
/// return their result as a scalar ([`Encoded`]): a subprogram cannot return a struct.
#[inline(always)]
fn ingress(ctx: &TcContext, hook: Hook) -> Result<i32, Reason> {
    let result = ingress4(ctx, hook);
    if result != NOT_IPV4 {
        return decode(result);
    }
    decode(ingress6(ctx, hook))
}

/// A `Result<i32, Reason>` as an `i64`: an action as itself, a reason `r` as `-1 - r`.
type Encoded = i64;
/// [`ingress4`]: not an IPv4 packet the programs handle.
const NOT_IPV4: Encoded = i64::MIN;

#[inline(always)]
fn encode(result: Result<i32, Reason>) -> Encoded {
    match result {
        Ok(action) => action as i64,
        Err(reason) => -1 - reason as i64,
    }
}

#[inline(always)]
fn decode(encoded: Encoded) -> Result<i32, Reason> {
    if encoded >= 0 {
        Ok(encoded as i32)
    } else {
        Err((-1 - encoded) as Reason)
    }
}

#[inline(never)]
fn ingress6(ctx: &TcContext, hook: Hook) -> Encoded {
    encode(match v6::parse(ctx) {
        Some(pkt) => v6::ingress(ctx, &pkt, hook),
        None => Ok(TC_ACT_OK),
    })
}

#[inline(never)]
fn ingress4(ctx: &TcContext, hook: Hook) -> Encoded {
    let Some(parsed) = parse::parse(ctx) else {
        return NOT_IPV4;
    };
    encode(match parsed {
        Packet::IcmpError(err) => icmp::ingress(ctx, &err).map_err(rewrite_failed),
        Packet::Flow(pkt) => ingress_flow(ctx, hook, &pkt),
    })
}

#[inline(always)]
fn ingress_flow(ctx: &TcContext, hook: Hook, pkt: &Ipv4Packet) -> Result<i32, Reason> {
    // A reply: translated here when its flow skips the host's routing.
    let reply_key = conntrack::key(pkt, CT_DIR_REPLY);
    if let Some(entry) = conntrack::lookup(&reply_key) {
        if entry.flags & CT_F_REDIRECT == 0 {
            // Tracked and translated on the way out (`egress`).
            return Ok(TC_ACT_OK);
        }
        conntrack::seen(&reply_key, &entry, pkt.tcp_flags);
        nat::reverse(ctx, pkt, &entry).map_err(rewrite_failed)?;
        let (saddr, daddr) = nat::reversed_addrs(pkt, &entry);
        return route::send(ctx, &entry, saddr, daddr).map_err(rewrite_failed);
    }

    let fwd_key = conntrack::key(pkt, CT_DIR_FORWARD);
    let known = conntrack::lookup(&fwd_key);
    let entry = match known {
        Some(entry) if !pkt.is_tcp_syn() => {
            conntrack::seen(&fwd_key, &entry, pkt.tcp_flags);
            entry
        }
        known => {
            // A new flow, or a TCP SYN: it starts a new connection even when its tuple is still
            // remembered (the client reused a port), unless it is a retransmission. A SYN on a
            // connection that is over (RST, FIN both ways) is always a new one.
            let Some(service) = lb::service(pkt, hook) else {
                return Ok(TC_ACT_OK);
            };
            // SAFETY: a helper call without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            match known {
                Some(entry)
                    if !ct_closed(entry.state)
                        && lb::keep_on_syn(&service, &entry, pkt.saddr, now) =>
                {
                    conntrack::seen(&fwd_key, &entry, pkt.tcp_flags);
                    entry
                }
                _ => match new_flow(ctx, pkt, &fwd_key, &service, hook, now, known.as_ref())? {
                    NewFlow::Balanced(entry) => entry,
                    NewFlow::Done(action) => return Ok(action),
                },
            }
        }
    };

    nat::forward(ctx, pkt, &entry).map_err(rewrite_failed)?;
    let (saddr, daddr) = nat::forwarded_addrs(pkt, &entry);
    route::send(ctx, &entry, saddr, daddr).map_err(rewrite_failed)
}

enum NewFlow {
    /// Balanced: the flow's forward entry.
    Balanced(sluice_common::CtValue),
    /// Handled without a backend (answered, or passed).
    Done(i32),
}

/// Steps 6 to 10: the frontend's source ranges, its missing backends, the backend and the
/// source NAT of a new flow (`replaced`: the live entry of the tuple it takes over).
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    fwd_key: &sluice_common::CtKey,
    service: &sluice_common::ServiceValue,
    hook: Hook,
    now: u64,
    replaced: Option<&sluice_common::CtValue>,
) -> Result<NewFlow, Reason> {
    if service.flags & SVC_F_SOURCE_RANGES != 0 && !lb::source_allowed(service.id, pkt.saddr) {
        return Err(REASON_DROP_SOURCE_RANGE);
    }
    if service.backend_count == 0 {
        if service.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
            return Err(REASON_DROP_NO_LOCAL_ENDPOINTS);
        }
        return match reject::build(ctx, pkt) {
            Ok(reject::Answer::Built) => {
                stats::record(ctx, REASON_REJECT_NO_ENDPOINTS);
                let action = route::bounce(ctx).map_err(|()| REASON_DROP_REJECT_FAILED)?;
                Ok(NewFlow::Done(action))
            }
            Ok(reject::Answer::Nothing) => Err(REASON_REJECT_NO_ENDPOINTS),
            Err(()) => Err(REASON_DROP_REJECT_FAILED),
        };
    }
    let Some((backend, slot)) = lb::select(service, pkt.saddr, now) else {
        // The service lost its backends between the two reads: as if it had none yet.
        return Ok(NewFlow::Done(TC_ACT_OK));
    };
    let (snat, flags) = masq::decide(masq::config(), service, &backend, pkt, hook);
    let new = conntrack::NewEntry {
        service_id: service.id,
        backend,
        backend_slot: slot,
        snat,
        flags,
        now,
    };
    let entry = conntrack::create(pkt, fwd_key, &new, replaced)?;
    Ok(NewFlow::Balanced(entry))
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Result<i32, Reason> {
    let pkt = match parse::parse(ctx) {
        None => {
            return match v6::parse(ctx) {
                Some(pkt) => v6::egress(ctx, &pkt),
                None => Ok(TC_ACT_OK),
            }
        }
        Some(Packet::IcmpError(err)) => return icmp::egress(ctx, &err).map_err(rewrite_failed),
        Some(Packet::Flow(pkt)) => pkt,
    };
    let reply_key = conntrack::key(&pkt, CT_DIR_REPLY);
    if let Some(entry) = conntrack::lookup(&reply_key) {
        conntrack::seen(&reply_key, &entry, pkt.tcp_flags);
        nat::reverse(ctx, &pkt, &entry).map_err(rewrite_failed)?;
    }
    Ok(TC_ACT_OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
