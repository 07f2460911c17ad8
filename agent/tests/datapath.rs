//! The real eBPF programs, loaded into the kernel and run with `BPF_PROG_RUN` on hand-built
//! packets, with their maps programmed by `Datapath::sync`.
//!
//! Needs root and BPF; a test fails (never skips) when they are missing. Every test loads its
//! own datapath with private maps, so the tests run in parallel without seeing each other. The
//! pinning/attach tests use a bpffs mounted in a temporary directory and a veth pair inside a
//! network namespace of their own, both removed afterwards (also on panic): nothing touches the
//! machine's interfaces or /sys/fs/bpf.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
};
use sluice::{
    datapath::{self, Datapath, ProgramRun},
    node::NodeContext,
    packet::{
        self, ethernet, internet_checksum, ipv4_packet, l4_offset, with_ip_options, Decoded, Flow,
        ETH_HLEN, IPV4_HLEN, L4, PROTO_ICMP, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN,
    },
    state::{BackendAddr, DesiredState, Frontend, FrontendKind, Protocol, ServiceEntry, WhenEmpty},
};
use sluice_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_DROP_NO_LOCAL_ENDPOINTS, REASON_DROP_SOURCE_RANGE, REASON_REJECT_NO_ENDPOINTS,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP_PSH_ACK: u8 = TCP_PSH | TCP_ACK;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

// ---------------------------------------------------------------------------------------------
// Packets: built and taken apart by `sluice::packet`, which `sluice trace` uses too.

/// Flows as the tests name them: from [`CLIENT`], and the replies of a backend.
trait TestFlow {
    fn tcp(sport: u16, dst: Ipv4Addr, dport: u16) -> Flow;
    fn udp(sport: u16, dst: Ipv4Addr, dport: u16) -> Flow;
    /// The flow of the replies `backend` sends to the client.
    fn reply_from(&self, backend: BackendAddr) -> Flow;
}

impl TestFlow for Flow {
    fn tcp(sport: u16, dst: Ipv4Addr, dport: u16) -> Flow {
        Flow {
            proto: PROTO_TCP,
            src: CLIENT,
            sport,
            dst,
            dport,
        }
    }

    fn udp(sport: u16, dst: Ipv4Addr, dport: u16) -> Flow {
        Flow {
            proto: PROTO_UDP,
            ..Flow::tcp(sport, dst, dport)
        }
    }

    fn reply_from(&self, backend: BackendAddr) -> Flow {
        Flow {
            src: v4(backend.ip),
            sport: backend.port,
            ..self.reversed()
        }
    }
}

const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
/// Odd length on purpose: the checksum then covers a padded last byte.
const PAYLOAD: &[u8] = b"hello sluice!";

/// A TCP segment; everything but a SYN carries [`PAYLOAD`].
fn tcp_packet(flow: &Flow, flags: u8) -> Vec<u8> {
    let payload = if flags & TCP_SYN == 0 { PAYLOAD } else { &[] };
    packet::tcp_packet(flow, flags, payload)
}

fn udp_packet(flow: &Flow, with_checksum: bool) -> Vec<u8> {
    packet::udp_packet(flow, with_checksum, PAYLOAD)
}

/// The first packet of `flow`: a SYN for TCP, a datagram for UDP.
fn first_packet(flow: &Flow) -> Vec<u8> {
    packet::first_packet(flow, PAYLOAD)
}

/// A later packet of `flow`.
fn next_packet(flow: &Flow) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp_packet(flow, TCP_PSH_ACK),
        _ => udp_packet(flow, true),
    }
}

/// The IPv4 tuple of a packet built above (or rewritten by the programs).
fn tuple_of(packet: &[u8]) -> Flow {
    packet::decode(packet)
        .ok()
        .and_then(|decoded| decoded.flow())
        .unwrap_or_else(|| panic!("not a TCP/UDP packet: {packet:02x?}"))
}

fn l4_checksum_field(packet: &[u8]) -> u16 {
    let at = l4_offset(packet)
        + if packet[ETH_HLEN + 9] == PROTO_TCP {
            16
        } else {
            6
        };
    u16::from_be_bytes([packet[at], packet[at + 1]])
}

/// Recomputes the IPv4 header and TCP/UDP checksums from scratch over `packet`.
fn assert_checksums_valid(packet: &[u8]) {
    if let Err(e) = packet::verify_checksums(packet) {
        panic!("{e}: {packet:02x?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Running the programs

/// Runs `program` on `packet` with BPF_PROG_RUN; returns the verdict and the packet as the
/// program left it.
fn run(program: &SchedClassifier, packet: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_RUN failed on {packet:02x?}: {e}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs `from_pod`, expects TC_ACT_OK and valid checksums, returns the packet sent on.
fn from_pod(datapath: &Datapath, packet: &[u8]) -> Vec<u8> {
    let (verdict, out) = run(datapath.from_pod(), packet);
    assert_eq!(verdict, TC_ACT_OK, "from_pod verdict");
    assert_eq!(out.len(), packet.len());
    assert_checksums_valid(&out);
    out
}

fn to_pod(datapath: &Datapath, packet: &[u8]) -> Vec<u8> {
    let (verdict, out) = run(datapath.to_pod(), packet);
    assert_eq!(verdict, TC_ACT_OK, "to_pod verdict");
    assert_eq!(out.len(), packet.len());
    assert_checksums_valid(&out);
    out
}

/// The backend `packet` (a DNATed packet of `flow`) was sent to, after checking that nothing but
/// the destination changed.
fn dnat_target(flow: &Flow, packet: &[u8]) -> BackendAddr {
    let out = tuple_of(packet);
    assert_eq!(
        (out.proto, out.src, out.sport),
        (flow.proto, flow.src, flow.sport)
    );
    BackendAddr {
        ip: out.dst.into(),
        port: out.dport,
    }
}

// ---------------------------------------------------------------------------------------------
// Services

fn frontend(ip: Ipv4Addr, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        ip: ip.into(),
        port,
        proto,
    }
}

fn backends(addrs: &[([u8; 4], u16)]) -> Vec<BackendAddr> {
    let mut list: Vec<BackendAddr> = addrs
        .iter()
        .map(|&(ip, port)| BackendAddr {
            ip: Ipv4Addr::from(ip).into(),
            port,
        })
        .collect();
    list.sort();
    list
}

fn desired(services: &[(Frontend, Vec<BackendAddr>)]) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .map(|(f, b)| {
                let entry = ServiceEntry::cluster_ip(
                    format!("default/svc-{}:{}", f.port, f.proto),
                    b.clone(),
                );
                (*f, entry)
            })
            .collect(),
        ..Default::default()
    }
}

fn load_private() -> Datapath {
    Datapath::load_unpinned().unwrap_or_else(|e| {
        panic!("loading the datapath failed (these tests need root and a kernel with BPF): {e:#}")
    })
}

/// A datapath with private maps programmed with `services`.
fn datapath_with(services: &[(Frontend, Vec<BackendAddr>)]) -> Datapath {
    let mut datapath = load_private();
    let stats = datapath.sync(&desired(services)).expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    datapath
}

fn two_backends() -> Vec<BackendAddr> {
    backends(&[([10, 244, 1, 2], 8080), ([10, 244, 2, 3], 8080)])
}

// ---------------------------------------------------------------------------------------------
// Translation

#[test]
fn tcp_flow_to_a_vip_is_dnated_kept_on_its_backend_and_reverse_natted() {
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let datapath = datapath_with(&[(svc, two_backends())]);
    let flow = Flow::tcp(40_000, VIP, 80);

    let syn = from_pod(&datapath, &tcp_packet(&flow, TCP_SYN));
    let backend = dnat_target(&flow, &syn);
    assert!(two_backends().contains(&backend), "SYN went to {backend}");

    // Later packets of the flow (not SYNs: no new balancing) follow the conntrack entry.
    for _ in 0..20 {
        let packet = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
        assert_eq!(dnat_target(&flow, &packet), backend);
        assert_eq!(&packet[packet.len() - PAYLOAD.len()..], PAYLOAD);
    }

    // The backend's reply reaches the client as coming from the VIP.
    let reply_flow = flow.reply_from(backend);
    let reply = to_pod(&datapath, &tcp_packet(&reply_flow, TCP_SYN | TCP_ACK));
    assert_eq!(
        tuple_of(&reply),
        Flow {
            src: VIP,
            sport: 80,
            ..reply_flow
        }
    );

    // The flow is recorded twice: forward (client -> VIP) and reply (backend -> client).
    let entries = datapath.conntrack_entries().expect("conntrack");
    assert_eq!(entries.len(), 2, "{entries:?}");
    let service_id = datapath.service_id(&svc).expect("programmed");
    for (key, value) in &entries {
        assert_eq!(value.service_id, service_id);
        match key.dir {
            CT_DIR_FORWARD => assert_eq!(
                (key.sport, value.nat_port),
                (40_000u16.to_be(), 8080u16.to_be())
            ),
            CT_DIR_REPLY => assert_eq!(
                (key.sport, value.nat_port),
                (8080u16.to_be(), 80u16.to_be())
            ),
            other => panic!("unknown direction {other}"),
        }
    }
}

#[test]
fn udp_flow_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let svc = frontend(VIP, 53, Protocol::Udp);
    let datapath = datapath_with(&[(svc, two_backends())]);
    let flow = Flow::udp(50_000, VIP, 53);

    let first = from_pod(&datapath, &udp_packet(&flow, true));
    let backend = dnat_target(&flow, &first);
    assert!(two_backends().contains(&backend));
    assert_ne!(l4_checksum_field(&first), 0);
    for _ in 0..20 {
        let packet = from_pod(&datapath, &udp_packet(&flow, true));
        assert_eq!(dnat_target(&flow, &packet), backend);
    }

    let reply_flow = flow.reply_from(backend);
    let reply = to_pod(&datapath, &udp_packet(&reply_flow, true));
    assert_eq!(
        tuple_of(&reply),
        Flow {
            src: VIP,
            sport: 53,
            ..reply_flow
        }
    );

    // Without a checksum (0), the rewritten packets keep "no checksum", in both directions and
    // for a new flow as well as a known one.
    for sport in [50_000, 50_001] {
        let flow = Flow::udp(sport, VIP, 53);
        let out = from_pod(&datapath, &udp_packet(&flow, false));
        let backend = dnat_target(&flow, &out);
        assert_eq!(
            l4_checksum_field(&out),
            0,
            "DNAT of a datagram without checksum"
        );
        let reply = to_pod(&datapath, &udp_packet(&flow.reply_from(backend), false));
        assert_eq!(tuple_of(&reply).src, VIP);
        assert_eq!(
            l4_checksum_field(&reply),
            0,
            "reverse NAT of a datagram without checksum"
        );
    }
}

#[test]
fn new_flows_are_spread_uniformly_over_the_backends() {
    let three = backends(&[
        ([10, 244, 1, 2], 8080),
        ([10, 244, 2, 3], 8080),
        ([10, 244, 3, 4], 9090),
    ]);
    let datapath = datapath_with(&[(frontend(VIP, 80, Protocol::Tcp), three.clone())]);

    let mut hits: BTreeMap<BackendAddr, usize> = BTreeMap::new();
    for sport in 10_000..10_300 {
        let flow = Flow::tcp(sport, VIP, 80);
        let out = from_pod(&datapath, &tcp_packet(&flow, TCP_SYN));
        *hits.entry(dnat_target(&flow, &out)).or_default() += 1;
    }
    assert_eq!(hits.keys().copied().collect::<Vec<_>>(), three, "{hits:?}");
    // 100 expected each; 50 is more than 6 standard deviations away.
    for (backend, n) in &hits {
        assert!(*n >= 50, "{backend} got only {n} of 300 flows: {hits:?}");
    }
}

#[test]
fn ports_and_protocols_of_one_vip_have_their_own_backends() {
    let http = backends(&[([10, 244, 1, 1], 8080)]);
    let https = backends(&[([10, 244, 2, 2], 8443)]);
    let dns = backends(&[([10, 244, 3, 3], 5353)]);
    let datapath = datapath_with(&[
        (frontend(VIP, 80, Protocol::Tcp), http.clone()),
        (frontend(VIP, 443, Protocol::Tcp), https.clone()),
        (frontend(VIP, 80, Protocol::Udp), dns.clone()),
    ]);
    for (flow, expected) in [
        (Flow::tcp(40_001, VIP, 80), http[0]),
        (Flow::tcp(40_002, VIP, 443), https[0]),
        (Flow::udp(40_003, VIP, 80), dns[0]),
    ] {
        let out = from_pod(&datapath, &first_packet(&flow));
        assert_eq!(dnat_target(&flow, &out), expected, "{flow:?}");
    }
    // A port of the VIP without a service is not translated.
    let other_port = first_packet(&Flow::tcp(40_004, VIP, 8080));
    assert_eq!(from_pod(&datapath, &other_port), other_port);
}

