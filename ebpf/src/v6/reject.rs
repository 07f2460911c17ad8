//! kube-proxy's REJECT for an IPv6 frontend without endpoints, as reject.rs for IPv4: the
//! packet becomes the answer (a TCP RST from the frontend, or an ICMPv6 port unreachable,
//! RFC 4443 type 1 code 4, quoting the IPv6 header and 8 L4 bytes) and is sent back out the
//! interface it came in on.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_skb_change_tail,
    programs::TcContext,
};
use sluice_common::{Reason, PROTO_TCP, REASON_DROP_REJECT_FAILED, REASON_REJECT_NO_ENDPOINTS};

use super::{Ipv6Header, Ipv6Packet, Scratch6, ICMPV6_DEST_UNREACH, IPV6_HLEN, PROTO_ICMPV6};
use crate::{parse::ETH_HLEN, reject, route, stats, verdict};

/// kube-proxy's REJECT for a frontend without endpoints: TCP RST, ICMPv6 port unreachable,
/// sent back out the interface the packet came in on. Its own frame (`#[inline(never)]`): the
/// answer's headers are built on the stack.
#[inline(never)]
pub fn answer(ctx: &TcContext, s: &Scratch6) -> i32 {
    let pkt = s.pkt;
    verdict(ctx, answer_steps(ctx, &pkt))
}

#[inline(always)]
fn answer_steps(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, Reason> {
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
struct TcpChecksummed {
    pseudo: PseudoHeader,
    tcp: reject::TcpHeader,
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

/// Turns a TCP segment into the RST answering it (reject::rst_header); `Ok(false)`: it is a
/// RST itself.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<bool, ()> {
    let segment_len = pkt.payload_len as u32;
    let Some(rst) = reject::rst_header(ctx, pkt.l4_off, segment_len, pkt.sport, pkt.dport)? else {
        return Ok(false);
    };
    let mut answer = TcpChecksummed {
        pseudo: pseudo_header(TCP_HLEN, PROTO_TCP, pkt),
        tcp: rst,
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
