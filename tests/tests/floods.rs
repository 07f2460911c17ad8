//! The datapath under floods and load, with real traffic on a netns node (issue #13):
//! * a flood of new flows (SYNs from both CPUs) leaves other pods' established connections
//!   alone, for service flows (conntrack) and for NetworkPolicy flows (policy_flows), and
//!   what could not be protected is counted and logged;
//! * masquerading finds a source port while one is free: 30,000 concurrent masqueraded
//!   connections to one backend through one node, and 2,000 short connections a second for
//!   20 s without a drop.
//!
//! The maps are made small (`--max-conntrack`, `--max-policy-flows`) so a flood of tens of
//! thousands of SYNs overflows them many times over, as 180,000 SYNs overflow the defaults.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sluice_testbed::{enter_netns, sluice::SluiceCluster, Pod};

const TIMEOUT: Duration = Duration::from_secs(3);

/// One test of this file at a time: each loads the node's CPUs on purpose, and the rates
/// measured are this file's, not a neighbour's.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// SYNs the kernel of `pod`'s netns retransmitted so far (TcpExt TCPSynRetrans): a SYN that
/// went unanswered for its 1 s timeout, e.g. dropped for want of a masquerade port.
fn syn_retransmits(pod: &Pod) -> u64 {
    pod.run(|| {
        let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "TCPSynRetrans")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap()
    })
    .unwrap()
}
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
const PORT: u16 = 8080;

/// What a [`Server`] does with a connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers each line with the pod's name.
    Echo,
    /// Keeps it open, silent.
    Hold,
    /// Closes it.
    Close,
}

/// A TCP server in a pod: every accepted connection is kept open; in echo mode each line it
/// reads is answered with the pod's name (one thread per connection), else it is only held
/// (30,000 connections need no 30,000 threads). Records every peer. Stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Server {
    fn start(pod: &Pod, port: u16, echo: bool) -> Server {
        Server::start_with(pod, port, if echo { Mode::Echo } else { Mode::Hold })
    }

    fn start_with(pod: &Pod, port: u16, mode: Mode) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (netns, name) = (pod.netns_path().to_path_buf(), pod.name().to_string());
        let (stop2, peers2) = (stop.clone(), peers.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_netns(&netns).unwrap();
            let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
            // SAFETY: listen(2) on a valid socket: a backlog for 2,000 connections a second.
            unsafe { libc::listen(listener.as_raw_fd(), 4096) };
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut held = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        peers2.lock().unwrap().push(peer);
                        stream.set_nonblocking(false).unwrap();
                        match mode {
                            Mode::Echo => {
                                let (name, stop3) = (name.clone(), stop2.clone());
                                std::thread::spawn(move || echo_lines(stream, &name, &stop3));
                            }
                            Mode::Hold => held.push(stream),
                            Mode::Close => drop(stream),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("the server did not start");
        Server {
            stop,
            thread: Some(thread),
            peers,
        }
    }

    /// A server that records each connection's peer and closes it at once.
    fn start_closing(pod: &Pod, port: u16) -> Server {
        Server::start_with(pod, port, Mode::Close)
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers each line read with `name`, until EOF (or the test ends).
fn echo_lines(stream: TcpStream, name: &str, stop: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// One line sent on `stream`, the answer read back.
fn ping(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"ping\n")?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).to_string())
}

/// `n` connections from `client` to `dst`, each answered once: (stream, who answered).
fn open_idle_connections(client: &Pod, dst: SocketAddrV4, n: usize) -> Vec<(TcpStream, String)> {
    client
        .run(|| {
            (0..n)
                .map(|_| {
                    let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT).unwrap();
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    let first = ping(&mut s).unwrap();
                    (s, first)
                })
                .collect()
        })
        .unwrap()
}

/// How many of `connections` still reach the backend that answered them first.
fn still_on_their_backend(connections: &mut [(TcpStream, String)]) -> (usize, Vec<String>) {
    let mut kept = 0;
    let mut failures = Vec::new();
    for (stream, first) in connections.iter_mut() {
        match ping(stream) {
            Ok(answer) if answer == *first => kept += 1,
            Ok(answer) => failures.push(format!("answered by {answer}, not {first}")),
            Err(e) => failures.push(format!("{first}: {e}")),
        }
    }
    (kept, failures)
}

/// The one's-complement sum of `data`, folded.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN from `src`:`sport` to `dst`:`dport` (the kernel fills the IP checksum and
/// length of a raw socket's packet; the TCP checksum is ours).
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for half in [src.octets(), dst.octets()] {
        pseudo += u16::from_be_bytes([half[0], half[1]]) as u32;
        pseudo += u16::from_be_bytes([half[2], half[3]]) as u32;
    }
    pseudo += 6 + 20;
    let sum = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

