//! NetworkPolicy for IPv6: policy.rs's checks on `isolated6`, `policy6` and `policy_flows6`,
//! at the same points of the IPv6 path (v6/mod.rs). The 40-byte keys and the event are built
//! in [`Scratch6`], not on the stack; each check is a frame of its own (`#[inline(never)]`),
//! called from the flow step, so its locals never add to the NAT steps' ones. Layout and
//! reasoning: `sluice-common`, "NetworkPolicy".

use aya_ebpf::helpers::bpf_ktime_get_ns;
use sluice_common::{
    policy6_prefix_len, PolicyKey6, Reason, CT_DIR_FORWARD, ISOLATED_EGRESS, ISOLATED_INGRESS,
    MAX_POLICY_PORT_RANGES, REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS, WAY_EGRESS,
    WAY_INGRESS,
};

use super::{ct_key, ct_lookup, Ipv6Packet, Scratch6};
use crate::maps::{ISOLATED6, POLICY6, POLICY_EVENTS, POLICY_FLOWS6, POLICY_REPLIED6};

/// Whether a policy isolates `pod` in direction `way`.
#[inline(always)]
fn isolated(pod: &[u32; 4], way: u8) -> bool {
    let bit = if way == WAY_INGRESS {
        ISOLATED_INGRESS
    } else {
        ISOLATED_EGRESS
    };
    // SAFETY: a u8 copied out at once.
    let isolated = unsafe { ISOLATED6.get(pod).copied() }.unwrap_or(0);
    isolated & bit != 0
}

/// For a TCP SYN, whether `pod` is isolated in direction `way`; `None` for other packets (as
/// policy.rs `syn_isolation`: a SYN of an open pod passes without the lookups for an admitted
/// flow).
#[inline(always)]
fn syn_isolation(pkt: &Ipv6Packet, pod: &[u32; 4], way: u8) -> Option<bool> {
    pkt.is_tcp_syn().then(|| isolated(pod, way))
}

/// Whether `pod` may have a new `proto` connection with `peer` to `port` (network byte order)
/// in direction `way`: open when not isolated for it, else one longest-prefix lookup (the key
/// in `s.policy_key`) and a scan of at most [`MAX_POLICY_PORT_RANGES`] ranges.
#[inline(always)]
fn allowed(
    s: &mut Scratch6,
    pod: &[u32; 4],
    way: u8,
    proto: u8,
    peer: &[u32; 4],
    port: u16,
) -> bool {
    allowed_when(s, isolated(pod, way), pod, way, proto, peer, port)
}

/// [`allowed`], with whether the pod is isolated in `way` already known.
#[inline(always)]
fn allowed_when(
    s: &mut Scratch6,
    isolated: bool,
    pod: &[u32; 4],
    way: u8,
    proto: u8,
    peer: &[u32; 4],
    port: u16,
) -> bool {
    if !isolated {
        return true;
    }
    s.policy_key.prefix_len = policy6_prefix_len(128);
    s.policy_key.data = PolicyKey6 {
        pod: *pod,
        way,
        proto,
        _pad: 0,
        peer: *peer,
    };
    let Some(value) = POLICY6.get(&s.policy_key) else {
        return false;
    };
    let port = u16::from_be(port);
    for i in 0..MAX_POLICY_PORT_RANGES {
        if i as u32 >= value.count {
            break;
        }
        let range = value.ranges[i];
        if range.first <= port && port <= range.last {
            return true;
        }
    }
    false
}

/// Puts the packet's tuple (`reversed`: the other way round) recorded in `way` in
/// `s.flow_key`.
#[inline(always)]
fn set_flow_key(s: &mut Scratch6, pkt: &Ipv6Packet, reversed: bool, way: u8) {
    // `pkt` may be `s.pkt`: copied field by field through registers, or LLVM calls memmove, a
    // frame of its own (32 bytes to verifiers before 6.12) that put from_pod's IPv6 call chain
    // at 544 of 512 bytes on 5.10 and 6.1.
    let (saddr, daddr) = (registers(&pkt.saddr), registers(&pkt.daddr));
    let k = &mut s.flow_key;
    if reversed {
        k.saddr = daddr;
        k.daddr = saddr;
        k.sport = pkt.dport;
        k.dport = pkt.sport;
    } else {
        k.saddr = saddr;
        k.daddr = daddr;
        k.sport = pkt.sport;
        k.dport = pkt.dport;
    }
    k.proto = pkt.proto;
    k.way = way;
    k._pad = 0;
}

