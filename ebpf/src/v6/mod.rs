//! The IPv6 datapath: the IPv4 one's steps (main.rs) on the IPv6 maps (`services6`,
//! `backends6`, `conntrack6`, `affinity6`, `source_ranges6`, `config6`, see `sluice-common`).
//! `from_pod`/`from_world` and `to_pod`/`to_world` come here for an IPv6 frame (main.rs).
//!
//! ```text
//!  from_pod / from_world  (ingress)
//!  1. parse                     IPv6 + TCP/UDP/SCTP right after the fixed header, or an
//!                               ICMPv6 error (destination unreachable, packet too big, time
//!                               exceeded, parameter problem) quoting such a packet; anything
//!                               else (extension headers, fragments, neighbour discovery, echo)
//!                               passes untouched
//!  2. icmp::ingress             an ICMPv6 error about a translated flow is translated like the
//!                               flow's packets (its reply, or its client's packet)
//!  3. conntrack6 (reply)        a reply of a flow that skips the host's routing
//!                               (CT_F_REDIRECT): source back to the frontend, destination
//!                               back to the client, then nat::send (FIB, or hairpin bounce);
//!                               other replies pass (translated on egress)
//!  4. conntrack6 (forward)      a known flow keeps its backend (a TCP SYN is balanced again
//!                               unless lb::keep_on_syn: a retransmission, or the client's
//!                               affinity backend)
//!  5. lb::service               services6; from_pod takes the SCOPE_POD entry (the
//!                               cluster-wide backends of an externalTrafficPolicy Local
//!                               frontend, SVC_F_EXTERNAL_LOCAL) when there is one; not a
//!                               frontend: pass, but from_pod first runs
//!     policy::from_pod          (a flow policy_flows6 admitted, or its reply, passes; a new
//!                               one is checked against the pod's egress policy6 and
//!                               recorded)
//!  6. lb::source_allowed        loadBalancerSourceRanges (source_ranges6): others dropped
//!  7. no backends               reject::answer (TCP RST, ICMPv6 port unreachable, bounced)
//!                               or DROP (SVC_F_DROP_WHEN_EMPTY)
//!  8. lb::select                the affinity6 backend (per service port, see sluice-common),
//!                               else a random slot of backends6
//!     policy::egress_to_backend from_pod: the pod's egress policy6 against the chosen
//!                               backend and its port
//!  9. lb::masquerade            hairpin (to HAIRPIN6_SNAT_ADDR), masqueradeAll, external
//!                               traffic to a remote backend, sources outside the IPv6 cluster
//!                               CIDRs: to the node's IPv6 address (config6)
//! 10. lb::create                conntrack6 forward + reply entries (a unique masquerade port)
//! 11. nat::forward              addresses and ports, the L4 checksum over the pseudo header
//!                               by bpf_l4_csum_replace with BPF_F_PSEUDO_HDR, SCTP's CRC32c
//! 12. nat::send                 masqueraded flows: redirected per the FIB
//!                               (bpf_fib_lookup + bpf_redirect_neigh); hairpin: back out the
//!                               pod's veth; the rest: through the host's routing. A
//!                               redirected packet skips the kernel's forwarding, so its hop
//!                               limit is decremented here; at 1 it goes to the stack instead,
//!                               which discards it with the time exceeded a router sends
//!
//!  to_pod / to_world  (egress): parse; icmp::egress (an error toward the client of a flow);
//!  a reply (conntrack6 reply entry) gets the frontend back as its source (and, masqueraded,
//!  the client as its destination); to_pod, any other packet: policy::to_pod (a flow
//!  policy_flows6 admitted, its reply, or the answer of the pod's own service flow passes; a
//!  new one is checked against the pod's ingress policy6 with the client as delivered)
//! ```
//!
//! Stack: eBPF gives a call chain 512 bytes of stack. The IPv6 path holds 40-byte keys,
//! 56-byte conntrack values, a 64-byte `bpf_fib_lookup`, affinity and LPM keys; kept on the
//! stack they filled one frame up to the limit before affinity, source ranges and ICMPv6 were
//! added. So the path runs in functions of its own (`#[inline(never)]`, BPF-to-BPF calls):
//! [`ingress`] and [`egress`] (main.rs: a packet never pays for both families' frames), and
//! below them the parser, the flow steps, the ICMPv6 steps and the REJECT answer, each its own
//! frame, called one after the other (the deepest chain is about 330 of the 512 bytes). The
//! big keys and values live in [`Scratch6`], one entry of the per-CPU array `scratch6` (as
//! Cilium's per-CPU scratch buffers): a tc program runs to its end on its CPU before another
//! one runs there (the redirects it asks for happen after it returns), so the entry is the
//! packet's own until the program returns; nothing is kept in it between packets. (A tail
//! call would also give a fresh stack, at the price of a program array for the loader,
//! `sluice trace` and the tests to fill; per-CPU scratch keeps the object self-contained.)
//!
//! Headers are read with `bpf_skb_load_bytes` (`ctx.load`); the IPv4 fast path's direct
//! packet access is not duplicated here.