#[test]
fn packets_with_ip_options_are_translated() {
    let datapath = datapath_with(&[
        (frontend(VIP, 80, Protocol::Tcp), two_backends()),
        (frontend(VIP, 53, Protocol::Udp), two_backends()),
    ]);
    // Record route (7, 11 bytes, pointer 4) padded with end-of-options: 12 bytes of options.
    let options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for flow in [Flow::tcp(40_000, VIP, 80), Flow::udp(40_000, VIP, 53)] {
        let packet = with_ip_options(&first_packet(&flow), &options);
        assert_checksums_valid(&packet);
        let out = from_pod(&datapath, &packet);
        let backend = dnat_target(&flow, &out);
        assert!(
            two_backends().contains(&backend),
            "{flow:?} went to {backend}"
        );
        assert_eq!(
            out[L4_OFF..L4_OFF + options.len()],
            options,
            "options untouched"
        );

        let reply = with_ip_options(&next_packet(&flow.reply_from(backend)), &options);
        let out = to_pod(&datapath, &reply);
        assert_eq!(
            (tuple_of(&out).src, tuple_of(&out).sport),
            (VIP, flow.dport)
        );
    }
}

#[test]
fn traffic_that_is_not_for_a_service_passes_byte_identical() {
    let datapath = datapath_with(&[(frontend(VIP, 80, Protocol::Tcp), two_backends())]);

    let tcp_elsewhere = tcp_packet(
        &Flow::tcp(40_000, Ipv4Addr::new(10, 244, 9, 9), 80),
        TCP_SYN,
    );
    let udp_elsewhere = udp_packet(&Flow::udp(40_000, Ipv4Addr::new(10, 244, 9, 9), 80), true);

    let mut arp = ethernet(0x0806);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    arp.extend_from_slice(&CLIENT.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP.octets());

    let mut ipv6 = ethernet(0x86dd);
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64]);
    ipv6.extend_from_slice(&[0xfd; 16]); // src
    ipv6.extend_from_slice(&[0xfe; 16]); // dst
    let mut tcp6 = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, TCP_SYN];
    tcp6.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    ipv6.extend_from_slice(&tcp6);

    // ICMP echo request to the VIP itself.
    let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(PAYLOAD);
    let csum = internet_checksum(&echo);
    echo[2..4].copy_from_slice(&csum.to_be_bytes());
    let icmp = ipv4_packet(CLIENT, VIP, 1, echo, None);

    // Shorter than the headers the programs read.
    let truncated = tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_SYN)[..L4_OFF + 10].to_vec();
    // (BPF_PROG_RUN itself refuses an IPv4 frame shorter than an IPv4 header.)
    let mut not_ipv4 = tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_SYN);
    not_ipv4[ETH_HLEN] = 0x65; // version 6 behind the IPv4 ethertype

    for (name, packet) in [
        ("TCP to a non-service address", &tcp_elsewhere),
        ("UDP to a non-service address", &udp_elsewhere),
        ("ARP", &arp),
        ("IPv6", &ipv6),
        ("ICMP to the VIP", &icmp),
        ("truncated TCP to the VIP", &truncated),
        ("IPv4 ethertype, other IP version", &not_ipv4),
    ] {
        for (program, which) in [
            (datapath.from_pod(), "from_pod"),
            (datapath.to_pod(), "to_pod"),
        ] {
            let (verdict, out) = run(program, packet);
            assert_eq!(verdict, TC_ACT_OK, "{which} verdict for {name}");
            assert_eq!(&out, packet, "{which} changed {name}");
        }
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());
}

#[test]
fn a_removed_service_no_longer_translates_new_flows() {
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let mut datapath = datapath_with(&[(svc, two_backends())]);
    let established = Flow::tcp(40_000, VIP, 80);
    let backend = dnat_target(
        &established,
        &from_pod(&datapath, &tcp_packet(&established, TCP_SYN)),
    );

    let stats = datapath.sync(&desired(&[])).unwrap();
    assert_eq!((stats.removed, stats.map_writes), (1, 3), "{stats:?}");
    assert!(datapath.programmed_services().is_empty());

    for sport in [40_001, 40_002, 40_003] {
        let syn = tcp_packet(&Flow::tcp(sport, VIP, 80), TCP_SYN);
        assert_eq!(from_pod(&datapath, &syn), syn, "new flow after removal");
    }
    // A new connection reusing the established flow's tuple is not translated either ...
    let syn = tcp_packet(&established, TCP_SYN);
    assert_eq!(from_pod(&datapath, &syn), syn);
    // ... while, like with netfilter, packets of an established connection keep their backend
    // until their conntrack entry is purged.
    let ack = from_pod(
        &datapath,
        &tcp_packet(&Flow::tcp(40_000, VIP, 80), TCP_PSH_ACK),
    );
    assert_eq!(dnat_target(&established, &ack), backend);
    let purged = datapath.purge_conntrack(|_, _| true).unwrap();
    assert_eq!(purged, 2);
    let ack = tcp_packet(&established, TCP_PSH_ACK);
    assert_eq!(from_pod(&datapath, &ack), ack);
}

#[test]
fn resyncing_the_kernel_maps_writes_only_differences() {
    let services: Vec<(Frontend, Vec<BackendAddr>)> = (0..200u16)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8);
            let b = backends(&[([10, 244, 1, (i % 250) as u8], 8080), ([10, 244, 2, 1], 80)]);
            (frontend(ip, 80, Protocol::Tcp), b)
        })
        .collect();
    let mut datapath = load_private();
    let first = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((first.added, first.map_writes), (200, 600));
    let again = datapath.sync(&desired(&services)).unwrap();
    assert_eq!((again.unchanged, again.map_writes), (200, 0), "{again:?}");

    // One backend replaced in one service: one slot rewritten, and the new backend is used.
    let mut changed = services.clone();
    changed[7].1 = backends(&[([10, 244, 1, 7], 8080), ([10, 244, 3, 3], 80)]);
    let stats = datapath.sync(&desired(&changed)).unwrap();
    assert_eq!((stats.updated, stats.map_writes), (1, 1), "{stats:?}");
    let programmed = datapath.programmed_services();
    let seven = programmed
        .iter()
        .find(|s| s.frontend == Some(changed[7].0))
        .unwrap();
    assert_eq!(
        seven.backends.iter().copied().collect::<BTreeSet<_>>(),
        changed[7].1.iter().copied().collect()
    );
}

