//! Packets, flows, datapaths and network namespaces shared by the datapath tests.

pub(crate) use std::{
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

pub(crate) use aya::programs::{
    links::{FdLink, PinnedLink},
    SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
};
pub(crate) use sluice::{
    datapath::{self, Datapath, ProgramRun},
    node::NodeContext,
    packet::{
        self, ethernet, internet_checksum, ipv4_packet, l4_offset, with_ip_options, Decoded, Flow,
        ETH_HLEN, IPV4_HLEN, L4, PROTO_ICMP, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN,
    },
    state::{BackendAddr, DesiredState, Frontend, FrontendKind, Protocol, ServiceEntry, WhenEmpty},
};
pub(crate) use sluice_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_DROP_NO_LOCAL_ENDPOINTS, REASON_DROP_SOURCE_RANGE, REASON_REJECT_NO_ENDPOINTS,
};

pub(crate) const TC_ACT_OK: u32 = 0;

pub(crate) const TC_ACT_SHOT: u32 = 2;

pub(crate) const TC_ACT_REDIRECT: u32 = 7;

pub(crate) const TCP_PSH_ACK: u8 = TCP_PSH | TCP_ACK;

pub(crate) const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

pub(crate) const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

// ---------------------------------------------------------------------------------------------
// Packets: built and taken apart by `sluice::packet`, which `sluice trace` uses too.

/// Flows as the tests name them: from [`CLIENT`], and the replies of a backend.
pub(crate) trait TestFlow {
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

pub(crate) const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;

/// Odd length on purpose: the checksum then covers a padded last byte.
pub(crate) const PAYLOAD: &[u8] = b"hello sluice!";

/// A TCP segment; everything but a SYN carries [`PAYLOAD`].
pub(crate) fn tcp_packet(flow: &Flow, flags: u8) -> Vec<u8> {
    let payload = if flags & TCP_SYN == 0 { PAYLOAD } else { &[] };
    packet::tcp_packet(flow, flags, payload)
}

pub(crate) fn udp_packet(flow: &Flow, with_checksum: bool) -> Vec<u8> {
    packet::udp_packet(flow, with_checksum, PAYLOAD)
}

/// The first packet of `flow`: a SYN for TCP, a datagram for UDP.
pub(crate) fn first_packet(flow: &Flow) -> Vec<u8> {
    packet::first_packet(flow, PAYLOAD)
}

/// A later packet of `flow`.
pub(crate) fn next_packet(flow: &Flow) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp_packet(flow, TCP_PSH_ACK),
        _ => udp_packet(flow, true),
    }
}

/// The IPv4 tuple of a packet built above (or rewritten by the programs).
pub(crate) fn tuple_of(packet: &[u8]) -> Flow {
    packet::decode(packet)
        .ok()
        .and_then(|decoded| decoded.flow())
        .unwrap_or_else(|| panic!("not a TCP/UDP packet: {packet:02x?}"))
}

pub(crate) fn l4_checksum_field(packet: &[u8]) -> u16 {
    let at = l4_offset(packet)
        + if packet[ETH_HLEN + 9] == PROTO_TCP {
            16
        } else {
            6
        };
    u16::from_be_bytes([packet[at], packet[at + 1]])
}