// The maps take `impl Borrow<K>`: keys in scratch are passed by reference on purpose, a value
// would be copied onto the stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod icmp;
mod lb;
mod nat;
mod policy;
mod reject;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, TC_ACT_OK},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use sluice_common::{
    ct_closed, AffinityKey6, AffinityValue6, CtKey6, CtValue6, PolicyEvent6, PolicyFlowKey6,
    PolicyKey6, Reason, SourceRangeKey6, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, REASON_DROP_REWRITE_FAILED,
};

use crate::{
    conntrack,
    maps::SCRATCH6,
    parse::{ETH_HLEN, SCTP_CSUM_OFF, TCP_CSUM_OFF, TCP_FLAG_ACK, TCP_FLAG_SYN, UDP_CSUM_OFF},
    verdict, Hook,
};

pub const PROTO_ICMPV6: u8 = 58;

const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
pub const IPV6_HLEN: usize = 40;
/// Offsets inside the IPv6 header.
pub const IPV6_SADDR_OFF: usize = 8;
pub const IPV6_DADDR_OFF: usize = 24;
const IPV6_HOP_LIMIT_OFF: usize = 7;
/// ICMPv6 error types (RFC 4443) whose body quotes the packet they are about.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAM_PROBLEM: u8 = 4;
const ICMPV6_HLEN: usize = 8;

/// The fixed IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Header {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// What the programs need of an IPv6 TCP, UDP or SCTP packet, in network byte order.
/// Without implicit padding: it is copied whole into and out of [`Scratch6`], and the
/// verifier rejects reading stack bytes never written.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Packet {
    l4_off: usize,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    /// The IPv6 payload length, host order (the L4 packet: no extension headers here).
    payload_len: u16,
    proto: u8,
    tcp_flags: u8,
    hop_limit: u8,
    _pad: [u8; 7],
}

impl Ipv6Packet {
    #[inline(always)]
    fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    #[inline(always)]
    fn l4_csum_off(&self) -> usize {
        self.l4_off + l4_csum_field(self.proto)
    }
}

#[inline(always)]
fn l4_csum_field(proto: u8) -> usize {
    match proto {
        PROTO_TCP => TCP_CSUM_OFF,
        PROTO_UDP => UDP_CSUM_OFF,
        _ => SCTP_CSUM_OFF,
    }
}

/// An ICMPv6 error quoting an IPv6 TCP, UDP or SCTP packet: the outer addresses and the
/// quoted ("inner") tuple, in network byte order (no implicit padding, as [`Ipv6Packet`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Icmp6Error {
    saddr: [u32; 4],
    daddr: [u32; 4],
    inner_saddr: [u32; 4],
    inner_daddr: [u32; 4],
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
    hop_limit: u8,
    _pad: u16,
}

/// Offsets of an ICMPv6 error's parts (fixed: no extension headers on either level).
const ICMP_OFF: usize = ETH_HLEN + IPV6_HLEN;
const INNER_OFF: usize = ICMP_OFF + ICMPV6_HLEN;
const INNER_L4_OFF: usize = INNER_OFF + IPV6_HLEN;