// ---------------------------------------------------------------------------------------------
// kube-proxy's behaviours. Most of these run the programs inside a network namespace that
// stands in for a node ([`FibNode`]), so the FIB lookups of the packets the programs redirect
// see known routes.

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// Pods on this node (behind `pod0`) and on the other node.
const LOCAL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
/// A client outside the cluster.
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NODE_PORT: u16 = 30_080;
const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Runs `program` on an IPv6 `packet`, expects `verdict` and valid checksums (recomputed from
/// scratch), returns the packet as the program left it.
fn expect6(
    program: &aya::programs::SchedClassifier,
    packet: &[u8],
    ifindex: Option<u32>,
    verdict: u32,
) -> Vec<u8> {
    let ran = run_at(program, packet, ifindex);
    assert_eq!(
        ran.return_value, verdict,
        "verdict (reason {:?})",
        ran.reason
    );
    packet::verify_checksums6(&ran.packet).unwrap_or_else(|e| panic!("{e}: {:02x?}", ran.packet));
    ran.packet
}

/// An IPv6 frontend without endpoints answers a TCP SYN with RST|ACK and UDP with an ICMPv6
/// port unreachable quoting the packet, from the frontend, bounced back out the interface; the
/// answers equal the packets built from scratch. A Local policy's frontend drops instead.
#[test]
fn an_ipv6_frontend_without_endpoints_rejects_with_a_reset_or_port_unreachable() {
    use packet::{icmp6_packet, ipv6_packet, tcp6_packet, udp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let frontend6 = |port, proto| Frontend {
        ip: vip6.into(),
        port,
        proto,
    };
    let mut dropping = entry(FrontendKind::NodePort, &[], &[]);
    dropping.when_empty = WhenEmpty::Drop;
    let node_ip6: Ipv6Addr = "fc00:f853:ccd:e793::3".parse().unwrap();
    let services = vec![
        (
            frontend6(80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
        (
            frontend6(53, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
        (
            Frontend {
                ip: node_ip6.into(),
                port: NODE_PORT,
                proto: Protocol::Tcp,
            },
            dropping,
        ),
    ];
    let datapath = node_datapath(services, &node_context(false));

    let syn_flow = Flow6 {
        proto: PROTO_TCP,
        src: client6,
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let syn = tcp6_packet(&syn_flow, TCP_SYN, b"data");
    let ran = run_at(datapath.from_pod(), &syn, None);
    assert_eq!(ran.return_value, TC_ACT_REDIRECT);
    assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
    assert_bounced(&syn, &ran.packet);
    packet::verify_checksums6(&ran.packet).unwrap();
    // RST|ACK, seq 0, ack = the SYN's seq + 1 (SYN) + 4 (payload), window 0.
    let mut rst = Vec::new();
    rst.extend_from_slice(&80u16.to_be_bytes());
    rst.extend_from_slice(&40_000u16.to_be_bytes());
    rst.extend_from_slice(&0u32.to_be_bytes());
    rst.extend_from_slice(&(0x0102_0304u32 + 5).to_be_bytes());
    rst.extend_from_slice(&[5 << 4, TCP_RST | TCP_ACK, 0, 0, 0, 0, 0, 0]);
    let expected = ipv6_packet(vip6, client6, PROTO_TCP, rst, Some(16));
    assert_eq!(ran.packet[ETH_HLEN..], expected[ETH_HLEN..], "the RST");

    let udp_flow = Flow6 {
        proto: PROTO_UDP,
        dport: 53,
        ..syn_flow
    };
    let datagram = udp6_packet(&udp_flow, PAYLOAD);
    let ran = run_at(datapath.from_pod(), &datagram, None);
    assert_eq!(ran.return_value, TC_ACT_REDIRECT);
    assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
    assert_bounced(&datagram, &ran.packet);
    packet::verify_checksums6(&ran.packet).unwrap();
    let mut body = vec![0; 4]; // unused
    body.extend_from_slice(&datagram[ETH_HLEN..ETH_HLEN + 48]);
    let expected = icmp6_packet(vip6, client6, 1, 4, &body);
    assert_eq!(
        ran.packet[ETH_HLEN..],
        expected[ETH_HLEN..],
        "the port unreachable"
    );

    // externalTrafficPolicy Local without local endpoints: dropped.
    let to_node_port = tcp6_packet(
        &Flow6 {
            dst: node_ip6,
            dport: NODE_PORT,
            ..syn_flow
        },
        TCP_SYN,
        &[],
    );
    let ran = run_at(datapath.from_world(), &to_node_port, None);
    assert_eq!(
        (ran.return_value, ran.reason),
        (TC_ACT_SHOT, Some(REASON_DROP_NO_LOCAL_ENDPOINTS))
    );
    assert!(datapath.conntrack6_entries().unwrap().is_empty());
}

/// A removed IPv6 backend loses its UDP flows at once (their next packet is balanced over the
/// live backends); its TCP flows drain.
#[test]
fn removed_ipv6_backends_lose_their_udp_flows_at_once() {
    use packet::{tcp6_packet, udp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let a = be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080);
    let b = be("fd00:10:244::8".parse::<Ipv6Addr>().unwrap(), 8080);
    let services = |backends: &[BackendAddr]| {
        [Protocol::Udp, Protocol::Tcp]
            .map(|proto| {
                (
                    Frontend {
                        ip: vip6.into(),
                        port: 80,
                        proto,
                    },
                    entry(FrontendKind::ClusterIp, backends, backends),
                )
            })
            .to_vec()
    };
    let mut datapath = node_datapath(services(&[a]), &node_context(false));
    let flow = Flow6 {
        proto: PROTO_UDP,
        src: "fd00:10:244::5".parse().unwrap(),
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let tcp = Flow6 {
        proto: PROTO_TCP,
        ..flow
    };
    let out = expect6(
        datapath.from_pod(),
        &udp6_packet(&flow, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    assert_eq!(be(ipv6_dst(&out).0, ipv6_dst(&out).1), a);
    expect6(
        datapath.from_pod(),
        &tcp6_packet(&tcp, TCP_SYN, &[]),
        None,
        TC_ACT_OK,
    );
    assert_eq!(datapath.conntrack6_entries().unwrap().len(), 4);

    let stats = resync(&mut datapath, services(&[b]));
    assert_eq!(stats.purged, 2, "{stats:?}");
    let left = datapath.conntrack6_entries().unwrap();
    assert!(left.iter().all(|(k, _)| k.proto == PROTO_TCP), "{left:?}");
    let out = expect6(
        datapath.from_pod(),
        &udp6_packet(&flow, PAYLOAD),
        None,
        TC_ACT_OK,
    );
    assert_eq!(be(ipv6_dst(&out).0, ipv6_dst(&out).1), b);
}

/// A pod reaching itself through an IPv6 ClusterIP: source-NATed to the IPv6 service
/// loopback address and sent back out its interface; its reply is reverse-translated and sent
/// back too. Both packets equal the ones built from scratch with the new tuples.
#[test]
fn ipv6_hairpin_is_masqueraded_to_the_service_loopback_and_sent_back() {
    use packet::{tcp6_packet, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let pod: Ipv6Addr = "fd00:10:244::7".parse().unwrap();
    let loopback = Ipv6Addr::from(sluice_common::HAIRPIN6_SNAT_ADDR);
    assert_eq!(loopback, "fd00:a9fe:2a01::1".parse::<Ipv6Addr>().unwrap());
    let backend = be(pod, 8080);
    let datapath = node_datapath(
        vec![(
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &[backend], &[backend]),
        )],
        &node_context(false),
    );
    let flow = Flow6 {
        proto: PROTO_TCP,
        src: pod,
        sport: 40_000,
        dst: vip6,
        dport: 80,
    };
    let syn = tcp6_packet(&flow, TCP_SYN, &[]);
    let out = expect6(datapath.from_pod(), &syn, None, TC_ACT_REDIRECT);
    assert_bounced(&syn, &out);
    let hairpinned = Flow6 {
        proto: PROTO_TCP,
        src: loopback,
        sport: 40_000, // free: kept
        dst: pod,
        dport: 8080,
    };
    assert_eq!(
        out[ETH_HLEN..],
        tcp6_packet(&hairpinned, TCP_SYN, &[])[ETH_HLEN..]
    );

    let answer = tcp6_packet(&hairpinned.reversed(), TCP_SYN | TCP_ACK, &[]);
    let out = expect6(datapath.from_pod(), &answer, None, TC_ACT_REDIRECT);
    assert_bounced(&answer, &out);
    assert_eq!(
        out[ETH_HLEN..],
        tcp6_packet(&flow.reversed(), TCP_SYN | TCP_ACK, &[])[ETH_HLEN..]
    );
}

/// The (destination, destination port) of an Ethernet + IPv6 + TCP/UDP packet.
fn ipv6_dst(packet: &[u8]) -> (std::net::Ipv6Addr, u16) {
    let ip = ETH_HLEN;
    let dst: [u8; 16] = packet[ip + 24..ip + 40].try_into().unwrap();
    let l4 = ip + 40;
    (
        dst.into(),
        u16::from_be_bytes([packet[l4 + 2], packet[l4 + 3]]),
    )
}

/// An IPv6 ClusterIP's TCP and UDP flows from a pod: destination NAT to a backend, every later
/// packet to the same backend, replies reverse-NATed to the frontend; every rewritten packet
/// equals, byte for byte, the packet built from scratch with the new tuple (so its L4 checksum
/// is the one computed over the new pseudo header), and its checksum verifies independently.
#[test]
fn ipv6_cluster_ip_flows_are_dnated_and_reverse_natted_with_valid_checksums() {
    use packet::{tcp6_packet, udp6_packet, verify_checksums6, Flow6};
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let backends6 = [
        be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080),
        be("fd00:10:244:1::9".parse::<Ipv6Addr>().unwrap(), 8080),
    ];
    let mut services = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        services.push((
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto,
            },
            entry(FrontendKind::ClusterIp, &backends6, &backends6[..1]),
        ));
    }
    let mut node = node_context(false);
    node.node_ips.push("fc00:f853:ccd:e793::3".parse().unwrap());
    let mut datapath = load_private();
    assert!(datapath.set_node_config(&node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert_eq!(
        (stats.ipv6_programmed, stats.skipped_ipv6),
        (2, 0),
        "{stats:?}"
    );
    let programmed = datapath.programmed_services6();
    assert_eq!(programmed.len(), 2);
    assert_eq!(programmed[0].4.len(), 2);

    let mut seen = BTreeSet::new();
    for (i, proto) in [PROTO_TCP, PROTO_UDP].into_iter().enumerate() {
        for sport in 0..16u16 {
            let flow = Flow6 {
                proto,
                src: client6,
                sport: 40_000 + sport + 100 * i as u16,
                dst: vip6,
                dport: 80,
            };
            let build = |flow: &Flow6, answer: bool| {
                if proto == PROTO_TCP {
                    let flags = if answer { TCP_SYN | TCP_ACK } else { TCP_SYN };
                    tcp6_packet(flow, flags, &[])
                } else {
                    udp6_packet(flow, PAYLOAD)
                }
            };
            let first = build(&flow, false);
            let out = expect6(datapath.from_pod(), &first, None, TC_ACT_OK);
            verify_checksums6(&out).unwrap();
            let (dst, dport) = ipv6_dst(&out);
            let backend = be(dst, dport);
            assert!(backends6.contains(&backend), "DNAT to {backend}");
            seen.insert(backend);
            let dnated = Flow6 { dst, dport, ..flow };
            assert_eq!(out, build(&dnated, false), "the DNATed packet of {flow}");

            // The next packet of the flow goes to the same backend.
            let next = if proto == PROTO_TCP {
                tcp6_packet(&flow, TCP_PSH_ACK, PAYLOAD)
            } else {
                udp6_packet(&flow, b"again")
            };
            let out = expect6(datapath.from_pod(), &next, None, TC_ACT_OK);
            assert_eq!(ipv6_dst(&out), (dst, dport), "{flow} changed backend");
            verify_checksums6(&out).unwrap();

            // The backend's answer leaves towards the client from the frontend.
            let reply = build(&dnated.reversed(), true);
            let out = expect6(datapath.to_pod(), &reply, None, TC_ACT_OK);
            verify_checksums6(&out).unwrap();
            assert_eq!(out, build(&flow.reversed(), true), "the reply of {flow}");
        }
    }
    assert_eq!(seen.len(), 2, "both backends are used: {seen:?}");
    assert_eq!(datapath.conntrack6_entries().unwrap().len(), 2 * 32);
    assert!(datapath.conntrack_entries().unwrap().is_empty());

    // A ClusterIP from outside the node would need masquerade: not translated.
    let from_outside = tcp6_packet(
        &Flow6 {
            proto: PROTO_TCP,
            src: "2001:db8::1".parse().unwrap(),
            sport: 50_000,
            dst: vip6,
            dport: 80,
        },
        TCP_SYN,
        &[],
    );
    let out = expect6(datapath.from_world(), &from_outside, None, TC_ACT_OK);
    assert_eq!(out, from_outside);

    // Removing the frontends empties the IPv6 maps' programming.
    let stats = resync(&mut datapath, vec![]);
    assert_eq!(stats.ipv6_programmed, 0);
    assert!(datapath.programmed_services6().is_empty());
    let out = expect6(
        datapath.from_pod(),
        &tcp6_packet(
            &Flow6 {
                proto: PROTO_TCP,
                src: client6,
                sport: 45_000,
                dst: vip6,
                dport: 80,
            },
            TCP_SYN,
            &[],
        ),
        None,
        TC_ACT_OK,
    );
    assert_eq!(ipv6_dst(&out), (vip6, 80));
}

// ---------------------------------------------------------------------------------------------
// IPv6

/// Neighbour discovery, router solicitations, ICMPv6, fragments and packets with extension
/// headers pass every program byte-identical on a dual-stack node, as does TCP/UDP to IPv6
/// addresses that are no frontend; the IPv4 frontend of the same dual-stack service is still
/// translated.
#[test]
fn ipv6_control_traffic_fragments_and_extension_headers_pass_every_program_untouched() {
    use packet::{
        icmp6_packet, neighbor_solicitation, tcp6_packet, udp6_packet, verify_checksums6,
        with_ipv6_extension, Flow6, ICMPV6_ECHO_REQUEST, ICMPV6_NEIGHBOR_ADVERTISEMENT,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_ROUTER_ADVERTISEMENT, ICMPV6_ROUTER_SOLICITATION,
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
    };
    use std::net::Ipv6Addr;

    let vip6: Ipv6Addr = "fd00:10:96::10".parse().unwrap();
    let client6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
    let backend4 = be(LOCAL_POD, 8080);
    let backend6 = be("fd00:10:244::7".parse::<Ipv6Addr>().unwrap(), 8080);
    let mut node = node_context(false);
    node.node_ips.push("fc00:f853:ccd:e793::3".parse().unwrap());
    node.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
    let services = vec![
        (
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[backend4], &[backend4]),
        ),
        (
            Frontend {
                ip: vip6.into(),
                port: 80,
                proto: Protocol::Tcp,
            },
            entry(FrontendKind::ClusterIp, &[backend6], &[backend6]),
        ),
        (
            Frontend {
                ip: vip6.into(),
                port: 53,
                proto: Protocol::Udp,
            },
            entry(FrontendKind::ClusterIp, &[], &[]),
        ),
    ];
    let mut datapath = load_private();
    assert!(datapath.set_node_config(&node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    assert_eq!(
        (stats.added, stats.ipv6_programmed, stats.skipped_ipv6),
        (1, 2, 0),
        "{stats:?}"
    );

    let tcp = Flow6 {
        proto: PROTO_TCP,
        src: client6,
        sport: 40_000,
        dst: "fd00:10:244:9::9".parse().unwrap(),
        dport: 80,
    };
    let udp = Flow6 {
        proto: PROTO_UDP,
        ..tcp
    };
    let to_vip = Flow6 { dst: vip6, ..tcp };
    let udp_to_vip = Flow6 {
        dport: 53,
        ..Flow6 { dst: vip6, ..udp }
    };
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
    let mut quoted = tcp6_packet(&tcp.reversed(), TCP_SYN | TCP_ACK, &[])[ETH_HLEN..].to_vec();
    quoted.truncate(48);
    let mut too_big = 1280u32.to_be_bytes().to_vec();
    too_big.extend_from_slice(&quoted);

    let packets: Vec<(&str, Vec<u8>)> = vec![
        (
            "neighbour solicitation for the VIP",
            neighbor_solicitation(client6, vip6),
        ),
        (
            "neighbour advertisement",
            icmp6_packet(
                vip6,
                client6,
                ICMPV6_NEIGHBOR_ADVERTISEMENT,
                0,
                &[0x60, 0, 0, 0],
            ),
        ),
        (
            "router solicitation",
            icmp6_packet(
                link_local,
                all_routers,
                ICMPV6_ROUTER_SOLICITATION,
                0,
                &[0; 4],
            ),
        ),
        (
            "router advertisement",
            icmp6_packet(
                link_local,
                client6,
                ICMPV6_ROUTER_ADVERTISEMENT,
                0,
                &[64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        (
            "echo request to the VIP",
            icmp6_packet(client6, vip6, ICMPV6_ECHO_REQUEST, 0, &[0, 1, 0, 1]),
        ),
        (
            "packet too big about a non-translated flow",
            icmp6_packet(link_local, client6, ICMPV6_PACKET_TOO_BIG, 0, &too_big),
        ),
        (
            "TCP SYN to a non-service address",
            tcp6_packet(&tcp, TCP_SYN, &[]),
        ),
        ("UDP to a non-service address", udp6_packet(&udp, PAYLOAD)),
        (
            "first fragment of a UDP datagram to the VIP",
            with_ipv6_extension(&udp6_packet(&udp_to_vip, PAYLOAD), IPV6_FRAGMENT, (0, true)),
        ),
        (
            "non-first fragment to the VIP",
            with_ipv6_extension(
                &udp6_packet(&udp_to_vip, PAYLOAD),
                IPV6_FRAGMENT,
                (2, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind a routing header",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_ROUTING,
                (0, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind hop-by-hop options",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_HOP_BY_HOP,
                (0, false),
            ),
        ),
        (
            "TCP SYN to the VIP behind destination options",
            with_ipv6_extension(
                &tcp6_packet(&to_vip, TCP_SYN, &[]),
                IPV6_DEST_OPTS,
                (0, false),
            ),
        ),
    ];
    for (name, packet) in &packets {
        verify_checksums6(packet).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (program, which) in [
            (datapath.from_pod(), "from_pod"),
            (datapath.from_world(), "from_world"),
            (datapath.to_pod(), "to_pod"),
            (datapath.to_world(), "to_world"),
        ] {
            let ran = run_at(program, packet, None);
            assert_eq!(
                (ran.return_value, ran.reason),
                (TC_ACT_OK, None),
                "{which} verdict for {name}"
            );
            assert_eq!(&ran.packet, packet, "{which} changed {name}");
        }
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());

    // The IPv4 frontend of the dual-stack service is translated as before.
    let flow = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
    let out = expect(datapath.from_pod(), &first_packet(&flow), None, TC_ACT_OK);
    assert_eq!(dnat_target(&flow, &out), backend4);
}

/// A network namespace standing in for a node: `ext0` carries the node IP (172.18.0.3/16,
/// default route via 172.18.0.1; the other node 172.18.0.4 routes 10.244.1.0/24), `pod0` leads
/// to this node's pods (10.244.0.0/24). Forwarding is on and the neighbours are static, so
/// `bpf_fib_lookup` succeeds for every destination the tests use.
struct FibNode {
    netns: TestNetns,
}

/// The interfaces of a [`FibNode`], as seen inside it.
#[derive(Clone, Copy)]
struct Ifaces {
    ext: u32,
    pod: u32,
}

impl FibNode {
    fn new() -> FibNode {
        let netns = TestNetns::with_veth("ext0", "ext0-peer");
        netns.ip(&[
            "link",
            "add",
            "pod0",
            "type",
            "veth",
            "peer",
            "name",
            "pod0-peer",
        ]);
        for dev in ["lo", "ext0", "ext0-peer", "pod0", "pod0-peer"] {
            netns.ip(&["link", "set", "dev", dev, "up"]);
        }
        netns.ip(&["addr", "add", "172.18.0.3/16", "dev", "ext0"]);
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "172.18.0.1",
            "dev",
            "ext0",
        ]);
        netns.ip(&["route", "add", "10.244.0.0/24", "dev", "pod0"]);
        netns.ip(&[
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "172.18.0.4",
            "dev",
            "ext0",
        ]);
        for (ip, mac, dev) in [
            ("172.18.0.1", "02:00:00:00:01:01", "ext0"),
            ("172.18.0.4", "02:00:00:00:01:04", "ext0"),
            ("10.244.0.5", "02:00:00:00:02:05", "pod0"),
            ("10.244.0.7", "02:00:00:00:02:07", "pod0"),
        ] {
            netns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        netns.run(|| {
            // A thread in the namespace sees the namespace's sysctls.
            fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enabling forwarding");
        });
        FibNode { netns }
    }

    /// Runs `f` inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce(Ifaces) -> T + Send) -> T {
        self.netns.run(|| {
            f(Ifaces {
                ext: ifindex("ext0"),
                pod: ifindex("pod0"),
            })
        })
    }
}

/// Runs `program` on `packet` as received on `ifindex` (None: loopback).
fn run_at(
    program: &aya::programs::SchedClassifier,
    packet: &[u8],
    ifindex: Option<u32>,
) -> ProgramRun {
    datapath::run_program(program, packet, ifindex)
        .unwrap_or_else(|e| panic!("BPF_PROG_RUN failed on {packet:02x?}: {e:#}"))
}

/// Runs `program` and checks the verdict and the checksums of what it left.
fn expect(
    program: &aya::programs::SchedClassifier,
    packet: &[u8],
    ifindex: Option<u32>,
    verdict: u32,
) -> Vec<u8> {
    let ran = run_at(program, packet, ifindex);
    assert_eq!(
        ran.return_value,
        verdict,
        "verdict for {} (reason {:?})",
        packet::decode(packet)
            .map(|d| d.to_string())
            .unwrap_or_default(),
        ran.reason
    );
    if verdict != TC_ACT_SHOT {
        assert_checksums_valid(&ran.packet);
    }
    ran.packet
}

fn decoded(packet: &[u8]) -> Decoded {
    packet::decode(packet).unwrap_or_else(|e| panic!("{e}: {packet:02x?}"))
}

/// The answer went back the way the packet came: MAC addresses swapped.
fn assert_bounced(input: &[u8], output: &[u8]) {
    assert_eq!(output[..6], input[6..12], "destination MAC");
    assert_eq!(output[6..12], input[..6], "source MAC");
}

/// An ICMP error from `src` to `dst` quoting the first `quote` bytes (IP header included) of
/// the IP packet in `about`; `rest` is the second word of the ICMP header (the MTU of a
/// fragmentation needed).
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (icmp_type, code): (u8, u8),
    rest: u32,
    about: &[u8],
    quote: usize,
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&about[ETH_HLEN..ETH_HLEN + quote]);
    let csum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    ipv4_packet(src, dst, PROTO_ICMP, icmp, None)
}

const PORT_UNREACHABLE: (u8, u8) = (3, 3);
const FRAG_NEEDED: (u8, u8) = (3, 4);

/// The outer addresses of an ICMP error and the flow it quotes; checks the quoted IP header's
/// checksum.
fn icmp_about(packet: &[u8]) -> (Ipv4Addr, Ipv4Addr, Flow) {
    let decoded = decoded(packet);
    let L4::Icmp {
        quoted: Some(quoted),
        ..
    } = decoded.l4
    else {
        panic!("not an ICMP error: {decoded}");
    };
    let inner = ETH_HLEN + IPV4_HLEN + 8;
    let inner_ihl = usize::from(packet[inner] & 0x0f) * 4;
    assert_eq!(
        internet_checksum(&packet[inner..inner + inner_ihl]),
        0,
        "the quoted IP header's checksum"
    );
    (decoded.src, decoded.dst, quoted)
}

fn be(ip: impl Into<std::net::IpAddr>, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip.into(),
        port,
    }
}

/// The IPv4 address of a backend of these (IPv4) tests.
fn v4(ip: std::net::IpAddr) -> Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => panic!("IPv6 backend {v6} in an IPv4 test"),
    }
}

/// A frontend's entry: `kind`, balancing over `backends`, of which `local` run on this node.
fn entry(kind: FrontendKind, backends: &[BackendAddr], local: &[BackendAddr]) -> ServiceEntry {
    let mut backends = backends.to_vec();
    backends.sort();
    ServiceEntry {
        name: format!("default/svc-{kind}"),
        kind,
        backends,
        local_backends: local.iter().copied().collect(),
        cluster_backends: None,
        when_empty: WhenEmpty::Reject,
        external_local: false,
        affinity_timeout: None,
        source_ranges: Vec::new(),
    }
}

/// The node context of the tests: this node's IP, the cluster CIDR 10.244.0.0/16.
fn node_context(masquerade_all: bool) -> NodeContext {
    NodeContext {
        name: Some("node-a".into()),
        node_ips: vec![NODE_IP.into()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all,
        ..Default::default()
    }
}

/// A private datapath programmed with `services` for the node `node`.
fn node_datapath(services: Vec<(Frontend, ServiceEntry)>, node: &NodeContext) -> Datapath {
    let mut datapath = load_private();
    assert!(datapath.set_node_config(node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    datapath
}

fn resync(
    datapath: &mut Datapath,
    services: Vec<(Frontend, ServiceEntry)>,
) -> sluice::datapath::SyncStats {
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    stats
}

fn flow(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Flow {
    Flow {
        proto,
        src,
        sport,
        dst,
        dport,
    }
}

#[test]
fn nodeport_from_outside_to_a_local_backend_keeps_the_client_address() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(
                nodeport,
                entry(FrontendKind::NodePort, &[backend], &[backend]),
            )],
            &node_context(false),
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);

        // Entering from outside, the flow skips the host's routing: redirected to the pod.
        let syn = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&syn),
            flow(PROTO_TCP, OUTSIDER, 40_000, LOCAL_POD, 8080)
        );
        let ack = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&ack).dst, LOCAL_POD);

        // The pod's answer enters at its veth and leaves from the NodePort: a local source,
        // which the stack would drop as martian, so it is redirected too.
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        let out = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&out), client.reversed());
        // Already translated: the external interface's egress leaves it alone.
        assert_eq!(
            expect(datapath.to_world(), &out, Some(ifs.ext), TC_ACT_OK),
            out
        );

        let entries = datapath.conntrack_entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries
            .iter()
            .all(|(_, v)| v.flags & CT_F_REDIRECT != 0 && v.flags & CT_F_SNAT == 0));
    });
}

