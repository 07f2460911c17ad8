//! Building and decoding the Ethernet + IPv4 and IPv6 packets that `BPF_PROG_RUN` feeds to the
//! datapath's programs: `sluice trace` and the datapath tests (agent/tests/datapath.rs) share
//! this code, so the packets a trace reports on are built exactly like the ones the tests check.
//!
//! Pure: no I/O. Addresses and ports are host values here; on the wire they are big-endian.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use sluice_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// An IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
pub const PROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_DEST_UNREACHABLE: u8 = 3;

/// SCTP chunk types used here (RFC 9260).
const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;

/// A packet's 5-tuple as it travels: `src:sport -> dst:dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    /// IP protocol number.
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

impl Flow {
    /// The flow of the packets answering this one (source and destination swapped).
    pub fn reversed(&self) -> Flow {
        Flow {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// The lowercase name `sluice trace` uses for a protocol number (`proto 47` for the others).
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_SCTP => "sctp".into(),
        PROTO_ICMP => "icmp".into(),
        PROTO_ICMPV6 => "icmpv6".into(),
        other => format!("proto {other}"),
    }
}

/// `tcp 10.244.0.5:40000 -> 10.96.0.1:80`, the syntax `sluice trace` reads its packet in.
impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{} -> {}:{}",
            proto_name(self.proto),
            self.src,
            self.sport,
            self.dst,
            self.dport
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums

/// The Internet checksum of `data` (RFC 1071): the ones' complement of the ones' complement sum.
/// A region that includes a correct checksum sums to 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo header the TCP and UDP checksums cover, followed by the segment.
pub fn with_pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(12 + segment.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&[0, proto]);
    data.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    data.extend_from_slice(segment);
    data
}

/// CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Offset of the L4 checksum field inside the L4 header, for the protocols that have one there.
fn l4_checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_SCTP => Some(8),
        PROTO_ICMP => Some(2),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Building

/// An Ethernet header between two locally administered addresses.
pub fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// Ethernet + IPv4 + `l4`, with the IPv4 header checksum and, when `l4_csum_at` (the offset of
/// the checksum field in `l4`) is given, the TCP/UDP checksum filled in.
pub fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    mut l4: Vec<u8>,
    l4_csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = l4_csum_at {
        let csum = internet_checksum(&with_pseudo_header(src, dst, proto, &l4));
        // A computed UDP checksum of 0 is sent as 0xffff (0 means "no checksum").
        let csum = if proto == PROTO_UDP && csum == 0 {
            0xffff
        } else {
            csum
        };
        l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((IPV4_HLEN + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]); // id, DF, ttl, proto, csum
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let csum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut frame = ethernet(ETH_P_IP);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// A TCP segment of `flow` with `flags` and `payload`.
pub fn tcp_packet(flow: &Flow, flags: u8, payload: &[u8]) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_TCP, "tcp_packet of a {flow}");
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&flow.sport.to_be_bytes());
    tcp.extend_from_slice(&flow.dport.to_be_bytes());
    tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    let ack: u32 = if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 };
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]); // offset, flags, window, csum, urg
    tcp.extend_from_slice(payload);
    ipv4_packet(flow.src, flow.dst, PROTO_TCP, tcp, Some(16))
}

/// A UDP datagram of `flow`; without `with_checksum` its checksum is 0 ("none").
pub fn udp_packet(flow: &Flow, with_checksum: bool, payload: &[u8]) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_UDP, "udp_packet of a {flow}");
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&flow.sport.to_be_bytes());
    udp.extend_from_slice(&flow.dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4_packet(
        flow.src,
        flow.dst,
        PROTO_UDP,
        udp,
        with_checksum.then_some(6),
    )
}

/// An SCTP packet of `flow` holding one INIT chunk (an association's first packet) or, with
/// `init_ack`, the INIT ACK answering it.
pub fn sctp_packet(flow: &Flow, init_ack: bool) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_SCTP, "sctp_packet of a {flow}");
    let sctp = sctp_segment(flow.sport, flow.dport, init_ack);
    ipv4_packet(flow.src, flow.dst, PROTO_SCTP, sctp, None)
}

