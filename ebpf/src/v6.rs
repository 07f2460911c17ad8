//! The IPv6 datapath: a subset of the IPv4 one, on its own maps (`services6`, `backends6`,
//! `conntrack6`, `config6`, see `sluice-common`). `from_pod`/`from_world` and
//! `to_pod`/`to_world` come here for a packet that is not IPv4 (main.rs), so the IPv4 path
//! only pays for one failed ethertype check on IPv6 packets.
//!
//! ```text
//!  from_pod / from_world
//!  1. parse                     IPv6 + TCP/UDP/SCTP right after the fixed header; anything
//!                               else (extension headers, fragments, ICMPv6 and so neighbour
//!                               discovery and router solicitations) passes untouched
//!  2. conntrack6 (reply)        a reply of a masqueraded flow (CT_F_REDIRECT): source back
//!                               to the frontend, destination back to the client, redirected
//!                               per the FIB (bpf_fib_lookup + bpf_redirect_neigh); other
//!                               replies pass (translated on egress)
//!  3. conntrack6 (forward)      a known flow keeps its backend (a TCP SYN is balanced again
//!                               unless it is a retransmission)
//!  4. services6                 not a frontend: pass. A ClusterIP entering from outside the
//!                               node passes too (kube-proxy masquerades it; not done here)
//!  5. no backends               REJECT (TCP RST, ICMPv6 port unreachable type 1 code 4
//!                               quoting the IPv6 header and 8 L4 bytes, sent back out the
//!                               interface) or DROP (SVC_F_DROP_WHEN_EMPTY)
//!  6. a random slot of backends6
//!  7. source NAT                hairpin (the backend is the client pod): to the service
//!                               loopback address HAIRPIN6_SNAT_ADDR, sent back out the pod's
//!                               interface both ways; external traffic from outside the node
//!                               (externalTrafficPolicy Cluster) to a backend on another node:
//!                               to the node's IPv6 address (config6), redirected per the FIB
//!                               both ways; each with a source port that keeps the reply tuple
//!                               unique
//!  8. conntrack6                forward and reply entries
//!  9. NAT                       addresses and ports, the L4 checksum over the pseudo header
//!                               by bpf_l4_csum_replace with BPF_F_PSEUDO_HDR (one call per
//!                               changed 32-bit word), SCTP's CRC32c for ports
//!
//!  to_pod / to_world: parse, then a reply (conntrack6 reply entry) gets the frontend back as
//!  its source (and, masqueraded, the client as its destination)
//! ```
//!
//! Not in IPv6 yet: sessionAffinity, loadBalancerSourceRanges (the agent does not program
//! frontends with either), masqueradeAll and the masquerade of sources outside the cluster
//! CIDRs, ICMPv6 error translation (destination unreachable, packet too big about a
//! translated flow pass untouched). Headers are read with `bpf_skb_load_bytes` (the IPv4 fast
//! path's direct packet access is not duplicated here).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_redir_neigh,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_OK,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh,
        bpf_skb_change_tail,
    },
    programs::TcContext,
    EbpfContext,
};
use sluice_common::{
    crc32c, Backend6, BackendKey, CtKey6, CtValue6, Reason, ServiceKey6, ServiceValue,
    BACKEND_F_LOCAL, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_HAIRPIN, CT_F_REDIRECT, CT_F_SNAT,
    HAIRPIN6_SNAT_ADDR, KIND_CLUSTER_IP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_DROP_NO_LOCAL_ENDPOINTS, REASON_DROP_NO_SNAT_PORT, REASON_DROP_REJECT_FAILED,
    REASON_DROP_REWRITE_FAILED, REASON_REJECT_NO_ENDPOINTS, SVC_F_DROP_WHEN_EMPTY, SVC_F_EXTERNAL,
    SVC_F_EXTERNAL_LOCAL,
};

use crate::{
    lb::SYN_RETRANSMIT_NS,
    maps::{BACKENDS6, CONFIG6, CONNTRACK6, SERVICES6},
    parse::{
        ETH_HLEN, SCTP_CSUM_OFF, TCP_CSUM_OFF, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST,
        TCP_FLAG_SYN, UDP_CSUM_OFF,
    },
    reject, route, stats, Hook,
};