#[test]
fn nodeport_from_outside_to_a_remote_backend_is_masqueraded_and_its_reply_restored() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let tcp = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let udp = frontend(NODE_IP, NODE_PORT, Protocol::Udp);
        let datapath = node_datapath(
            vec![
                (tcp, entry(FrontendKind::NodePort, &[backend], &[])),
                (udp, entry(FrontendKind::NodePort, &[backend], &[])),
            ],
            &node_context(false),
        );

        // externalTrafficPolicy Cluster, backend on another node: the source becomes the node
        // (keeping the client's port when it is free), so the answer comes back here.
        let first = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&first, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, NODE_IP, 40_000, REMOTE_POD, 8080)
        );

        // Another client with the same port to the same backend: the node's port 40000 is
        // taken, the flow gets another one.
        let second = flow(
            PROTO_TCP,
            Ipv4Addr::new(192, 0, 2, 11),
            40_000,
            NODE_IP,
            NODE_PORT,
        );
        let out2 = expect(
            datapath.from_world(),
            &tcp_packet(&second, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        let masqueraded = tuple_of(&out2);
        assert_eq!((masqueraded.src, masqueraded.dst), (NODE_IP, REMOTE_POD));
        assert!(
            (61_000..=65_535).contains(&masqueraded.sport),
            "{masqueraded}"
        );

        // The backend's answers come back through the external interface and reach each
        // client from the NodePort.
        for (client, sent) in [(first, out), (second, out2)] {
            let answer = tcp_packet(&tuple_of(&sent).reversed(), TCP_SYN | TCP_ACK);
            let back = expect(
                datapath.from_world(),
                &answer,
                Some(ifs.ext),
                TC_ACT_REDIRECT,
            );
            assert_eq!(tuple_of(&back), client.reversed());
        }
        // Later packets keep their translation.
        let ack = expect(
            datapath.from_world(),
            &tcp_packet(&second, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&ack), masqueraded);

        // UDP without a checksum keeps none through both translations.
        let client = flow(PROTO_UDP, OUTSIDER, 50_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &udp_packet(&client, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_UDP, NODE_IP, 50_000, REMOTE_POD, 8080)
        );
        assert_eq!(l4_checksum_field(&out), 0);
        let back = expect(
            datapath.from_world(),
            &udp_packet(&tuple_of(&out).reversed(), false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), client.reversed());
        assert_eq!(l4_checksum_field(&back), 0);

        let entries = datapath.conntrack_entries().unwrap();
        assert_eq!(entries.len(), 6);
        assert!(entries.iter().all(|(_, v)| v.flags & CT_F_SNAT != 0));
    });
}

#[test]
fn external_and_load_balancer_ips_are_translated_from_outside_and_from_pods() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let external_ip = frontend(Ipv4Addr::new(203, 0, 113, 50), 80, Protocol::Tcp);
        let lb_ip = frontend(Ipv4Addr::new(198, 51, 100, 7), 443, Protocol::Tcp);
        let datapath = node_datapath(
            vec![
                (
                    external_ip,
                    entry(FrontendKind::ExternalIp, &[backend], &[backend]),
                ),
                (
                    lb_ip,
                    entry(FrontendKind::LoadBalancer, &[backend], &[backend]),
                ),
            ],
            &node_context(false),
        );
        for f in [external_ip, lb_ip] {
            // From outside: DNAT, redirected to the pod, the client's address kept.
            let outside = flow(PROTO_TCP, OUTSIDER, 40_001, v4(f.ip), f.port);
            let out = expect(
                datapath.from_world(),
                &tcp_packet(&outside, TCP_SYN),
                Some(ifs.ext),
                TC_ACT_REDIRECT,
            );
            assert_eq!(dnat_target(&outside, &out), backend);

            // From a pod of the cluster: DNAT through the host's routing, no masquerade; the
            // answer is restored on the way to the client pod.
            let inside = flow(PROTO_TCP, LOCAL_CLIENT, 40_002, v4(f.ip), f.port);
            let out = expect(
                datapath.from_pod(),
                &tcp_packet(&inside, TCP_SYN),
                Some(ifs.pod),
                TC_ACT_OK,
            );
            assert_eq!(dnat_target(&inside, &out), backend);
            let answer = tcp_packet(&inside.reply_from(backend), TCP_SYN | TCP_ACK);
            // Its flow went through the stack: the backend's veth leaves the answer alone ...
            assert_eq!(
                expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_OK),
                answer
            );
            // ... and the client's veth restores the frontend.
            let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
            assert_eq!(tuple_of(&back), inside.reversed());
        }
    });
}

#[test]
fn a_pod_reaches_a_nodeport_of_its_node() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(nodeport, entry(FrontendKind::NodePort, &[backend], &[]))],
            &node_context(false),
        );
        // A pod's address routes back to it: no masquerade, even for a backend elsewhere.
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, LOCAL_CLIENT, 40_000, REMOTE_POD, 8080)
        );
        // The answer arrives from the other node untouched by from_world, and leaves the
        // client's veth from the NodePort.
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        assert_eq!(
            expect(datapath.from_world(), &answer, Some(ifs.ext), TC_ACT_OK),
            answer
        );
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());
    });
}