pub enum Packet6 {
    Flow(Ipv6Packet),
    IcmpError(Icmp6Error),
}

/// The IPv6 path's working space (see the module doc), one per CPU (`scratch6`).
#[repr(C)]
pub struct Scratch6 {
    /// The packet being handled (from [`parse_into`]).
    pub pkt: Ipv6Packet,
    /// Or the ICMPv6 error being handled.
    pub err: Icmp6Error,
    /// The conntrack key being looked up (reply, then forward direction).
    pub key: CtKey6,
    /// A new flow's reply key.
    pub reply_key: CtKey6,
    /// The flow's conntrack entry (the forward one for a client's packet, the reply one for a
    /// reply).
    pub entry: CtValue6,
    /// A new flow's reply entry.
    pub reply: CtValue6,
    /// When [`ct_lookup`] found `entry` (bpf_ktime_get_ns), for conntrack::seen6.
    pub now: u64,
    pub fib: bpf_fib_lookup,
    pub affinity_key: AffinityKey6,
    pub affinity: AffinityValue6,
    pub range_key: Key<SourceRangeKey6>,
    /// NetworkPolicy (policy.rs): the `policy6` lookup key, a `policy_flows6` key, a drop's
    /// event.
    pub policy_key: Key<PolicyKey6>,
    pub flow_key: PolicyFlowKey6,
    pub event: PolicyEvent6,
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch6> {
    // SAFETY: entry 0 of a per-CPU array is this CPU's; a tc program is not preempted by
    // another one on its CPU, so nothing else uses it until this program returns.
    SCRATCH6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Whether the frame carries IPv6 (direct packet access: the IPv4 path pays one comparison).
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return false;
    }
    // SAFETY: the 14 bytes of the Ethernet header are inside the packet (checked above).
    unsafe { *((start + 12) as *const u16) == ETH_P_IPV6_BE }
}

/// What [`parse_into`] found.
const PARSED_OTHER: u8 = 0;
const PARSED_FLOW: u8 = 1;
const PARSED_ICMP_ERROR: u8 = 2;

/// `from_pod` and `from_world` for an IPv6 frame. Each part runs in a frame of its own
/// (`#[inline(never)]`), so the chain's stack is the parser's or one path's, never both.
#[inline(never)]
pub fn ingress(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(s) = scratch() else {
        return TC_ACT_OK;
    };
    match parse_into(ctx, s) {
        PARSED_FLOW => match flow_ingress(ctx, s, hook) {
            // Called from here, not from flow_ingress: the two frames would not fit one chain.
            REJECT => reject::answer(ctx, s),
            action => action,
        },
        PARSED_ICMP_ERROR => icmp_ingress(ctx, s),
        _ => TC_ACT_OK,
    }
}

/// [`flow_ingress`]'s verdict for a packet to a frontend without endpoints that kube-proxy
/// rejects: [`reject::answer`] answers it (not a TC_ACT_* value).
pub const REJECT: i32 = i32::MIN;

/// `to_pod` and `to_world` for an IPv6 frame.
#[inline(never)]
pub fn egress(ctx: &TcContext, hook: Hook) -> i32 {
    let Some(s) = scratch() else {
        return TC_ACT_OK;
    };
    match parse_into(ctx, s) {
        PARSED_FLOW => flow_egress(ctx, s, hook),
        PARSED_ICMP_ERROR => icmp_egress(ctx, s),
        _ => TC_ACT_OK,
    }
}

#[inline(never)]
fn flow_egress(ctx: &TcContext, s: &mut Scratch6, hook: Hook) -> i32 {
    let pkt = s.pkt;
    s.key = ct_key(&pkt, CT_DIR_REPLY);
    let result = if ct_lookup(s) {
        conntrack::seen6(&s.key, &s.entry, pkt.tcp_flags, s.now);
        nat::reverse(ctx, &pkt, &s.entry).map_err(|()| REASON_DROP_REWRITE_FAILED)
    } else if hook == Hook::Pod {
        // Not the reply of a translated flow: the receiving pod's ingress policy.
        policy::to_pod(s, &pkt)
    } else {
        Ok(())
    };
    verdict(ctx, result.map(|()| TC_ACT_OK))
}

