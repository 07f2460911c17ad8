//! The four programs fed truncated, malformed and random frames through `BPF_PROG_RUN` (issue
//! #13), on a dual-stack datapath with ClusterIPs (with backends, and without: REJECT), a
//! NodePort (and a Local one without local endpoints: DROP), a NetworkPolicy isolating one pod
//! and the node's config, inside a network namespace with routes for both families (so the
//! redirect paths run too).
//!
//! Every run must return a tc action the programs use (OK, SHOT, REDIRECT), give a reason with
//! every drop and only with a drop or an answer; a frame that is none of the datapath's
//! business must pass byte-identical; a frame cut short of the headers the datapath needs must
//! pass untouched or be dropped; a valid packet the programs translate or answer must leave
//! with valid checksums; and the `drops` counters must grow by exactly the reasons the runs
//! reported. What is "ours" is computed from the frame as built, never from the output of its
//! run:
//!
//! * an IPv4 or IPv6 TCP/UDP/SCTP packet with its whole fixed L4 header right after the IP
//!   header (IPv4: options allowed, not a later fragment; IPv6: no extension header) to a
//!   frontend (ingress programs), or a packet of a flow the programs created, either way
//!   (ingress programs; egress programs: its replies only);
//! * an ICMP (types 3, 11, 12) or ICMPv6 (types 1 to 4) error quoting, with its ports, a packet
//!   of such a flow (about a packet toward the backend: every program; about a reply as the
//!   client got it: ingress programs);
//! * a new flow of the isolated pod (`from_pod`: from it, `to_pod`: to it) may be dropped for
//!   its policy, never modified.
//!
//! The flows the programs created are a model the runs keep: when an ingress program
//! translates a packet to a frontend, the packet's tuple and the reverse of the translated one
//! (the replies') join it. An entry the programs dropped since only makes the model lenient.
//!
//! `BPF_PROG_RUN` itself refuses frames shorter than Ethernet and, behind the IPv4 or IPv6
//! ethertype, shorter than the fixed IP header ([`kernel_refuses`]): exactly those may fail,
//! with EINVAL.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
    path::Path,
    time::Instant,
};

use sluice::{
    manifests,
    packet::{
        crc32c, icmp6_packet, ipv6_packet, verify_checksums6, with_ipv6_extension, ETH_P_IPV6,
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING, PROTO_ICMPV6,
    },
    policy,
};
use sluice_common::{REASON_COUNT, REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS};

use crate::support::*;

/// The largest frame fed to the programs (a 1,500-byte Ethernet frame, headers included).
const FRAME_MAX: usize = 1500;

// IPv4: VIP (support) has backends, VIP_REJECT none; NODE_IP (support) carries the NodePorts.
const VIP_REJECT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The isolated pod (x/a) and a pod no policy selects (y/a).
const XA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const YA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);

const NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 3);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 1);
const OTHER_NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 4);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const VIP6_REJECT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 7);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 9);
const OUTSIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const XA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xa);
const YA6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x14);
const NOWHERE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 9, 0, 0, 0, 9);

/// Frontend ports: TCP, UDP and SCTP on the ClusterIPs; the NodePort (TCP and UDP) and a Local
/// NodePort without local endpoints (TCP); the backends' target port.
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const SCTP_PORT: u16 = 5000;
const DROP_NODE_PORT: u16 = 30_081;
const TARGET_PORT: u16 = 8080;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const PORT_UNREACHABLE6: (u8, u8) = (1, 4);
const PACKET_TOO_BIG: (u8, u8) = (2, 0);
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// SCTP chunk types: INIT, INIT ACK, PAD (RFC 4820).
const SCTP_INIT: u8 = 1;
const SCTP_INIT_ACK: u8 = 2;
const SCTP_PAD: u8 = 0x84;

// ---------------------------------------------------------------------------------------------
// The programs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    FromPod,
    ToPod,
    FromWorld,
    ToWorld,
}

const PROGRAMS: [Prog; 4] = [Prog::FromPod, Prog::ToPod, Prog::FromWorld, Prog::ToWorld];

impl Prog {
    fn ingress(self) -> bool {
        matches!(self, Prog::FromPod | Prog::FromWorld)
    }

    fn name(self) -> &'static str {
        match self {
            Prog::FromPod => "from_pod",
            Prog::ToPod => "to_pod",
            Prog::FromWorld => "from_world",
            Prog::ToWorld => "to_world",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a frame is, read from its bytes the way the datapath's contract describes it

/// A 5-tuple of either family (addresses and ports in host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    proto: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
}

impl Tuple {
    fn reversed(self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            packet::proto_name(self.proto),
            std::net::SocketAddr::new(self.src, self.sport),
            std::net::SocketAddr::new(self.dst, self.dport)
        )
    }
}

/// The headers the datapath acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Headers {
    /// Nothing the datapath translates: another ethertype (VLAN tags included), another IP
    /// version behind the ethertype, another protocol, an IPv4 later fragment, an IPv6
    /// extension header, an ICMP message that is no error, or headers cut short.
    Other,
    /// A TCP, UDP or SCTP packet with its whole fixed L4 header.
    Flow(Tuple),
    /// An ICMP(v6) error quoting the IP header and the ports of a TCP, UDP or SCTP packet.
    IcmpError(Tuple),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr4(b: &[u8], at: usize) -> IpAddr {
    IpAddr::from(<[u8; 4]>::try_from(&b[at..at + 4]).unwrap())
}

fn addr6(b: &[u8], at: usize) -> IpAddr {
    IpAddr::from(<[u8; 16]>::try_from(&b[at..at + 16]).unwrap())
}

/// Length of the fixed L4 header the datapath needs (with the checksum field NAT rewrites).
fn l4_header_len(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(20),
        PROTO_UDP => Some(8),
        PROTO_SCTP => Some(12),
        _ => None,
    }
}

fn headers(frame: &[u8]) -> Headers {
    if frame.len() < ETH_HLEN {
        return Headers::Other;
    }
    match be16(frame, 12) {
        0x0800 => headers4(frame).unwrap_or(Headers::Other),
        ETH_P_IPV6 => headers6(frame).unwrap_or(Headers::Other),
        _ => Headers::Other,
    }
}

/// An IPv4 header at `at` that may carry an L4 header: (header length, protocol).
fn ipv4_at(frame: &[u8], at: usize) -> Option<(usize, u8)> {
    let h = frame.get(at..at + IPV4_HLEN)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let later_fragment = be16(h, 6) & 0x1fff != 0;
    (h[0] >> 4 == 4 && ihl >= IPV4_HLEN && !later_fragment).then_some((ihl, h[9]))
}

fn headers4(frame: &[u8]) -> Option<Headers> {
    let ip = ETH_HLEN;
    let (ihl, proto) = ipv4_at(frame, ip)?;
    let l4 = ip + ihl;
    if proto == PROTO_ICMP {
        let icmp_type = *frame.get(l4)?;
        frame.get(l4..l4 + 4)?;
        if !matches!(icmp_type, 3 | 11 | 12) {
            return None;
        }
        let inner = l4 + 8;
        let (inner_ihl, inner_proto) = ipv4_at(frame, inner)?;
        l4_header_len(inner_proto)?;
        let ports = frame.get(inner + inner_ihl..inner + inner_ihl + 4)?;
        return Some(Headers::IcmpError(Tuple {
            proto: inner_proto,
            src: addr4(frame, inner + 12),
            sport: be16(ports, 0),
            dst: addr4(frame, inner + 16),
            dport: be16(ports, 2),
        }));
    }
    let header = frame.get(l4..l4 + l4_header_len(proto)?)?;
    Some(Headers::Flow(Tuple {
        proto,
        src: addr4(frame, ip + 12),
        sport: be16(header, 0),
        dst: addr4(frame, ip + 16),
        dport: be16(header, 2),
    }))
}

