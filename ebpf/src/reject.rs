//! kube-proxy's REJECT for a frontend without endpoints: the program answers the client itself,
//! turning the packet into the answer and sending it back out the interface it came in on.
//!
//! * TCP: a RST from the frontend, as Linux's `tcp_v4_send_reset` builds it: for a segment
//!   with ACK, `seq = its ack`; otherwise RST|ACK with `ack = seq + SYN + FIN + payload`.
//!   A RST is never answered.
//! * UDP, SCTP: an ICMP port unreachable from the frontend quoting the packet's IP header and
//!   its first 8 payload bytes (the packet grows by an IP and an ICMP header in front of it,
//!   `bpf_skb_adjust_room`, and is cut after the quote, `bpf_skb_change_tail`).
//!
//! Every byte is written with BPF_F_RECOMPUTE_CSUM so a CHECKSUM_COMPLETE sum stays right; the
//! checksums are computed in full. (A CHECKSUM_PARTIAL packet, from a local socket through a
//! veth, keeps that state: its receiver trusts it without looking at the checksum.)

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_RECOMPUTE_CSUM},
    helpers::{bpf_csum_diff, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use sluice_common::{PROTO_ICMP, PROTO_TCP};

use crate::parse::{Ipv4Packet, ETH_HLEN, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// The quote: the offending packet's IP header (up to 60 bytes) and 8 bytes of its payload.
const MAX_QUOTE: usize = 60 + 8;

/// What became of the packet.
pub enum Answer {
    /// The packet is now the answer, to be sent back.
    Built,
    /// Nothing to answer (a RST): drop it.
    Nothing,
}

/// An IPv4 header without options, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

/// A TCP header without options, as on the wire (both families' RSTs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHeader {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub data_off: u8,
    pub flags: u8,
    pub window: u16,
    pub csum: u16,
    pub urg: u16,
}

/// The TCP pseudo header followed by the header: what the RST's checksum covers.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpChecksummed {
    saddr: u32,
    daddr: u32,
    zero: u8,
    proto: u8,
    len: u16,
    tcp: TcpHeader,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHeader {
    icmp_type: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

/// Turns the packet into the answer refusing it.
#[inline(always)]
pub fn build(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<Answer, ()> {
    if pkt.proto == PROTO_TCP {
        tcp_reset(ctx, pkt)
    } else {
        icmp_port_unreachable(ctx, pkt).map(|()| Answer::Built)
    }
}

/// The header (checksum 0) of the RST answering the TCP segment at `l4_off` of `segment_len`
/// bytes from `sport` to `dport`, as Linux's `tcp_v4_send_reset` and `tcp_v6_send_reset` build
/// it: for a segment with ACK `seq = its ack`; otherwise RST|ACK with
/// `ack = seq + SYN + FIN + payload`. `None`: the segment is a RST itself (never answered).
#[inline(always)]
pub fn rst_header(
    ctx: &TcContext,
    l4_off: usize,
    segment_len: u32,
    sport: u16,
    dport: u16,
) -> Result<Option<TcpHeader>, ()> {
    let seq: u32 = ctx.load(l4_off + 4).map_err(|_| ())?;
    let ack: u32 = ctx.load(l4_off + 8).map_err(|_| ())?;
    let off_flags: [u8; 2] = ctx.load(l4_off + 12).map_err(|_| ())?;
    let flags = off_flags[1];
    if flags & TCP_FLAG_RST != 0 {
        return Ok(None);
    }
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_FLAG_ACK != 0 {
        (ack, 0, TCP_FLAG_RST)
    } else {
        let data_off = ((off_flags[0] >> 4) as u32) * 4;
        let payload = segment_len.saturating_sub(data_off);
        let consumed =
            payload + (flags & TCP_FLAG_SYN != 0) as u32 + (flags & TCP_FLAG_FIN != 0) as u32;
        (
            0,
            u32::from_be(seq).wrapping_add(consumed).to_be(),
            TCP_FLAG_RST | TCP_FLAG_ACK,
        )
    };
    Ok(Some(TcpHeader {
        sport: dport,
        dport: sport,
        seq: rst_seq,
        ack: rst_ack,
        data_off: ((TCP_HLEN / 4) as u8) << 4,
        flags: rst_flags,
        window: 0,
        csum: 0,
        urg: 0,
    }))
}

/// The ones' complement sum of `len` bytes at `data` (a multiple of 4), added to `seed`.
#[inline(always)]
pub fn sum(data: *const u8, len: u32, seed: u32) -> Result<u32, ()> {
    // SAFETY: the callers pass initialised memory of at least `len` bytes.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data as *mut u32, len, seed) };
    if sum < 0 {
        return Err(());
    }
    Ok(sum as u32)
}

/// Folds a 32-bit ones' complement sum into the 16-bit checksum (complemented).
#[inline(always)]
pub fn checksum(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn ip_header(tot_len: usize, tos: u8, proto: u8, saddr: u32, daddr: u32) -> Result<Ipv4Header, ()> {
    let mut ip = Ipv4Header {
        ver_ihl: 0x45,
        tos,
        tot_len: (tot_len as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        proto,
        csum: 0,
        saddr,
        daddr,
    };
    ip.csum = checksum(sum(
        &ip as *const Ipv4Header as *const u8,
        IPV4_HLEN as u32,
        0,
    )?);
    Ok(ip)
}

#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<Answer, ()> {
    let segment_len = (pkt.tot_len as u32).saturating_sub(pkt.ihl as u32);
    let Some(rst) = rst_header(ctx, pkt.l4_off, segment_len, pkt.sport, pkt.dport)? else {
        return Ok(Answer::Nothing);
    };
    let mut tcp = TcpChecksummed {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        zero: 0,
        proto: PROTO_TCP,
        len: (TCP_HLEN as u16).to_be(),
        tcp: rst,
    };
    tcp.tcp.csum = checksum(sum(
        &tcp as *const TcpChecksummed as *const u8,
        size_of::<TcpChecksummed>() as u32,
        0,
    )?);
    let ip = ip_header(IPV4_HLEN + TCP_HLEN, 0, PROTO_TCP, pkt.daddr, pkt.saddr)?;

    // Headers only: options and payload go.
    // SAFETY: a helper call on the program's context.
    let rc =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IPV4_HLEN + TCP_HLEN) as u32, 0) };
    if rc != 0 {
        return Err(());
    }
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(ETH_HLEN, &ip, recompute).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_HLEN, &tcp.tcp, recompute)
        .map_err(|_| ())?;
    Ok(Answer::Built)
}