/// An address loaded into registers (never a memmove from memory that may overlap its target).
#[inline(always)]
fn registers(addr: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reading a reference; volatile, so LLVM keeps the loads instead of a memmove.
    unsafe { core::ptr::read_volatile(addr) }
}

/// Whether `s.flow_key` was admitted and, but for TCP, seen within the idle timeout;
/// refreshes it, and moves it between the answered and unanswered maps
/// (crate::policy::known_in).
#[inline(always)]
fn known(s: &Scratch6, tcp_flags: u8, reply: bool, now: u64) -> bool {
    crate::policy::known_in(
        &POLICY_REPLIED6,
        &POLICY_FLOWS6,
        &s.flow_key,
        s.flow_key.proto,
        tcp_flags,
        reply,
        now,
    )
}

/// A later packet of a flow admitted in `way` (not a TCP SYN), or a reply of one admitted
/// the other way.
#[inline(always)]
fn admitted(s: &mut Scratch6, pkt: &Ipv6Packet, way: u8, now: u64) -> bool {
    let other = if way == WAY_INGRESS {
        WAY_EGRESS
    } else {
        WAY_INGRESS
    };
    if !pkt.is_tcp_syn() {
        set_flow_key(s, pkt, false, way);
        if known(s, pkt.tcp_flags, false, now) {
            return true;
        }
    }
    set_flow_key(s, pkt, true, other);
    known(s, pkt.tcp_flags, true, now)
}

/// Remembers an admitted flow (LRU: evicts instead of failing; a failed write only means the
/// next packet is checked again).
#[inline(always)]
fn record(s: &mut Scratch6, pkt: &Ipv6Packet, way: u8, now: u64) {
    set_flow_key(s, pkt, false, way);
    let _ = POLICY_FLOWS6.insert(&s.flow_key, &now, 0);
}

/// Streams a policy drop to `sluice monitor` as a `PolicyEvent6` (lost when the ring is full;
/// counted anyway).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    s: &mut Scratch6,
    pod: &[u32; 4],
    peer: &[u32; 4],
    pod_port: u16,
    peer_port: u16,
    proto: u8,
    way: u8,
    reason: Reason,
) {
    let e = &mut s.event;
    e.pod = *pod;
    e.peer = *peer;
    e.pod_port = pod_port;
    e.peer_port = peer_port;
    e.proto = proto;
    e.way = way;
    e._pad = 0;
    e.reason = reason;
    e._pad2 = 0;
    // SAFETY: a helper call without arguments.
    e.time_ns = unsafe { bpf_ktime_get_ns() };
    let _ = POLICY_EVENTS.output::<sluice_common::PolicyEvent6>(&s.event, 0);
}

/// What the checks below return when the packet passes: no reason. (A subprogram returns a
/// scalar, not a `Result`.)
const PASS: Reason = 0;

#[inline(always)]
fn result(reason: Reason) -> Result<(), Reason> {
    if reason == PASS {
        Ok(())
    } else {
        Err(reason)
    }
}

/// Egress of a new service flow from a pod against the chosen backend: see
/// [`egress_to_backend_check`].
#[inline(always)]
pub fn egress_to_backend(
    s: &mut Scratch6,
    pkt: &Ipv6Packet,
    backend: &[u32; 4],
    port: u16,
) -> Result<(), Reason> {
    result(egress_to_backend_check(s, pkt, backend, port))
}

/// A packet a pod sends that is not a service flow's: see [`from_pod_check`].
#[inline(always)]
pub fn from_pod(s: &mut Scratch6, pkt: &Ipv6Packet) -> Result<(), Reason> {
    result(from_pod_check(s, pkt))
}

