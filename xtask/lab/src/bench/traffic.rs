//! Part 2: real TCP traffic through a ClusterIP in the netns testbed, for Sluice, kube-proxy's
//! iptables and nftables layouts, and the pod IP directly (the floor).
//!
//! One node (a network namespace), a client pod and a server pod on it. N services, each
//! ClusterIP:80 -> the server pod:8080. The client (direct: over 16 server ports) spreads its connections over 16 services
//! spaced evenly through the N (so iptables' linear KUBE-SERVICES walk costs what it costs on
//! average, not its best case). Per N, in this order, each in a fresh cluster:
//! (d) direct, (b) iptables-restore into the node netns, measured, flushed; (c) nft -f (the
//! same ruleset as kube-proxy's, in transactions of 500 services), measured, deleted; then (a) the agent started (no rules left) and measured. kube-proxy's rules only
//! ever exist inside the node's network namespace (`nsenter --net=<node netns>`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use sluice_testbed::{enter_netns, in_netns, sluice::SluiceCluster, Pod};

use super::{
    rules::{self, BenchService},
    stats::Summary,
    Options,
};

pub const SERVER_PORT: u16 = 8080;
/// The echo server listens on SERVER_PORT and the next ports, so the direct (floor) client
/// spreads its connections over as many destinations as the service clients do (16): with
/// one destination, connect()'s search for a source port not in TIME_WAIT towards it slows
/// the floor below the services.
const SERVER_PORTS: u16 = TARGETS as u16;
pub const SERVICE_PORT: u16 = 80;
const TARGETS: usize = 16;
/// Services per `nft -f` when loading the nftables layout for traffic.
pub const NFT_SERVICES_PER_TRANSACTION: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    Sluice,
    Iptables,
    Nftables,
    Direct,
}