/// Loads `into.len()` words of the packet at `offset` (a length the verifier sees as a constant).
#[inline(always)]
fn load_bytes(ctx: &TcContext, offset: usize, into: &mut [u32]) -> Result<(), ()> {
    // SAFETY: `into` has room for the bytes loaded.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            into.as_mut_ptr() as *mut _,
            (into.len() * 4) as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<(), ()> {
    // ihl is 20..=60 and a multiple of 4: so is the quote's length, as bpf_csum_diff wants.
    // LLVM knows the bound and would drop a plain check of it; the verifier does not know it
    // and needs to see one: hide the value from LLVM.
    // SAFETY: reading a local.
    let quote_len = unsafe { core::ptr::read_volatile(&(pkt.ihl + 8)) };
    if !(IPV4_HLEN + 8..=MAX_QUOTE).contains(&quote_len) {
        return Err(());
    }
    let answer_len = IPV4_HLEN + ICMP_HLEN + quote_len;

    // Room for the new IP and ICMP headers between the Ethernet header and the packet, which
    // becomes the quote; then cut it after the quote.
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // SAFETY: a helper call on the program's context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + answer_len) as u32, 0) };
    if rc != 0 {
        return Err(());
    }

    let quote_off = ETH_HLEN + IPV4_HLEN + ICMP_HLEN;
    // Loaded in fixed-size pieces: the header without options, then each word of options the
    // packet has. Verifiers before 6.13 (seen on 6.1 and 6.12) refuse a variable-length write
    // to the stack when LLVM checked the length on a copy of the register it passes, and 5.10
    // refuses variable-length stack access outright. Words past the quote stay zero, so the
    // whole buffer sums to the quote's sum.
    let mut quote = [0u32; MAX_QUOTE / 4];
    load_bytes(ctx, quote_off, &mut quote[..(IPV4_HLEN + 8) / 4])?;
    for word in (IPV4_HLEN + 8) / 4..MAX_QUOTE / 4 {
        if word * 4 >= quote_len {
            break;
        }
        load_bytes(ctx, quote_off + word * 4, &mut quote[word..word + 1])?;
    }
    let mut icmp = IcmpHeader {
        icmp_type: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        csum: 0,
        unused: 0,
    };
    let quoted = sum(quote.as_ptr() as *const u8, MAX_QUOTE as u32, 0)?;
    icmp.csum = checksum(sum(
        &icmp as *const IcmpHeader as *const u8,
        ICMP_HLEN as u32,
        quoted,
    )?);
    // RFC 1812: ICMP errors go with precedence "internetwork control" (as Linux sends them).
    let ip = ip_header(answer_len, 0xc0, PROTO_ICMP, pkt.daddr, pkt.saddr)?;

    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(ETH_HLEN, &ip, recompute).map_err(|_| ())?;
    ctx.store(ETH_HLEN + IPV4_HLEN, &icmp, recompute)
        .map_err(|_| ())?;
    Ok(())
}