/// A packet delivered to a pod: see [`to_pod_check`].
#[inline(always)]
pub fn to_pod(s: &mut Scratch6, pkt: &Ipv6Packet) -> Result<(), Reason> {
    result(to_pod_check(s, pkt))
}

/// Egress of a new service flow from a pod against the chosen backend (`backend`:`port`,
/// network byte order); its later packets and replies are `conntrack6`'s.
#[inline(never)]
fn egress_to_backend_check(
    s: &mut Scratch6,
    pkt: &Ipv6Packet,
    backend: &[u32; 4],
    port: u16,
) -> Reason {
    if allowed(s, &pkt.saddr, WAY_EGRESS, pkt.proto, backend, port) {
        return PASS;
    }
    report(
        s,
        &pkt.saddr,
        backend,
        pkt.sport,
        port,
        pkt.proto,
        WAY_EGRESS,
        REASON_DROP_POLICY_EGRESS,
    );
    REASON_DROP_POLICY_EGRESS
}

/// A packet a pod sends that is not a service flow's: passes when its flow was admitted, else
/// it opens one, checked against the pod's egress policy and recorded.
#[inline(never)]
fn from_pod_check(s: &mut Scratch6, pkt: &Ipv6Packet) -> Reason {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let syn_isolated = syn_isolation(pkt, &pkt.saddr, WAY_EGRESS);
    if syn_isolated == Some(false) {
        record(s, pkt, WAY_EGRESS, now);
        return PASS;
    }
    if admitted(s, pkt, WAY_EGRESS, now) {
        return PASS;
    }
    let isolated = syn_isolated.unwrap_or_else(|| isolated(&pkt.saddr, WAY_EGRESS));
    if !allowed_when(
        s, isolated, &pkt.saddr, WAY_EGRESS, pkt.proto, &pkt.daddr, pkt.dport,
    ) {
        report(
            s,
            &pkt.saddr,
            &pkt.daddr,
            pkt.sport,
            pkt.dport,
            pkt.proto,
            WAY_EGRESS,
            REASON_DROP_POLICY_EGRESS,
        );
        return REASON_DROP_POLICY_EGRESS;
    }
    record(s, pkt, WAY_EGRESS, now);
    PASS
}

/// A packet delivered to a pod that is not the reply of a translated flow: passes when its
/// flow was admitted or it answers the pod's own service flow (its forward `conntrack6`
/// entry), else it opens a flow, checked against the pod's ingress policy with the client as
/// delivered, and recorded.
#[inline(never)]
fn to_pod_check(s: &mut Scratch6, pkt: &Ipv6Packet) -> Reason {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let syn_isolated = syn_isolation(pkt, &pkt.daddr, WAY_INGRESS);
    if syn_isolated == Some(false) {
        record(s, pkt, WAY_INGRESS, now);
        return PASS;
    }
    if admitted(s, pkt, WAY_INGRESS, now) {
        return PASS;
    }
    s.key = ct_key(pkt, CT_DIR_FORWARD);
    s.key.saddr = pkt.daddr;
    s.key.daddr = pkt.saddr;
    s.key.sport = pkt.dport;
    s.key.dport = pkt.sport;
    if ct_lookup(s) {
        return PASS;
    }
    let isolated = syn_isolated.unwrap_or_else(|| isolated(&pkt.daddr, WAY_INGRESS));
    if !allowed_when(
        s,
        isolated,
        &pkt.daddr,
        WAY_INGRESS,
        pkt.proto,
        &pkt.saddr,
        pkt.dport,
    ) {
        report(
            s,
            &pkt.daddr,
            &pkt.saddr,
            pkt.dport,
            pkt.sport,
            pkt.proto,
            WAY_INGRESS,
            REASON_DROP_POLICY_INGRESS,
        );
        return REASON_DROP_POLICY_INGRESS;
    }
    record(s, pkt, WAY_INGRESS, now);
    PASS
}