/// Recomputes the IPv4 header and TCP/UDP checksums from scratch over `packet`.
pub(crate) fn assert_checksums_valid(packet: &[u8]) {
    if let Err(e) = packet::verify_checksums(packet) {
        panic!("{e}: {packet:02x?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Running the programs

/// Runs `program` on `packet` with BPF_PROG_RUN; returns the verdict and the packet as the
/// program left it.
pub(crate) fn run(program: &SchedClassifier, packet: &[u8]) -> (u32, Vec<u8>) {
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
pub(crate) fn from_pod(datapath: &Datapath, packet: &[u8]) -> Vec<u8> {
    let (verdict, out) = run(datapath.from_pod(), packet);
    assert_eq!(verdict, TC_ACT_OK, "from_pod verdict");
    assert_eq!(out.len(), packet.len());
    assert_checksums_valid(&out);
    out
}

pub(crate) fn to_pod(datapath: &Datapath, packet: &[u8]) -> Vec<u8> {
    let (verdict, out) = run(datapath.to_pod(), packet);
    assert_eq!(verdict, TC_ACT_OK, "to_pod verdict");
    assert_eq!(out.len(), packet.len());
    assert_checksums_valid(&out);
    out
}

/// The backend `packet` (a DNATed packet of `flow`) was sent to, after checking that nothing but
/// the destination changed.
pub(crate) fn dnat_target(flow: &Flow, packet: &[u8]) -> BackendAddr {
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

pub(crate) fn frontend(ip: Ipv4Addr, port: u16, proto: Protocol) -> Frontend {
    Frontend {
        ip: ip.into(),
        port,
        proto,
    }
}

pub(crate) fn backends(addrs: &[([u8; 4], u16)]) -> Vec<BackendAddr> {
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

pub(crate) fn desired(services: &[(Frontend, Vec<BackendAddr>)]) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .map(|(f, b)| {
                let entry = ServiceEntry::cluster_ip(
                    format!("default/svc-{}:{}", f.port, f.proto),
                    b.clone(),
                );
                (*f, entry.into())
            })
            .collect(),
        ..Default::default()
    }
}

pub(crate) fn load_private() -> Datapath {
    Datapath::load_unpinned().unwrap_or_else(|e| {
        panic!("loading the datapath failed (these tests need root and a kernel with BPF): {e:#}")
    })
}

/// A datapath with private maps programmed with `services`.
pub(crate) fn datapath_with(services: &[(Frontend, Vec<BackendAddr>)]) -> Datapath {
    let mut datapath = load_private();
    let stats = datapath.sync(&desired(services)).expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    datapath
}

pub(crate) fn two_backends() -> Vec<BackendAddr> {
    backends(&[([10, 244, 1, 2], 8080), ([10, 244, 2, 3], 8080)])
}

// ---------------------------------------------------------------------------------------------
// Nodes. Most of the service tests run the programs inside a network namespace that stands
// in for a node ([`FibNode`]), so the FIB lookups of the packets the programs redirect
// see known routes.

pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

pub(crate) const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);

/// Pods on this node (behind `pod0`) and on the other node.
pub(crate) const LOCAL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

pub(crate) const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);

pub(crate) const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);

/// A client outside the cluster.
pub(crate) const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

pub(crate) const NODE_PORT: u16 = 30_080;

pub(crate) const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Runs `program` on an IPv6 `packet`, expects `verdict` and valid checksums (recomputed from
/// scratch), returns the packet as the program left it.
pub(crate) fn expect6(
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

/// The (destination, destination port) of an Ethernet + IPv6 + TCP/UDP packet.
pub(crate) fn ipv6_dst(packet: &[u8]) -> (std::net::Ipv6Addr, u16) {
    let ip = ETH_HLEN;
    let dst: [u8; 16] = packet[ip + 24..ip + 40].try_into().unwrap();
    let l4 = ip + 40;
    (
        dst.into(),
        u16::from_be_bytes([packet[l4 + 2], packet[l4 + 3]]),
    )
}

// ---------------------------------------------------------------------------------------------
// IPv6

/// A network namespace standing in for a node: `ext0` carries the node IP (172.18.0.3/16,
/// default route via 172.18.0.1; the other node 172.18.0.4 routes 10.244.1.0/24), `pod0` leads
/// to this node's pods (10.244.0.0/24). Forwarding is on and the neighbours are static, so
/// `bpf_fib_lookup` succeeds for every destination the tests use.
pub(crate) struct FibNode {
    pub(crate) netns: TestNetns,
}

/// The interfaces of a [`FibNode`], as seen inside it.
#[derive(Clone, Copy)]
pub(crate) struct Ifaces {
    pub(crate) ext: u32,
    pub(crate) pod: u32,
}

impl FibNode {
    pub(crate) fn new() -> FibNode {
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
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce(Ifaces) -> T + Send) -> T {
        self.netns.run(|| {
            f(Ifaces {
                ext: ifindex("ext0"),
                pod: ifindex("pod0"),
            })
        })
    }
}

/// Runs `program` on `packet` as received on `ifindex` (None: loopback).
pub(crate) fn run_at(
    program: &aya::programs::SchedClassifier,
    packet: &[u8],
    ifindex: Option<u32>,
) -> ProgramRun {
    datapath::run_program(program, packet, ifindex)
        .unwrap_or_else(|e| panic!("BPF_PROG_RUN failed on {packet:02x?}: {e:#}"))
}

/// Runs `program` and checks the verdict and the checksums of what it left.
pub(crate) fn expect(
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

pub(crate) fn decoded(packet: &[u8]) -> Decoded {
    packet::decode(packet).unwrap_or_else(|e| panic!("{e}: {packet:02x?}"))
}

/// The answer went back the way the packet came: MAC addresses swapped.
pub(crate) fn assert_bounced(input: &[u8], output: &[u8]) {
    assert_eq!(output[..6], input[6..12], "destination MAC");
    assert_eq!(output[6..12], input[..6], "source MAC");
}

/// An ICMP error from `src` to `dst` quoting the first `quote` bytes (IP header included) of
/// the IP packet in `about`; `rest` is the second word of the ICMP header (the MTU of a
/// fragmentation needed).
pub(crate) fn icmp_error(
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

pub(crate) const PORT_UNREACHABLE: (u8, u8) = (3, 3);

pub(crate) const FRAG_NEEDED: (u8, u8) = (3, 4);

/// The outer addresses of an ICMP error and the flow it quotes; checks the quoted IP header's
/// checksum.
pub(crate) fn icmp_about(packet: &[u8]) -> (Ipv4Addr, Ipv4Addr, Flow) {
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

pub(crate) fn be(ip: impl Into<std::net::IpAddr>, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip.into(),
        port,
    }
}

/// The IPv4 address of a backend of these (IPv4) tests.
pub(crate) fn v4(ip: std::net::IpAddr) -> Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => panic!("IPv6 backend {v6} in an IPv4 test"),
    }
}

/// A frontend's entry: `kind`, balancing over `backends`, of which `local` run on this node.
pub(crate) fn entry(
    kind: FrontendKind,
    backends: &[BackendAddr],
    local: &[BackendAddr],
) -> ServiceEntry {
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
pub(crate) fn node_context(masquerade_all: bool) -> NodeContext {
    NodeContext {
        name: Some("node-a".into()),
        node_ips: vec![NODE_IP.into()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        masquerade_all,
        // As the agent reads them from the node: Linux's default ephemeral ports.
        skip_ports: Some(EPHEMERAL_PORTS),
        ..Default::default()
    }
}

/// The node's ephemeral ports in [`node_context`] (Linux's default), which masquerading skips.
pub(crate) const EPHEMERAL_PORTS: sluice::node::PortRange = sluice::node::PortRange {
    first: 32_768,
    last: 60_999,
};

/// Whether `port` is one the default masquerade range gives a flow of [`node_context`]:
/// 1024-65535 less the ephemeral ports.
pub(crate) fn is_masquerade_port(port: u16) -> bool {
    port >= 1_024 && !(EPHEMERAL_PORTS.first..=EPHEMERAL_PORTS.last).contains(&port)
}

/// A private datapath programmed with `services` for the node `node`.
pub(crate) fn node_datapath(
    services: Vec<(Frontend, ServiceEntry)>,
    node: &NodeContext,
) -> Datapath {
    let mut datapath = load_private();
    assert!(datapath.set_node_config(node).expect("config"));
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().map(|(f, e)| (f, e.into())).collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    datapath
}

pub(crate) fn resync(
    datapath: &mut Datapath,
    services: Vec<(Frontend, ServiceEntry)>,
) -> sluice::datapath::SyncStats {
    let stats = datapath
        .sync(&DesiredState {
            services: services.into_iter().map(|(f, e)| (f, e.into())).collect(),
            ..Default::default()
        })
        .expect("sync");
    assert!(stats.is_complete(), "{stats:?}");
    stats
}

pub(crate) fn flow(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Flow {
    Flow {
        proto,
        src,
        sport,
        dst,
        dport,
    }
}

/// The first answer of `flow` (a SYN-ACK, a datagram).
pub(crate) fn tcp_or_udp_answer(flow: &Flow) -> Vec<u8> {
    packet::first_answer(flow, PAYLOAD)
}

// ---------------------------------------------------------------------------------------------
// Pinning and attaching (a private bpffs, a veth pair in a network namespace of its own)

pub(crate) static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` of concurrent tests can race on setting up /run/netns.
pub(crate) static NETNS_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs mounted on a temporary directory, unmounted (dropping every pin in it) on drop.
pub(crate) struct PrivateBpffs {
    pub(crate) dir: PathBuf,
}

impl PrivateBpffs {
    pub(crate) fn new() -> PrivateBpffs {
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

    pub(crate) fn pin_path(&self) -> PathBuf {
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
pub(crate) struct TestNetns {
    pub(crate) name: String,
}

impl TestNetns {
    /// An empty network namespace (loopback down).
    pub(crate) fn new() -> TestNetns {
        let name = unique_name("sluice-dp-test");
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            sh(Command::new("ip").args(["netns", "add", &name]));
        }
        TestNetns { name }
    }

    pub(crate) fn with_veth(veth: &str, peer: &str) -> TestNetns {
        let netns = TestNetns::new();
        netns.ip(&["link", "add", veth, "type", "veth", "peer", "name", peer]);
        netns
    }

    /// A veth pair from `here` in this namespace to `there` in `other`, both up.
    pub(crate) fn link_to(&self, here: &str, other: &TestNetns, there: &str) {
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
    pub(crate) fn spawn<T: Send + 'static>(
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

    pub(crate) fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip` inside the namespace.
    pub(crate) fn ip(&self, args: &[&str]) {
        let net = format!("--net={}", self.path().display());
        sh(Command::new("nsenter").arg(net).arg("ip").args(args));
    }

    /// Runs `f` on a thread that entered the namespace (a thread's netns is its own).
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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

pub(crate) fn sh(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn ifindex(ifname: &str) -> u32 {
    let c_name = CString::new(ifname).unwrap();
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    index
}

/// Ids of the programs tcx runs on `ifname` in direction `attach_type`.
pub(crate) fn tcx_programs(ifname: &str, attach_type: TcAttachType) -> Vec<(u32, String)> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type).expect("query tcx");
    programs
        .iter()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Unpinning a link detaches it asynchronously (the kernel frees the bpffs inode after an RCU
/// grace period, then puts the link from a workqueue): wait for it, boundedly.
pub(crate) fn wait_until_detached(ifname: &str) {
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

pub(crate) fn link_id(pin: &Path) -> u32 {
    let link = FdLink::from(PinnedLink::from_pin(pin).expect("pinned link"));
    link.info().expect("link info").id()
}

// ---------------------------------------------------------------------------------------------
// Real traffic through the attached programs: namespaces for an outside client, a node, a pod
// on it and a host behind another interface of the node, wired with veths. The kernel's own
// forwarding then decides what the BPF_PROG_RUN tests can only predict: that redirected
// packets arrive, that the node's address as source is not dropped as martian, that answers
// reach the client.

/// A TCP server answering every connection with the address it sees the client as, and a UDP
/// server answering every datagram the same way, both on `port`, until the guard is dropped.
pub(crate) fn serve_peer_address(netns: &TestNetns, port: u16) -> Servers {
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
pub(crate) struct Servers {
    pub(crate) stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) threads: Vec<std::thread::JoinHandle<()>>,
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
pub(crate) fn ip_of(answer: std::io::Result<String>, what: &str) -> String {
    let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
    match answer.rsplit_once(':') {
        Some((ip, _)) => ip.to_string(),
        None => answer,
    }
}

/// Connects to `to` over TCP and returns what the server says (the client's address as it
/// saw it), or the connection's error.
pub(crate) fn ask_tcp(to: std::net::SocketAddr) -> std::io::Result<String> {
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    Ok(answer)
}

/// Sends a datagram to `to` and returns the answer, or the error (ECONNREFUSED for an ICMP
/// port unreachable).
pub(crate) fn ask_udp(to: std::net::SocketAddr) -> std::io::Result<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    socket.connect(to)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