#[test]
fn external_traffic_policy_local_never_masquerades_and_drops_without_local_endpoints() {
    let node = FibNode::new();
    node.run(|ifs| {
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let empty = frontend(NODE_IP, NODE_PORT + 1, Protocol::Tcp);
        let mut local = entry(
            FrontendKind::NodePort,
            &[be(LOCAL_POD, 8080)],
            &[be(LOCAL_POD, 8080)],
        );
        local.external_local = true;
        // The translation gives a Local frontend this node's endpoints only; even a backend
        // not marked local is not masqueraded (the client's address is the policy's point).
        let mut odd = entry(FrontendKind::NodePort, &[be(REMOTE_POD, 8080)], &[]);
        odd.external_local = true;
        let mut none = entry(FrontendKind::NodePort, &[], &[]);
        none.external_local = true;
        none.when_empty = WhenEmpty::Drop;
        let mut datapath = node_datapath(
            vec![(nodeport, local), (empty, none)],
            &node_context(true), // not even masqueradeAll masquerades it
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, OUTSIDER, 40_000, LOCAL_POD, 8080)
        );

        resync(&mut datapath, vec![(nodeport, odd)]);
        let client = flow(PROTO_TCP, OUTSIDER, 40_001, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);

        // No local endpoint: dropped silently, and counted.
        let mut none = entry(FrontendKind::NodePort, &[], &[]);
        none.external_local = true;
        none.when_empty = WhenEmpty::Drop;
        resync(&mut datapath, vec![(empty, none)]);
        let client = flow(PROTO_TCP, OUTSIDER, 40_002, NODE_IP, NODE_PORT + 1);
        let ran = run_at(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));
        assert_eq!(
            datapath
                .drop_counts()
                .unwrap()
                .get(&REASON_DROP_NO_LOCAL_ENDPOINTS),
            Some(&1)
        );
    });
}

#[test]
fn pods_reach_an_external_traffic_policy_local_nodeport_through_every_endpoint() {
    let node = FibNode::new();
    node.run(|ifs| {
        // This node has no endpoint of the service; another node has one.
        let backend = be(REMOTE_POD, 8080);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let mut none_here = entry(FrontendKind::NodePort, &[], &[]);
        none_here.external_local = true;
        none_here.when_empty = WhenEmpty::Drop;
        none_here.cluster_backends = Some(vec![backend]);
        let mut datapath = node_datapath(vec![(nodeport, none_here.clone())], &node_context(false));

        // From a pod: the cluster-wide endpoint, the pod's address kept.
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, LOCAL_CLIENT, 40_000, REMOTE_POD, 8080)
        );
        let answer = tcp_packet(&client.reply_from(backend), TCP_SYN | TCP_ACK);
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());

        // The same packet from outside the node: no local endpoint, dropped.
        let ran = run_at(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.ext),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));

        // Resyncing the same state writes nothing; without the pods' set, pods are dropped too.
        let stats = resync(&mut datapath, vec![(nodeport, none_here.clone())]);
        assert_eq!(stats.map_writes, 0, "{stats:?}");
        let mut local_only = none_here;
        local_only.cluster_backends = None;
        resync(&mut datapath, vec![(nodeport, local_only)]);
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_001, NODE_IP, NODE_PORT);
        let ran = run_at(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
        );
        assert_eq!(ran.return_value, TC_ACT_SHOT);
        assert_eq!(ran.reason, Some(REASON_DROP_NO_LOCAL_ENDPOINTS));
    });
}

#[test]
fn cluster_ip_traffic_from_outside_the_cluster_cidr_is_masqueraded() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let services = vec![(vip, entry(FrontendKind::ClusterIp, &[backend], &[backend]))];
        let mut datapath = node_datapath(services.clone(), &node_context(false));

        // kube-proxy's `! -s clusterCIDR` rule: even to a local backend.
        let outside = flow(PROTO_TCP, OUTSIDER, 40_000, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, NODE_IP, 40_000, LOCAL_POD, 8080)
        );
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), outside.reversed());

        // A pod of another node (inside the cluster CIDR) keeps its address.
        let pod = flow(PROTO_TCP, REMOTE_POD, 40_000, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&pod, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, REMOTE_POD);

        // Without a cluster CIDR every source counts as a pod: no masquerade.
        let no_cidr = NodeContext {
            cluster_cidrs: vec![],
            ..node_context(false)
        };
        assert!(datapath.set_node_config(&no_cidr).unwrap());
        let outside = flow(PROTO_TCP, OUTSIDER, 40_001, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);

        // Without a node address nothing can be masqueraded.
        let no_ip = NodeContext {
            node_ips: vec![],
            ..node_context(false)
        };
        assert!(datapath.set_node_config(&no_ip).unwrap());
        let outside = flow(PROTO_TCP, OUTSIDER, 40_002, VIP, 80);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_SYN),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&out).src, OUTSIDER);
    });
}

#[test]
fn masquerade_all_masquerades_pod_flows_too() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(vip, entry(FrontendKind::ClusterIp, &[backend], &[backend]))],
            &node_context(true),
        );
        let client = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
        // The source becomes the node: redirected past the stack's martian check.
        let out = expect(
            datapath.from_pod(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifs.pod),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, NODE_IP, 40_000, LOCAL_POD, 8080)
        );
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), client.reversed());
    });
}

#[test]
fn hairpin_traffic_is_masqueraded_to_the_service_loopback_and_sent_back() {
    let node = FibNode::new();
    node.run(|ifs| {
        let itself = be(LOCAL_POD, 8080);
        let vip = frontend(VIP, 80, Protocol::Tcp);
        let datapath = node_datapath(
            vec![(vip, entry(FrontendKind::ClusterIp, &[itself], &[itself]))],
            &node_context(false),
        );
        // The pod reaches itself through its service: it must not see its own address as the
        // source, and the packet goes straight back out its veth.
        let client = flow(PROTO_TCP, LOCAL_POD, 40_000, VIP, 80);
        let syn = tcp_packet(&client, TCP_SYN);
        let out = expect(datapath.from_pod(), &syn, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, HAIRPIN_ADDR, 40_000, LOCAL_POD, 8080)
        );
        assert_bounced(&syn, &out);

        // Its answer to the loopback address comes back from the service.
        let answer = tcp_packet(&tuple_of(&out).reversed(), TCP_SYN | TCP_ACK);
        let back = expect(datapath.from_pod(), &answer, Some(ifs.pod), TC_ACT_REDIRECT);
        assert_eq!(tuple_of(&back), client.reversed());
        assert_bounced(&answer, &back);
    });
}

#[test]
fn a_service_without_endpoints_rejects_with_a_reset_or_port_unreachable() {
    let tcp = frontend(VIP, 80, Protocol::Tcp);
    let udp = frontend(VIP, 53, Protocol::Udp);
    let sctp = frontend(VIP, 3868, Protocol::Sctp);
    let mut datapath = datapath_with(&[(tcp, vec![]), (udp, vec![]), (sctp, vec![])]);
    let programmed = datapath.programmed_services();
    assert!(programmed.iter().all(|s| s.backend_count == 0));

    // A SYN: RST|ACK from the service, acknowledging the SYN, sent back out the interface.
    let client = Flow::tcp(40_000, VIP, 80);
    for program in [datapath.from_pod(), datapath.from_world()] {
        let syn = tcp_packet(&client, TCP_SYN);
        let ran = run_at(program, &syn, None);
        assert_eq!(ran.return_value, TC_ACT_REDIRECT);
        assert_eq!(ran.reason, Some(REASON_REJECT_NO_ENDPOINTS));
        let rst = ran.packet;
        assert_checksums_valid(&rst);
        assert_bounced(&syn, &rst);
        assert_eq!(rst.len(), ETH_HLEN + IPV4_HLEN + 20);
        assert_eq!(tuple_of(&rst), client.reversed());
        let tcp_header = &rst[L4_OFF..];
        assert_eq!(tcp_header[13], TCP_RST | TCP_ACK);
        assert_eq!(tcp_header[4..8], [0, 0, 0, 0], "seq");
        assert_eq!(
            tcp_header[8..12],
            0x0102_0305u32.to_be_bytes(),
            "ack = seq + 1"
        );
    }
    // A segment with ACK (and data): RST whose seq is that ack.
    let data = tcp_packet(&Flow::tcp(40_001, VIP, 80), TCP_PSH_ACK);
    let rst = expect(datapath.from_pod(), &data, None, TC_ACT_REDIRECT);
    assert_eq!(rst[L4_OFF + 13], TCP_RST);
    assert_eq!(rst[L4_OFF + 4..L4_OFF + 8], 0x0a0b_0c0du32.to_be_bytes());
    // A RST is never answered.
    let reset = tcp_packet(&Flow::tcp(40_002, VIP, 80), TCP_RST);
    assert_eq!(
        run_at(datapath.from_pod(), &reset, None).return_value,
        TC_ACT_SHOT
    );

    // UDP and SCTP: ICMP port unreachable from the service quoting the IP header and 8 bytes,
    // also with IP options (quoted too).
    let options = [7, 7, 4, 0, 0, 0, 0, 1]; // record route, padded
    for (packet, client) in [
        (
            udp_packet(&Flow::udp(50_000, VIP, 53), true),
            Flow::udp(50_000, VIP, 53),
        ),
        (
            with_ip_options(&udp_packet(&Flow::udp(50_001, VIP, 53), false), &options),
            Flow::udp(50_001, VIP, 53),
        ),
        (
            packet::sctp_packet(&flow(PROTO_SCTP, CLIENT, 50_002, VIP, 3868), false),
            flow(PROTO_SCTP, CLIENT, 50_002, VIP, 3868),
        ),
    ] {
        let icmp = expect(datapath.from_pod(), &packet, None, TC_ACT_REDIRECT);
        assert_bounced(&packet, &icmp);
        let (src, dst, quoted) = icmp_about(&icmp);
        assert_eq!((src, dst, quoted), (VIP, CLIENT, client));
        let L4::Icmp {
            icmp_type, code, ..
        } = decoded(&icmp).l4
        else {
            unreachable!()
        };
        assert_eq!((icmp_type, code), PORT_UNREACHABLE);
        let ihl = l4_offset(&packet) - ETH_HLEN;
        assert_eq!(icmp.len(), ETH_HLEN + IPV4_HLEN + 8 + ihl + 8);
        assert_eq!(
            icmp[ETH_HLEN + IPV4_HLEN + 8..],
            packet[ETH_HLEN..ETH_HLEN + ihl + 8],
            "the quote is the packet's beginning"
        );
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());
    // 2 SYNs, the data segment, the RST (dropped, not answered, counted as well), 3 datagrams.
    assert_eq!(
        datapath
            .drop_counts()
            .unwrap()
            .get(&REASON_REJECT_NO_ENDPOINTS),
        Some(&7)
    );

    // Endpoints appear: the same service translates from the next flow on.
    datapath
        .sync(&desired(&[(tcp, two_backends()), (udp, vec![])]))
        .unwrap();
    let flow = Flow::tcp(40_003, VIP, 80);
    let out = from_pod(&datapath, &first_packet(&flow));
    assert!(two_backends().contains(&dnat_target(&flow, &out)));
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let four: Vec<BackendAddr> = (1..=4)
        .map(|i| be(Ipv4Addr::new(10, 244, 2, i), 8080))
        .collect();
    let sticky = frontend(VIP, 80, Protocol::Tcp);
    let short = frontend(VIP, 81, Protocol::Tcp);
    let mut sticky_entry = entry(FrontendKind::ClusterIp, &four, &[]);
    sticky_entry.affinity_timeout = Some(10_800);
    let mut short_entry = entry(FrontendKind::ClusterIp, &four, &[]);
    short_entry.affinity_timeout = Some(1);
    let datapath = node_datapath(
        vec![(sticky, sticky_entry), (short, short_entry)],
        &node_context(false),
    );
    let backend_of = |client: Ipv4Addr, sport: u16, port: u16| {
        let f = flow(PROTO_TCP, client, sport, VIP, port);
        dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)))
    };
    let last_used = |client: Ipv4Addr, port: u16| {
        let id = datapath
            .service_id(&frontend(VIP, port, Protocol::Tcp))
            .unwrap();
        datapath
            .affinity_entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.service_id == id && k.client == u32::from_ne_bytes(client.octets()))
            .map(|(_, v)| v.last_used_ns)
            .expect("an affinity entry")
    };

    // Every new connection of a client goes to its first backend (a random choice would
    // differ in 30 tries with probability 1 - 4^-29), refreshing the entry.
    let first = backend_of(CLIENT, 20_000, 80);
    let mut used = last_used(CLIENT, 80);
    for sport in 20_001..20_030 {
        assert_eq!(backend_of(CLIENT, sport, 80), first);
        let now = last_used(CLIENT, 80);
        assert!(now > used, "every new flow refreshes the affinity");
        used = now;
    }
    // Other clients are balanced on their own: over 40 clients more than one backend shows.
    let others: BTreeSet<BackendAddr> = (1..=40)
        .map(|i| backend_of(Ipv4Addr::new(10, 244, 3, i), 20_000, 80))
        .collect();
    assert!(others.len() > 1, "{others:?}");

    // Past the timeout the client is balanced again, and sticks to the new choice.
    backend_of(CLIENT, 21_000, 81);
    let chosen_at = last_used(CLIENT, 81);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let after = backend_of(CLIENT, 21_001, 81);
    assert!(last_used(CLIENT, 81) > chosen_at + 1_000_000_000);
    assert_eq!(backend_of(CLIENT, 21_002, 81), after);
}