/// `per_cpu` SYNs to `dst`:`dport` from `flooder`, each from another source port, sent by
/// one thread pinned to each CPU (the kernel's LRU keeps per-CPU lists: a one-CPU flood can
/// miss entries the other CPU holds). Returns how many were sent.
fn flood(flooder: &Pod, dst: Ipv4Addr, dport: u16, per_cpu: u32) -> usize {
    let sent = Arc::new(AtomicUsize::new(0));
    let netns: PathBuf = flooder.netns_path().to_path_buf();
    let src = flooder.ip();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<JoinHandle<()>> = (0..cpus)
        .map(|cpu| {
            let (netns, sent) = (netns.clone(), sent.clone());
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of_cpu_set(), &set);
                }
                enter_netns(&netns).unwrap();
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::from(libc::SOCK_RAW),
                    Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
                )
                .unwrap();
                let to = socket2::SockAddr::from(SocketAddrV4::new(dst, dport));
                for i in 0..per_cpu {
                    // Distinct source ports per CPU: the tuples never repeat within a run.
                    let sport = 1_024 + ((i + cpu as u32 * per_cpu) % 64_000) as u16;
                    let packet = syn(src, sport, dst, dport, i.wrapping_mul(2_654_435_761));
                    if socket.send_to(&packet, &to).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    sent.load(Ordering::Relaxed)
}

fn size_of_cpu_set() -> usize {
    std::mem::size_of::<libc::cpu_set_t>()
}

/// The drop and event counters `sluice state drops` shows for node `i`, by reason name.
fn counters(cluster: &SluiceCluster, i: usize) -> BTreeMap<String, u64> {
    let pins = cluster.pins[i - 1].path().to_str().unwrap().to_string();
    let output = cluster.run_sluice(i, &["state", "--pin-path", &pins, "--json", "drops"]);
    let json: serde_json::Value = serde_json::from_str(&output).unwrap();
    json["drops"]
        .as_object()
        .map(|drops| {
            drops
                .iter()
                .filter_map(|(reason, n)| Some((reason.clone(), n.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A ClusterIP service `web` (VIP:80 -> `PORT`) over `backends`, all on node-1.
fn service(backends: &[&Pod]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|p| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-1, conditions: {{ready: true}}}}\n",
                p.ip()
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: flood}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, targetPort: {PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: flood
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: {PORT}, protocol: TCP}}
"#
    )
}

#[test]
fn a_flood_of_new_flows_leaves_established_service_connections_alone() {
    let _serial = serial();
    let mut cluster = SluiceCluster::new("flood-ct", 1).unwrap();
    let node = cluster.node(1);
    let backends: Vec<Pod> = (0..3)
        .map(|i| {
            node.add_pod(&format!("web-{i}"), node.pod_ip(10 + i))
                .unwrap()
        })
        .collect();
    let a = node.add_pod("client-a", node.pod_ip(20)).unwrap();
    let b = node.add_pod("flooder-b", node.pod_ip(21)).unwrap();
    let c = node.add_pod("busy-c", node.pod_ip(22)).unwrap();
    let _servers: Vec<Server> = backends
        .iter()
        .map(|p| Server::start(p, PORT, true))
        .collect();
    cluster
        .manifests
        .write("web.yaml", &service(&backends.iter().collect::<Vec<_>>()))
        .unwrap();
    // 64 entries per conntrack map: A's 5 connections (10 entries) fit in the answered map,
    // C's 40 (80 entries) do not all fit; the flood overflows the LRU hundreds of times.
    cluster
        .start_agent(
            1,
            &["--max-conntrack", "64", "--conntrack-gc-interval", "500ms"],
        )
        .unwrap();
    let vip = SocketAddrV4::new(VIP, 80);

    let mut idle = open_idle_connections(&a, vip, 5);
    let answered_by: BTreeSet<&str> = idle.iter().map(|(_, who)| who.as_str()).collect();
    assert!(!answered_by.is_empty());
    let mut busy = open_idle_connections(&c, vip, 40);

    let sent = flood(&b, VIP, 80, 20_000);
    assert!(sent >= 30_000, "only {sent} SYNs sent");

    // Every one of A's idle connections still reaches its backend: its entries were never
    // evictable. (Before: 26 of 40 were reset by another backend.)
    let (kept, failures) = still_on_their_backend(&mut idle);
    assert_eq!(kept, 5, "{failures:?}");
    // C's connections that found no room among the answered flows were counted, and the
    // agent said what to do about it.
    let counts = counters(&cluster, 1);
    assert!(
        counts.get("conntrack-answered-full").copied().unwrap_or(0) > 0,
        "{counts:?}"
    );
    cluster
        .agent_mut(1)
        .unwrap()
        .wait_for_log("ct_answered is full", Duration::from_secs(5))
        .unwrap();
    // Those of C's connections that stayed answered survive as well.
    let (kept_busy, _) = still_on_their_backend(&mut busy);
    assert!(kept_busy >= 20, "{kept_busy} of C's 40 connections kept");
}

fn pod_manifest(pod: &Pod, label: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: flood, labels: {{pod: {label}}}}}\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: {PORT}}}\n\
         status: {{podIP: {}}}\n",
        pod.name(),
        pod.ip()
    )
}

