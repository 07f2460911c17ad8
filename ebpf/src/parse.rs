//! Header parsing with direct packet access.

use aya_ebpf::programs::TcContext;
use sluice_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Offset of the checksum inside the TCP and UDP headers.
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What the programs need of an IPv4 TCP or UDP packet. Addresses and ports stay in network
/// byte order.
pub struct Ipv4Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
}

impl Ipv4Packet {
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }
}

/// A bounds-checked pointer to a `T` at `off` in the packet; `None` when the packet is shorter.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Parses Ethernet + IPv4 + TCP/UDP. Returns `None` for anything else (ARP, IPv6, ICMP, other
/// protocols, non-first fragments, truncated packets): those pass untouched.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4Packet> {
    let ethertype: u16 = read(ctx, 12)?;
    if ethertype != ETH_P_IP_BE {
        return None;
    }
    let l3_off = ETH_HLEN;
    let ver_ihl: u8 = read(ctx, l3_off)?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // Fragment offset != 0: no L4 header in this packet.
    let frag: u16 = read(ctx, l3_off + 6)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = read(ctx, l3_off + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let saddr: u32 = read(ctx, l3_off + IP_SADDR_OFF)?;
    let daddr: u32 = read(ctx, l3_off + IP_DADDR_OFF)?;
    let l4_off = l3_off + ihl;
    let sport: u16 = read(ctx, l4_off)?;
    let dport: u16 = read(ctx, l4_off + 2)?;
    let tcp_flags = if proto == PROTO_TCP {
        // Make sure the whole fixed TCP header (and its checksum) is present.
        let _: [u8; 20] = read(ctx, l4_off)?;
        read::<u8>(ctx, l4_off + 13)?
    } else {
        let _: [u8; 8] = read(ctx, l4_off)?;
        0
    };
    Some(Ipv4Packet {
        l3_off,
        l4_off,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
    })
}