#[test]
fn source_ranges_admit_only_their_sources() {
    let node = FibNode::new();
    node.run(|ifs| {
        let backend = be(LOCAL_POD, 8080);
        let lb = frontend(Ipv4Addr::new(198, 51, 100, 7), 443, Protocol::Tcp);
        let with_ranges = |ranges: &[&str]| {
            let mut e = entry(FrontendKind::LoadBalancer, &[backend], &[backend]);
            e.source_ranges = ranges
                .iter()
                .map(|r| r.parse::<ipnet::IpNet>().unwrap())
                .collect();
            vec![(lb, e)]
        };
        let mut datapath = node_datapath(
            with_ranges(&["192.0.2.0/24", "203.0.113.7/32"]),
            &node_context(false),
        );
        let mut sport = 40_000;
        let mut verdict_for = |datapath: &Datapath, src: [u8; 4]| {
            sport += 1;
            let f = flow(PROTO_TCP, Ipv4Addr::from(src), sport, v4(lb.ip), lb.port);
            let ran = run_at(
                datapath.from_world(),
                &tcp_packet(&f, TCP_SYN),
                Some(ifs.ext),
            );
            (ran.return_value, ran.reason)
        };
        let admitted = (TC_ACT_REDIRECT, None);
        let refused = (TC_ACT_SHOT, Some(REASON_DROP_SOURCE_RANGE));
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), admitted);
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 255]), admitted);
        assert_eq!(verdict_for(&datapath, [203, 0, 113, 7]), admitted);
        assert_eq!(verdict_for(&datapath, [203, 0, 113, 8]), refused);
        assert_eq!(verdict_for(&datapath, [198, 51, 100, 1]), refused);

        // New ranges replace the old ones: one range written, two deleted.
        let stats = resync(&mut datapath, with_ranges(&["198.51.100.0/24"]));
        assert_eq!((stats.updated, stats.map_writes), (1, 3), "{stats:?}");
        assert_eq!(verdict_for(&datapath, [198, 51, 100, 1]), admitted);
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), refused);
        // No ranges: every source is admitted.
        let stats = resync(&mut datapath, with_ranges(&[]));
        assert_eq!((stats.updated, stats.map_writes), (1, 2), "{stats:?}");
        assert_eq!(verdict_for(&datapath, [192, 0, 2, 10]), admitted);
        assert_eq!(
            datapath
                .drop_counts()
                .unwrap()
                .get(&REASON_DROP_SOURCE_RANGE),
            Some(&3)
        );
    });
}

#[test]
fn removed_backends_lose_their_udp_flows_at_once() {
    let (gone, stays) = (
        be(Ipv4Addr::new(10, 244, 2, 1), 5353),
        be(Ipv4Addr::new(10, 244, 2, 2), 5353),
    );
    let dns = frontend(VIP, 53, Protocol::Udp);
    let web = frontend(VIP, 80, Protocol::Tcp);
    let sticky = frontend(VIP, 54, Protocol::Udp);
    let mut sticky_entry = entry(FrontendKind::ClusterIp, &[gone], &[]);
    sticky_entry.affinity_timeout = Some(10_800);
    let services = |backends: &[BackendAddr]| {
        let mut sticky_now = sticky_entry.clone();
        // One backend: the first (the one that goes, then the one that stays).
        sticky_now.backends = backends[..1].to_vec();
        vec![
            (dns, entry(FrontendKind::ClusterIp, backends, &[])),
            (
                web,
                entry(
                    FrontendKind::ClusterIp,
                    &backends.iter().map(|b| be(b.ip, 8080)).collect::<Vec<_>>(),
                    &[],
                ),
            ),
            (sticky, sticky_now),
        ]
    };
    let mut datapath = node_datapath(services(&[gone, stays]), &node_context(false));
    let dns_id = datapath.service_id(&dns).unwrap();

    // UDP flows on both backends, and a TCP connection on the one that goes.
    let mut on: BTreeMap<BackendAddr, Vec<Flow>> = BTreeMap::new();
    for sport in 50_000..50_040 {
        let f = Flow::udp(sport, VIP, 53);
        on.entry(dnat_target(&f, &from_pod(&datapath, &udp_packet(&f, true))))
            .or_default()
            .push(f);
    }
    assert_eq!(on.len(), 2, "40 flows use both backends");
    let tcp = (40_000..40_100)
        .map(|sport| Flow::tcp(sport, VIP, 80))
        .find(|f| dnat_target(f, &from_pod(&datapath, &tcp_packet(f, TCP_SYN))).ip == gone.ip)
        .expect("a TCP flow on the backend that goes");
    let sticky_flow = Flow::udp(51_000, VIP, 54);
    assert_eq!(
        dnat_target(
            &sticky_flow,
            &from_pod(&datapath, &udp_packet(&sticky_flow, true))
        ),
        gone
    );
    assert_eq!(datapath.affinity_entries().unwrap().len(), 1);

    let stats = resync(&mut datapath, services(&[stays]));
    let removed: Vec<(u32, Vec<BackendAddr>)> = stats
        .removed_backends
        .iter()
        .map(|r| (r.service_id, r.backends.iter().copied().collect()))
        .collect();
    assert!(removed.contains(&(dns_id, vec![gone])), "{removed:?}");
    let gone_flows = on[&gone].len();
    // Two entries per UDP flow on the removed backend (both services), and the affinity entry.
    assert_eq!(stats.purged, 2 * gone_flows + 2 + 1, "{stats:?}");
    assert!(datapath.affinity_entries().unwrap().is_empty());

    // The next datagram of a flow that was on the removed backend goes to the live one at once;
    // the others keep theirs.
    for f in &on[&gone] {
        assert_eq!(
            dnat_target(f, &from_pod(&datapath, &udp_packet(f, true))),
            stays
        );
    }
    for f in &on[&stays] {
        assert_eq!(
            dnat_target(f, &from_pod(&datapath, &udp_packet(f, true))),
            stays
        );
    }
    // TCP connections drain on their backend.
    assert_eq!(
        dnat_target(&tcp, &from_pod(&datapath, &tcp_packet(&tcp, TCP_PSH_ACK))).ip,
        gone.ip
    );
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let node = FibNode::new();
    node.run(|ifs| {
        let local_dns = be(LOCAL_POD, 5353);
        let remote_web = be(REMOTE_POD, 8080);
        let dns = frontend(VIP, 53, Protocol::Udp);
        let web = frontend(VIP, 80, Protocol::Tcp);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
        let datapath = node_datapath(
            vec![
                (
                    dns,
                    entry(FrontendKind::ClusterIp, &[local_dns], &[local_dns]),
                ),
                (web, entry(FrontendKind::ClusterIp, &[remote_web], &[])),
                (nodeport, entry(FrontendKind::NodePort, &[remote_web], &[])),
            ],
            &node_context(false),
        );

        // A pod's UDP query to a local backend that has no socket: the backend's port
        // unreachable reaches the client about the service address it used.
        let query = flow(PROTO_UDP, LOCAL_CLIENT, 50_000, VIP, 53);
        let sent = expect(
            datapath.from_pod(),
            &udp_packet(&query, true),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        let error = icmp_error(
            LOCAL_POD,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &sent,
            IPV4_HLEN + 8,
        );
        // The flow goes through the host's routing: the backend's veth lets it pass ...
        assert_eq!(
            expect(datapath.from_pod(), &error, Some(ifs.pod), TC_ACT_OK),
            error
        );
        // ... the client's veth translates it.
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (VIP, LOCAL_CLIENT, query));

        // The same with the whole datagram quoted (as Linux does): the ICMP checksum covers it.
        let error = icmp_error(
            LOCAL_POD,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &sent,
            sent.len() - ETH_HLEN,
        );
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (VIP, LOCAL_CLIENT, query));

        // The client answers a reply it cannot place with a port unreachable to the service:
        // the backend gets it about its own address.
        let reply = tcp_or_udp_answer(&query.reversed());
        let error = icmp_error(
            LOCAL_CLIENT,
            VIP,
            PORT_UNREACHABLE,
            0,
            &reply,
            IPV4_HLEN + 8,
        );
        let seen = expect(datapath.from_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(
            icmp_about(&seen),
            (
                LOCAL_CLIENT,
                LOCAL_POD,
                flow(PROTO_UDP, LOCAL_POD, 5353, LOCAL_CLIENT, 50_000)
            )
        );

        // A router's fragmentation needed about a pod's DNATed segment to another node: the
        // external interface lets it pass, the client's veth translates it; the MTU stays.
        let connection = flow(PROTO_TCP, LOCAL_CLIENT, 40_000, VIP, 80);
        let sent = expect(
            datapath.from_pod(),
            &tcp_packet(&connection, TCP_PSH_ACK),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        let error = icmp_error(
            ROUTER,
            LOCAL_CLIENT,
            FRAG_NEEDED,
            1400,
            &sent,
            IPV4_HLEN + 8,
        );
        assert_eq!(
            expect(datapath.from_world(), &error, Some(ifs.ext), TC_ACT_OK),
            error
        );
        let seen = expect(datapath.to_pod(), &error, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(icmp_about(&seen), (ROUTER, LOCAL_CLIENT, connection));
        assert_eq!(
            seen[ETH_HLEN + IPV4_HLEN + 4..ETH_HLEN + IPV4_HLEN + 8],
            1400u32.to_be_bytes()
        );

        // A router's fragmentation needed about a masqueraded NodePort flow reaches the
        // outside client about the NodePort, redirected to it.
        let outside = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let sent = expect(
            datapath.from_world(),
            &tcp_packet(&outside, TCP_PSH_ACK),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&sent).src, NODE_IP);
        let error = icmp_error(ROUTER, NODE_IP, FRAG_NEEDED, 1400, &sent, IPV4_HLEN + 8);
        let seen = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(icmp_about(&seen), (ROUTER, OUTSIDER, outside));
        // The backend itself refusing: the error comes from the NodePort's address.
        let error = icmp_error(
            REMOTE_POD,
            NODE_IP,
            PORT_UNREACHABLE,
            0,
            &sent,
            IPV4_HLEN + 8,
        );
        let seen = expect(
            datapath.from_world(),
            &error,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(icmp_about(&seen), (NODE_IP, OUTSIDER, outside));

        // An error about no translated flow passes untouched.
        let stranger = first_packet(&flow(
            PROTO_UDP,
            LOCAL_CLIENT,
            9,
            Ipv4Addr::new(10, 244, 0, 99),
            9,
        ));
        let error = icmp_error(
            ROUTER,
            LOCAL_CLIENT,
            PORT_UNREACHABLE,
            0,
            &stranger,
            IPV4_HLEN + 8,
        );
        for (program, at) in [
            (datapath.from_world(), ifs.ext),
            (datapath.to_pod(), ifs.pod),
        ] {
            assert_eq!(expect(program, &error, Some(at), TC_ACT_OK), error);
        }
    });
}

/// The first answer of `flow` (a SYN-ACK, a datagram).
fn tcp_or_udp_answer(flow: &Flow) -> Vec<u8> {
    packet::first_answer(flow, PAYLOAD)
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_a_later_one_is_balanced_again() {
    let many: Vec<BackendAddr> = (1..=8)
        .map(|i| be(Ipv4Addr::new(10, 244, 2, i), 8080))
        .collect();
    let datapath = node_datapath(
        vec![(
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &many, &[]),
        )],
        &node_context(false),
    );
    // A SYN sent again at once is a retransmission: same backend (40 flows, 8 backends).
    for sport in 30_000..30_040 {
        let f = Flow::tcp(sport, VIP, 80);
        let first = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        let again = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        assert_eq!(first, again, "{f}");
    }
    // A SYN on the tuple after the retransmission window opens a new connection: balanced
    // again (its conntrack entry is a new one).
    let f = Flow::tcp(31_000, VIP, 80);
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    let created = |datapath: &Datapath| {
        datapath
            .conntrack_entries()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.dir == CT_DIR_FORWARD && k.sport == 31_000u16.to_be())
            .map(|(_, v)| v.created_ns)
            .unwrap()
    };
    let before = created(&datapath);
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    assert_eq!(
        created(&datapath),
        before,
        "retransmission: the entry stays"
    );
    std::thread::sleep(std::time::Duration::from_millis(1_600));
    from_pod(&datapath, &tcp_packet(&f, TCP_SYN));
    assert!(created(&datapath) > before, "new connection: a new entry");

    // Within the window too, a SYN is not kept on a backend the service no longer has.
    let vip = frontend(VIP, 80, Protocol::Tcp);
    let mut datapath = datapath;
    for sport in 32_000..32_020 {
        let f = Flow::tcp(sport, VIP, 80);
        let chosen = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        let rest: Vec<BackendAddr> = many.iter().copied().filter(|b| *b != chosen).collect();
        resync(
            &mut datapath,
            vec![(vip, entry(FrontendKind::ClusterIp, &rest, &[]))],
        );
        let again = dnat_target(&f, &from_pod(&datapath, &tcp_packet(&f, TCP_SYN)));
        assert_ne!(again, chosen, "{f}: SYN kept on the removed {chosen}");
        resync(
            &mut datapath,
            vec![(vip, entry(FrontendKind::ClusterIp, &many, &[]))],
        );
    }
}

#[test]
fn sctp_flows_are_translated_with_their_crc_updated() {
    let node = FibNode::new();
    node.run(|ifs| {
        let local = be(LOCAL_POD, 3869);
        let remote = be(REMOTE_POD, 3870);
        let vip = frontend(VIP, 3868, Protocol::Sctp);
        let nodeport = frontend(NODE_IP, NODE_PORT, Protocol::Sctp);
        let datapath = node_datapath(
            vec![
                (vip, entry(FrontendKind::ClusterIp, &[local], &[local])),
                (nodeport, entry(FrontendKind::NodePort, &[remote], &[])),
            ],
            &node_context(false),
        );
        // Address and port change; the CRC32c is checked from scratch by assert_checksums_valid.
        let client = flow(PROTO_SCTP, LOCAL_CLIENT, 50_000, VIP, 3868);
        let out = expect(
            datapath.from_pod(),
            &packet::sctp_packet(&client, false),
            Some(ifs.pod),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_SCTP, LOCAL_CLIENT, 50_000, LOCAL_POD, 3869)
        );
        let answer = packet::sctp_packet(&client.reply_from(local), true);
        let back = expect(datapath.to_pod(), &answer, Some(ifs.pod), TC_ACT_OK);
        assert_eq!(tuple_of(&back), client.reversed());

        // From outside to a backend elsewhere: masqueraded too.
        let outside = flow(PROTO_SCTP, OUTSIDER, 50_001, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &packet::sctp_packet(&outside, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_SCTP, NODE_IP, 50_001, REMOTE_POD, 3870)
        );
        let answer = packet::sctp_packet(&tuple_of(&out).reversed(), true);
        let back = expect(
            datapath.from_world(),
            &answer,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), outside.reversed());

        // Another client with the same port: another masquerade port, CRC still right.
        let second = flow(
            PROTO_SCTP,
            Ipv4Addr::new(192, 0, 2, 11),
            50_001,
            NODE_IP,
            NODE_PORT,
        );
        let out = expect(
            datapath.from_world(),
            &packet::sctp_packet(&second, false),
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert!(
            (61_000..=65_535).contains(&tuple_of(&out).sport),
            "{}",
            tuple_of(&out)
        );
        let answer = packet::sctp_packet(&tuple_of(&out).reversed(), true);
        let back = expect(
            datapath.from_world(),
            &answer,
            Some(ifs.ext),
            TC_ACT_REDIRECT,
        );
        assert_eq!(tuple_of(&back), second.reversed());
    });
}

