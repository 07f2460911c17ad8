//! Header parsing: direct packet access for the common packet, a helper for the rest.

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

/// Reads headers out of the packet: in place (direct packet access) or through a helper.
trait Reader {
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
    /// Whether this reader can only reach the header layout without IP options.
    const FIXED_LAYOUT: bool;
}

/// Direct packet access at constant offsets, bounds-checked against `data_end` as the verifier
/// requires. Used for the common packet: no IP options, headers in the skb's linear data.
struct Direct<'a>(&'a TcContext);

impl Reader for Direct<'_> {
    const FIXED_LAYOUT: bool = true;

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let start = self.0.data();
        let end = self.0.data_end();
        if start + off + core::mem::size_of::<T>() > end {
            return None;
        }
        // SAFETY: the whole T lies between data and data_end, checked just above.
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    }
}

/// `bpf_skb_load_bytes`: for the rare packet the direct path cannot take, an IPv4 header with
/// options (the L4 header then sits at a variable offset, which the verifier only accepts
/// through the very register compared with `data_end`, something LLVM does not guarantee) or
/// headers outside the linear data.
struct Loaded<'a>(&'a TcContext);

impl Reader for Loaded<'_> {
    const FIXED_LAYOUT: bool = false;

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.0.load::<T>(off).ok()
    }
}

enum Parsed {
    Packet(Ipv4Packet),
    /// Not IPv4 TCP/UDP (or truncated): the programs leave it alone.
    NotOurs,
    /// The reader could not decide; try the other one.
    Fallback,
}

/// Parses Ethernet + IPv4 + TCP/UDP. Returns `None` for anything else (ARP, IPv6, ICMP, other
/// protocols, non-first fragments, truncated packets): those pass untouched.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Option<Ipv4Packet> {
    match parse(&Direct(ctx)) {
        Parsed::Packet(pkt) => Some(pkt),
        Parsed::NotOurs => None,
        Parsed::Fallback => match parse(&Loaded(ctx)) {
            Parsed::Packet(pkt) => Some(pkt),
            Parsed::NotOurs | Parsed::Fallback => None,
        },
    }
}

#[inline(always)]
fn parse<R: Reader>(r: &R) -> Parsed {
    let Some(ethertype) = r.read::<u16>(12) else {
        return Parsed::Fallback;
    };
    if ethertype != ETH_P_IP_BE {
        return Parsed::NotOurs;
    }
    let l3_off = ETH_HLEN;
    let Some(ip) = r.read::<Ipv4Header>(l3_off) else {
        return Parsed::Fallback;
    };
    if ip.ver_ihl >> 4 != 4 {
        return Parsed::NotOurs;
    }
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Parsed::NotOurs;
    }
    // Fragment offset != 0: no L4 header in this packet.
    if u16::from_be(ip.frag_off) & 0x1fff != 0 {
        return Parsed::NotOurs;
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Parsed::NotOurs;
    }
    let l4_off = if R::FIXED_LAYOUT {
        if ihl != 20 {
            return Parsed::Fallback;
        }
        // A constant, so the verifier can check the accesses below.
        l3_off + 20
    } else {
        l3_off + ihl
    };
    // The whole fixed L4 header (with its checksum field, which NAT rewrites) must be present.
    let (sport, dport, tcp_flags) = if ip.proto == PROTO_TCP {
        match r.read::<TcpHeader>(l4_off) {
            Some(tcp) => (tcp.sport, tcp.dport, tcp.flags),
            None if R::FIXED_LAYOUT => return Parsed::Fallback,
            None => return Parsed::NotOurs,
        }
    } else {
        match r.read::<UdpHeader>(l4_off) {
            Some(udp) => (udp.sport, udp.dport, 0),
            None if R::FIXED_LAYOUT => return Parsed::Fallback,
            None => return Parsed::NotOurs,
        }
    };
    Parsed::Packet(Ipv4Packet {
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