/// The SCTP common header and INIT (or INIT ACK) chunk of [`sctp_packet`], CRC32c included
/// (SCTP has no pseudo header, so the segment is the same in both families).
fn sctp_segment(sport: u16, dport: u16, init_ack: bool) -> Vec<u8> {
    let mut sctp = Vec::with_capacity(32);
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    // Verification tag: 0 in an INIT, the peer's initiate tag otherwise.
    let vtag: u32 = if init_ack { 0x5c1_0001 } else { 0 };
    sctp.extend_from_slice(&vtag.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]); // checksum, below
    let chunk_type = if init_ack { SCTP_INIT_ACK } else { SCTP_INIT };
    sctp.extend_from_slice(&[chunk_type, 0, 0, 20]); // type, flags, length
    sctp.extend_from_slice(&0x5c1_0002u32.to_be_bytes()); // initiate tag
    sctp.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    sctp.extend_from_slice(&[0, 10, 0, 10]); // outbound and inbound streams
    sctp.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
                                                 // The CRC32c is stored little-endian (the Linux stack's cpu_to_le32 of the raw value).
    let crc = crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    sctp
}

/// The packet opening a new connection or association of `flow`: a TCP SYN, a UDP datagram
/// (with `payload`), an SCTP INIT.
pub fn first_packet(flow: &Flow, payload: &[u8]) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp_packet(flow, TCP_SYN, &[]),
        PROTO_UDP => udp_packet(flow, true, payload),
        PROTO_SCTP => sctp_packet(flow, false),
        other => panic!("first_packet: protocol {other} is not supported"),
    }
}

/// The server's answer to [`first_packet`] of the reversed flow: a TCP SYN-ACK, a UDP datagram,
/// an SCTP INIT ACK. `flow` is the answer's own flow (server -> client).
pub fn first_answer(flow: &Flow, payload: &[u8]) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp_packet(flow, TCP_SYN | TCP_ACK, &[]),
        PROTO_UDP => udp_packet(flow, true, payload),
        PROTO_SCTP => sctp_packet(flow, true),
        other => panic!("first_answer: protocol {other} is not supported"),
    }
}

/// Inserts `options` (a multiple of 4 bytes) into the IPv4 header of `packet` (built without
/// options), fixing its length fields and checksum. The L4 checksum does not cover IP options
/// and stays valid.
pub fn with_ip_options(packet: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IP options come in 4-byte words");
    let l4_off = ETH_HLEN + IPV4_HLEN;
    let mut out = packet[..l4_off].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&packet[l4_off..]);
    out[ETH_HLEN] = 0x40 | ((IPV4_HLEN + options.len()) / 4) as u8;
    let total_len = (out.len() - ETH_HLEN) as u16;
    out[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total_len.to_be_bytes());
    out[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    let csum = internet_checksum(&out[ETH_HLEN..ETH_HLEN + IPV4_HLEN + options.len()]);
    out[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// An IPv4 packet taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub l4: L4,
}

/// What the transport header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        checksum: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
        /// For errors (destination unreachable, time exceeded, ...): the flow of the packet the
        /// error is about, from the headers it quotes.
        quoted: Option<Flow>,
    },
    /// Another protocol, or a transport header cut short.
    Other,
}

impl L4 {
    /// (source, destination) ports, for the protocols that have them.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Tcp { sport, dport, .. }
            | L4::Udp { sport, dport, .. }
            | L4::Sctp { sport, dport } => Some((sport, dport)),
            L4::Icmp { .. } | L4::Other => None,
        }
    }
}

impl Decoded {
    /// The 5-tuple, for the protocols that have ports.
    pub fn flow(&self) -> Option<Flow> {
        let (sport, dport) = self.l4.ports()?;
        Some(Flow {
            proto: self.proto,
            src: self.src,
            sport,
            dst: self.dst,
            dport,
        })
    }

    pub fn tcp_flags(&self) -> Option<u8> {
        match self.l4 {
            L4::Tcp { flags, .. } => Some(flags),
            _ => None,
        }
    }
}

/// `tcp 10.244.0.5:40000 -> 10.96.0.1:80`, or `icmp 10.96.0.1 -> 10.244.0.5 type 3 code 3`.
impl fmt::Display for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(flow) = self.flow() {
            return flow.fmt(f);
        }
        write!(f, "{} {} -> {}", proto_name(self.proto), self.src, self.dst)?;
        if let L4::Icmp {
            icmp_type, code, ..
        } = self.l4
        {
            write!(f, " type {icmp_type} code {code}")?;
        }
        Ok(())
    }
}

/// Where the L4 header of an Ethernet + IPv4 packet starts (after the IP options, if any).
pub fn l4_offset(packet: &[u8]) -> usize {
    ETH_HLEN + usize::from(packet[ETH_HLEN] & 0x0f) * 4
}