fn headers6(frame: &[u8]) -> Option<Headers> {
    let ip = ETH_HLEN;
    let h = frame.get(ip..ip + 40)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let l4 = ip + 40;
    if h[6] == PROTO_ICMPV6 {
        if !(1..=4).contains(frame.get(l4)?) {
            return None;
        }
        let inner = l4 + 8;
        let quoted = frame.get(inner..inner + 40)?;
        l4_header_len(quoted[6])?;
        let ports = frame.get(inner + 40..inner + 44)?;
        return Some(Headers::IcmpError(Tuple {
            proto: quoted[6],
            src: addr6(frame, inner + 8),
            sport: be16(ports, 0),
            dst: addr6(frame, inner + 24),
            dport: be16(ports, 2),
        }));
    }
    let header = frame.get(l4..l4 + l4_header_len(h[6])?)?;
    Some(Headers::Flow(Tuple {
        proto: h[6],
        src: addr6(frame, ip + 8),
        sport: be16(header, 0),
        dst: addr6(frame, ip + 24),
        dport: be16(header, 2),
    }))
}

/// Whether the frame's IP header and L4 checksums hold (recomputed from scratch).
fn checksums_valid(frame: &[u8]) -> bool {
    if frame.len() < ETH_HLEN {
        return false;
    }
    match be16(frame, 12) {
        0x0800 => packet::verify_checksums(frame).is_ok(),
        ETH_P_IPV6 => verify_checksums6(frame).is_ok(),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The model: frontends, the isolated pod, the flows the programs created

/// What a run may do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The datapath's own: any of its actions, any rewrite.
    Ours,
    /// A new flow of the isolated pod: passed untouched, or dropped for this reason.
    Policy(u32),
    /// Cut short of the headers the datapath needs to translate it: passed untouched or
    /// dropped (with a reason: counted).
    Truncated,
    /// None of the datapath's business: passed untouched.
    Foreign,
}

#[derive(Default)]
struct Model {
    frontends: HashSet<(u8, IpAddr, u16)>,
    /// The same, in the order they were programmed (the random test picks from it).
    frontend_list: Vec<(u8, IpAddr, u16)>,
    isolated: HashSet<IpAddr>,
    /// Tuples of the clients' packets (client -> frontend) of the flows the programs created...
    forward: HashSet<Tuple>,
    forward_list: Vec<Tuple>,
    /// ... and of their replies (backend -> client, or backend -> masquerade address).
    reply: HashSet<Tuple>,
    reply_list: Vec<Tuple>,
}

impl Model {
    fn is_frontend(&self, t: &Tuple) -> bool {
        self.frontends.contains(&(t.proto, t.dst, t.dport))
    }

    fn add_flow(&mut self, forward: Tuple, reply: Tuple) {
        if self.forward.insert(forward) {
            self.forward_list.push(forward);
        }
        if self.reply.insert(reply) {
            self.reply_list.push(reply);
        }
    }

    fn expect(&self, prog: Prog, frame: &[u8]) -> Expect {
        match headers(frame) {
            Headers::Other => Expect::Foreign,
            Headers::Flow(t) => {
                let ours = if prog.ingress() {
                    self.is_frontend(&t) || self.forward.contains(&t) || self.reply.contains(&t)
                } else {
                    self.reply.contains(&t)
                };
                if ours {
                    Expect::Ours
                } else if prog == Prog::FromPod && self.isolated.contains(&t.src) {
                    Expect::Policy(REASON_DROP_POLICY_EGRESS)
                } else if prog == Prog::ToPod && self.isolated.contains(&t.dst) {
                    Expect::Policy(REASON_DROP_POLICY_INGRESS)
                } else {
                    Expect::Foreign
                }
            }
            Headers::IcmpError(quoted) => {
                let about = quoted.reversed();
                if self.reply.contains(&about) || (prog.ingress() && self.forward.contains(&about))
                {
                    Expect::Ours
                } else {
                    Expect::Foreign
                }
            }
        }
    }

    /// [`Model::expect`] for `frame`, a prefix of `full` when `full` is given.
    fn expect_cut(&self, prog: Prog, frame: &[u8], full: Option<&[u8]>) -> Expect {
        let cut = full.is_some_and(|full| {
            headers(full) != Headers::Other && headers(frame) == Headers::Other
        });
        if cut {
            Expect::Truncated
        } else {
            self.expect(prog, frame)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Building frames

fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: Vec<u8>, csum_at: Option<usize>) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, proto, l4, csum_at),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, proto, l4, csum_at),
        _ => panic!("{src} -> {dst}: mixed families"),
    }
}

fn tcp_segment(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    let ack: u32 = if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 };
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    tcp
}

fn udp_datagram(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    udp
}

/// An SCTP packet: the common header, an INIT (or INIT ACK) chunk and, with a payload, a PAD
/// chunk holding it; CRC32c stored as the Linux stack does (little-endian).
fn sctp_segment(sport: u16, dport: u16, init_ack: bool, payload: &[u8]) -> Vec<u8> {
    let mut sctp = Vec::with_capacity(36 + payload.len());
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    let vtag: u32 = if init_ack { 0x5c1_0001 } else { 0 };
    sctp.extend_from_slice(&vtag.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]);
    let chunk = if init_ack { SCTP_INIT_ACK } else { SCTP_INIT };
    sctp.extend_from_slice(&[chunk, 0, 0, 20]);
    sctp.extend_from_slice(&0x5c1_0002u32.to_be_bytes());
    sctp.extend_from_slice(&65_535u32.to_be_bytes());
    sctp.extend_from_slice(&[0, 10, 0, 10]);
    sctp.extend_from_slice(&1u32.to_be_bytes());
    if !payload.is_empty() {
        sctp.extend_from_slice(&[SCTP_PAD, 0]);
        sctp.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
        sctp.extend_from_slice(payload);
    }
    let crc = crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    sctp
}

/// A packet of `t` (TCP with `flags`; UDP; SCTP: an INIT, or an INIT ACK when `flags` has
/// ACK) carrying `payload`, checksums valid.
fn flow_frame(t: &Tuple, flags: u8, payload: &[u8]) -> Vec<u8> {
    match t.proto {
        PROTO_TCP => ip_frame(
            t.src,
            t.dst,
            PROTO_TCP,
            tcp_segment(t.sport, t.dport, flags, payload),
            Some(16),
        ),
        PROTO_UDP => ip_frame(
            t.src,
            t.dst,
            PROTO_UDP,
            udp_datagram(t.sport, t.dport, payload),
            Some(6),
        ),
        PROTO_SCTP => ip_frame(
            t.src,
            t.dst,
            PROTO_SCTP,
            sctp_segment(t.sport, t.dport, flags & TCP_ACK != 0, payload),
            None,
        ),
        other => panic!("flow_frame of protocol {other}"),
    }
}

/// An ICMP (IPv4) or ICMPv6 message from `src` to `dst`: type, code, the 32-bit field `rest`,
/// then `body` (for an error: the quoted IP packet), checksum valid.
fn icmp_frame(
    src: IpAddr,
    dst: IpAddr,
    (icmp_type, code): (u8, u8),
    rest: u32,
    body: &[u8],
) -> Vec<u8> {
    let mut rest_body = rest.to_be_bytes().to_vec();
    rest_body.extend_from_slice(body);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut icmp = vec![icmp_type, code, 0, 0];
            icmp.extend_from_slice(&rest_body);
            let csum = internet_checksum(&icmp);
            icmp[2..4].copy_from_slice(&csum.to_be_bytes());
            ipv4_packet(s, d, PROTO_ICMP, icmp, None)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => icmp6_packet(s, d, icmp_type, code, &rest_body),
        _ => panic!("{src} -> {dst}: mixed families"),
    }
}

