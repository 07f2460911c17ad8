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
//!  0. v6::is_ipv6              an IPv6 frame goes to v6::ingress: the same steps on the
//!                               IPv6 maps (listed in v6/mod.rs, NetworkPolicy included), in
//!                               a stack frame of its own
//!  1. parse::parse              IPv4 TCP/UDP/SCTP, or an ICMP error quoting such a packet;
//!                               everything else passes untouched
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
//!                               over: RST or FIN both ways); conntrack::seen records it (and
//!                               moves an answered flow to `ct_answered`, out of the LRU's
//!                               reach). Lookups try `ct_answered`, then `conntrack`
//!  5. lb::service               (address, port, proto) in `services`; not a frontend: pass.
//!                               from_pod takes the frontend's pods' entry (SCOPE_POD: an
//!                               externalTrafficPolicy Local frontend's cluster-wide
//!                               backends) when the frontend has SVC_F_EXTERNAL_LOCAL and one
//!     policy::from_pod          from_pod, not a frontend: a packet of a flow `policy_flows`
//!                               admitted (or its reply) passes; else a new flow, checked
//!                               against the pod's egress NetworkPolicy (drop:
//!                               drop-policy-egress-denied) and recorded
//!  6. lb::source_allowed        loadBalancerSourceRanges: other sources are dropped
//!  7. no backends               reject::build (TCP RST, ICMP port unreachable, sent back by
//!                               route::bounce) or drop, as the service says
//!  8. lb::select                sessionAffinity's backend, else a random slot of `backends`
//!                               (the first slots: the service entry's own copies)
//!     policy::egress_to_backend from_pod: the pod's egress NetworkPolicy against the chosen
//!                               backend and its port (not the frontend), before conntrack
//!                               remembers the flow
//!     a TCP segment that is not a SYN (and has no entry): dropped (drop-tcp-no-flow)
//!  9. masq::decide              source NAT: hairpin, masqueradeAll, external traffic to a
//!                               remote backend, sources outside the cluster CIDRs
//! 10. conntrack::create         forward + reply entries in `conntrack` (with a masquerade
//!                               port found by conntrack::claim_port_in's search; a
//!                               re-balanced tuple's old reply entry goes)
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
//!  0. v6::is_ipv6              (IPv6: v6::egress, with policy::to_pod's IPv6 twin)
//!  1. parse::parse
//!  2. icmp::egress              an ICMP error about a flow, toward its client (ICMP is not
//!                               subject to policy here)
//!  3. conntrack::lookup (reply) a reply of a translated flow that went through the host's
//!     conntrack::seen           routing: its state and last-seen time recorded,
//!     nat::reverse              source back to the frontend (and the client)
//!  4. policy::to_pod            to_pod, any other packet: a packet of a flow `policy_flows`
//!                               admitted, its reply, or the answer of the pod's own service
//!                               flow passes; else a new flow, checked against the pod's
//!                               ingress NetworkPolicy with the client as delivered (the
//!                               original client, or the masquerade address) (drop:
//!                               drop-policy-ingress-denied) and recorded
//! ```
//!
//! Host traffic (processes in the node's own network namespace: the kubelet, hostNetwork
//! pods) meets no tc program on its way out; cgroup `sock_addr` programs (sock.rs, attached to
//! the cgroup the agent is given) balance it when a socket is addressed, before any packet:
//!
//! ```text
//!  sock_connect4/6, sock_sendmsg4/6 (connect(), unconnected UDP sendmsg())
//!  1. sock::host_socket         TCP/UDP sockets of the node's namespace (`sock_config`);
//!                               pods' sockets in the same cgroup keep the tc path
//!  2. sock::service4/6          the frontend, its pods' entry (SCOPE_POD) if any; an IPv4-mapped
//!                               address on an IPv6 socket uses the IPv4 maps (balance4)
//!  3. source ranges, no backends the call fails: EPERM (kube-proxy drops), ECONNREFUSED
//!                               (no endpoints: kube-proxy rejects)
//!  4. lb::select_with           sessionAffinity (client: the node IP), else a random backend
//!                               (TCP) or the socket cookie's (UDP: one backend per socket)
//!  5. sock_revnat(6)            (socket cookie, backend) -> frontend, for the way back
//!  6. rewrite                   the socket's address becomes the backend's
//!
//!  sock_recvmsg4/6 (UDP), sock_getpeername4/6
//!  1. sock::host_socket, sock_revnat(6) lookup: the backend's address back to the frontend's
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
mod policy;
mod reject;
mod route;
mod sock;
mod stats;
mod v6;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use sluice_common::{
    ct_closed, Reason, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, PROTO_TCP,
    REASON_DROP_NO_LOCAL_ENDPOINTS, REASON_DROP_REJECT_FAILED, REASON_DROP_REWRITE_FAILED,
    REASON_DROP_SOURCE_RANGE, REASON_DROP_TCP_NO_FLOW, REASON_REJECT_NO_ENDPOINTS,
    SVC_F_DROP_WHEN_EMPTY, SVC_F_SOURCE_RANGES,
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

// Each family's steps run in a function of their own (`#[inline(never)]`, a BPF-to-BPF call):
// the eBPF stack is 512 bytes for the whole call chain, and inlined into one frame the two
// paths' locals would add up (they did: 496 bytes before IPv6 had affinity). Apart, a packet
// pays for its own family's frame only. See v6/mod.rs for the IPv6 path's scratch space.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    if v6::is_ipv6(&ctx) {
        return v6::ingress(&ctx, Hook::Pod);
    }
    verdict(&ctx, decode(ingress4(&ctx, Hook::Pod)))
}