/// Takes an Ethernet + IPv4 packet apart. Errors say why it is not one.
pub fn decode(packet: &[u8]) -> Result<Decoded, String> {
    if packet.len() < ETH_HLEN {
        return Err(format!(
            "{} bytes: shorter than an Ethernet header",
            packet.len()
        ));
    }
    let ethertype = u16::from_be_bytes([packet[12], packet[13]]);
    if ethertype != ETH_P_IP {
        return Err(format!("ethertype {ethertype:#06x} is not IPv4"));
    }
    let ip = &packet[ETH_HLEN..];
    let (src, dst, proto, l4) = decode_ipv4(ip)?;
    let l4 = decode_l4(proto, l4);
    Ok(Decoded {
        src,
        dst,
        proto,
        l4,
    })
}

/// The addresses, protocol and transport bytes of an IPv4 packet (without Ethernet header).
fn decode_ipv4(ip: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, u8, &[u8]), String> {
    if ip.len() < IPV4_HLEN {
        return Err(format!("{} bytes: shorter than an IPv4 header", ip.len()));
    }
    if ip[0] >> 4 != 4 {
        return Err(format!("IP version {}", ip[0] >> 4));
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < IPV4_HLEN || ip.len() < ihl {
        return Err(format!("bad IPv4 header length {ihl}"));
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    // Quoted packets (in ICMP errors) may be cut short of their total length.
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]])).clamp(ihl, ip.len());
    Ok((src, dst, ip[9], &ip[ihl..total_len]))
}

fn decode_l4(proto: u8, l4: &[u8]) -> L4 {
    let ports = || {
        (l4.len() >= 4).then(|| {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        })
    };
    match proto {
        PROTO_TCP if l4.len() >= 20 => {
            let (sport, dport) = ports().expect("length checked");
            L4::Tcp {
                sport,
                dport,
                flags: l4[13],
            }
        }
        PROTO_UDP if l4.len() >= 8 => {
            let (sport, dport) = ports().expect("length checked");
            L4::Udp {
                sport,
                dport,
                checksum: u16::from_be_bytes([l4[6], l4[7]]),
            }
        }
        PROTO_SCTP if l4.len() >= 12 => {
            let (sport, dport) = ports().expect("length checked");
            L4::Sctp { sport, dport }
        }
        PROTO_ICMP if l4.len() >= 8 => {
            let icmp_type = l4[0];
            // Error messages (unreachable 3, source quench 4, redirect 5, time exceeded 11,
            // parameter problem 12) quote the IP header and 8 bytes of the offending packet.
            let quoted = matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
                .then(|| decode_ipv4(&l4[8..]).ok())
                .flatten()
                .and_then(|(src, dst, proto, quoted_l4)| {
                    (quoted_l4.len() >= 4).then(|| Flow {
                        proto,
                        src,
                        sport: u16::from_be_bytes([quoted_l4[0], quoted_l4[1]]),
                        dst,
                        dport: u16::from_be_bytes([quoted_l4[2], quoted_l4[3]]),
                    })
                });
            L4::Icmp {
                icmp_type,
                code: l4[1],
                quoted,
            }
        }
        _ => L4::Other,
    }
}

/// Checks the IPv4 header checksum and the TCP, UDP, SCTP or ICMP checksum against the packet's
/// content, recomputed from scratch. A UDP checksum of 0 means "none" and is accepted.
pub fn verify_checksums(packet: &[u8]) -> Result<(), String> {
    let decoded = decode(packet)?;
    let l4_off = l4_offset(packet);
    if internet_checksum(&packet[ETH_HLEN..l4_off]) != 0 {
        return Err("the IPv4 header checksum is wrong".into());
    }
    let total_len = usize::from(u16::from_be_bytes([
        packet[ETH_HLEN + 2],
        packet[ETH_HLEN + 3],
    ]));
    if ETH_HLEN + total_len > packet.len() || ETH_HLEN + total_len < l4_off {
        return Err(format!(
            "the IPv4 total length {total_len} does not fit the {}-byte frame",
            packet.len()
        ));
    }
    let segment = &packet[l4_off..ETH_HLEN + total_len];
    let Some(csum_at) = l4_checksum_offset(decoded.proto) else {
        return Ok(()); // nothing to check
    };
    if segment.len() < csum_at + 2 {
        return Err(format!(
            "the {} header is truncated",
            proto_name(decoded.proto)
        ));
    }
    let valid = match decoded.proto {
        PROTO_UDP if segment[6..8] == [0, 0] => true,
        PROTO_TCP | PROTO_UDP => {
            internet_checksum(&with_pseudo_header(
                decoded.src,
                decoded.dst,
                decoded.proto,
                segment,
            )) == 0
        }
        PROTO_ICMP => internet_checksum(segment) == 0,
        PROTO_SCTP => {
            let mut zeroed = segment.to_vec();
            zeroed[8..12].copy_from_slice(&[0; 4]);
            crc32c(&zeroed).to_le_bytes() == segment[8..12]
        }
        _ => unreachable!("l4_checksum_offset only knows these"),
    };
    if valid {
        Ok(())
    } else {
        Err(format!(
            "the {} checksum is wrong",
            proto_name(decoded.proto).to_uppercase()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6: building and checking the packets the datapath tests and `sluice trace` feed the
// programs.

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV6_HLEN: usize = 40;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers (next header values).
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;
pub const IPV6_NO_NEXT: u8 = 59;

/// ICMPv6 types (RFC 4443, RFC 4861).
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;

/// An IPv6 packet's 5-tuple: `[src]:sport -> [dst]:dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow6 {
    pub proto: u8,
    pub src: Ipv6Addr,
    pub sport: u16,
    pub dst: Ipv6Addr,
    pub dport: u16,
}

impl Flow6 {
    pub fn reversed(&self) -> Flow6 {
        Flow6 {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// `tcp [fd00::5]:40000 -> [fd00:10:96::1]:80`.
impl fmt::Display for Flow6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}]:{} -> [{}]:{}",
            proto_name(self.proto),
            self.src,
            self.sport,
            self.dst,
            self.dport
        )
    }
}

/// The IPv6 pseudo header (RFC 8200 section 8.1) followed by the upper-layer packet.
pub fn with_pseudo_header6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, upper: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(40 + upper.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(upper.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, next]);
    data.extend_from_slice(upper);
    data
}