/// An ICMP error about the IP packet of frame `about`, quoting as much of it as fits in
/// [`FRAME_MAX`].
fn error_about(src: IpAddr, dst: IpAddr, kind: (u8, u8), rest: u32, about: &[u8]) -> Vec<u8> {
    let ip_hlen = if src.is_ipv6() { 40 } else { IPV4_HLEN };
    let room = FRAME_MAX - ETH_HLEN - ip_hlen - 8;
    let quote = &about[ETH_HLEN..about.len().min(ETH_HLEN + room)];
    icmp_frame(src, dst, kind, rest, quote)
}

/// Payload bytes (a recognisable pattern).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// `build(payload)` with the payload that makes the frame [`FRAME_MAX`] bytes long.
fn padded(build: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    // (Measured with one byte: an SCTP packet only has its PAD chunk with a payload.)
    let base = build(&[0]).len() - 1;
    let frame = build(&pattern(FRAME_MAX - base));
    assert_eq!(frame.len(), FRAME_MAX);
    frame
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let end = (ETH_HLEN + ihl).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    let csum = internet_checksum(&frame[ETH_HLEN..end]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&csum.to_be_bytes());
}

/// `frame` (IPv4) with its flags and fragment offset field set to `field`.
fn with_fragment_field(frame: &[u8], field: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&field.to_be_bytes());
    fix_ipv4_checksum(&mut frame);
    frame
}

/// `frame` with an 802.1Q (or 802.1ad) tag after the MAC addresses.
fn vlan_tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&tpid.to_be_bytes());
    tagged.extend_from_slice(&100u16.to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

fn with_ethertype(frame: &[u8], ethertype: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    frame
}

/// Record route (7, 11 bytes) padded with end-of-options: 12 bytes.
const IP_OPTIONS: [u8; 12] = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];

// ---------------------------------------------------------------------------------------------
// The node, the datapath