const PROTO_ICMPV6: u8 = 58;
const AF_INET6: u8 = 10;

const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const IPV6_HLEN: usize = 40;
/// Offsets inside the IPv6 header.
const IPV6_SADDR_OFF: usize = 8;
const IPV6_DADDR_OFF: usize = 24;

/// The fixed IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    vtc_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// What the programs need of an IPv6 TCP, UDP or SCTP packet, in network byte order.
pub struct Ipv6Packet {
    l4_off: usize,
    /// The IPv6 payload length, host order (the L4 packet: no extension headers here).
    payload_len: u16,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
}

impl Ipv6Packet {
    #[inline(always)]
    fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    #[inline(always)]
    fn l4_csum_off(&self) -> usize {
        self.l4_off
            + match self.proto {
                PROTO_TCP => TCP_CSUM_OFF,
                PROTO_UDP => UDP_CSUM_OFF,
                _ => SCTP_CSUM_OFF,
            }
    }
}

/// Ethernet + IPv6 + TCP/UDP/SCTP directly after the fixed header; `None` for anything else.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Ipv6Packet> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IPV6_BE {
        return None;
    }
    let ip: Ipv6Header = ctx.load(ETH_HLEN).ok()?;
    if u32::from_be(ip.vtc_flow) >> 28 != 6 {
        return None;
    }
    let proto = ip.next_header;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return None; // extension headers, fragments, ICMPv6, others: untouched
    }
    let l4_off = ETH_HLEN + IPV6_HLEN;
    // The fixed L4 header with its checksum field must be present (TCP: 20 bytes, UDP and
    // SCTP: 12 bytes cover the ports and the checksum).
    let (ports, tcp_flags) = if proto == PROTO_TCP {
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
    Some(Ipv6Packet {
        l4_off,
        payload_len: u16::from_be(ip.payload_len),
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto,
        tcp_flags,
    })
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

#[inline(always)]
fn ct_lookup(key: &CtKey6) -> Option<CtValue6> {
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK6.get(key).copied() }
}

/// Steps 1 to 7 of `from_pod` and `from_world` for an IPv6 packet.
#[inline(always)]
pub fn ingress(ctx: &TcContext, pkt: &Ipv6Packet, hook: Hook) -> Result<i32, Reason> {
    if let Some(entry) = ct_lookup(&ct_key(pkt, CT_DIR_REPLY)) {
        // A reply of a masqueraded flow: addressed to the node, so translated here (source
        // back to the frontend, destination back to the client) and redirected per the FIB.
        // Other replies are translated on egress, after the host's routing.
        if entry.flags & CT_F_REDIRECT == 0 {
            return Ok(TC_ACT_OK);
        }
        reverse(ctx, pkt, &entry).map_err(|()| REASON_DROP_REWRITE_FAILED)?;
        let daddr = if entry.flags & CT_F_SNAT != 0 {
            entry.snat_addr
        } else {
            pkt.daddr
        };
        if entry.flags & CT_F_HAIRPIN != 0 {
            return route::bounce(ctx).map_err(|()| REASON_DROP_REWRITE_FAILED);
        }
        return Ok(via_fib(ctx, &entry.nat_addr, &daddr));
    }
    let fwd_key = ct_key(pkt, CT_DIR_FORWARD);
    let known = ct_lookup(&fwd_key);
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let entry = match known {
        Some(entry) if !pkt.is_tcp_syn() => entry,
        // A retransmitted SYN keeps its backend.
        Some(entry) if now.wrapping_sub(entry.created_ns) < SYN_RETRANSMIT_NS => entry,
        _ => {
            let key = ServiceKey6 {
                addr: pkt.daddr,
                port: pkt.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            // SAFETY: the value is copied out at once; the agent replaces entries whole.
            let Some(service) = (unsafe { SERVICES6.get(key).copied() }) else {
                return Ok(TC_ACT_OK);
            };
            if hook == Hook::World && service.kind == KIND_CLUSTER_IP {
                return Ok(TC_ACT_OK); // would need masquerade
            }
            if service.backend_count == 0 {
                return no_backends(ctx, pkt, &service);
            }
            match new_flow(pkt, &fwd_key, &service, hook, now)? {
                Some(entry) => entry,
                None => return Ok(TC_ACT_OK),
            }
        }
    };
    rewrite(
        ctx,
        pkt,
        IPV6_DADDR_OFF,
        2,
        (pkt.daddr, pkt.dport),
        (entry.nat_addr, entry.nat_port),
    )
    .map_err(|()| REASON_DROP_REWRITE_FAILED)?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(
            ctx,
            pkt,
            IPV6_SADDR_OFF,
            0,
            (pkt.saddr, pkt.sport),
            (entry.snat_addr, entry.snat_port),
        )
        .map_err(|()| REASON_DROP_REWRITE_FAILED)?;
    }
    if entry.flags & CT_F_HAIRPIN != 0 {
        return route::bounce(ctx).map_err(|()| REASON_DROP_REWRITE_FAILED);
    }
    if entry.flags & CT_F_REDIRECT != 0 {
        let saddr = if entry.flags & CT_F_SNAT != 0 {
            entry.snat_addr
        } else {
            pkt.saddr
        };
        return Ok(via_fib(ctx, &saddr, &entry.nat_addr));
    }
    Ok(TC_ACT_OK)
}