/// Ethernet + IPv6 (hop limit 64) + `upper` (of protocol `next`), with the checksum at
/// `csum_at` in `upper` computed over the pseudo header when given (TCP, UDP, ICMPv6; a UDP
/// checksum is mandatory in IPv6).
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    mut upper: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_at {
        upper[at..at + 2].copy_from_slice(&[0, 0]);
        let csum = internet_checksum(&with_pseudo_header6(src, dst, next, &upper));
        let csum = if next == PROTO_UDP && csum == 0 {
            0xffff
        } else {
            csum
        };
        upper[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    }
    let mut frame = ethernet(ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version, traffic class, flow label
    frame.extend_from_slice(&(upper.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[next, 64]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&upper);
    frame
}

/// A TCP segment of an IPv6 `flow`.
pub fn tcp6_packet(flow: &Flow6, flags: u8, payload: &[u8]) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_TCP, "tcp6_packet of a {flow}");
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&flow.sport.to_be_bytes());
    tcp.extend_from_slice(&flow.dport.to_be_bytes());
    tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    let ack: u32 = if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 };
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    ipv6_packet(flow.src, flow.dst, PROTO_TCP, tcp, Some(16))
}

/// A UDP datagram of an IPv6 `flow`, with its (mandatory) checksum.
pub fn udp6_packet(flow: &Flow6, payload: &[u8]) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_UDP, "udp6_packet of a {flow}");
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&flow.sport.to_be_bytes());
    udp.extend_from_slice(&flow.dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv6_packet(flow.src, flow.dst, PROTO_UDP, udp, Some(6))
}

/// An ICMPv6 message of `type_`/`code` with `body` (what follows the 4-byte header).
pub fn icmp6_packet(src: Ipv6Addr, dst: Ipv6Addr, type_: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut icmp = vec![type_, code, 0, 0];
    icmp.extend_from_slice(body);
    ipv6_packet(src, dst, PROTO_ICMPV6, icmp, Some(2))
}

/// A neighbour solicitation from `src` for `target`, sent to the target's solicited-node
/// multicast address, with a source link-layer address option.
pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut body = vec![0; 4]; // reserved
    body.extend_from_slice(&t);
    body.extend_from_slice(&[1, 1, 0x02, 0, 0, 0, 0, 0x01]); // source link-layer address
    icmp6_packet(src, dst, ICMPV6_NEIGHBOR_SOLICITATION, 0, &body)
}

/// Inserts an extension header of type `ext` (hop-by-hop, routing, destination options: 8
/// bytes of padding; fragment: `fragment`'s offset in 8-byte units and more-fragments flag)
/// between the IPv6 header of `packet` and its upper-layer header. The upper-layer checksum
/// does not cover extension headers and stays valid.
pub fn with_ipv6_extension(packet: &[u8], ext: u8, fragment: (u16, bool)) -> Vec<u8> {
    let ip = ETH_HLEN;
    let next = packet[ip + 6];
    let header: Vec<u8> = match ext {
        IPV6_FRAGMENT => {
            let (offset, more) = fragment;
            let field = (offset << 3) | u16::from(more);
            let mut h = vec![next, 0];
            h.extend_from_slice(&field.to_be_bytes());
            h.extend_from_slice(&0x5eed_0001u32.to_be_bytes()); // identification
            h
        }
        IPV6_ROUTING => vec![next, 0, 0, 0, 0, 0, 0, 0], // type 0... segments left 0
        _ => vec![next, 0, 1, 4, 0, 0, 0, 0],            // PadN option
    };
    let mut out = packet[..ip + IPV6_HLEN].to_vec();
    out[ip + 6] = ext;
    let payload_len = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + header.len() as u16;
    out[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&packet[ip + IPV6_HLEN..]);
    out
}