/// [`FibNode`] with IPv6 as well: `ext0` also carries NODE6/64 (default route via ROUTER6,
/// fd00:10:244:1::/64 via OTHER_NODE6), `pod0` leads to fd00:10:244::/64.
fn dual_stack_node() -> FibNode {
    let node = FibNode::new();
    let netns = &node.netns;
    let (node6, router6, other6) = (
        format!("{NODE6}/64"),
        ROUTER6.to_string(),
        OTHER_NODE6.to_string(),
    );
    netns.ip(&["-6", "addr", "add", &node6, "dev", "ext0", "nodad"]);
    netns.ip(&[
        "-6", "route", "add", "default", "via", &router6, "dev", "ext0",
    ]);
    netns.ip(&["-6", "route", "add", "fd00:10:244::/64", "dev", "pod0"]);
    netns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:10:244:1::/64",
        "via",
        &other6,
        "dev",
        "ext0",
    ]);
    for (ip, mac, dev) in [
        (router6, "02:00:00:00:01:01", "ext0"),
        (other6, "02:00:00:00:01:04", "ext0"),
        (CLIENT6.to_string(), "02:00:00:00:02:05", "pod0"),
        (LOCAL_POD6.to_string(), "02:00:00:00:02:07", "pod0"),
    ] {
        netns.ip(&[
            "-6",
            "neigh",
            "replace",
            &ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    netns.run(|| {
        fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("IPv6 forwarding");
    });
    node
}

fn node_config() -> NodeContext {
    let mut node = node_context(false);
    node.node_ips.push(NODE6.into());
    node.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
    node
}

/// x/a (10.244.0.10, fd00:10:244::a) on this node, isolated both ways with no rule.
const ISOLATING_POLICY: &str = r#"---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: node-a
  containers:
  - name: c
    ports:
    - {name: serve-80-tcp, containerPort: 80}
status: {podIP: 10.244.0.10, podIPs: [{ip: 10.244.0.10}, {ip: 'fd00:10:244::a'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress]}
"#;

/// The services of both families, the policy, the node config; and the model that says so.
fn fuzz_datapath() -> (Datapath, Model) {
    let mut services = Vec::new();
    let mut model = Model::default();
    let families: [(IpAddr, IpAddr, IpAddr, [IpAddr; 2]); 2] = [
        (
            VIP.into(),
            VIP_REJECT.into(),
            NODE_IP.into(),
            [LOCAL_POD.into(), REMOTE_POD.into()],
        ),
        (
            VIP6.into(),
            VIP6_REJECT.into(),
            NODE6.into(),
            [LOCAL_POD6.into(), REMOTE_POD6.into()],
        ),
    ];
    for (vip, vip_reject, node_ip, [local, remote]) in families {
        let both = [be(local, TARGET_PORT), be(remote, TARGET_PORT)];
        let mut add = |ip: IpAddr, port: u16, proto: Protocol, entry: ServiceEntry| {
            model.frontends.insert((proto.number(), ip, port));
            model.frontend_list.push((proto.number(), ip, port));
            services.push((Frontend { ip, port, proto }, entry));
        };
        for (proto, port) in [
            (Protocol::Tcp, TCP_PORT),
            (Protocol::Udp, UDP_PORT),
            (Protocol::Sctp, SCTP_PORT),
        ] {
            add(
                vip,
                port,
                proto,
                entry(FrontendKind::ClusterIp, &both, &both[..1]),
            );
            add(
                vip_reject,
                port,
                proto,
                entry(FrontendKind::ClusterIp, &[], &[]),
            );
        }
        for proto in [Protocol::Tcp, Protocol::Udp] {
            add(
                node_ip,
                NODE_PORT,
                proto,
                entry(FrontendKind::NodePort, &both, &both[..1]),
            );
        }
        let mut local_only = entry(FrontendKind::NodePort, &[], &[]);
        local_only.when_empty = WhenEmpty::Drop;
        add(node_ip, DROP_NODE_PORT, Protocol::Tcp, local_only);
    }
    let datapath = node_datapath(services, &node_config());
    let mut datapath = datapath;

    let mut objects = manifests::Objects::default();
    let mut errors = Vec::new();
    manifests::parse_into(
        Path::new("policy.yaml"),
        ISOLATING_POLICY,
        &mut objects,
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let (wire, problems) = policy::program(&objects, &node_config());
    assert!(problems.is_empty(), "{problems:?}");
    let stats = datapath.sync_policy(&wire);
    assert!(stats.failed.is_empty(), "{stats:?}");
    model.isolated.extend([IpAddr::from(XA), IpAddr::from(XA6)]);
    (datapath, model)
}

// ---------------------------------------------------------------------------------------------
// Running and checking

/// What the runs did, for the summary and the counters.
#[derive(Default, Debug)]
struct Tally {
    runs: u64,
    refused_short: u64,
    passed: u64,
    modified: u64,
    dropped: u64,
    redirected: u64,
    /// Runs that reported a reason, by reason.
    reasons: BTreeMap<u32, u64>,
    /// Runs by what the model expected.
    ours: u64,
    policy: u64,
    truncated: u64,
    foreign: u64,
}

struct Fuzz<'a> {
    datapath: &'a Datapath,
    ifs: Ifaces,
    model: Model,
    /// Named in every failure (the random test's; the truncation test uses no randomness).
    seed: Option<u64>,
    tally: Tally,
    /// Failed checks by check, program and frame kind...
    failed: BTreeMap<String, usize>,
    /// ... and the first example of each (the first 40 kinds).
    examples: Vec<String>,
}

/// A frame for a failure message: its length, what it is, its first bytes.
fn show(frame: &[u8]) -> String {
    let shown = frame.len().min(96);
    format!(
        "{} bytes, {:?}, {:02x?}{}",
        frame.len(),
        headers(frame),
        &frame[..shown],
        if shown < frame.len() { " ..." } else { "" }
    )
}

/// Whether `BPF_PROG_RUN` refuses `frame` (EINVAL) before any program sees it: Linux's
/// `bpf_prog_test_run_skb` wants an Ethernet header and, behind the IPv4 or IPv6 ethertype, the
/// fixed IP header (measured on 6.18: IPv4 frames below 34 bytes, IPv6 ones below 54). Older
/// kernels may run some of those; then they are checked like any other frame.
fn kernel_refuses(frame: &[u8]) -> bool {
    frame.len() < ETH_HLEN
        || match be16(frame, 12) {
            0x0800 => frame.len() < ETH_HLEN + IPV4_HLEN,
            ETH_P_IPV6 => frame.len() < ETH_HLEN + 40,
            _ => false,
        }
}

/// Whether `error` is BPF_PROG_RUN's EINVAL.
fn is_einval(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(libc::EINVAL)
    })
}

impl Fuzz<'_> {
    fn program(&self, prog: Prog) -> &SchedClassifier {
        match prog {
            Prog::FromPod => self.datapath.from_pod(),
            Prog::ToPod => self.datapath.to_pod(),
            Prog::FromWorld => self.datapath.from_world(),
            Prog::ToWorld => self.datapath.to_world(),
        }
    }

    fn ifindex(&self, prog: Prog) -> u32 {
        match prog {
            Prog::FromPod | Prog::ToPod => self.ifs.pod,
            Prog::FromWorld | Prog::ToWorld => self.ifs.ext,
        }
    }

    /// Records a failed `check` for `group` (the program and the kind of frame), with the
    /// details of this one.
    fn fail(&mut self, check: &str, group: &str, details: String) {
        let count = self.failed.entry(format!("{check}: {group}")).or_default();
        *count += 1;
        if *count == 1 && self.examples.len() < 40 {
            self.examples.push(format!("{check}: {details}"));
        }
    }

    /// Runs `prog` on `frame` (a prefix of `full` when given) and checks the run against what
    /// the model expects; the flows a run creates join the model. `None`: nothing ran.
    fn check(
        &mut self,
        prog: Prog,
        frame: &[u8],
        full: Option<&[u8]>,
        what: &str,
        details: &str,
    ) -> Option<ProgramRun> {
        let group = format!("{} {what}", prog.name());
        let expect = self.model.expect_cut(prog, frame, full);
        self.tally.runs += 1;
        *match expect {
            Expect::Ours => &mut self.tally.ours,
            Expect::Policy(_) => &mut self.tally.policy,
            Expect::Truncated => &mut self.tally.truncated,
            Expect::Foreign => &mut self.tally.foreign,
        } += 1;
        let ran = match datapath::run_program(self.program(prog), frame, Some(self.ifindex(prog))) {
            Ok(ran) => ran,
            Err(e) if kernel_refuses(frame) && is_einval(&e) => {
                self.tally.refused_short += 1;
                return None;
            }
            Err(e) => {
                let frame = show(frame);
                self.fail(
                    "BPF_PROG_RUN failed",
                    &group,
                    format!("{group} {details}: {e:#}; frame {frame}"),
                );
                return None;
            }
        };
        let context = || {
            format!(
                "{group} {details} (expected {expect:?}): returned {} reason {:?}\n  in:  {}\n  \
                 out: {}",
                ran.return_value,
                ran.reason,
                show(frame),
                show(&ran.packet)
            )
        };
        // Every run: a tc action of the programs; a reason only with a drop or an answer;
        // every drop with its reason (counted).
        let unchanged = ran.packet == frame;
        match ran.return_value {
            TC_ACT_OK if unchanged => self.tally.passed += 1,
            TC_ACT_OK => self.tally.modified += 1,
            TC_ACT_SHOT => self.tally.dropped += 1,
            TC_ACT_REDIRECT => self.tally.redirected += 1,
            _ => self.fail("not a tc action of the datapath", &group, context()),
        }
        if let Some(reason) = ran.reason {
            *self.tally.reasons.entry(reason).or_default() += 1;
            if !(1..REASON_COUNT).contains(&reason) {
                self.fail("unknown reason", &group, context());
            }
            let answered =
                ran.return_value == TC_ACT_REDIRECT && reason == REASON_REJECT_NO_ENDPOINTS;
            if ran.return_value != TC_ACT_SHOT && !answered {
                self.fail("a reason without a drop or an answer", &group, context());
            }
        } else if ran.return_value == TC_ACT_SHOT {
            self.fail("a drop without a reason (not counted)", &group, context());
        }

        let untouched = ran.return_value == TC_ACT_OK && unchanged;
        let dropped = ran.return_value == TC_ACT_SHOT;
        match expect {
            Expect::Ours => {
                // A valid packet translated (or answered) stays valid.
                if !dropped && !unchanged && checksums_valid(frame) && !checksums_valid(&ran.packet)
                {
                    self.fail("translated with broken checksums", &group, context());
                }
            }
            Expect::Policy(reason) => {
                if !(untouched || dropped && ran.reason == Some(reason)) {
                    self.fail(
                        "not passed untouched nor dropped by policy",
                        &group,
                        context(),
                    );
                }
            }
            Expect::Truncated => {
                if !(untouched || dropped) {
                    self.fail(
                        "headers cut short, not passed untouched nor dropped",
                        &group,
                        context(),
                    );
                }
            }
            Expect::Foreign => {
                if !untouched {
                    self.fail("not ours, not passed untouched", &group, context());
                }
            }
        }

        // A new flow of a frontend: remember its client's and its replies' tuples.
        if let (true, Headers::Flow(sent)) = (prog.ingress(), headers(frame)) {
            if self.model.is_frontend(&sent)
                && ran.return_value != TC_ACT_SHOT
                && ran.reason.is_none()
            {
                if let Headers::Flow(out) = headers(&ran.packet) {
                    if out != sent {
                        self.model.add_flow(sent, out.reversed());
                    }
                }
            }
        }
        Some(ran)
    }

    /// Runs every program on `frame` and on each of its prefixes (every length from 0).
    fn every_length(&mut self, frame: &[u8], what: &str) {
        for prog in PROGRAMS {
            for len in 0..=frame.len() {
                let full = (len < frame.len()).then_some(frame);
                let details = format!("cut to {len} of {} bytes", frame.len());
                self.check(prog, &frame[..len], full, what, &details);
            }
        }
    }

    /// The `drops` counters grew by exactly the reasons the runs reported since `before`.
    fn check_counters(&mut self, before: &BTreeMap<u32, u64>) {
        let after = self.datapath.drop_counts().expect("drop counters");
        for reason in 1..REASON_COUNT {
            let grew = after.get(&reason).copied().unwrap_or(0)
                - before.get(&reason).copied().unwrap_or(0);
            let reported = self.tally.reasons.get(&reason).copied().unwrap_or(0);
            if grew != reported {
                let name = sluice_common::reason_name(reason);
                self.fail(
                    "drop counters",
                    name,
                    format!("{name} grew by {grew}, the runs reported it {reported} times"),
                );
            }
        }
    }

    fn finish(self, test: &str, started: Instant) {
        eprintln!(
            "{test}: {:?} in {:.1?}{}",
            self.tally,
            started.elapsed(),
            self.seed
                .map(|s| format!(" (SLUICE_FUZZ_SEED={s})"))
                .unwrap_or_default()
        );
        let seed = self
            .seed
            .map(|s| format!(" (SLUICE_FUZZ_SEED={s})"))
            .unwrap_or_default();
        assert!(
            self.failed.is_empty(),
            "{} failed checks{seed}:\n{}\nthe first of each (up to 40):\n{}",
            self.failed.values().sum::<usize>(),
            self.failed
                .iter()
                .map(|(group, count)| format!("{count:>7} {group}"))
                .collect::<Vec<_>>()
                .join("\n"),
            self.examples.join("\n")
        );
    }

    /// Opens, per family, a TCP, UDP and SCTP flow from a pod to the ClusterIP and a TCP and
    /// UDP flow from outside to the NodePort.
    fn open_flows(&mut self) -> Vec<(Family, Opened)> {
        families()
            .into_iter()
            .map(|f| {
                let opened = Opened {
                    tcp: self.open(
                        Prog::FromPod,
                        tuple(PROTO_TCP, f.client, 41_000, f.vip, TCP_PORT),
                    ),
                    udp: self.open(
                        Prog::FromPod,
                        tuple(PROTO_UDP, f.client, 41_001, f.vip, UDP_PORT),
                    ),
                    sctp: self.open(
                        Prog::FromPod,
                        tuple(PROTO_SCTP, f.client, 41_002, f.vip, SCTP_PORT),
                    ),
                    node_port: self.open(
                        Prog::FromWorld,
                        tuple(PROTO_TCP, f.outsider, 41_003, f.node, NODE_PORT),
                    ),
                    node_port_udp: self.open(
                        Prog::FromWorld,
                        tuple(PROTO_UDP, f.outsider, 41_004, f.node, NODE_PORT),
                    ),
                };
                (f, opened)
            })
            .collect()
    }

    /// Opens a flow with its first packet, through `prog`.
    fn open(&mut self, prog: Prog, t: Tuple) -> OpenFlow {
        let flags = if t.proto == PROTO_TCP { TCP_SYN } else { 0 };
        let first = flow_frame(&t, flags, PAYLOAD);
        let ran = self
            .check(prog, &first, None, &format!("opening {t}"), "")
            .expect("ran");
        assert_ne!(
            ran.return_value,
            TC_ACT_SHOT,
            "{} dropped {t}: {:?}",
            prog.name(),
            ran.reason
        );
        let Headers::Flow(out) = headers(&ran.packet) else {
            panic!("{} left {t} as {}", prog.name(), show(&ran.packet));
        };
        assert_ne!(out, t, "{} did not translate {t}", prog.name());
        OpenFlow {
            fwd: t,
            reply: out.reversed(),
        }
    }
}