#[test]
fn without_a_forwarding_route_the_stack_gets_the_packet() {
    // A namespace without routes and with forwarding off: the FIB lookup fails.
    let netns = TestNetns::with_veth("ext0", "ext0-peer");
    netns.ip(&["link", "set", "dev", "ext0", "up"]);
    netns.ip(&["link", "set", "dev", "ext0-peer", "up"]);
    netns.run(|| {
        let backend = be(REMOTE_POD, 8080);
        let datapath = node_datapath(
            vec![(
                frontend(NODE_IP, NODE_PORT, Protocol::Tcp),
                entry(FrontendKind::NodePort, &[backend], &[]),
            )],
            &node_context(false),
        );
        let client = flow(PROTO_TCP, OUTSIDER, 40_000, NODE_IP, NODE_PORT);
        let out = expect(
            datapath.from_world(),
            &tcp_packet(&client, TCP_SYN),
            Some(ifindex("ext0")),
            TC_ACT_OK,
        );
        assert_eq!(
            tuple_of(&out),
            flow(PROTO_TCP, NODE_IP, 40_000, REMOTE_POD, 8080)
        );
    });
}

#[test]
fn node_config_and_service_settings_are_written_only_when_they_change() {
    let mut datapath = load_private();
    let node = node_context(false);
    assert!(datapath.set_node_config(&node).unwrap());
    assert!(
        !datapath.set_node_config(&node).unwrap(),
        "unchanged: not written"
    );
    assert!(datapath.set_node_config(&node_context(true)).unwrap());
    assert_eq!(
        datapath.node_config().node_ip.to_ne_bytes(),
        NODE_IP.octets()
    );

    let vip = frontend(VIP, 80, Protocol::Tcp);
    let base = entry(FrontendKind::ClusterIp, &two_backends(), &[]);
    resync(&mut datapath, vec![(vip, base.clone())]);
    let mut changed = base.clone();
    changed.affinity_timeout = Some(60);
    changed.when_empty = WhenEmpty::Drop;
    let stats = resync(&mut datapath, vec![(vip, changed.clone())]);
    assert_eq!((stats.updated, stats.map_writes), (1, 1), "{stats:?}");
    let stats = resync(&mut datapath, vec![(vip, changed.clone())]);
    assert_eq!((stats.unchanged, stats.map_writes), (1, 0), "{stats:?}");
    // A backend becoming local rewrites its slot only.
    let mut local = changed.clone();
    local.local_backends = [two_backends()[0]].into();
    let stats = resync(&mut datapath, vec![(vip, local)]);
    assert_eq!((stats.updated, stats.map_writes), (1, 1), "{stats:?}");
    let programmed = &datapath.programmed_services()[0];
    assert_eq!(programmed.local_backends, vec![two_backends()[0]]);
    assert_eq!(programmed.settings.affinity_timeout, 60);
}

// ---------------------------------------------------------------------------------------------
// Pinning and attaching (a private bpffs, a veth pair in a network namespace of its own)

static UNIQUE: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` of concurrent tests can race on setting up /run/netns.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs mounted on a temporary directory, unmounted (dropping every pin in it) on drop.
struct PrivateBpffs {
    dir: PathBuf,
}

impl PrivateBpffs {
    fn new() -> PrivateBpffs {
        let dir = std::env::temp_dir().join(unique_name("sluice-test-bpffs"));
        fs::create_dir_all(&dir).unwrap();
        let c_dir = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let fstype = CString::new("bpf").unwrap();
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                c_dir.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            let _ = fs::remove_dir(&dir);
            panic!(
                "mounting a bpffs on {} (needs root): {error}",
                dir.display()
            );
        }
        PrivateBpffs { dir }
    }

    fn pin_path(&self) -> PathBuf {
        self.dir.join("sluice")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let c_dir = CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated string.
        unsafe { libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A network namespace holding a veth pair, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    /// An empty network namespace (loopback down).
    fn new() -> TestNetns {
        let name = unique_name("sluice-dp-test");
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            sh(Command::new("ip").args(["netns", "add", &name]));
        }
        TestNetns { name }
    }

    fn with_veth(veth: &str, peer: &str) -> TestNetns {
        let netns = TestNetns::new();
        netns.ip(&["link", "add", veth, "type", "veth", "peer", "name", peer]);
        netns
    }

    /// A veth pair from `here` in this namespace to `there` in `other`, both up.
    fn link_to(&self, here: &str, other: &TestNetns, there: &str) {
        self.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ]);
        self.ip(&["link", "set", "dev", here, "up"]);
        other.ip(&["link", "set", "dev", there, "up"]);
    }

    /// Runs `f` on a thread of its own that entered the namespace, in the background.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            // SAFETY: a valid descriptor of a netns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip` inside the namespace.
    fn ip(&self, args: &[&str]) {
        let net = format!("--net={}", self.path().display());
        sh(Command::new("nsenter").arg(net).arg("ip").args(args));
    }

    /// Runs `f` on a thread that entered the namespace (a thread's netns is its own).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = fs::File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: a valid descriptor of a netns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(ifname: &str) -> u32 {
    let c_name = CString::new(ifname).unwrap();
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    index
}

/// Ids of the programs tcx runs on `ifname` in direction `attach_type`.
fn tcx_programs(ifname: &str, attach_type: TcAttachType) -> Vec<(u32, String)> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type).expect("query tcx");
    programs
        .iter()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Unpinning a link detaches it asynchronously (the kernel frees the bpffs inode after an RCU
/// grace period, then puts the link from a workqueue): wait for it, boundedly.
fn wait_until_detached(ifname: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let ingress = tcx_programs(ifname, TcAttachType::Ingress);
        let egress = tcx_programs(ifname, TcAttachType::Egress);
        if ingress.is_empty() && egress.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "programs still attached to {ifname}: {ingress:?} {egress:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn link_id(pin: &Path) -> u32 {
    let link = FdLink::from(PinnedLink::from_pin(pin).expect("pinned link"));
    link.info().expect("link info").id()
}

#[test]
fn pinned_maps_survive_a_restart_with_their_services_and_ids() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let other = frontend(VIP, 443, Protocol::Tcp);
    let state = desired(&[(svc, two_backends()), (other, vec![])]);

    let (id, flow_backend) = {
        let mut datapath = Datapath::load(&pin_path).expect("load pinned");
        assert_eq!(datapath.pin_path(), Some(pin_path.as_path()));
        assert!(datapath.sync(&state).unwrap().is_complete());
        for map in ["services", "backends", "conntrack"] {
            assert!(pin_path.join(map).exists(), "{map} is not pinned");
        }
        let flow = Flow::tcp(40_000, VIP, 80);
        let backend = dnat_target(&flow, &from_pod(&datapath, &tcp_packet(&flow, TCP_SYN)));
        (datapath.service_id(&svc).unwrap(), backend)
    };

    // The "restarted agent" finds the services, their ids and the conntrack entries again, and
    // resyncing the same state writes nothing.
    let mut datapath = Datapath::load(&pin_path).expect("reload pinned");
    assert_eq!(datapath.service_id(&svc), Some(id));
    assert_eq!(datapath.programmed_services().len(), 2);
    assert_eq!(datapath.conntrack_entries().unwrap().len(), 2);
    let stats = datapath.sync(&state).unwrap();
    assert_eq!((stats.unchanged, stats.map_writes), (2, 0), "{stats:?}");
    let flow = Flow::tcp(40_000, VIP, 80);
    let ack = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
    assert_eq!(dnat_target(&flow, &ack), flow_backend);

    // A private datapath does not see the pinned one's state.
    assert!(load_private().programmed_services().is_empty());

    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
    assert!(!pin_path.exists());
    Datapath::cleanup(&pin_path).expect("cleanup of nothing");
}

#[test]
fn load_explains_a_pin_path_that_is_not_on_bpffs() {
    let dir = std::env::temp_dir().join(unique_name("sluice-test-not-bpffs"));
    let error = Datapath::load(&dir).err().expect("load must fail");
    assert!(!dir.exists(), "load created {} anyway", dir.display());
    let message = format!("{error:#}");
    assert!(message.contains("not on a bpf filesystem"), "{message}");
    assert!(message.contains(&dir.display().to_string()), "{message}");
}

#[test]
fn unpinned_datapath_refuses_to_attach() {
    let mut datapath = load_private();
    let error = datapath.attach(1, "lo").unwrap_err();
    assert!(format!("{error:#}").contains("private maps"), "{error:#}");
}