#[inline(never)]
fn icmp_ingress(ctx: &TcContext, s: &mut Scratch6) -> i32 {
    let err = s.err;
    verdict(ctx, icmp::ingress(ctx, s, &err))
}

#[inline(never)]
fn icmp_egress(ctx: &TcContext, s: &mut Scratch6) -> i32 {
    let err = s.err;
    verdict(
        ctx,
        icmp::egress(ctx, s, &err)
            .map(|()| TC_ACT_OK)
            .map_err(|()| REASON_DROP_REWRITE_FAILED),
    )
}

/// Parses the frame into `s.pkt` or `s.err`; returns which (`PARSED_*`).
#[inline(never)]
fn parse_into(ctx: &TcContext, s: &mut Scratch6) -> u8 {
    match parse(ctx) {
        Some(Packet6::Flow(pkt)) => {
            s.pkt = pkt;
            PARSED_FLOW
        }
        Some(Packet6::IcmpError(err)) => {
            s.err = err;
            PARSED_ICMP_ERROR
        }
        None => PARSED_OTHER,
    }
}

#[inline(always)]
fn ports(ctx: &TcContext, off: usize) -> Option<(u16, u16)> {
    let p: [u16; 2] = ctx.load(off).ok()?;
    Some((p[0], p[1]))
}

/// Ethernet + IPv6 + TCP/UDP/SCTP (or an ICMPv6 error quoting such a packet) directly after
/// the fixed header; `None` for anything else.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet6> {
    let ip: Ipv6Header = ctx.load(ETH_HLEN).ok()?;
    if u32::from_be(ip.vtc_flow) >> 28 != 6 {
        return None;
    }
    let proto = ip.next_header;
    let l4_off = ETH_HLEN + IPV6_HLEN;
    if proto == PROTO_ICMPV6 {
        let icmp_type: u8 = ctx.load(l4_off).ok()?;
        if !matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAM_PROBLEM
        ) {
            return None; // echo, neighbour discovery, ...: untouched
        }
        let inner: Ipv6Header = ctx.load(INNER_OFF).ok()?;
        let inner_proto = inner.next_header;
        if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP && inner_proto != PROTO_SCTP {
            return None;
        }
        // The quote must hold the ports and the L4 checksum fields this code may rewrite,
        // inside the packet (not in bytes after it).
        if (u16::from_be(ip.payload_len) as usize) < INNER_L4_OFF + 4 - l4_off {
            return None;
        }
        let (inner_sport, inner_dport) = ports(ctx, INNER_L4_OFF)?;
        return Some(Packet6::IcmpError(Icmp6Error {
            hop_limit: ip.hop_limit,
            saddr: ip.saddr,
            daddr: ip.daddr,
            inner_saddr: inner.saddr,
            inner_daddr: inner.daddr,
            inner_sport,
            inner_dport,
            inner_proto,
            _pad: 0,
        }));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return None; // extension headers, fragments, others: untouched
    }
    // The fixed L4 header with its checksum field must be present (TCP: 20 bytes, UDP: its 8
    // bytes, SCTP: 12 bytes cover the ports and the checksum). A UDP datagram with less than 4
    // bytes of payload is a flow like any other (not passed untouched: it would skip the
    // services and NetworkPolicy).
    // ... inside the IPv6 packet, not in bytes after it (padding, a trailer).
    let header_len = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => 12,
    };
    if (u16::from_be(ip.payload_len) as usize) < header_len {
        return None;
    }
    let (ports, tcp_flags) = if proto == PROTO_UDP {
        let h: [u8; 8] = ctx.load(l4_off).ok()?;
        (
            [
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            ],
            0,
        )
    } else if proto == PROTO_TCP {
        let h: [u8; 20] = ctx.load(l4_off).ok()?;
        (
            [
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            ],
            h[13],
        )
    } else {
        let h: [u8; 12] = ctx.load(l4_off).ok()?;
        (
            [
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            ],
            0,
        )
    };
    Some(Packet6::Flow(Ipv6Packet {
        l4_off,
        payload_len: u16::from_be(ip.payload_len),
        hop_limit: ip.hop_limit,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto,
        tcp_flags,
        _pad: [0; 7],
    }))
}