/// S admits no ingress at all.
const DENY_INGRESS_TO_S: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-s, namespace: flood}
spec:
  podSelector: {matchLabels: {pod: s}}
  policyTypes: [Ingress]
"#;

#[test]
fn a_flood_of_new_flows_leaves_established_policy_flows_alone() {
    let _serial = serial();
    let mut cluster = SluiceCluster::new("flood-pol", 1).unwrap();
    let node = cluster.node(1);
    let s = node.add_pod("server-s", node.pod_ip(10)).unwrap();
    let a = node.add_pod("client-a", node.pod_ip(20)).unwrap();
    let b = node.add_pod("flooder-b", node.pod_ip(21)).unwrap();
    let _server = Server::start(&s, PORT, true);
    let pods = [
        pod_manifest(&s, "s"),
        pod_manifest(&a, "a"),
        pod_manifest(&b, "b"),
    ]
    .concat();
    cluster
        .manifests
        .write(
            "pods.yaml",
            &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: flood}}\n{pods}"),
        )
        .unwrap();
    cluster
        .start_agent(1, &["--max-policy-flows", "64"])
        .unwrap();
    let to_s = SocketAddrV4::new(s.ip(), PORT);

    let mut idle = open_idle_connections(&a, to_s, 5);
    let sent = flood(&b, s.ip(), PORT, 20_000);
    assert!(sent >= 30_000, "only {sent} SYNs sent");

    // A policy now isolates S: new connections from A are denied, the established ones it
    // admitted before stay (the flood did not evict them). Before: 0 of 5 survived.
    cluster
        .manifests
        .write("deny.yaml", DENY_INGRESS_TO_S)
        .unwrap();
    cluster
        .agent_mut(1)
        .unwrap()
        .wait_for_log("network policy synced", Duration::from_secs(10))
        .unwrap();
    let denied = a
        .run(|| TcpStream::connect_timeout(&to_s.into(), Duration::from_millis(800)))
        .unwrap();
    assert!(
        denied.is_err(),
        "a new connection to the isolated pod went through"
    );
    let (kept, failures) = still_on_their_backend(&mut idle);
    assert_eq!(kept, 5, "{failures:?}");
}

/// Lets the calling thread's netns take source ports 1024-65535 and reuse its TIME_WAIT ones
/// (a client of tens of thousands of connections to one destination).
fn widen_local_ports() {
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").unwrap();
    // A load client's own TIME_WAIT sockets would otherwise hold its ports for 60 s (connect()
    // fails with EAGAIN): reused for new connections, as load generators do.
    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap();
}

/// Raises the open-file limit to 200,000 (tens of thousands of sockets on both ends; root
/// may raise the hard limit too). Returns the limit in force.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let wanted = limit.rlim_max.max(200_000);
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return wanted;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_cur
    }
}

