//! Header parsing: direct packet access for the common packet, a helper for the rest.

use aya_ebpf::programs::TcContext;
use sluice_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Offset of the checksum inside the TCP, UDP, SCTP and ICMP headers.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const SCTP_CSUM_OFF: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// ICMP error types whose payload quotes the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// What the programs need of an IPv4 TCP, UDP or SCTP packet. Addresses and ports stay in
/// network byte order.
pub struct Ipv4Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    /// IPv4 header length in bytes (20 without options).
    pub ihl: usize,
    /// IPv4 total length, host order.
    pub tot_len: u16,
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

    /// Offset of the checksum field of the L4 header; for SCTP its CRC32c, which does not cover
    /// the IP addresses.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + match self.proto {
                PROTO_TCP => TCP_CSUM_OFF,
                PROTO_UDP => UDP_CSUM_OFF,
                _ => SCTP_CSUM_OFF,
            }
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting an IPv4
/// TCP, UDP or SCTP packet: the outer header and the quoted ("inner") tuple.
pub struct IcmpError {
    pub l3_off: usize,
    pub icmp_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    /// Offset of the quoted IPv4 header and of its L4 header.
    pub inner_off: usize,
    pub inner_l4_off: usize,
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_proto: u8,
    /// Offset of the end of the IP packet (the frame may carry bytes after it).
    pub end: usize,
}

/// What the programs handle.
pub enum Packet {
    Flow(Ipv4Packet),
    IcmpError(IcmpError),
}

/// The fixed part of the IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    ver_ihl: u8,
    _tos: u8,
    total_len: u16,
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

/// UDP's header, and as much of SCTP's common header as the programs read (ports, then the
/// verification tag / length and checksum: 8 bytes either way; SCTP's CRC32c follows).
#[repr(C)]
#[derive(Clone, Copy)]
struct PortsHeader {
    sport: u16,
    dport: u16,
    _rest: u32,
}

/// SCTP's common header.
#[repr(C)]
#[derive(Clone, Copy)]
struct SctpHeader {
    sport: u16,
    dport: u16,
    _vtag: u32,
    _csum: u32,
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
/// through the very register compared with `data_end`, something LLVM does not guarantee),
/// headers outside the linear data, and ICMP errors (the quoted header is at a variable
/// offset too).
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
    /// ICMP: maybe an error about a translated flow, parsed on the slow path.
    Icmp {
        ihl: usize,
    },
    /// Not IPv4 TCP/UDP/SCTP/ICMP (or truncated): the programs leave it alone.
    NotOurs,
    /// The reader could not decide; try the other one.
    Fallback,
}

/// Parses Ethernet + IPv4 + TCP/UDP/SCTP, or an ICMP error quoting such a packet. Returns
/// `None` for anything else (ARP, IPv6, other ICMP, other protocols, non-first fragments,
/// truncated packets): those pass untouched.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    match parse_with(&Direct(ctx)) {
        Parsed::Packet(pkt) => Some(Packet::Flow(pkt)),
        Parsed::Icmp { ihl } => parse_icmp_error(ctx, ihl),
        Parsed::NotOurs => None,
        Parsed::Fallback => match parse_with(&Loaded(ctx)) {
            Parsed::Packet(pkt) => Some(Packet::Flow(pkt)),
            Parsed::Icmp { ihl } => parse_icmp_error(ctx, ihl),
            Parsed::NotOurs | Parsed::Fallback => None,
        },
    }
}

#[inline(always)]
fn parse_with<R: Reader>(r: &R) -> Parsed {
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
    if ip.proto == PROTO_ICMP {
        return Parsed::Icmp { ihl };
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_SCTP {
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
    let ports = if ip.proto == PROTO_TCP {
        r.read::<TcpHeader>(l4_off)
            .map(|tcp| (tcp.sport, tcp.dport, tcp.flags))
    } else if ip.proto == PROTO_UDP {
        r.read::<PortsHeader>(l4_off).map(|h| (h.sport, h.dport, 0))
    } else {
        r.read::<SctpHeader>(l4_off).map(|h| (h.sport, h.dport, 0))
    };
    let (sport, dport, tcp_flags) = match ports {
        Some(ports) => ports,
        None if R::FIXED_LAYOUT => return Parsed::Fallback,
        None => return Parsed::NotOurs,
    };
    // ... inside the IP packet, not in bytes after it (Ethernet padding, a trailer), which
    // are nobody's to rewrite.
    let header_len = match ip.proto {
        PROTO_TCP => core::mem::size_of::<TcpHeader>(),
        PROTO_UDP => core::mem::size_of::<PortsHeader>(),
        _ => core::mem::size_of::<SctpHeader>(),
    };
    if (u16::from_be(ip.total_len) as usize) < ihl + header_len {
        return Parsed::NotOurs;
    }
    Parsed::Packet(Ipv4Packet {
        l3_off,
        l4_off,
        ihl,
        tot_len: u16::from_be(ip.total_len),
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
    })
}

/// The ICMP header's first bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHeader {
    icmp_type: u8,
    _code: u8,
    _csum: u16,
}

/// An ICMP error quoting a TCP, UDP or SCTP packet, read with the helper (the rare path).
#[inline(always)]
fn parse_icmp_error(ctx: &TcContext, ihl: usize) -> Option<Packet> {
    let r = Loaded(ctx);
    let l3_off = ETH_HLEN;
    let outer = r.read::<Ipv4Header>(l3_off)?;
    let icmp_off = l3_off + ihl;
    // Where the IP packet ends: bytes after it (padding, a trailer) are not the quote's.
    let end = l3_off + u16::from_be(outer.total_len) as usize;
    let icmp = r.read::<IcmpHeader>(icmp_off)?;
    if icmp.icmp_type != ICMP_DEST_UNREACH
        && icmp.icmp_type != ICMP_TIME_EXCEEDED
        && icmp.icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return None;
    }
    let inner_off = icmp_off + 8;
    let inner = r.read::<Ipv4Header>(inner_off)?;
    if inner.ver_ihl >> 4 != 4 || u16::from_be(inner.frag_off) & 0x1fff != 0 {
        return None;
    }
    let inner_ihl = ((inner.ver_ihl & 0x0f) as usize) * 4;
    if inner_ihl < 20
        || (inner.proto != PROTO_TCP && inner.proto != PROTO_UDP && inner.proto != PROTO_SCTP)
    {
        return None;
    }
    let inner_l4_off = inner_off + inner_ihl;
    // Errors quote at least 8 bytes of the L4 header: the ports are there (inside the
    // packet).
    if inner_l4_off + 4 > end {
        return None;
    }
    let ports = r.read::<[u16; 2]>(inner_l4_off)?;
    Some(Packet::IcmpError(IcmpError {
        l3_off,
        icmp_off,
        saddr: outer.saddr,
        daddr: outer.daddr,
        inner_off,
        inner_l4_off,
        inner_saddr: inner.saddr,
        inner_daddr: inner.daddr,
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto: inner.proto,
        end,
    }))
}
