//! TCP and UDP "who am I" servers running on a thread inside a namespace (a pod's, a node's or
//! an external host's).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// Transport protocol of a request a server saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One request a server answered: who sent it (as the server saw it, i.e. after any NAT),
/// and to which of its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub proto: Proto,
    /// The server's port the request arrived on.
    pub port: u16,
    /// The client's IPv4 address and port. For an IPv6 client this is `0.0.0.0:0`: use
    /// [`Seen::source`], which covers both families.
    pub peer: SocketAddrV4,
    /// The client's address and port, IPv4 or IPv6 (an IPv4 client reaching a dual-stack
    /// socket is reported as IPv4, not as a v4-mapped IPv6 address).
    pub source: SocketAddr,
}

impl Seen {
    /// The client's IP address (either family).
    pub fn source_ip(&self) -> std::net::IpAddr {
        self.source.ip()
    }
}

/// Which sockets a server binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bind {
    /// `0.0.0.0:<port>`.
    V4,
    /// `[::]:<port>` with `IPV6_V6ONLY` off (IPv4 and IPv6); `0.0.0.0:<port>` if the kernel
    /// has no IPv6.
    Dual,
}

/// At most this many [`Seen`] entries are kept per pod (older ones are kept, newer dropped).
pub const MAX_SEEN: usize = 100_000;
/// How long a closed-for-writing TCP connection waits for the client's FIN before it is
/// dropped (so a client that sent a request never gets an RST instead of the answer).
const LINGER: Duration = Duration::from_secs(2);
const POLL_MS: i32 = 20;

pub(crate) struct ServerThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Binds each TCP and UDP port inside `netns` (see [`Bind`]; errors are returned here,
    /// synchronously) and serves until stopped.
    pub(crate) fn start(
        netns: PathBuf,
        answer: String,
        tcp_ports: &[u16],
        udp_ports: &[u16],
        bind: Bind,
        seen: Arc<Mutex<Vec<Seen>>>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel::<Result<()>>(1);
        let tcp_ports = tcp_ports.to_vec();
        let udp_ports = udp_ports.to_vec();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("srv-{answer}"))
            .spawn(move || {
                let setup = || -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                    crate::netns::enter_netns(&netns)?;
                    let mut tcp = Vec::new();
                    for &p in &tcp_ports {
                        let l = bind_tcp(p, bind)
                            .with_context(|| format!("binding tcp/{p} in {}", netns.display()))?;
                        l.set_nonblocking(true)?;
                        tcp.push(l);
                    }
                    let mut udp = Vec::new();
                    for &p in &udp_ports {
                        let s = bind_udp(p, bind)
                            .with_context(|| format!("binding udp/{p} in {}", netns.display()))?;
                        s.set_nonblocking(true)?;
                        udp.push(s);
                    }
                    Ok((tcp, udp))
                };
                match setup() {
                    Ok((tcp, udp)) => {
                        let _ = tx.send(Ok(()));
                        serve_loop(&stop2, answer.as_bytes(), &tcp, &udp, &seen);
                        // Stop listening now, not when the last reference goes: a process
                        // another test thread is spawning holds a copy of every descriptor
                        // until it execs, and a listener closed only by `drop` keeps
                        // accepting (then resets) connections until then. `shutdown` on a
                        // listening socket closes it whoever else holds it.
                        for l in &tcp {
                            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .context("spawning server thread")?;
        let mut this = Self {
            stop,
            thread: Some(thread),
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(this),
            Ok(Err(e)) => {
                this.stop();
                Err(e)
            }
            Err(_) => {
                this.stop();
                Err(anyhow!("server thread did not start"))
            }
        }
    }

    /// Stops the thread and closes its sockets (bounded: the loop polls every 20 ms).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn record(seen: &Mutex<Vec<Seen>>, s: Seen) {
    let mut v = seen.lock().unwrap_or_else(|e| e.into_inner());
    if v.len() < MAX_SEEN {
        v.push(s);
    }
}

/// `addr` with a v4-mapped IPv6 address turned into IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => SocketAddr::V6(a),
        },
        v4 => v4,
    }
}

fn make_seen(proto: Proto, port: u16, peer: SocketAddr) -> Seen {
    let source = canonical(peer);
    Seen {
        proto,
        port,
        peer: match source {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        },
        source,
    }
}

fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

fn dual_socket(ty: socket2::Type, port: u16) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, ty, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

fn bind_tcp(port: u16, bind: Bind) -> std::io::Result<TcpListener> {
    if bind == Bind::Dual {
        match dual_socket(socket2::Type::STREAM, port).and_then(|s| {
            s.listen(1024)?;
            Ok(s)
        }) {
            Ok(s) => return Ok(s.into()),
            Err(e) if no_ipv6(&e) => {}
            Err(e) => return Err(e),
        }
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
}

fn bind_udp(port: u16, bind: Bind) -> std::io::Result<UdpSocket> {
    if bind == Bind::Dual {
        match dual_socket(socket2::Type::DGRAM, port) {
            Ok(s) => return Ok(s.into()),
            Err(e) if no_ipv6(&e) => {}
            Err(e) => return Err(e),
        }
    }
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
}

fn serve_loop(
    stop: &AtomicBool,
    answer: &[u8],
    tcp: &[TcpListener],
    udp: &[UdpSocket],
    seen_log: &Mutex<Vec<Seen>>,
) {
    let mut reply = answer.to_vec();
    reply.push(b'\n');
    let tcp_ports: Vec<u16> = tcp
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    let udp_ports: Vec<u16> = udp
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    // Connections we answered and half-closed, waiting for the client's FIN.
    let mut lingering: Vec<(TcpStream, Instant)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = tcp
            .iter()
            .map(|l| l.as_raw_fd())
            .chain(udp.iter().map(|s| s.as_raw_fd()))
            .chain(lingering.iter().map(|(s, _)| s.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        for (i, l) in tcp.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            // Bounded per round, like the UDP loop below.
            for _ in 0..1024 {
                match l.accept() {
                    Ok((mut stream, peer)) => {
                        record(seen_log, make_seen(Proto::Tcp, tcp_ports[i], peer));
                        // A fresh socket's send buffer takes the short answer at once.
                        if stream.set_nonblocking(true).is_ok()
                            && stream.write_all(&reply).is_ok()
                            && stream.shutdown(std::net::Shutdown::Write).is_ok()
                        {
                            lingering.push((stream, Instant::now() + LINGER));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // ECONNABORTED and friends: poll again.
                    Err(_) => break,
                }
            }
        }
        for (j, s) in udp.iter().enumerate() {
            if fds[tcp.len() + j].revents == 0 {
                continue;
            }
            // Bounded per round so one flooded socket cannot starve the stop flag.
            for _ in 0..1024 {
                match s.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        record(seen_log, make_seen(Proto::Udp, udp_ports[j], peer));
                        let _ = s.send_to(&reply, peer);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // WouldBlock, or an ICMP error queued on the socket: next round.
                    Err(_) => break,
                }
            }
        }
        let base = tcp.len() + udp.len();
        let now = Instant::now();
        let mut k = 0;
        lingering.retain_mut(|(stream, deadline)| {
            let ready = fds.get(base + k).map(|f| f.revents != 0).unwrap_or(false);
            k += 1;
            if now >= *deadline {
                return false;
            }
            if !ready {
                return true;
            }
            // Drain whatever the client sent; keep it until EOF or error.
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
        });
        // Never hold more than a few thousand descriptors.
        if lingering.len() > 4096 {
            let excess = lingering.len() - 4096;
            lingering.drain(..excess);
        }
    }
}

/// The servers of one namespace and what they saw.
#[derive(Default)]
pub(crate) struct ServerSet {
    threads: Mutex<Vec<ServerThread>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ServerSet {
    /// Starts one more server thread (see [`ServerThread::start`]).
    pub(crate) fn start(
        &self,
        netns: &Path,
        answer: &str,
        tcp: &[u16],
        udp: &[u16],
        bind: Bind,
    ) -> Result<()> {
        let t = ServerThread::start(
            netns.to_path_buf(),
            answer.to_string(),
            tcp,
            udp,
            bind,
            self.seen.clone(),
        )?;
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
        Ok(())
    }

    /// Stops every server thread; their ports are closed when this returns.
    pub(crate) fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        drop(threads);
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn clear_seen(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
