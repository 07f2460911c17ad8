//! Header parsing.

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

/// The fixed part of the IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    ver_ihl: u8,
    _tos: u8,
    _total_len: u16,
    _id: u16,
    frag_off: u16,
    _ttl: u8,
    proto: u8,
    _csum: u16,
    saddr: u32,
    daddr: u32,
}

/// The fixed part of the TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    _seq: u32,
    _ack: u32,
    _data_off: u8,
    flags: u8,
    _window: u16,
    _csum: u16,
    _urg: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHeader {
    sport: u16,
    dport: u16,
    _len: u16,
    _csum: u16,
}

/// Copies a `T` from offset `off` of the packet; `None` when the packet is shorter.
///
/// This goes through `bpf_skb_load_bytes` rather than direct packet access: the L4 header sits
/// at a variable offset (IP options), and the verifier only accepts a direct access through the
/// very register that was compared with `data_end`, which LLVM does not guarantee (it may
/// recompute `data + off` into a fresh register, rejected as "invalid access to packet"). The
/// helper also reads headers outside the skb's linear part.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
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
    let ip: Ipv4Header = read(ctx, l3_off)?;
    if ip.ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // Fragment offset != 0: no L4 header in this packet.
    if u16::from_be(ip.frag_off) & 0x1fff != 0 {
        return None;
    }
    let l4_off = l3_off + ihl;
    // The whole fixed header (with its checksum field, which NAT rewrites) must be present.
    let (sport, dport, tcp_flags) = match ip.proto {
        PROTO_TCP => {
            let tcp: TcpHeader = read(ctx, l4_off)?;
            (tcp.sport, tcp.dport, tcp.flags)
        }
        PROTO_UDP => {
            let udp: UdpHeader = read(ctx, l4_off)?;
            (udp.sport, udp.dport, 0)
        }
        _ => return None,
    };
    Some(Ipv4Packet {
        l3_off,
        l4_off,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
    })
}