#[inline(always)]
fn ct_key(pkt: &Ipv6Packet, dir: u8) -> CtKey6 {
    CtKey6 {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        _pad: 0,
    }
}

/// Looks `s.key` up in conntrack6 and copies the entry to `s.entry` (and the time it was
/// judged at to `s.now`); whether there was a live one (an expired entry counts as absent, as
/// conntrack::lookup).
#[inline(always)]
fn ct_lookup(s: &mut Scratch6) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(entry) = conntrack::find6(&s.key) else {
        return false;
    };
    // SAFETY: a pointer to the map's value, valid for the program's run; copied out below.
    let entry = unsafe { &*entry };
    s.now = conntrack::now();
    if conntrack::expired6(&s.key, entry, s.now) {
        return false;
    }
    s.entry = *entry;
    true
}

/// Steps 3 to 12 of `from_pod` and `from_world` for an IPv6 flow's packet; a frame of its own
/// (the parser's headers are not on the stack any more).
#[inline(never)]
fn flow_ingress(ctx: &TcContext, s: &mut Scratch6, hook: Hook) -> i32 {
    let pkt = s.pkt;
    verdict(ctx, ingress_steps(ctx, s, &pkt, hook))
}

#[inline(always)]
fn ingress_steps(
    ctx: &TcContext,
    s: &mut Scratch6,
    pkt: &Ipv6Packet,
    hook: Hook,
) -> Result<i32, Reason> {
    s.key = ct_key(pkt, CT_DIR_REPLY);
    if ct_lookup(s) {
        // A reply of a flow that skips the host's routing (masqueraded, hairpin) is
        // translated here and sent on; other replies after the host's routing (egress).
        if s.entry.flags & CT_F_REDIRECT == 0 {
            return Ok(TC_ACT_OK);
        }
        conntrack::seen6(&s.key, &s.entry, pkt.tcp_flags, s.now);
        nat::reverse(ctx, pkt, &s.entry).map_err(|()| REASON_DROP_REWRITE_FAILED)?;
        let (saddr, daddr) = nat::reversed_addrs(pkt, &s.entry);
        let flags = s.entry.flags;
        return nat::send(ctx, s, flags, pkt.hop_limit, saddr, daddr);
    }
    s.key.dir = CT_DIR_FORWARD;
    let known = ct_lookup(s);
    if !known || pkt.is_tcp_syn() {
        // A new flow, or a TCP SYN: it starts a new connection even when its tuple is still
        // remembered (the client reused a port), unless it is a retransmission or the
        // client's affinity backend; a SYN on a connection that is over (RST, FIN both ways)
        // always starts a new one.
        let Some(service) = lb::service(pkt, hook) else {
            if hook == Hook::Pod {
                // Not a frontend: the sending pod's egress policy, against the destination.
                policy::from_pod(s, pkt)?;
            }
            return Ok(TC_ACT_OK);
        };
        // The clock read by the lookup, if it found an entry.
        let now = if known { s.now } else { conntrack::now() };
        if known && !ct_closed(s.entry.state) && lb::keep_on_syn(s, &service, pkt.saddr, now) {
            conntrack::seen6(&s.key, &s.entry, pkt.tcp_flags, s.now);
        } else if let Some(action) = lb::new_flow(s, pkt, &service, hook, now)? {
            return Ok(action);
        }
    } else {
        conntrack::seen6(&s.key, &s.entry, pkt.tcp_flags, s.now);
    }
    nat::forward(ctx, pkt, &s.entry).map_err(|()| REASON_DROP_REWRITE_FAILED)?;
    let (saddr, daddr) = nat::forwarded_addrs(pkt, &s.entry);
    let flags = s.entry.flags;
    nat::send(ctx, s, flags, pkt.hop_limit, saddr, daddr)
}