/// The flows the truncation test opens first (their packets and replies are frames of their
/// own), per family.
struct Opened {
    tcp: OpenFlow,
    udp: OpenFlow,
    sctp: OpenFlow,
    node_port: OpenFlow,
    node_port_udp: OpenFlow,
}

/// A flow the programs created: its client's tuple, and its replies'.
#[derive(Clone, Copy)]
struct OpenFlow {
    fwd: Tuple,
    reply: Tuple,
}

struct Family {
    v6: bool,
    vip: IpAddr,
    vip_reject: IpAddr,
    node: IpAddr,
    client: IpAddr,
    outsider: IpAddr,
    router: IpAddr,
    isolated: IpAddr,
    open_pod: IpAddr,
    nowhere: IpAddr,
}

fn families() -> [Family; 2] {
    [
        Family {
            v6: false,
            vip: VIP.into(),
            vip_reject: VIP_REJECT.into(),
            node: NODE_IP.into(),
            client: LOCAL_CLIENT.into(),
            outsider: OUTSIDER.into(),
            router: ROUTER.into(),
            isolated: XA.into(),
            open_pod: YA.into(),
            nowhere: NOWHERE.into(),
        },
        Family {
            v6: true,
            vip: VIP6.into(),
            vip_reject: VIP6_REJECT.into(),
            node: NODE6.into(),
            client: CLIENT6.into(),
            outsider: OUTSIDER6.into(),
            router: ROUTER6.into(),
            isolated: XA6.into(),
            open_pod: YA6.into(),
            nowhere: NOWHERE6.into(),
        },
    ]
}