#[test]
fn attach_pins_tcx_links_and_a_restart_swaps_programs_in_place() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-pod0", "sl-peer0");

    netns.run(|| {
        let ifindex = ifindex("sl-pod0");
        let ingress_pin = pin_path.join(format!("links/{ifindex}-ingress"));
        let egress_pin = pin_path.join(format!("links/{ifindex}-egress"));

        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.attach(ifindex, "sl-pod0").expect("attach");
        datapath
            .attach(ifindex, "sl-pod0")
            .expect("attaching again is a no-op");
        assert_eq!(
            datapath.attached_interfaces().collect::<Vec<_>>(),
            [ifindex]
        );
        let ingress = tcx_programs("sl-pod0", TcAttachType::Ingress);
        let egress = tcx_programs("sl-pod0", TcAttachType::Egress);
        assert_eq!(ingress.len(), 1, "{ingress:?}");
        assert_eq!(ingress[0].1, "from_pod");
        assert_eq!(egress.len(), 1, "{egress:?}");
        assert_eq!(egress[0].1, "to_pod");
        let (ingress_link, egress_link) = (link_id(&ingress_pin), link_id(&egress_pin));

        // The agent stops: the programs stay attached.
        drop(datapath);
        assert_eq!(tcx_programs("sl-pod0", TcAttachType::Ingress), ingress);

        // The agent restarts: the same links now run the new programs; nothing was detached or
        // attached twice.
        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath.attach(ifindex, "sl-pod0").expect("re-attach");
        let new_ingress = tcx_programs("sl-pod0", TcAttachType::Ingress);
        let new_egress = tcx_programs("sl-pod0", TcAttachType::Egress);
        assert_eq!(new_ingress.len(), 1, "{new_ingress:?}");
        assert_eq!(new_egress.len(), 1, "{new_egress:?}");
        assert_ne!(
            new_ingress[0].0, ingress[0].0,
            "ingress runs the new program"
        );
        assert_ne!(new_egress[0].0, egress[0].0, "egress runs the new program");
        assert_eq!(link_id(&ingress_pin), ingress_link, "ingress link reused");
        assert_eq!(link_id(&egress_pin), egress_link, "egress link reused");

        // An interface that is still there but no longer wanted is detached.
        let forgotten = datapath
            .forget_interfaces_except(&BTreeSet::new())
            .expect("forget");
        assert_eq!(forgotten, [ifindex]);
        assert!(!ingress_pin.exists() && !egress_pin.exists());
        wait_until_detached("sl-pod0");

        // Attached again, then the whole datapath is removed: cleanup detaches everything.
        datapath
            .attach(ifindex, "sl-pod0")
            .expect("attach after forget");
        assert_eq!(tcx_programs("sl-pod0", TcAttachType::Ingress).len(), 1);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
        assert!(!pin_path.exists());
        wait_until_detached("sl-pod0");
    });
}

#[test]
fn a_link_left_pinned_for_a_deleted_interface_is_replaced() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-old", "sl-oldpeer");
    netns.ip(&[
        "link",
        "add",
        "sl-new",
        "type",
        "veth",
        "peer",
        "name",
        "sl-newpeer",
    ]);

    netns.run(|| {
        let (old, new) = (ifindex("sl-old"), ifindex("sl-new"));
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.attach(old, "sl-old").expect("attach");
        drop(datapath);

        // The pod goes away while no agent runs, and its ifindex is reused by a new interface:
        // simulated by deleting the veth and giving its links the new interface's names.
        sh(Command::new("ip").args(["link", "del", "sl-old"]));
        for direction in ["ingress", "egress"] {
            fs::rename(
                pin_path.join(format!("links/{old}-{direction}")),
                pin_path.join(format!("links/{new}-{direction}")),
            )
            .expect("rename pin");
        }

        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath
            .attach(new, "sl-new")
            .expect("attach over a defunct link");
        assert_eq!(tcx_programs("sl-new", TcAttachType::Ingress).len(), 1);
        assert_eq!(tcx_programs("sl-new", TcAttachType::Egress).len(), 1);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
    });
}

#[test]
fn attach_external_runs_the_world_programs_with_their_own_links() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-ext0", "sl-extpeer");
    netns.ip(&[
        "link",
        "add",
        "sl-pod1",
        "type",
        "veth",
        "peer",
        "name",
        "sl-podpeer",
    ]);

    netns.run(|| {
        let (ext, pod) = (ifindex("sl-ext0"), ifindex("sl-pod1"));
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath
            .attach_external(ext, "sl-ext0")
            .expect("attach external");
        datapath.attach(pod, "sl-pod1").expect("attach pod");
        datapath
            .attach_external(ext, "sl-ext0")
            .expect("attaching again is a no-op");
        let error = datapath.attach(ext, "sl-ext0").unwrap_err();
        assert!(
            format!("{error:#}").contains("attached as External"),
            "{error:#}"
        );

        let names = |ifname: &str, attach_type| {
            tcx_programs(ifname, attach_type)
                .into_iter()
                .map(|(_, name)| name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("sl-ext0", TcAttachType::Ingress), ["from_world"]);
        assert_eq!(names("sl-ext0", TcAttachType::Egress), ["to_world"]);
        assert_eq!(names("sl-pod1", TcAttachType::Ingress), ["from_pod"]);
        for link in ["world-ingress", "world-egress"] {
            assert!(
                pin_path.join(format!("links/{ext}-{link}")).exists(),
                "{link}"
            );
        }
        let mut roles: Vec<_> = datapath.attached_roles().collect();
        roles.sort_by_key(|(ifindex, _)| *ifindex);
        assert_eq!(roles.len(), 2);

        // A restarted agent finds the external interface's links and swaps its programs in.
        drop(datapath);
        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath.attach_external(ext, "sl-ext0").expect("re-attach");
        assert_eq!(names("sl-ext0", TcAttachType::Ingress), ["from_world"]);

        // Forgetting every interface but the pod's detaches the external one.
        let forgotten = datapath
            .forget_interfaces_except(&[pod].into())
            .expect("forget");
        assert_eq!(forgotten, [ext]);
        assert!(!pin_path.join(format!("links/{ext}-world-ingress")).exists());
        wait_until_detached("sl-ext0");
        assert_eq!(names("sl-pod1", TcAttachType::Ingress), ["from_pod"]);

        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
        assert!(!pin_path.exists());
        wait_until_detached("sl-pod1");
    });
}

// ---------------------------------------------------------------------------------------------
// Real traffic through the attached programs: namespaces for an outside client, a node, a pod
// on it and a host behind another interface of the node, wired with veths. The kernel's own
// forwarding then decides what the BPF_PROG_RUN tests can only predict: that redirected
// packets arrive, that the node's address as source is not dropped as martian, that answers
// reach the client.

/// A TCP server answering every connection with the address it sees the client as, and a UDP
/// server answering every datagram the same way, both on `port`, until the guard is dropped.
fn serve_peer_address(netns: &TestNetns, port: u16) -> Servers {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tcp_stop = stop.clone();
    let tcp = netns.spawn(move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("tcp bind");
        listener.set_nonblocking(true).expect("nonblocking");
        while !tcp_stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = std::io::Write::write_all(&mut stream, peer.to_string().as_bytes());
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    });
    let udp_stop = stop.clone();
    let udp = netns.spawn(move || {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("udp bind");
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        while !udp_stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(peer.to_string().as_bytes(), peer);
            }
        }
    });
    Servers {
        stop,
        threads: vec![tcp, udp],
    }
}

/// Servers of [`serve_peer_address`], stopped on drop.
struct Servers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The address part of `ip:port`.
fn ip_of(answer: std::io::Result<String>, what: &str) -> String {
    let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
    match answer.rsplit_once(':') {
        Some((ip, _)) => ip.to_string(),
        None => answer,
    }
}

/// Connects to `to` over TCP and returns what the server says (the client's address as it
/// saw it), or the connection's error.
fn ask_tcp(to: std::net::SocketAddr) -> std::io::Result<String> {
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    Ok(answer)
}

/// Sends a datagram to `to` and returns the answer, or the error (ECONNREFUSED for an ICMP
/// port unreachable).
fn ask_udp(to: std::net::SocketAddr) -> std::io::Result<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    socket.connect(to)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn real_traffic_reaches_services_through_the_attached_programs() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    // client (192.0.2.10) --c0|ext0-- node (192.0.2.1) --pod0|eth0-- pod (10.244.0.7)
    //                                   node (198.51.100.1) --ext1|eth0-- other (198.51.100.20)
    let (client, node, pod, other) = (
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
    );
    for ns in [&client, &node, &pod, &other] {
        ns.ip(&["link", "set", "dev", "lo", "up"]);
    }
    client.link_to("c0", &node, "ext0");
    node.link_to("pod0", &pod, "eth0");
    node.link_to("ext1", &other, "eth0");
    client.ip(&["addr", "add", "192.0.2.10/24", "dev", "c0"]);
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", "ext0"]);
    node.ip(&["addr", "add", "198.51.100.1/24", "dev", "ext1"]);
    node.ip(&["addr", "add", "10.244.0.1/24", "dev", "pod0"]);
    pod.ip(&["addr", "add", "10.244.0.7/24", "dev", "eth0"]);
    pod.ip(&["route", "add", "default", "via", "10.244.0.1"]);
    other.ip(&["addr", "add", "198.51.100.20/24", "dev", "eth0"]);
    other.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    node.run(|| fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding"));
    let _servers = [
        serve_peer_address(&pod, 8080),
        serve_peer_address(&other, 8080),
    ];

    let node_ip = Ipv4Addr::new(192, 0, 2, 1);
    let in_pod = be(Ipv4Addr::new(10, 244, 0, 7), 8080);
    let elsewhere = be(Ipv4Addr::new(198, 51, 100, 20), 8080);
    let services = vec![
        (
            frontend(node_ip, 30_080, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[in_pod], &[in_pod]),
        ),
        (
            frontend(node_ip, 30_081, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[elsewhere], &[]),
        ),
        (
            frontend(node_ip, 30_081, Protocol::Udp),
            entry(FrontendKind::NodePort, &[elsewhere], &[]),
        ),
        (
            frontend(node_ip, 30_082, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[], &[]),
        ),
        (
            frontend(node_ip, 30_082, Protocol::Udp),
            entry(FrontendKind::NodePort, &[], &[]),
        ),
        (
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[in_pod], &[in_pod]),
        ),
        // A ClusterIP over the host behind the other interface, and UDP frontends whose
        // backend has no socket (its kernel answers with a port unreachable).
        (
            frontend(VIP, 81, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[elsewhere], &[]),
        ),
        (
            frontend(VIP, 53, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[be(elsewhere.ip, 9999)], &[]),
        ),
        (
            frontend(node_ip, 30_083, Protocol::Udp),
            entry(FrontendKind::NodePort, &[be(elsewhere.ip, 9999)], &[]),
        ),
    ];
    let node_context = NodeContext {
        node_ips: vec![node_ip.into()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let datapath = node.run(|| {
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.set_node_config(&node_context).expect("config");
        resync(&mut datapath, services);
        for ifname in ["ext0", "ext1"] {
            datapath
                .attach_external(ifindex(ifname), ifname)
                .expect("attach external");
        }
        datapath
            .attach(ifindex("pod0"), "pod0")
            .expect("attach pod");
        datapath
    });

    let results = client.run(|| {
        let at = |port| std::net::SocketAddr::from((node_ip, port));
        (
            ask_tcp(at(30_080)),
            ask_tcp(at(30_081)),
            ask_udp(at(30_081)),
            ask_tcp(at(30_082)).map_err(|e| e.kind()),
            ask_udp(at(30_082)).map_err(|e| e.kind()),
            ask_udp(at(30_083)).map_err(|e| e.kind()),
        )
    });
    // A NodePort to a pod of the node: the pod sees the client, the client gets the answer
    // (the pod's reply, from the node's address, redirected past the martian check).
    assert_eq!(ip_of(results.0, "NodePort, local backend"), "192.0.2.10");
    // externalTrafficPolicy Cluster, the backend behind another interface: it sees the node,
    // and its answer, back through that interface, reaches the client from the NodePort.
    assert_eq!(
        ip_of(results.1, "NodePort, remote backend, TCP"),
        "192.0.2.1"
    );
    assert_eq!(
        ip_of(results.2, "NodePort, remote backend, UDP"),
        "192.0.2.1"
    );
    // No endpoints: refused at once, by a RST and by a port unreachable.
    assert_eq!(results.3.err(), Some(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(results.4.err(), Some(std::io::ErrorKind::ConnectionRefused));
    // The backend's port unreachable about a masqueraded datagram reaches the client about
    // the NodePort it used (ICMP error translation): the datagram did go to the backend,
    // masqueraded; untranslated, the error would have stayed at the node.
    assert_eq!(results.5.err(), Some(std::io::ErrorKind::ConnectionRefused));
    let masqueraded_to_9999 = datapath.conntrack_entries().unwrap().iter().any(|(k, v)| {
        k.dir == CT_DIR_FORWARD
            && k.proto == PROTO_UDP
            && v.nat_port == 9999u16.to_be()
            && v.flags & CT_F_SNAT != 0
    });
    assert!(masqueraded_to_9999);

    let (hairpin, cluster_ip, unreachable) = pod.run(|| {
        (
            ask_tcp(std::net::SocketAddr::from((VIP, 80))),
            ask_tcp(std::net::SocketAddr::from((VIP, 81))),
            ask_udp(std::net::SocketAddr::from((VIP, 53))).map_err(|e| e.kind()),
        )
    });
    // Hairpin: the pod reaches itself through its ClusterIP and sees the service loopback.
    assert_eq!(ip_of(hairpin, "hairpin"), "169.254.42.1");
    // A pod's ClusterIP flow to a backend elsewhere goes through the node's routing both ways,
    // its answer restored at the pod's veth; the backend sees the pod.
    assert_eq!(ip_of(cluster_ip, "ClusterIP, remote backend"), "10.244.0.7");
    // ... and so does a port unreachable about it.
    assert_eq!(
        unreachable.err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );

    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
}