/// Source back to the frontend and, for a masqueraded flow, destination back to the client.
#[inline(always)]
fn reverse(ctx: &TcContext, pkt: &Ipv6Packet, entry: &CtValue6) -> Result<(), ()> {
    rewrite(
        ctx,
        pkt,
        IPV6_SADDR_OFF,
        0,
        (pkt.saddr, pkt.sport),
        (entry.nat_addr, entry.nat_port),
    )?;
    if entry.flags & CT_F_SNAT != 0 {
        rewrite(
            ctx,
            pkt,
            IPV6_DADDR_OFF,
            2,
            (pkt.daddr, pkt.dport),
            (entry.snat_addr, entry.snat_port),
        )?;
    }
    Ok(())
}

/// Redirects the packet to the egress interface and next hop the FIB has for `daddr`
/// (`bpf_fib_lookup` + `bpf_redirect_neigh`, as `route::via_fib` for IPv4); TC_ACT_OK (the
/// stack routes it) when there is no forwarding route.
#[inline(always)]
fn via_fib(ctx: &TcContext, saddr: &[u32; 4], daddr: &[u32; 4]) -> i32 {
    // SAFETY: a plain C struct; all zeroes is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.__bindgen_anon_3.ipv6_src = *saddr;
    params.__bindgen_anon_4.ipv6_dst = *daddr;
    // SAFETY: the context is the program's __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: params is a valid bpf_fib_lookup of the size given.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET6 as u32,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            // SAFETY: the lookup filled the IPv6 member for an IPv6 lookup.
            ipv6_nh: unsafe { params.__bindgen_anon_4.ipv6_dst },
        },
    };
    // SAFETY: nh is valid for its size.
    (unsafe {
        bpf_redirect_neigh(
            params.ifindex,
            &mut nh,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }) as i32
}

/// A frontend without backends: kube-proxy's DROP (a Local policy left none here) or REJECT
/// (TCP RST, ICMPv6 port unreachable, sent back out the interface the packet came in on).
#[inline(always)]
fn no_backends(ctx: &TcContext, pkt: &Ipv6Packet, service: &ServiceValue) -> Result<i32, Reason> {
    if service.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
        return Err(REASON_DROP_NO_LOCAL_ENDPOINTS);
    }
    let built = if pkt.proto == PROTO_TCP {
        tcp_reset(ctx, pkt)
    } else {
        icmp6_port_unreachable(ctx, pkt).map(|()| true)
    };
    match built {
        Ok(true) => {
            stats::record(ctx, REASON_REJECT_NO_ENDPOINTS);
            route::bounce(ctx).map_err(|()| REASON_DROP_REJECT_FAILED)
        }
        // A RST is never answered.
        Ok(false) => Err(REASON_REJECT_NO_ENDPOINTS),
        Err(()) => Err(REASON_DROP_REJECT_FAILED),
    }
}