/// The upper-layer protocol and offset of an IPv6 packet, past the extension headers this
/// module builds (hop-by-hop, routing, fragment, destination options).
pub fn ipv6_upper(packet: &[u8]) -> Result<(u8, usize), String> {
    if packet.len() < ETH_HLEN + IPV6_HLEN
        || u16::from_be_bytes([packet[12], packet[13]]) != ETH_P_IPV6
        || packet[ETH_HLEN] >> 4 != 6
    {
        return Err("not an Ethernet + IPv6 frame".into());
    }
    let mut next = packet[ETH_HLEN + 6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    loop {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                (usize::from(*packet.get(off + 1).ok_or("truncated extension header")?) + 1) * 8
            }
            IPV6_FRAGMENT => 8,
            _ => return Ok((next, off)),
        };
        next = *packet.get(off).ok_or("truncated extension header")?;
        off += len;
    }
}

/// Checks an IPv6 packet's TCP, UDP or ICMPv6 checksum, recomputed from scratch over the
/// pseudo header; the payload length must match the frame. Fragments are not checked (their
/// checksum covers the reassembled packet).
pub fn verify_checksums6(packet: &[u8]) -> Result<(), String> {
    let (next, off) = ipv6_upper(packet)?;
    let payload_len = usize::from(u16::from_be_bytes([
        packet[ETH_HLEN + 4],
        packet[ETH_HLEN + 5],
    ]));
    if ETH_HLEN + IPV6_HLEN + payload_len != packet.len() {
        return Err(format!(
            "the IPv6 payload length {payload_len} does not fit the {}-byte frame",
            packet.len()
        ));
    }
    let mut ext = packet[ETH_HLEN + 6];
    let mut at = ETH_HLEN + IPV6_HLEN;
    while at < off {
        if ext == IPV6_FRAGMENT {
            return Ok(());
        }
        let len = (usize::from(packet[at + 1]) + 1) * 8;
        ext = packet[at];
        at += len;
    }
    let csum_at = match next {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        PROTO_ICMPV6 => 2,
        _ => return Ok(()),
    };
    let upper = &packet[off..];
    if upper.len() < csum_at + 2 {
        return Err(format!("the {} header is truncated", proto_name(next)));
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[ETH_HLEN + 8..ETH_HLEN + 24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[ETH_HLEN + 24..ETH_HLEN + 40]).unwrap());
    if next == PROTO_UDP && upper[6..8] == [0, 0] {
        return Err("an IPv6 UDP checksum of 0 (none) is not allowed".into());
    }
    if internet_checksum(&with_pseudo_header6(src, dst, next, upper)) != 0 {
        return Err(format!(
            "the {} checksum is wrong",
            proto_name(next).to_uppercase()
        ));
    }
    Ok(())
}

/// An SCTP packet of an IPv6 `flow`: one INIT chunk or, with `init_ack`, the INIT ACK.
pub fn sctp6_packet(flow: &Flow6, init_ack: bool) -> Vec<u8> {
    assert_eq!(flow.proto, PROTO_SCTP, "sctp6_packet of a {flow}");
    let sctp = sctp_segment(flow.sport, flow.dport, init_ack);
    ipv6_packet(flow.src, flow.dst, PROTO_SCTP, sctp, None)
}

/// [`first_packet`] of an IPv6 `flow`.
pub fn first_packet6(flow: &Flow6, payload: &[u8]) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp6_packet(flow, TCP_SYN, &[]),
        PROTO_UDP => udp6_packet(flow, payload),
        PROTO_SCTP => sctp6_packet(flow, false),
        other => panic!("first_packet6: protocol {other} is not supported"),
    }
}

/// [`first_answer`] of an IPv6 `flow`.
pub fn first_answer6(flow: &Flow6, payload: &[u8]) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp6_packet(flow, TCP_SYN | TCP_ACK, &[]),
        PROTO_UDP => udp6_packet(flow, payload),
        PROTO_SCTP => sctp6_packet(flow, true),
        other => panic!("first_answer6: protocol {other} is not supported"),
    }
}

// ---------------------------------------------------------------------------------------------
// Either family: what `sluice trace` works with. A packet's family is its ethertype; the
// builders and decoders above do the work.