fn tuple(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Tuple {
    Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Truncation

/// Every kind of frame the datapath handles (and some it must leave alone), 1,500 bytes long,
/// for one family.
fn frames_of_every_kind(f: &Family, o: &Opened) -> Vec<(String, Vec<u8>)> {
    let fam = if f.v6 { "IPv6" } else { "IPv4" };
    let mut frames: Vec<(&str, Vec<u8>)> = Vec::new();
    let flow = |t: Tuple, flags: u8| padded(move |p| flow_frame(&t, flags, p));

    let syn = tuple(PROTO_TCP, f.client, 42_000, f.vip, TCP_PORT);
    frames.push(("TCP SYN to a ClusterIP", flow(syn, TCP_SYN)));
    frames.push(("TCP ACK of a tracked flow", flow(o.tcp.fwd, TCP_PSH_ACK)));
    frames.push(("UDP of a tracked flow", flow(o.udp.fwd, 0)));
    frames.push(("SCTP INIT of a tracked association", flow(o.sctp.fwd, 0)));
    frames.push((
        "UDP to a ClusterIP, new flow",
        flow(tuple(PROTO_UDP, f.client, 42_001, f.vip, UDP_PORT), 0),
    ));
    frames.push(("TCP SYN-ACK reply", flow(o.tcp.reply, TCP_SYN | TCP_ACK)));
    frames.push(("UDP reply", flow(o.udp.reply, 0)));
    frames.push(("SCTP INIT ACK reply", flow(o.sctp.reply, TCP_ACK)));
    frames.push((
        "TCP SYN to the NodePort from outside",
        flow(
            tuple(PROTO_TCP, f.outsider, 42_002, f.node, NODE_PORT),
            TCP_SYN,
        ),
    ));
    frames.push((
        "TCP ACK reply of the NodePort flow",
        flow(o.node_port.reply, TCP_PSH_ACK),
    ));
    frames.push((
        "UDP reply of the NodePort flow",
        flow(o.node_port_udp.reply, 0),
    ));
    frames.push((
        "TCP SYN to a frontend without endpoints",
        flow(
            tuple(PROTO_TCP, f.client, 42_003, f.vip_reject, TCP_PORT),
            TCP_SYN,
        ),
    ));
    frames.push((
        "UDP to a frontend without endpoints",
        flow(
            tuple(PROTO_UDP, f.client, 42_004, f.vip_reject, UDP_PORT),
            0,
        ),
    ));
    frames.push((
        "SCTP INIT to a frontend without endpoints",
        flow(
            tuple(PROTO_SCTP, f.client, 42_005, f.vip_reject, SCTP_PORT),
            0,
        ),
    ));
    frames.push((
        "TCP SYN to a Local NodePort without local endpoints",
        flow(
            tuple(PROTO_TCP, f.outsider, 42_006, f.node, DROP_NODE_PORT),
            TCP_SYN,
        ),
    ));

    // ICMP errors about the tracked flows: about a packet toward the backend (from the
    // backend, or a router), toward the client; and about a reply as the client got it, from
    // the client toward the frontend.
    let (unreachable, too_big) = if f.v6 {
        (PORT_UNREACHABLE6, PACKET_TOO_BIG)
    } else {
        (PORT_UNREACHABLE, FRAG_NEEDED)
    };
    let mtu = if f.v6 { 1280 } else { 1400 };
    let dnated_udp = flow(o.udp.reply.reversed(), 0);
    frames.push((
        "port unreachable from the backend about a tracked UDP flow",
        error_about(
            o.udp.reply.src,
            o.udp.reply.dst,
            unreachable,
            0,
            &dnated_udp,
        ),
    ));
    let dnated_tcp = flow(o.tcp.reply.reversed(), TCP_PSH_ACK);
    frames.push((
        "fragmentation needed / packet too big from a router about a tracked TCP flow",
        error_about(f.router, o.tcp.reply.dst, too_big, mtu, &dnated_tcp),
    ));
    let reply_as_got = flow(o.tcp.fwd.reversed(), TCP_PSH_ACK);
    frames.push((
        "port unreachable from the client about a reply it got",
        error_about(f.client, f.vip, unreachable, 0, &reply_as_got),
    ));
    let masqueraded = flow(o.node_port.reply.reversed(), TCP_PSH_ACK);
    frames.push((
        "packet too big from a router about the NodePort flow",
        error_about(f.router, o.node_port.reply.dst, too_big, mtu, &masqueraded),
    ));
    // Errors quoting less than the quoted L4 checksum, with bytes after the IP packet (an
    // Ethernet trailer): the trailer is no part of the quote.
    let quote_len = if f.v6 { 40 } else { IPV4_HLEN };
    let trailer = |error: Vec<u8>| {
        let len = error.len();
        let mut frame = error;
        frame.extend_from_slice(&pattern(FRAME_MAX - len));
        frame
    };
    frames.push((
        "fragmentation needed / packet too big quoting 8 bytes of a tracked TCP flow's packet, \
         then a trailer",
        trailer(icmp_frame(
            f.router,
            o.tcp.reply.dst,
            too_big,
            mtu,
            &dnated_tcp[ETH_HLEN..ETH_HLEN + quote_len + 8],
        )),
    ));
    frames.push((
        "port unreachable quoting only the ports of a tracked UDP flow's packet, then a trailer",
        trailer(icmp_frame(
            o.udp.reply.src,
            o.udp.reply.dst,
            unreachable,
            0,
            &dnated_udp[ETH_HLEN..ETH_HLEN + quote_len + 4],
        )),
    ));
    let untracked = flow(tuple(PROTO_UDP, f.client, 43_000, f.nowhere, UDP_PORT), 0);
    frames.push((
        "port unreachable about no flow",
        error_about(f.nowhere, f.client, unreachable, 0, &untracked),
    ));
    let echo = if f.v6 {
        ICMPV6_ECHO_REQUEST
    } else {
        ICMP_ECHO_REQUEST
    };
    frames.push((
        "ICMP echo request to a ClusterIP",
        padded(|p| icmp_frame(f.client, f.vip, (echo, 0), 0x1234_0001, p)),
    ));

    // NetworkPolicy, and traffic that is no one's.
    frames.push((
        "TCP SYN from the isolated pod",
        flow(
            tuple(PROTO_TCP, f.isolated, 42_007, f.open_pod, 80),
            TCP_SYN,
        ),
    ));
    frames.push((
        "UDP to the isolated pod",
        flow(tuple(PROTO_UDP, f.open_pod, 42_008, f.isolated, 80), 0),
    ));
    frames.push((
        "TCP SYN to an address that is no frontend",
        flow(
            tuple(PROTO_TCP, f.client, 42_009, f.nowhere, TCP_PORT),
            TCP_SYN,
        ),
    ));
    let vlan_syn = padded(|p| vlan_tagged(&flow_frame(&syn, TCP_SYN, p), ETH_P_8021Q));
    frames.push(("VLAN-tagged TCP SYN to a ClusterIP", vlan_syn));
    let qinq = padded(|p| {
        vlan_tagged(
            &vlan_tagged(&flow_frame(&syn, TCP_SYN, p), ETH_P_8021Q),
            ETH_P_8021AD,
        )
    });
    frames.push(("QinQ-tagged TCP SYN to a ClusterIP", qinq));
    let other_ethertype = if f.v6 { 0x0800 } else { ETH_P_IPV6 };
    frames.push((
        "TCP SYN to a ClusterIP behind the other family's ethertype",
        with_ethertype(&flow(syn, TCP_SYN), other_ethertype),
    ));

    if f.v6 {
        let ext = |t: Tuple, flags: u8, chain: &'static [u8]| {
            padded(move |p| {
                chain.iter().fold(flow_frame(&t, flags, p), |frame, &ext| {
                    with_ipv6_extension(&frame, ext, (0, false))
                })
            })
        };
        frames.push((
            "TCP SYN with a hop-by-hop header to a ClusterIP",
            ext(syn, TCP_SYN, &[IPV6_HOP_BY_HOP]),
        ));
        frames.push((
            "UDP reply with a destination options header",
            ext(o.udp.reply, 0, &[IPV6_DEST_OPTS]),
        ));
        frames.push((
            "TCP ACK of a tracked flow behind hop-by-hop, routing, destination options",
            ext(
                o.tcp.fwd,
                TCP_PSH_ACK,
                &[IPV6_DEST_OPTS, IPV6_ROUTING, IPV6_HOP_BY_HOP],
            ),
        ));
        frames.push((
            "first fragment (fragment header) of UDP to a ClusterIP",
            ext(o.udp.fwd, 0, &[IPV6_FRAGMENT]),
        ));
        let quoted_ext = with_ipv6_extension(&dnated_udp, IPV6_HOP_BY_HOP, (0, false));
        frames.push((
            "port unreachable quoting a tracked flow's packet with an extension header",
            error_about(
                o.udp.reply.src,
                o.udp.reply.dst,
                unreachable,
                0,
                &quoted_ext,
            ),
        ));
    } else {
        let opts = |t: Tuple, flags: u8, options: &'static [u8]| {
            padded(move |p| with_ip_options(&flow_frame(&t, flags, p), options))
        };
        frames.push((
            "TCP SYN with IP options to a ClusterIP",
            opts(
                tuple(PROTO_TCP, f.client, 42_010, f.vip, TCP_PORT),
                TCP_SYN,
                &IP_OPTIONS,
            ),
        ));
        frames.push((
            "TCP reply with IP options",
            opts(o.tcp.reply, TCP_PSH_ACK, &IP_OPTIONS),
        ));
        frames.push((
            "UDP of a tracked flow with 40 bytes of IP options (ihl 15)",
            opts(o.udp.fwd, 0, &[1; 40]),
        ));
        frames.push((
            "first fragment (MF) of UDP to a ClusterIP",
            with_fragment_field(&flow(o.udp.fwd, 0), 0x2000),
        ));
        frames.push((
            "later fragment of UDP to a ClusterIP",
            with_fragment_field(&flow(o.udp.fwd, 0), 0x2000 | 185),
        ));
        let with_options = with_ip_options(&flow(o.udp.reply.reversed(), 0), &IP_OPTIONS);
        frames.push((
            "port unreachable quoting a tracked flow's packet with IP options",
            error_about(
                o.udp.reply.src,
                o.udp.reply.dst,
                unreachable,
                0,
                &with_options,
            ),
        ));
    }
    frames
        .into_iter()
        .map(|(what, frame)| {
            assert_eq!(frame.len(), FRAME_MAX, "{what}");
            (format!("{fam} {what}"), frame)
        })
        .collect()
}