/// The IPv6 pseudo header (RFC 8200 8.1), as the upper-layer checksums cover it.
#[repr(C)]
#[derive(Clone, Copy)]
struct PseudoHeader {
    saddr: [u32; 4],
    daddr: [u32; 4],
    len: u32,
    zero: [u8; 3],
    next_header: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    data_off: u8,
    flags: u8,
    window: u16,
    csum: u16,
    urg: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpChecksummed {
    pseudo: PseudoHeader,
    tcp: TcpHeader,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Icmp6Header {
    icmp_type: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

const TCP_HLEN: usize = 20;
const ICMP6_HLEN: usize = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// The quote of an ICMPv6 error: the offending packet's IPv6 header and 8 bytes of its L4
/// header (ports included), as much as the parser guaranteed is there.
const QUOTE_LEN: usize = IPV6_HLEN + 8;

#[inline(always)]
fn ipv6_header(payload_len: usize, next_header: u8, pkt: &Ipv6Packet) -> Ipv6Header {
    Ipv6Header {
        vtc_flow: (6u32 << 28).to_be(),
        payload_len: (payload_len as u16).to_be(),
        next_header,
        hop_limit: 64,
        saddr: pkt.daddr,
        daddr: pkt.saddr,
    }
}

#[inline(always)]
fn pseudo_header(len: usize, next_header: u8, pkt: &Ipv6Packet) -> PseudoHeader {
    PseudoHeader {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        len: (len as u32).to_be(),
        zero: [0; 3],
        next_header,
    }
}

/// Turns a TCP segment into the RST answering it (as `tcp_v6_send_reset`: for a segment with
/// ACK `seq = its ack`, else RST|ACK acking what it consumed); `Ok(false)`: it is a RST itself.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<bool, ()> {
    let seq: u32 = ctx.load(pkt.l4_off + 4).map_err(|_| ())?;
    let ack: u32 = ctx.load(pkt.l4_off + 8).map_err(|_| ())?;
    let off_flags: [u8; 2] = ctx.load(pkt.l4_off + 12).map_err(|_| ())?;
    let flags = off_flags[1];
    if flags & TCP_FLAG_RST != 0 {
        return Ok(false);
    }
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_FLAG_ACK != 0 {
        (ack, 0, TCP_FLAG_RST)
    } else {
        let data_off = ((off_flags[0] >> 4) as u32) * 4;
        let payload = (pkt.payload_len as u32).saturating_sub(data_off);
        let consumed =
            payload + (flags & TCP_FLAG_SYN != 0) as u32 + (flags & TCP_FLAG_FIN != 0) as u32;
        (
            0,
            u32::from_be(seq).wrapping_add(consumed).to_be(),
            TCP_FLAG_RST | TCP_FLAG_ACK,
        )
    };
    let mut answer = TcpChecksummed {
        pseudo: pseudo_header(TCP_HLEN, PROTO_TCP, pkt),
        tcp: TcpHeader {
            sport: pkt.dport,
            dport: pkt.sport,
            seq: rst_seq,
            ack: rst_ack,
            data_off: ((TCP_HLEN / 4) as u8) << 4,
            flags: rst_flags,
            window: 0,
            csum: 0,
            urg: 0,
        },
    };
    answer.tcp.csum = reject::checksum(reject::sum(
        &answer as *const TcpChecksummed as *const u8,
        size_of::<TcpChecksummed>() as u32,
        0,
    )?);
    let ip = ipv6_header(TCP_HLEN, PROTO_TCP, pkt);
    // SAFETY: a helper call on the program's context.
    let rc =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IPV6_HLEN + TCP_HLEN) as u32, 0) };
    if rc != 0 {
        return Err(());
    }
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(ETH_HLEN, &ip, recompute).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV6_HLEN, &answer.tcp, recompute)
        .map_err(|_| ())?;
    Ok(true)
}

