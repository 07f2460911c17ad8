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
    datapath::Datapath,
    packet::{
        self, ethernet, internet_checksum, ipv4_packet, l4_offset, with_ip_options, Flow, ETH_HLEN,
        IPV4_HLEN, TCP_ACK, TCP_PSH, TCP_SYN,
    },
    state::{BackendAddr, DesiredState, Frontend, Protocol, ServiceEntry},
};
use sluice_common::{CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

const TC_ACT_OK: u32 = 0;
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
            src: backend.ip,
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
        ip: out.dst,
        port: out.dport,
    }
}

// ---------------------------------------------------------------------------------------------
// Services

fn frontend(ip: Ipv4Addr, port: u16, proto: Protocol) -> Frontend {
    Frontend { ip, port, proto }
}

fn backends(addrs: &[([u8; 4], u16)]) -> Vec<BackendAddr> {
    let mut list: Vec<BackendAddr> = addrs
        .iter()
        .map(|&(ip, port)| BackendAddr {
            ip: Ipv4Addr::from(ip),
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
fn a_service_without_backends_passes_packets_untouched() {
    let tcp = frontend(VIP, 80, Protocol::Tcp);
    let udp = frontend(VIP, 53, Protocol::Udp);
    let mut datapath = datapath_with(&[(tcp, vec![]), (udp, vec![])]);
    let programmed = datapath.programmed_services();
    assert_eq!(programmed.len(), 2);
    assert!(programmed.iter().all(|s| s.backend_count == 0));

    for flow in [Flow::tcp(40_000, VIP, 80), Flow::udp(40_000, VIP, 53)] {
        let packet = first_packet(&flow);
        assert_eq!(from_pod(&datapath, &packet), packet, "{flow:?}");
        let packet = next_packet(&flow);
        assert_eq!(from_pod(&datapath, &packet), packet, "{flow:?}");
    }
    assert!(datapath.conntrack_entries().unwrap().is_empty());

    // Endpoints appear: the same service translates from the next flow on.
    datapath
        .sync(&desired(&[(tcp, two_backends()), (udp, vec![])]))
        .unwrap();
    let flow = Flow::tcp(40_001, VIP, 80);
    let out = from_pod(&datapath, &first_packet(&flow));
    assert!(two_backends().contains(&dnat_target(&flow, &out)));
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
    fn with_veth(veth: &str, peer: &str) -> TestNetns {
        let name = unique_name("sluice-dp-test");
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            sh(Command::new("ip").args(["netns", "add", &name]));
        }
        let netns = TestNetns { name };
        netns.ip(&["link", "add", veth, "type", "veth", "peer", "name", peer]);
        netns
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