/// A 5-tuple of either family: `tcp 10.244.0.5:40000 -> 10.96.0.1:80` or
/// `tcp [fd00::5]:40000 -> [fd00::1]:80`. Both addresses are of the same family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpFlow {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl IpFlow {
    pub fn reversed(&self) -> IpFlow {
        IpFlow {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }

    pub fn source(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }

    pub fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }

    /// The flow as an IPv4 [`Flow`], when both addresses are IPv4.
    pub fn v4(&self) -> Option<Flow> {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Some(Flow {
                proto: self.proto,
                src,
                sport: self.sport,
                dst,
                dport: self.dport,
            }),
            _ => None,
        }
    }

    /// The flow as an IPv6 [`Flow6`], when both addresses are IPv6.
    pub fn v6(&self) -> Option<Flow6> {
        match (self.src, self.dst) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => Some(Flow6 {
                proto: self.proto,
                src,
                sport: self.sport,
                dst,
                dport: self.dport,
            }),
            _ => None,
        }
    }

    /// Builds the flow's packet with `v4` or `v6`; a flow mixing families is a caller's bug.
    fn build(
        &self,
        v4: impl FnOnce(&Flow) -> Vec<u8>,
        v6: impl FnOnce(&Flow6) -> Vec<u8>,
    ) -> Vec<u8> {
        match (self.v4(), self.v6()) {
            (Some(flow), _) => v4(&flow),
            (_, Some(flow)) => v6(&flow),
            _ => panic!("{self}: the addresses are of different families"),
        }
    }
}

impl From<Flow> for IpFlow {
    fn from(flow: Flow) -> IpFlow {
        IpFlow {
            proto: flow.proto,
            src: flow.src.into(),
            sport: flow.sport,
            dst: flow.dst.into(),
            dport: flow.dport,
        }
    }
}

impl From<Flow6> for IpFlow {
    fn from(flow: Flow6) -> IpFlow {
        IpFlow {
            proto: flow.proto,
            src: flow.src.into(),
            sport: flow.sport,
            dst: flow.dst.into(),
            dport: flow.dport,
        }
    }
}

/// Displayed like [`Flow`] and [`Flow6`].
impl fmt::Display for IpFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            proto_name(self.proto),
            self.source(),
            self.destination()
        )
    }
}

/// [`first_packet`] or [`first_packet6`], by the flow's family.
pub fn first_ip_packet(flow: &IpFlow, payload: &[u8]) -> Vec<u8> {
    flow.build(|f| first_packet(f, payload), |f| first_packet6(f, payload))
}

/// [`first_answer`] or [`first_answer6`], by the flow's family.
pub fn first_ip_answer(flow: &IpFlow, payload: &[u8]) -> Vec<u8> {
    flow.build(|f| first_answer(f, payload), |f| first_answer6(f, payload))
}

/// A TCP segment of `flow` ([`tcp_packet`] or [`tcp6_packet`]).
pub fn tcp_ip_packet(flow: &IpFlow, flags: u8, payload: &[u8]) -> Vec<u8> {
    flow.build(
        |f| tcp_packet(f, flags, payload),
        |f| tcp6_packet(f, flags, payload),
    )
}

/// An IPv4 or IPv6 packet taken apart (ICMPv6 messages are [`L4::Icmp`], without the quoted
/// flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpDecoded {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: L4,
}

impl From<Decoded> for IpDecoded {
    fn from(decoded: Decoded) -> IpDecoded {
        IpDecoded {
            src: decoded.src.into(),
            dst: decoded.dst.into(),
            proto: decoded.proto,
            l4: decoded.l4,
        }
    }
}

impl IpDecoded {
    /// The 5-tuple, for the protocols that have ports.
    pub fn flow(&self) -> Option<IpFlow> {
        let (sport, dport) = self.l4.ports()?;
        Some(IpFlow {
            proto: self.proto,
            src: self.src,
            sport,
            dst: self.dst,
            dport,
        })
    }
}

/// Like [`Decoded`]: `tcp [fd00::5]:40000 -> [fd00::1]:80`, or
/// `icmpv6 fd00::1 -> fd00::5 type 1 code 4`.
impl fmt::Display for IpDecoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(flow) = self.flow() {
            return flow.fmt(f);
        }
        write!(f, "{} {} -> {}", proto_name(self.proto), self.src, self.dst)?;
        if let L4::Icmp {
            icmp_type, code, ..
        } = self.l4
        {
            write!(f, " type {icmp_type} code {code}")?;
        }
        Ok(())
    }
}