/// Turns a UDP or SCTP packet into the ICMPv6 destination unreachable (port unreachable,
/// RFC 4443 type 1 code 4) answering it, quoting its IPv6 header and first 8 L4 bytes.
#[inline(always)]
fn icmp6_port_unreachable(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<(), ()> {
    let icmp_len = ICMP6_HLEN + QUOTE_LEN;
    // Room for the new IPv6 and ICMPv6 headers in front of the packet, which becomes the
    // quote; then cut it after the quote.
    ctx.adjust_room((IPV6_HLEN + ICMP6_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // SAFETY: a helper call on the program's context.
    let rc =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IPV6_HLEN + icmp_len) as u32, 0) };
    if rc != 0 {
        return Err(());
    }
    let quote: [u32; QUOTE_LEN / 4] = ctx
        .load(ETH_HLEN + IPV6_HLEN + ICMP6_HLEN)
        .map_err(|_| ())?;
    let pseudo = pseudo_header(icmp_len, PROTO_ICMPV6, pkt);
    let mut icmp = Icmp6Header {
        icmp_type: ICMPV6_DEST_UNREACH,
        code: ICMPV6_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    let sum = reject::sum(
        &pseudo as *const PseudoHeader as *const u8,
        size_of::<PseudoHeader>() as u32,
        0,
    )?;
    let sum = reject::sum(quote.as_ptr() as *const u8, QUOTE_LEN as u32, sum)?;
    icmp.csum = reject::checksum(reject::sum(
        &icmp as *const Icmp6Header as *const u8,
        ICMP6_HLEN as u32,
        sum,
    )?);
    let ip = ipv6_header(icmp_len, PROTO_ICMPV6, pkt);
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(ETH_HLEN, &ip, recompute).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV6_HLEN, &icmp, recompute)
        .map_err(|_| ())?;
    Ok(())
}