/// Every kind of frame of [`frames_of_every_kind`], both families, through every program at
/// every length from 0 to its whole 1,500 bytes.
#[test]
fn fuzz_truncated_frames_of_every_kind_pass_untouched_or_drop_at_every_length() {
    let node = dual_stack_node();
    node.run(|ifs| {
        let started = Instant::now();
        let (datapath, model) = fuzz_datapath();
        let before = datapath.drop_counts().expect("drop counters");
        let mut fuzz = Fuzz {
            datapath: &datapath,
            ifs,
            model,
            seed: None,
            tally: Tally::default(),
            failed: BTreeMap::new(),
            examples: Vec::new(),
        };
        let mut frames = Vec::new();
        for (f, opened) in fuzz.open_flows() {
            frames.extend(frames_of_every_kind(&f, &opened));
        }
        // The frames are what the model says they are: the policy drops, the reject answers
        // (so the test is not vacuous).
        for (what, frame) in &frames {
            let mut complete = |prog| {
                let ran = fuzz.check(prog, frame, None, what, "whole").expect("ran");
                (ran.return_value, ran.reason)
            };
            if what.ends_with("from the isolated pod") {
                assert_eq!(
                    complete(Prog::FromPod),
                    (TC_ACT_SHOT, Some(REASON_DROP_POLICY_EGRESS)),
                    "{what}"
                );
            }
            if what.ends_with("to the isolated pod") {
                assert_eq!(
                    complete(Prog::ToPod),
                    (TC_ACT_SHOT, Some(REASON_DROP_POLICY_INGRESS)),
                    "{what}"
                );
            }
            if what.ends_with("to a frontend without endpoints") {
                assert_eq!(
                    complete(Prog::FromPod),
                    (TC_ACT_REDIRECT, Some(REASON_REJECT_NO_ENDPOINTS)),
                    "{what}"
                );
            }
        }
        for (what, frame) in &frames {
            fuzz.every_length(frame, what);
        }
        fuzz.check_counters(&before);
        fuzz.finish("truncation", started);
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Random frames

// A seeded PRNG (xorshift64*)

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn port(&mut self) -> u16 {
        self.next() as u16
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn seed() -> u64 {
    match std::env::var("SLUICE_FUZZ_SEED") {
        Ok(seed) => seed.parse().expect("SLUICE_FUZZ_SEED: a u64"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// Frames per program of the random test (`SLUICE_FUZZ_FRAMES=<n>` for a longer run).
const RANDOM_FRAMES: usize = 20_000;

const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa9fe, 0x2a01, 0, 0, 0, 0, 1);

const POOL4: [Ipv4Addr; 12] = [
    VIP,
    VIP_REJECT,
    NODE_IP,
    LOCAL_POD,
    REMOTE_POD,
    LOCAL_CLIENT,
    OUTSIDER,
    XA,
    YA,
    HAIRPIN_ADDR,
    ROUTER,
    NOWHERE,
];

const POOL6: [Ipv6Addr; 12] = [
    VIP6,
    VIP6_REJECT,
    NODE6,
    LOCAL_POD6,
    REMOTE_POD6,
    CLIENT6,
    OUTSIDER6,
    XA6,
    YA6,
    HAIRPIN6,
    ROUTER6,
    NOWHERE6,
];

const PORTS: [u16; 9] = [
    TCP_PORT,
    UDP_PORT,
    SCTP_PORT,
    NODE_PORT,
    DROP_NODE_PORT,
    TARGET_PORT,
    41_000,
    0,
    65_535,
];

/// A frame of the random test: what it is, and the frame it was cut from (when it was).
struct Generated {
    frame: Vec<u8>,
    full: Option<Vec<u8>>,
    what: String,
}

impl Tuple {
    fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }
}

fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    match (v6, rng.chance(80)) {
        (false, true) => rng.pick(&POOL4).into(),
        (true, true) => rng.pick(&POOL6).into(),
        (false, false) => IpAddr::from(<[u8; 4]>::try_from(rng.bytes(4)).unwrap()),
        (true, false) => IpAddr::from(<[u8; 16]>::try_from(rng.bytes(16)).unwrap()),
    }
}

fn random_port(rng: &mut Rng) -> u16 {
    if rng.chance(50) {
        rng.pick(&PORTS)
    } else {
        rng.port()
    }
}

/// A payload length: mostly short, now and then most of a frame.
fn random_len(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => rng.below(65),
        6..=8 => rng.below(513),
        _ => rng.below(1301),
    }
}

fn random_payload(rng: &mut Rng) -> Vec<u8> {
    let len = random_len(rng);
    rng.bytes(len)
}

fn random_tcp_flags(rng: &mut Rng) -> u8 {
    if rng.chance(50) {
        rng.pick(&[
            TCP_SYN,
            TCP_SYN | TCP_ACK,
            TCP_ACK,
            TCP_PSH_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            packet::TCP_FIN | TCP_ACK,
        ])
    } else {
        rng.byte()
    }
}

impl Model {
    /// A tuple to build a packet of: to a frontend, of a tracked flow (either way), or made
    /// of the addresses and ports the datapath knows, or random ones.
    fn random_tuple(&self, rng: &mut Rng, v6: bool) -> Tuple {
        let family = |t: &&Tuple| t.is_v6() == v6;
        let tracked = match rng.below(10) {
            0..=2 => {
                let frontends: Vec<_> = self
                    .frontend_list
                    .iter()
                    .filter(|(_, ip, _)| ip.is_ipv6() == v6)
                    .collect();
                let &(proto, dst, dport) = frontends[rng.below(frontends.len())];
                Some(Tuple {
                    proto,
                    src: random_addr(rng, v6),
                    sport: random_port(rng),
                    dst,
                    dport,
                })
            }
            3..=4 => {
                let replies: Vec<_> = self.reply_list.iter().filter(family).collect();
                (!replies.is_empty()).then(|| *replies[rng.below(replies.len())])
            }
            5 => {
                let forward: Vec<_> = self.forward_list.iter().filter(family).collect();
                (!forward.is_empty()).then(|| *forward[rng.below(forward.len())])
            }
            _ => None,
        };
        tracked.unwrap_or_else(|| Tuple {
            proto: rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_SCTP]),
            src: random_addr(rng, v6),
            sport: random_port(rng),
            dst: random_addr(rng, v6),
            dport: random_port(rng),
        })
    }

    /// A packet of a random tuple (TCP/UDP/SCTP, an ICMP error quoting one, another ICMP
    /// message, another protocol) with a random payload, checksums valid.
    fn random_packet(&self, rng: &mut Rng, v6: bool) -> (Vec<u8>, String) {
        match rng.below(10) {
            0..=5 => {
                let t = self.random_tuple(rng, v6);
                let flags = match t.proto {
                    PROTO_TCP => random_tcp_flags(rng),
                    _ => rng.byte() & TCP_ACK,
                };
                let payload = random_payload(rng);
                let mut frame = flow_frame(&t, flags, &payload);
                if t.proto == PROTO_UDP && !v6 && rng.chance(10) {
                    let at = ETH_HLEN + IPV4_HLEN + 6;
                    frame[at..at + 2].copy_from_slice(&[0, 0]); // no checksum
                }
                (frame, format!("{t} flags {flags:#04x}"))
            }
            6..=7 => {
                // The quoted packet: one toward a tracked flow's backend or its client as it
                // got it (both travel back to their sender), or any other.
                let quoted = match rng.below(3) {
                    0 => self.random_tuple(rng, v6),
                    _ => {
                        let t = self.random_tuple(rng, v6);
                        if rng.chance(50) {
                            t.reversed()
                        } else {
                            t
                        }
                    }
                };
                let flags = if quoted.proto == PROTO_TCP {
                    random_tcp_flags(rng)
                } else {
                    0
                };
                let mut about = flow_frame(&quoted, flags, &random_payload(rng));
                if !v6 && rng.chance(10) {
                    about = with_ip_options(&about, &IP_OPTIONS);
                }
                let ip = &about[ETH_HLEN..];
                let quote_len = match rng.below(5) {
                    0 => ip.len(),
                    1 => (if v6 { 48 } else { 28 }).min(ip.len()),
                    2 => (if v6 { 44 } else { 24 }).min(ip.len()),
                    _ => rng.below(ip.len() + 1),
                };
                let any = (rng.byte(), rng.byte());
                let kind = if v6 {
                    rng.pick(&[
                        (1, 4),
                        (1, 0),
                        (2, 0),
                        (3, 0),
                        (4, 0),
                        (ICMPV6_ECHO_REQUEST, 0),
                        (129, 0),
                        any,
                    ])
                } else {
                    rng.pick(&[
                        (3, 3),
                        (3, 4),
                        (3, 1),
                        (11, 0),
                        (12, 0),
                        (4, 0),
                        (5, 1),
                        any,
                    ])
                };
                let (src, dst) = if rng.chance(70) {
                    (quoted.dst, quoted.src)
                } else {
                    (random_addr(rng, v6), random_addr(rng, v6))
                };
                let frame = icmp_frame(src, dst, kind, rng.next() as u32, &ip[..quote_len]);
                (
                    frame,
                    format!("ICMP {kind:?} quoting {quote_len} bytes of {quoted}"),
                )
            }
            8 => {
                let kind = if v6 {
                    (rng.pick(&[ICMPV6_ECHO_REQUEST, 129, 133, 135, 136]), 0)
                } else {
                    (rng.pick(&[ICMP_ECHO_REQUEST, 0, 13]), 0)
                };
                let (src, dst) = (random_addr(rng, v6), random_addr(rng, v6));
                let body = random_payload(rng);
                let frame = icmp_frame(src, dst, kind, rng.next() as u32, &body);
                (frame, format!("ICMP {kind:?} {src} -> {dst}"))
            }
            _ => {
                let proto = rng.byte();
                let (src, dst) = (random_addr(rng, v6), random_addr(rng, v6));
                let frame = ip_frame(src, dst, proto, random_payload(rng), None);
                (frame, format!("protocol {proto} {src} -> {dst}"))
            }
        }
    }

    /// [`Model::random_packet`], its IP header mutated now and then (options, fragments, TTL,
    /// lengths, version, IPv6 extension headers), trailing bytes added, VLAN tags pushed or
    /// the other family's ethertype put in front of it, or cut short.
    fn random_structured(&self, rng: &mut Rng) -> Generated {
        let v6 = rng.chance(50);
        let (mut frame, mut what) = self.random_packet(rng, v6);
        let ip = ETH_HLEN;
        if v6 {
            if rng.chance(15) {
                for _ in 0..1 + rng.below(3) {
                    let ext =
                        rng.pick(&[IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_DEST_OPTS, IPV6_FRAGMENT]);
                    let fragment = ((rng.port() & 0x1fff), rng.chance(50));
                    frame = with_ipv6_extension(&frame, ext, fragment);
                    what.push_str(&format!(", extension header {ext}"));
                }
            }
            if rng.chance(25) {
                frame[ip + 7] = rng.pick(&[0, 1, 2, 255]);
            }
            if rng.chance(8) {
                frame[ip + 4..ip + 6].copy_from_slice(&rng.port().to_be_bytes());
            }
            if rng.chance(5) {
                frame[ip + 1..ip + 4].copy_from_slice(&rng.bytes(3));
            }
            if rng.chance(4) {
                frame[ip] = rng.byte();
            }
        } else {
            if rng.chance(12) {
                let len = 4 * (1 + rng.below(10));
                let options = rng.bytes(len);
                frame = with_ip_options(&frame, &options);
                what.push_str(&format!(", {} bytes of IP options", options.len()));
            }
            match rng.below(20) {
                0..=1 => frame[ip + 6..ip + 8].copy_from_slice(&rng.port().to_be_bytes()),
                2 => frame[ip + 6..ip + 8].copy_from_slice(&0x2000u16.to_be_bytes()),
                _ => {}
            }
            if rng.chance(25) {
                frame[ip + 8] = rng.pick(&[0, 1, 2, 255]);
            }
            if rng.chance(8) {
                frame[ip + 2..ip + 4].copy_from_slice(&rng.port().to_be_bytes());
            }
            if rng.chance(4) {
                frame[ip] = (frame[ip] & 0x0f) | (rng.byte() & 0xf0);
            }
            if rng.chance(4) {
                frame[ip] = (frame[ip] & 0xf0) | (rng.byte() & 0x0f);
            }
            if rng.chance(90) {
                fix_ipv4_checksum(&mut frame);
            }
        }
        if rng.chance(10) {
            let len = 1 + rng.below(64);
            let junk = rng.bytes(len);
            frame.extend_from_slice(&junk);
            what.push_str(", trailing bytes");
        }
        match rng.below(20) {
            0 => {
                frame = vlan_tagged(&frame, ETH_P_8021Q);
                what.push_str(", VLAN-tagged");
            }
            1 => {
                frame = vlan_tagged(&vlan_tagged(&frame, ETH_P_8021Q), ETH_P_8021AD);
                what.push_str(", QinQ-tagged");
            }
            2 => {
                frame = with_ethertype(&frame, if v6 { 0x0800 } else { ETH_P_IPV6 });
                what.push_str(", the other family's ethertype");
            }
            _ => {}
        }
        let mut full = None;
        if frame.len() > FRAME_MAX || rng.chance(15) {
            let len = rng.below(frame.len().min(FRAME_MAX));
            full = Some(frame.clone());
            frame.truncate(len);
            what.push_str(&format!(", cut to {len} bytes"));
        }
        Generated { frame, full, what }
    }

    /// Random bytes behind an IPv4 or IPv6 header's first bytes: version, a protocol the
    /// datapath handles, often a frontend's address and port.
    fn random_ip_like(&self, rng: &mut Rng) -> Generated {
        let v6 = rng.chance(50);
        let len = ETH_HLEN + 44 + rng.below(FRAME_MAX - ETH_HLEN - 44 + 1);
        let mut frame = rng.bytes(len);
        let ip = ETH_HLEN;
        let (_, dst, dport) = if rng.chance(60) {
            let frontends: Vec<_> = self
                .frontend_list
                .iter()
                .filter(|(_, ip, _)| ip.is_ipv6() == v6)
                .collect();
            *frontends[rng.below(frontends.len())]
        } else {
            (0, random_addr(rng, v6), random_port(rng))
        };
        let proto = rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6]);
        if v6 {
            frame[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            frame[ip] = 0x60 | (frame[ip] & 0x0f);
            frame[ip + 6] = proto;
            if let IpAddr::V6(dst) = dst {
                frame[ip + 24..ip + 40].copy_from_slice(&dst.octets());
            }
            frame[ip + 42..ip + 44].copy_from_slice(&dport.to_be_bytes());
        } else {
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ihl = if rng.chance(80) { 5 } else { rng.byte() & 0x0f };
            frame[ip] = 0x40 | ihl;
            frame[ip + 9] = proto;
            if rng.chance(80) {
                frame[ip + 6] &= 0xe0; // no fragment offset
            }
            if let IpAddr::V4(dst) = dst {
                frame[ip + 16..ip + 20].copy_from_slice(&dst.octets());
            }
            let l4 = ip + usize::from(ihl) * 4;
            if l4 + 4 <= frame.len() {
                frame[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
            }
        }
        let what = format!("random bytes behind an IP header to {dst}:{dport}, protocol {proto}");
        Generated {
            frame,
            full: None,
            what,
        }
    }

    fn random_frame(&self, rng: &mut Rng) -> Generated {
        match rng.below(100) {
            0..=54 => self.random_structured(rng),
            55..=74 => self.random_ip_like(rng),
            _ => {
                let len = if rng.chance(40) {
                    rng.below(65)
                } else {
                    rng.below(FRAME_MAX + 1)
                };
                let mut frame = rng.bytes(len);
                if len >= ETH_HLEN && rng.chance(50) {
                    let ethertype =
                        rng.pick(&[0x0800, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, 0x0806]);
                    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
                }
                Generated {
                    frame,
                    full: None,
                    what: format!("{len} random bytes"),
                }
            }
        }
    }
}

/// [`RANDOM_FRAMES`] random frames through every program: packets of random tuples (to the
/// frontends, of the tracked flows, of the pods, random) with random payloads and mutated
/// headers, cut short now and then; random bytes behind an IP header; random bytes.
///
/// `SLUICE_FUZZ_SEED=<n>` replays a run (up to the datapath's own random choices: backends,
/// masquerade ports), `SLUICE_FUZZ_FRAMES=<n>` runs that many frames; a failure names the seed.
#[test]
fn fuzz_random_frames_that_are_not_ours_pass_untouched() {
    let seed = seed();
    let node = dual_stack_node();
    node.run(|ifs| {
        let started = Instant::now();
        let (datapath, model) = fuzz_datapath();
        let before = datapath.drop_counts().expect("drop counters");
        let mut fuzz = Fuzz {
            datapath: &datapath,
            ifs,
            model,
            seed: Some(seed),
            tally: Tally::default(),
            failed: BTreeMap::new(),
            examples: Vec::new(),
        };
        fuzz.open_flows();
        let mut rng = Rng::new(seed);
        let frames = std::env::var("SLUICE_FUZZ_FRAMES")
            .map(|n| n.parse().expect("SLUICE_FUZZ_FRAMES: a number"))
            .unwrap_or(RANDOM_FRAMES);
        for i in 0..frames {
            let generated = fuzz.model.random_frame(&mut rng);
            for prog in PROGRAMS {
                fuzz.check(
                    prog,
                    &generated.frame,
                    generated.full.as_deref(),
                    "random frame",
                    &format!("{i}: {}", generated.what),
                );
            }
        }
        fuzz.check_counters(&before);
        fuzz.finish("random", started);
    });
}