impl Dataplane {
    pub fn label(self) -> &'static str {
        match self {
            Dataplane::Sluice => "Sluice",
            Dataplane::Iptables => "kube-proxy iptables",
            Dataplane::Nftables => "kube-proxy nftables",
            Dataplane::Direct => "pod IP (floor)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrafficResult {
    pub services: usize,
    pub dataplane: Dataplane,
    /// TCP_CRR-like: connect, request, response, close, per second.
    pub connections_per_s: f64,
    /// TCP_RR-like round trips over one connection, microseconds.
    pub rr_us: Summary,
}

/// A TCP server in a pod: answers each read with `tag` followed by the bytes read, until the
/// client closes; one connection at a time. Stops (bounded) when dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(pod: &Pod, tag: u8) -> anyhow::Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = pod.netns_path().to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let listeners = enter_netns(&netns).and_then(|()| {
                (0..SERVER_PORTS)
                    .map(|k| -> anyhow::Result<TcpListener> {
                        let l =
                            TcpListener::bind(("0.0.0.0", SERVER_PORT + k)).with_context(|| {
                                format!("binding the echo server's port {}", SERVER_PORT + k)
                            })?;
                        l.set_nonblocking(true)?;
                        Ok(l)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            });
            let listeners = match listeners {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                // Wait for a connection (or 100 ms, to see `stop`) without spinning, so an
                // accept costs no added latency.
                let mut fds: Vec<libc::pollfd> = listeners
                    .iter()
                    .map(|l| libc::pollfd {
                        fd: l.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: poll on valid descriptors, `fds.len()` of them.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
                // Served inline, one connection at a time: the bench's clients are sequential
                // (TCP_CRR and TCP_RR both), and a thread per connection would add its own cost
                // to every connection and blur the dataplanes' differences.
                for listener in &listeners {
                    while let Ok((stream, _)) = listener.accept() {
                        serve(stream, tag, &stop_flag);
                    }
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

/// Pins the calling thread to the last CPU. Client and server threads share it, so every
/// dataplane sees the same placement: without it the round trip is ~17 µs when the scheduler
/// happens to keep both on one CPU and ~60 µs when it wakes them across CPUs, which swamps
/// the differences measured.
pub fn pin_to_bench_cpu() {
    // SAFETY: sysconf, and sched_setaffinity on the calling thread (pid 0) with a set we own.
    unsafe {
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn serve(mut stream: TcpStream, tag: u8, stop: &AtomicBool) {
    pin_to_bench_cpu();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut answer = Vec::with_capacity(n + 1);
                answer.push(tag);
                answer.extend_from_slice(&buf[..n]);
                if stream.write_all(&answer).is_err() {
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

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request/response on `stream`: 8 bytes out, the tag and 8 bytes back. Returns the tag.
fn round_trip(stream: &mut TcpStream) -> anyhow::Result<u8> {
    stream.write_all(b"sluice-b")?;
    let mut answer = [0u8; 9];
    stream.read_exact(&mut answer)?;
    Ok(answer[0])
}

/// One TCP_CRR transaction: connect, request, response, close. Returns the server's tag.
pub fn transaction(dst: SocketAddrV4, timeout: Duration) -> anyhow::Result<u8> {
    let mut stream = TcpStream::connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    round_trip(&mut stream).with_context(|| format!("request to {dst}"))
}

/// Measures from inside the client pod: connections per second over `duration`, spread over
/// `targets`; then `round_trips` round trips over one connection to `targets[0]`.
fn measure(
    client: &Pod,
    targets: &[SocketAddrV4],
    duration: Duration,
    round_trips: usize,
) -> anyhow::Result<(f64, Summary)> {
    in_netns(client.netns_path(), || -> anyhow::Result<(f64, Summary)> {
        pin_to_bench_cpu();
        // Warm-up (ARP, the first flows, the CPUs' frequency and caches): a quarter of a
        // second of the same work, not counted.
        let warm = Instant::now();
        let mut k = 0;
        while warm.elapsed() < Duration::from_millis(250) || k < targets.len() {
            transaction(targets[k % targets.len()], Duration::from_secs(2))?;
            k += 1;
        }
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < duration {
            transaction(
                targets[done as usize % targets.len()],
                Duration::from_secs(2),
            )?;
            done += 1;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64();

        let mut stream = TcpStream::connect_timeout(&targets[0].into(), Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        for _ in 0..round_trips.min(100) {
            round_trip(&mut stream)?;
        }
        let mut samples = Vec::with_capacity(round_trips);
        for _ in 0..round_trips {
            let t = Instant::now();
            round_trip(&mut stream)?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((rate, Summary::of(samples)))
    })?
}

/// The N services, all to `server`.
pub fn bench_services(n: usize, endpoints: &[(Ipv4Addr, u16)]) -> Vec<BenchService> {
    (0..n)
        .map(|i| BenchService {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            vip: super::prog_run::service_vip(i),
            port: SERVICE_PORT,
            endpoints: endpoints.to_vec(),
        })
        .collect()
}

/// The services as manifests for the agent: one Service and one EndpointSlice each.
pub fn manifests(services: &[BenchService]) -> String {
    let mut out = String::new();
    for s in services {
        out.push_str(&service_manifest(s));
        out.push_str(&slice_manifest(s, 1));
    }
    out
}

pub fn service_manifest(s: &BenchService) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\n\
         spec:\n  clusterIP: {}\n  ports:\n  - {{name: http, port: {}, targetPort: {}}}\n",
        s.name,
        s.namespace,
        s.vip,
        s.port,
        s.endpoints.first().map(|e| e.1).unwrap_or(SERVER_PORT)
    )
}

/// The service's EndpointSlice, `generation` in its name's annotation so a rewrite is a change.
pub fn slice_manifest(s: &BenchService, generation: u64) -> String {
    let endpoints: String = s
        .endpoints
        .iter()
        .map(|(ip, _)| format!("- {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-1\n  namespace: {}\n\
         \x20 labels: {{kubernetes.io/service-name: {}}}\n  annotations: {{bench/generation: \"{generation}\"}}\n\
         addressType: IPv4\nendpoints:\n{endpoints}ports:\n- {{name: http, port: {}, protocol: TCP}}\n",
        s.name,
        s.namespace,
        s.name,
        s.endpoints.first().map(|e| e.1).unwrap_or(SERVER_PORT)
    )
}

/// Runs `program args` inside the network namespace at `netns` with `input` on stdin.
pub fn in_node_netns(
    netns: &Path,
    program: &str,
    args: &[&str],
    input: &str,
) -> anyhow::Result<()> {
    let mut child = spawn_in_netns(netns, program, args, Stdio::piped())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing {program}'s input"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} in {} failed: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Starts `program args` inside the network namespace at `netns`, its stdin and stderr piped.
pub fn spawn_in_netns(
    netns: &Path,
    program: &str,
    args: &[&str],
    stdout: Stdio,
) -> anyhow::Result<std::process::Child> {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} in {}", netns.display()))
}

/// The 16 measured frontends, spread over the N.
fn targets(services: &[BenchService]) -> Vec<SocketAddrV4> {
    let n = services.len();
    let count = TARGETS.min(n);
    (0..count)
        .map(|k| {
            let s = &services[(k * n / count + n / (2 * count)).min(n - 1)];
            SocketAddrV4::new(s.vip, s.port)
        })
        .collect()
}

pub fn run(options: &Options) -> anyhow::Result<Vec<TrafficResult>> {
    let mut results = Vec::new();
    for &n in &options.traffic_services {
        let mut cluster = SluiceCluster::new("bench", 1)?;
        let node = cluster.node(1);
        let netns = node.netns_path().to_owned();
        let server = node.add_pod("bench-server", node.pod_ip(21))?;
        let client = node.add_pod("bench-client", node.pod_ip(10))?;
        let _echo = EchoServer::start(&server, b'A')?;
        let services = bench_services(n, &[(server.ip(), SERVER_PORT)]);
        let duration = options.traffic_duration;
        let rr = options.round_trips;
        let mut record = |dataplane: Dataplane, (rate, rr_us): (f64, Summary)| {
            eprintln!(
                "bench: {n} services, {}: {rate:.0} conn/s, RR p50 {:.1} us p99 {:.1} us",
                dataplane.label(),
                rr_us.p50,
                rr_us.p99
            );
            results.push(TrafficResult {
                services: n,
                dataplane,
                connections_per_s: rate,
                rr_us,
            });
        };

        let direct: Vec<SocketAddrV4> = (0..SERVER_PORTS)
            .map(|k| SocketAddrV4::new(server.ip(), SERVER_PORT + k))
            .collect();
        record(Dataplane::Direct, measure(&client, &direct, duration, rr)?);

        let loading = Instant::now();
        in_node_netns(
            &netns,
            "iptables-restore",
            &[],
            &rules::iptables_restore(&services),
        )?;
        eprintln!(
            "bench: {n} services: iptables layout loaded in {:?}",
            loading.elapsed()
        );
        let measured = measure(&client, &targets(&services), duration, rr);
        in_node_netns(&netns, "iptables-restore", &[], rules::IPTABLES_FLUSH)?;
        record(
            Dataplane::Iptables,
            measured.context("through the iptables layout")?,
        );

        // The same ruleset as kube-proxy's one transaction, loaded in several: only the
        // rules matter here, and one transaction of 10,000 services takes minutes
        // (rules::nft_script).
        let loading = Instant::now();
        let transactions = rules::nft_transactions(&services, NFT_SERVICES_PER_TRANSACTION);
        for transaction in &transactions {
            in_node_netns(&netns, "nft", &["-f", "-"], transaction)?;
        }
        eprintln!(
            "bench: {n} services: nftables layout loaded in {:?} ({} transactions)",
            loading.elapsed(),
            transactions.len()
        );
        let measured = measure(&client, &targets(&services), duration, rr);
        in_node_netns(&netns, "nft", &["-f", "-"], rules::NFT_FLUSH)?;
        record(
            Dataplane::Nftables,
            measured.context("through the nftables layout")?,
        );

        cluster
            .manifests
            .write("bench-services.yaml", &manifests(&services))?;
        let agent = cluster.spawn_agent(1, &[])?;
        agent.wait_for_log(
            sluice_testbed::sluice::AGENT_READY_LINE,
            Duration::from_secs(600),
        )?;
        record(
            Dataplane::Sluice,
            measure(&client, &targets(&services), duration, rr).context("through Sluice")?,
        );
    }
    Ok(results)
}