#[classifier]
pub fn from_world(ctx: TcContext) -> i32 {
    if v6::is_ipv6(&ctx) {
        return v6::ingress(&ctx, Hook::World);
    }
    verdict(&ctx, decode(ingress4(&ctx, Hook::World)))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    if v6::is_ipv6(&ctx) {
        return v6::egress(&ctx, Hook::Pod);
    }
    verdict(&ctx, decode(egress4(&ctx, Hook::Pod)))
}

#[classifier]
pub fn to_world(ctx: TcContext) -> i32 {
    if v6::is_ipv6(&ctx) {
        return v6::egress(&ctx, Hook::World);
    }
    verdict(&ctx, decode(egress4(&ctx, Hook::World)))
}

/// The IPv4 steps, each in a function of its own (a BPF-to-BPF call: the IPv6 path's frame
/// is never on the stack with it). They return their result as a scalar ([`Encoded`]): a
/// subprogram cannot return a struct.
#[inline(never)]
fn ingress4(ctx: &TcContext, hook: Hook) -> Encoded {
    encode(ingress(ctx, hook))
}

#[inline(never)]
fn egress4(ctx: &TcContext, hook: Hook) -> Encoded {
    encode(egress(ctx, hook))
}

/// A `Result<i32, Reason>` as an `i64`: an action as itself, a reason `r` as `-1 - r`.
type Encoded = i64;

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

/// A packet a program could not handle is dropped (and counted): one the helpers could not
/// rewrite would reach its destination with a wrong address or checksum; dropping it lets the
/// sender retransmit.
#[inline(always)]
pub fn verdict(ctx: &TcContext, result: Result<i32, Reason>) -> i32 {
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

#[inline(always)]
fn ingress(ctx: &TcContext, hook: Hook) -> Result<i32, Reason> {
    match parse::parse(ctx) {
        None => Ok(TC_ACT_OK),
        Some(Packet::IcmpError(err)) => icmp::ingress(ctx, &err).map_err(rewrite_failed),
        Some(Packet::Flow(pkt)) => ingress_flow(ctx, hook, &pkt),
    }
}

#[inline(always)]
fn ingress_flow(ctx: &TcContext, hook: Hook, pkt: &Ipv4Packet) -> Result<i32, Reason> {
    // A reply: translated here when its flow skips the host's routing.
    let reply_key = conntrack::key(pkt, CT_DIR_REPLY);
    if let Some((entry, now)) = conntrack::lookup_at(&reply_key) {
        if entry.flags & CT_F_REDIRECT == 0 {
            // Tracked and translated on the way out (`egress`).
            return Ok(TC_ACT_OK);
        }
        conntrack::seen(&reply_key, &entry, pkt.tcp_flags, now);
        nat::reverse(ctx, pkt, &entry).map_err(rewrite_failed)?;
        let (saddr, daddr) = nat::reversed_addrs(pkt, &entry);
        return route::send(ctx, &entry, saddr, daddr).map_err(rewrite_failed);
    }

    let fwd_key = conntrack::key(pkt, CT_DIR_FORWARD);
    let known = conntrack::lookup_at(&fwd_key);
    let entry = match known {
        Some((entry, now)) if !pkt.is_tcp_syn() => {
            conntrack::seen(&fwd_key, &entry, pkt.tcp_flags, now);
            entry
        }
        known => {
            // A new flow, or a TCP SYN: it starts a new connection even when its tuple is still
            // remembered (the client reused a port), unless it is a retransmission. A SYN on a
            // connection that is over (RST, FIN both ways) is always a new one.
            let Some(service) = lb::service(pkt, hook) else {
                if hook == Hook::Pod {
                    policy::from_pod(pkt)?;
                }
                return Ok(TC_ACT_OK);
            };
            // The clock read by the lookup, if it found an entry.
            let now = match known {
                Some((_, now)) => now,
                None => conntrack::now(),
            };
            let known = known.map(|(entry, _)| entry);
            match known {
                Some(entry)
                    if !ct_closed(entry.state)
                        && lb::keep_on_syn(&service, &entry, pkt.saddr, now) =>
                {
                    conntrack::seen(&fwd_key, &entry, pkt.tcp_flags, now);
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
    if hook == Hook::Pod {
        policy::egress_to_backend(pkt, backend.addr, backend.port)?;
    }
    if pkt.proto == PROTO_TCP && !pkt.is_tcp_syn() {
        // Mid-connection (only a SYN, or a tuple conntrack knows, gets here otherwise), and
        // nobody remembers its backend: another one would answer with a RST. Dropped, as
        // nf_conntrack's INVALID, after the checks that would have dropped it anyway.
        return Err(REASON_DROP_TCP_NO_FLOW);
    }
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
fn egress(ctx: &TcContext, hook: Hook) -> Result<i32, Reason> {
    let pkt = match parse::parse(ctx) {
        None => return Ok(TC_ACT_OK),
        Some(Packet::IcmpError(err)) => return icmp::egress(ctx, &err).map_err(rewrite_failed),
        Some(Packet::Flow(pkt)) => pkt,
    };
    let reply_key = conntrack::key(&pkt, CT_DIR_REPLY);
    match conntrack::lookup_at(&reply_key) {
        Some((entry, now)) => {
            conntrack::seen(&reply_key, &entry, pkt.tcp_flags, now);
            nat::reverse(ctx, &pkt, &entry).map_err(rewrite_failed)?
        }
        None if hook == Hook::Pod => policy::to_pod(&pkt)?,
        None => {}
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