#[test]
fn thirty_thousand_concurrent_masqueraded_connections_to_one_backend() {
    let _serial = serial();
    let mut cluster = SluiceCluster::new("masq-30k", 1).unwrap();
    let node = cluster.node(1);
    let backend = node.add_pod("web-0", node.pod_ip(10)).unwrap();
    let client = node.add_pod("client", node.pod_ip(20)).unwrap();
    // The backend closes each connection once it saw it (this process may hold only so many
    // descriptors); its flow keeps its masquerade port while the client holds its end.
    let server = Server::start_closing(&backend, PORT);
    cluster
        .manifests
        .write("web.yaml", &service(&[&backend]))
        .unwrap();
    cluster.start_agent(1, &["--masquerade-all"]).unwrap();
    let node_ip = cluster.node(1).node_ip().unwrap();
    client.run(widen_local_ports).unwrap();
    let retransmits_before = syn_retransmits(&client);

    // 30,000 connections through the ClusterIP, held open by two client processes: each
    // masqueraded to the node's address with a source port of its own toward the one backend.
    let (target, per_process) = (30_000usize, 15_000usize);
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_sluice-probe"));
    let mut holders: Vec<std::process::Child> = (0..target / per_process)
        .map(|_| {
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", client.netns_path().display()))
                .arg(&probe)
                .args([
                    "hold",
                    &SocketAddrV4::new(VIP, 80).to_string(),
                    &per_process.to_string(),
                    "3000",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<String> = holders
        .iter_mut()
        .map(|child| {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim().to_string()
        })
        .collect();
    let counts = counters(&cluster, 1);
    let retransmits = syn_retransmits(&client) - retransmits_before;
    let peers = server.peers();
    for child in &mut holders {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    assert_eq!(
        counts.get("drop-no-snat-port").copied().unwrap_or(0),
        0,
        "{counts:?} {reports:?}"
    );
    // Every connection made, none after a SYN retransmission (the kernel's count; the
    // probes' own "slow" count also sees a client descheduled on a loaded machine).
    for report in &reports {
        assert!(
            report.starts_with(&format!("held {per_process} slow "))
                && report.ends_with(" failed 0"),
            "{reports:?}"
        );
    }
    assert_eq!(retransmits, 0, "SYN retransmissions: {reports:?}");
    // The backend saw 30,000 distinct masqueraded sources at once, none of them an ephemeral
    // port of the node.
    let sources: BTreeSet<SocketAddr> = peers.iter().copied().collect();
    assert_eq!(sources.len(), target, "{} accepted", peers.len());
    assert!(sources.iter().all(|p| {
        p.ip() == std::net::IpAddr::V4(node_ip) && !(32_768..=60_999).contains(&p.port())
    }));
    assert_eq!(
        counts.get("drop-no-snat-port").copied().unwrap_or(0),
        0,
        "{counts:?}"
    );
}

#[test]
fn two_thousand_short_masqueraded_connections_a_second_for_twenty_seconds() {
    let _serial = serial();
    raise_nofile();
    let mut cluster = SluiceCluster::new("masq-churn", 1).unwrap();
    let node = cluster.node(1);
    let backend = node.add_pod("web-0", node.pod_ip(10)).unwrap();
    let client = node.add_pod("client", node.pod_ip(20)).unwrap();
    let _server = Server::start(&backend, PORT, true);
    cluster
        .manifests
        .write("web.yaml", &service(&[&backend]))
        .unwrap();
    cluster.start_agent(1, &["--masquerade-all"]).unwrap();

    // 4 clients of 500 connections a second each: connect, one request, close. Each closed
    // flow holds its masquerade port for the close timeout (10 s): ~20,000 ports in use.
    let (rate, seconds, workers) = (2_000u64, 20u64, 4u64);
    let per_worker = rate * seconds / workers;
    let interval = Duration::from_micros(1_000_000 * workers / rate);
    let netns = client.netns_path().to_path_buf();
    client.run(widen_local_ports).unwrap();
    let retransmits_before = syn_retransmits(&client);
    let started = Instant::now();
    let results: Vec<(u64, u64, Vec<String>)> = (0..workers)
        .map(|_| {
            let netns = netns.clone();
            std::thread::spawn(move || {
                enter_netns(&netns).unwrap();
                let (mut ok, mut slow, mut errors) = (0, 0, Vec::new());
                let begin = Instant::now();
                for i in 0..per_worker {
                    let due = begin + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t = Instant::now();
                    let result =
                        TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), TIMEOUT)
                            .and_then(|mut s| {
                                s.set_read_timeout(Some(TIMEOUT))?;
                                ping(&mut s)
                            });
                    match result {
                        Ok(_) => ok += 1,
                        Err(e) if errors.len() < 5 => errors.push(e.to_string()),
                        Err(_) => {}
                    }
                    if t.elapsed() > Duration::from_millis(900) {
                        slow += 1;
                    }
                }
                (ok, slow, errors)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let slow: u64 = results.iter().map(|r| r.1).sum();
    let errors: Vec<&String> = results.iter().flat_map(|r| &r.2).collect();
    assert_eq!(ok, rate * seconds, "failures: {errors:?}");
    let retransmits = syn_retransmits(&client) - retransmits_before;
    assert_eq!(
        retransmits, 0,
        "SYN retransmissions ({slow} connections took 900 ms or more)"
    );
    assert!(
        elapsed < Duration::from_secs(seconds + 10),
        "the load took {elapsed:?}: not 2,000 connections a second"
    );
    let counts = counters(&cluster, 1);
    assert_eq!(
        counts.get("drop-no-snat-port").copied().unwrap_or(0),
        0,
        "{counts:?}"
    );
}