/// Takes an Ethernet + IPv4 or IPv6 packet apart, by its ethertype.
pub fn decode_ip(packet: &[u8]) -> Result<IpDecoded, String> {
    if packet.len() < ETH_HLEN {
        return Err(format!(
            "{} bytes: shorter than an Ethernet header",
            packet.len()
        ));
    }
    let ethertype = u16::from_be_bytes([packet[12], packet[13]]);
    match ethertype {
        ETH_P_IP => return decode(packet).map(IpDecoded::from),
        ETH_P_IPV6 => {}
        other => return Err(format!("ethertype {other:#06x} is neither IPv4 nor IPv6")),
    }
    let (next, off) = ipv6_upper(packet)?;
    let address = |at: usize| {
        let octets: [u8; 16] = packet[ETH_HLEN + at..ETH_HLEN + at + 16]
            .try_into()
            .expect("length checked by ipv6_upper");
        IpAddr::from(octets)
    };
    let payload_len = usize::from(u16::from_be_bytes([
        packet[ETH_HLEN + 4],
        packet[ETH_HLEN + 5],
    ]));
    let end = (ETH_HLEN + IPV6_HLEN + payload_len).clamp(off.min(packet.len()), packet.len());
    let upper = packet.get(off..end).unwrap_or_default();
    let l4 = match next {
        PROTO_ICMPV6 if upper.len() >= 4 => L4::Icmp {
            icmp_type: upper[0],
            code: upper[1],
            quoted: None,
        },
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => decode_l4(next, upper),
        _ => L4::Other,
    };
    Ok(IpDecoded {
        src: address(8),
        dst: address(24),
        proto: next,
        l4,
    })
}