/// [`HAIRPIN6_SNAT_ADDR`] as the maps and the packet hold it.
#[inline(always)]
fn hairpin_addr() -> [u32; 4] {
    let a = HAIRPIN6_SNAT_ADDR;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// How many source ports a masqueraded flow tries (as the IPv4 datapath).
const SNAT_ATTEMPTS: u32 = 5;

/// A new flow to a frontend with backends: its backend, its source NAT and conntrack entries;
/// `Ok(None)`: not translated.
///
/// External traffic from outside the node (externalTrafficPolicy Cluster) to a backend on
/// another node is masqueraded to the node's IPv6 address (`config6`), with a source port
/// that makes the reply tuple unique (claimed with BPF_NOEXIST), and its packets skip the
/// host's routing both ways ([`CT_F_REDIRECT`]). Without a node IPv6 address such a flow is
/// not translated.
#[inline(always)]
fn new_flow(
    pkt: &Ipv6Packet,
    fwd_key: &CtKey6,
    service: &ServiceValue,
    hook: Hook,
    now: u64,
) -> Result<Option<CtValue6>, Reason> {
    let Some((backend, slot)) = random_backend(service) else {
        return Ok(None);
    };
    let hairpin = hook == Hook::Pod && backend.addr == pkt.saddr;
    let masquerade = hook == Hook::World
        && service.flags & SVC_F_EXTERNAL != 0
        && service.flags & SVC_F_EXTERNAL_LOCAL == 0
        && backend.flags & BACKEND_F_LOCAL == 0;
    let mut forward = CtValue6 {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: 0,
        snat_addr: [0; 4],
        snat_port: 0,
        state: 0,
        _pad: 0,
        service_id: service.id,
        backend_slot: slot,
        created_ns: now,
        // 0: not tracked, never expires (IPv6 flow state waits for stack space, see
        // conntrack::seen6).
        last_seen_ns: 0,
    };
    let mut reply_key = CtKey6 {
        saddr: backend.addr,
        daddr: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let mut reply = CtValue6 {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        ..forward
    };
    if !masquerade && !hairpin {
        // LRU maps evict rather than fail; without its entries the flow is not translated.
        if CONNTRACK6.insert(reply_key, reply, 0).is_err()
            || CONNTRACK6.insert(fwd_key, forward, 0).is_err()
        {
            return Ok(None);
        }
        return Ok(Some(forward));
    }
    let (snat_addr, flags) = if hairpin {
        // A pod reaching itself through a service: from the service loopback address, sent
        // back out the pod's interface both ways.
        (hairpin_addr(), CT_F_SNAT | CT_F_REDIRECT | CT_F_HAIRPIN)
    } else {
        let Some(config) = CONFIG6.get(0) else {
            return Ok(None);
        };
        if config.node_ip == [0; 4] {
            return Ok(None);
        }
        (config.node_ip, CT_F_SNAT | CT_F_REDIRECT)
    };
    forward.flags = flags;
    forward.snat_addr = snat_addr;
    reply.flags = flags;
    reply.snat_addr = pkt.saddr;
    reply.snat_port = pkt.sport;
    reply_key.daddr = snat_addr;
    for attempt in 0..SNAT_ATTEMPTS {
        // From --masquerade-port-range (hairpin may keep the client's port).
        let port = crate::conntrack::masquerade_port_inline(attempt, pkt.sport, hairpin);
        reply_key.dport = port;
        if CONNTRACK6
            .insert(reply_key, reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            forward.snat_port = port;
            if CONNTRACK6.insert(fwd_key, forward, 0).is_err() {
                return Ok(None);
            }
            return Ok(Some(forward));
        }
    }
    Err(REASON_DROP_NO_SNAT_PORT)
}

#[inline(always)]
fn random_backend(service: &ServiceValue) -> Option<(Backend6, u32)> {
    if service.backend_count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let mut key = BackendKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: the values are copied out at once.
    match unsafe { BACKENDS6.get(key) } {
        Some(b) => Some((*b, slot)),
        None => {
            // A shrinking service: slot 0 exists while the count is not zero.
            key.slot = 0;
            unsafe { BACKENDS6.get(key).copied() }.map(|b| (b, 0))
        }
    }
}

/// Step 2 of `to_pod` and `to_world`: a reply of a translated flow gets the frontend back as
/// its source.
#[inline(always)]
pub fn egress(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, Reason> {
    if let Some(entry) = ct_lookup(&ct_key(pkt, CT_DIR_REPLY)) {
        reverse(ctx, pkt, &entry).map_err(|()| REASON_DROP_REWRITE_FAILED)?;
    }
    Ok(TC_ACT_OK)
}

/// Rewrites the address at `ip_field` of the IPv6 header and the port at `port_field` of the
/// L4 header from `old` to `new` (address, port).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv6Packet,
    ip_field: usize,
    port_field: usize,
    (old_addr, old_port): ([u32; 4], u16),
    (new_addr, new_port): ([u32; 4], u16),
) -> Result<(), ()> {
    let csum_off = pkt.l4_csum_off();
    // A UDP checksum of 0 is invalid in IPv6, but never turn one into 0 either.
    let mangled0 = if pkt.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        if pkt.proto != PROTO_SCTP {
            // The pseudo header's sum changes by each 32-bit word of the address.
            for i in 0..4 {
                if old_addr[i] != new_addr[i] {
                    ctx.l4_csum_replace(
                        csum_off,
                        old_addr[i] as u64,
                        new_addr[i] as u64,
                        BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
                    )
                    .map_err(|_| ())?;
                }
            }
        }
        ctx.store(ETH_HLEN + ip_field, &new_addr, 0)
            .map_err(|_| ())?;
    }
    if old_port != new_port {
        if pkt.proto == PROTO_SCTP {
            let old = old_port.to_ne_bytes();
            let new = new_port.to_ne_bytes();
            let trailing = (pkt.payload_len as usize).saturating_sub(port_field + 2) as u32;
            let delta = crc32c::delta2([old[0] ^ new[0], old[1] ^ new[1]], trailing & 0xffff);
            let crc: u32 = ctx.load(csum_off).map_err(|_| ())?;
            ctx.store(csum_off, &(crc ^ delta), 0).map_err(|_| ())?;
        } else {
            ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled0 | 2)
                .map_err(|_| ())?;
        }
        ctx.store(pkt.l4_off + port_field, &new_port, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}