/// [`verify_checksums`] or [`verify_checksums6`], by the packet's ethertype.
pub fn verify_ip_checksums(packet: &[u8]) -> Result<(), String> {
    if packet.len() >= ETH_HLEN && u16::from_be_bytes([packet[12], packet[13]]) == ETH_P_IPV6 {
        verify_checksums6(packet)
    } else {
        verify_checksums(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

    fn flow(proto: u8) -> Flow {
        Flow {
            proto,
            src: CLIENT,
            sport: 40_000,
            dst: VIP,
            dport: 80,
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn built_packets_decode_to_their_flow_with_valid_checksums() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
            let flow = flow(proto);
            for packet in [
                first_packet(&flow, b"odd payload"),
                first_answer(&flow.reversed(), b"odd payload"),
            ] {
                let decoded = decode(&packet).unwrap();
                assert!(
                    decoded.flow() == Some(flow) || decoded.flow() == Some(flow.reversed()),
                    "{decoded}"
                );
                verify_checksums(&packet).unwrap_or_else(|e| panic!("{flow}: {e}"));
            }
        }
        let syn = decode(&first_packet(&flow(PROTO_TCP), &[])).unwrap();
        assert_eq!(syn.tcp_flags(), Some(TCP_SYN));
        assert_eq!(syn.to_string(), "tcp 10.244.0.5:40000 -> 10.96.0.1:80");
    }

    #[test]
    fn a_changed_byte_breaks_the_checksum() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
            let mut packet = first_packet(&flow(proto), b"data");
            let last = packet.len() - 1;
            packet[last] ^= 0x55;
            assert!(verify_checksums(&packet).is_err(), "{}", proto_name(proto));
        }
        // A rewritten address without checksum update breaks the IPv4 and the L4 checksums.
        let mut packet = first_packet(&flow(PROTO_TCP), &[]);
        packet[ETH_HLEN + 19] = 9;
        assert_eq!(
            verify_checksums(&packet).unwrap_err(),
            "the IPv4 header checksum is wrong"
        );
    }

    #[test]
    fn ip_options_move_the_transport_header() {
        let packet = with_ip_options(&first_packet(&flow(PROTO_UDP), b"x"), &[1, 1, 1, 0]);
        assert_eq!(l4_offset(&packet), ETH_HLEN + 24);
        assert_eq!(decode(&packet).unwrap().flow(), Some(flow(PROTO_UDP)));
        verify_checksums(&packet).unwrap();
    }

    #[test]
    fn icmp_errors_quote_the_flow_they_are_about() {
        let original = first_packet(&flow(PROTO_TCP), &[]);
        let mut icmp = vec![ICMP_DEST_UNREACHABLE, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&original[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 8]);
        let csum = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        let packet = ipv4_packet(VIP, CLIENT, PROTO_ICMP, icmp, None);
        let decoded = decode(&packet).unwrap();
        assert_eq!(
            decoded.l4,
            L4::Icmp {
                icmp_type: 3,
                code: 3,
                quoted: Some(flow(PROTO_TCP)),
            }
        );
        assert_eq!(decoded.flow(), None);
        assert_eq!(
            decoded.to_string(),
            "icmp 10.96.0.1 -> 10.244.0.5 type 3 code 3"
        );
        verify_checksums(&packet).unwrap();
    }

    #[test]
    fn what_is_not_ipv4_is_named() {
        let mut arp = ethernet(0x0806);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(decode(&arp).unwrap_err(), "ethertype 0x0806 is not IPv4");
        assert!(decode(&[0; 10]).is_err());
        let mut v6 = first_packet(&flow(PROTO_TCP), &[]);
        v6[ETH_HLEN] = 0x65;
        assert_eq!(decode(&v6).unwrap_err(), "IP version 6");
    }

    #[test]
    fn ipv6_packets_carry_checksums_over_the_ipv6_pseudo_header() {
        let flow = Flow6 {
            proto: PROTO_TCP,
            src: "fd00:10:244:1::5".parse().unwrap(),
            sport: 40_000,
            dst: "fd00:10:96::1".parse().unwrap(),
            dport: 80,
        };
        assert_eq!(
            flow.to_string(),
            "tcp [fd00:10:244:1::5]:40000 -> [fd00:10:96::1]:80"
        );
        let udp = Flow6 {
            proto: PROTO_UDP,
            ..flow
        };
        let packets = [
            tcp6_packet(&flow, TCP_SYN, b"odd"),
            udp6_packet(&udp, b"odd payload"),
            neighbor_solicitation(flow.src, flow.dst),
            icmp6_packet(flow.src, flow.dst, ICMPV6_ECHO_REQUEST, 0, &[0, 1, 0, 1, 9]),
        ];
        for packet in &packets {
            verify_checksums6(packet).unwrap();
            // The sum is over the pseudo header: a changed address breaks it ...
            let mut moved = packet.clone();
            moved[ETH_HLEN + 39] ^= 1;
            assert!(verify_checksums6(&moved).is_err());
            // ... and extension headers do not count.
            let hop = with_ipv6_extension(packet, IPV6_HOP_BY_HOP, (0, false));
            assert_eq!(
                ipv6_upper(&hop).unwrap(),
                (packet[ETH_HLEN + 6], ETH_HLEN + IPV6_HLEN + 8)
            );
            verify_checksums6(&hop).unwrap();
        }
        // A hand-computed sum: the TCP SYN's checksum field, checked independently of
        // with_pseudo_header6.
        let syn = &packets[0];
        let mut sum: u32 = 0;
        for word in syn[ETH_HLEN + 8..ETH_HLEN + 40].chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        }
        sum += (syn.len() - ETH_HLEN - IPV6_HLEN) as u32 + u32::from(PROTO_TCP);
        let tcp = &syn[ETH_HLEN + IPV6_HLEN..];
        for (i, word) in tcp.chunks(2).enumerate() {
            if i != 8 {
                sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(u16::from_be_bytes([tcp[16], tcp[17]]), !(sum as u16));
        // The solicited-node multicast address of the target.
        let ns = &packets[2];
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&ns[ETH_HLEN + 24..ETH_HLEN + 40]).unwrap()),
            "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap()
        );
    }
    #[test]
    fn ip_flow_builds_and_decodes_either_family() {
        let v4 = IpFlow::from(flow(PROTO_UDP));
        assert_eq!(v4.to_string(), flow(PROTO_UDP).to_string());
        assert_eq!(
            first_ip_packet(&v4, b"x"),
            first_packet(&flow(PROTO_UDP), b"x")
        );
        let decoded = decode_ip(&first_ip_packet(&v4, b"x")).unwrap();
        assert_eq!(decoded.flow(), Some(v4));

        let v6 = IpFlow {
            proto: PROTO_SCTP,
            src: "fd00::5".parse().unwrap(),
            sport: 40_000,
            dst: "fd00:10:96::1".parse().unwrap(),
            dport: 3868,
        };
        assert_eq!(
            v6.to_string(),
            "sctp [fd00::5]:40000 -> [fd00:10:96::1]:3868"
        );
        assert_eq!(v6.to_string(), v6.v6().unwrap().to_string());
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
            let flow = IpFlow { proto, ..v6 };
            for packet in [
                first_ip_packet(&flow, b"x"),
                first_ip_answer(&flow.reversed(), b"y"),
            ] {
                verify_ip_checksums(&packet).unwrap();
                let decoded = decode_ip(&packet).unwrap();
                assert!(decoded.flow() == Some(flow) || decoded.flow() == Some(flow.reversed()));
            }
        }
        let mut arp = ethernet(0x0806);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(
            decode_ip(&arp).unwrap_err(),
            "ethertype 0x0806 is neither IPv4 nor IPv6"
        );
    }
}
