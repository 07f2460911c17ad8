//! Clients that run in the calling thread's network namespace.
//!
//! [`crate::Pod::tcp_request`] and friends call these on a thread inside the pod's netns; call
//! them directly inside [`crate::in_netns`] for custom loops.
//!
//! Two flavours:
//!
//! * [`tcp_request`] / [`udp_request`] (IPv4, `anyhow` errors, [`Reply`]): the original API.
//! * [`tcp_request_any`] / [`udp_request_any`] (IPv4 or IPv6, [`ReplyAny`]) whose error,
//!   [`RequestError`], tells *how* a request failed: refused (TCP RST), ICMP destination
//!   unreachable (with the ICMP sender for UDP), reset, or timed out.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// What a server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The answer, trimmed: the answering pod's name for the testbed's servers.
    pub text: String,
    /// The address the client's socket was talking to: `getpeername` for TCP, the source of
    /// the reply datagram (`recvfrom`) for UDP. For a service request this is the service
    /// address if reverse NAT worked.
    pub peer: SocketAddrV4,
    /// The client socket's own address (`getsockname`).
    pub local: SocketAddrV4,
}

/// What a server answered, for either address family ([`tcp_request_any`],
/// [`udp_request_any`]). Addresses are as in [`Reply`]; an IPv4-mapped IPv6 address is
/// reported as IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAny {
    /// The answer, trimmed: the answering pod's (node's, host's) name for the testbed's servers.
    pub text: String,
    /// `getpeername` for TCP, the reply datagram's source for UDP.
    pub peer: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
}

impl ReplyAny {
    /// The same reply as a [`Reply`], if both addresses are IPv4.
    pub fn to_v4(&self) -> Option<Reply> {
        match (self.peer, self.local) {
            (SocketAddr::V4(peer), SocketAddr::V4(local)) => Some(Reply {
                text: self.text.clone(),
                peer,
                local,
            }),
            _ => None,
        }
    }
}

impl From<Reply> for ReplyAny {
    fn from(r: Reply) -> Self {
        ReplyAny {
            text: r.text,
            peer: r.peer.into(),
            local: r.local.into(),
        }
    }
}

/// Which kind of ICMP destination unreachable (or local routing failure) stopped a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnreachableKind {
    /// Port unreachable (ICMP type 3 code 3, ICMPv6 type 1 code 4); for UDP also a bare
    /// `ECONNREFUSED`.
    Port,
    /// Host unreachable (ICMP codes 1, 7; ICMPv6 code 3 "address unreachable"),
    /// `EHOSTUNREACH`.
    Host,
    /// Network unreachable (ICMP codes 0, 6; ICMPv6 code 0 "no route"), `ENETUNREACH`; also
    /// the local stack having no route at all.
    Net,
    /// Administratively prohibited / filtered (ICMP codes 9, 10, 13; ICMPv6 codes 1, 5, 6),
    /// `EACCES`.
    Prohibited,
    /// Another destination-unreachable code (e.g. fragmentation needed).
    Other { code: u8 },
}

/// An ICMP destination unreachable, or a local "no route", that failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Unreachable {
    pub kind: UnreachableKind,
    /// Who sent the ICMP error (UDP only: read from the socket's error queue, `IP_RECVERR`).
    /// `None` for TCP (the kernel does not tell) and for errors of the local stack without
    /// an ICMP message (e.g. no route in the client's own namespace).
    pub from: Option<IpAddr>,
}

/// How a [`tcp_request_any`] / [`udp_request_any`] failed.
#[derive(Debug)]
pub enum RequestError {
    /// TCP connect refused (`ECONNREFUSED`): an RST in answer to the SYN, e.g. a closed port
    /// or a service without endpoints. (The kernel reports an ICMP port unreachable in answer
    /// to a SYN the same way; TCP cannot tell them apart.)
    Refused,
    /// An established TCP connection was reset (`ECONNRESET`) before the answer was complete.
    Reset,
    /// ICMP destination unreachable (UDP: a closed port gives [`UnreachableKind::Port`]), or
    /// no route from the client (`ENETUNREACH`, `EHOSTUNREACH` raised locally).
    Unreachable(Unreachable),
    /// Nothing came back in time (connect or answer): dropped somewhere.
    Timeout,
    /// Anything else (socket errors, other ICMP errors such as time exceeded, bad answers).
    Other(anyhow::Error),
}

impl RequestError {
    /// [`RequestError::Refused`].
    pub fn is_refused(&self) -> bool {
        matches!(self, RequestError::Refused)
    }
    /// [`RequestError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, RequestError::Timeout)
    }
    /// [`RequestError::Reset`].
    pub fn is_reset(&self) -> bool {
        matches!(self, RequestError::Reset)
    }
    /// The unreachable details, if it is [`RequestError::Unreachable`].
    pub fn unreachable(&self) -> Option<Unreachable> {
        match self {
            RequestError::Unreachable(u) => Some(*u),
            _ => None,
        }
    }
    /// An [`RequestError::Unreachable`] of kind [`UnreachableKind::Port`].
    pub fn is_port_unreachable(&self) -> bool {
        matches!(self.unreachable(), Some(u) if u.kind == UnreachableKind::Port)
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Refused => write!(f, "connection refused"),
            RequestError::Reset => write!(f, "connection reset"),
            RequestError::Unreachable(u) => {
                let what = match u.kind {
                    UnreachableKind::Port => "port unreachable".to_string(),
                    UnreachableKind::Host => "host unreachable".to_string(),
                    UnreachableKind::Net => "network unreachable".to_string(),
                    UnreachableKind::Prohibited => "administratively prohibited".to_string(),
                    UnreachableKind::Other { code } => {
                        format!("destination unreachable code {code}")
                    }
                };
                match u.from {
                    Some(from) => write!(f, "{what} (ICMP from {from})"),
                    None => write!(f, "{what}"),
                }
            }
            RequestError::Timeout => write!(f, "timed out"),
            RequestError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Other(e) => e.chain().nth(1),
            _ => None,
        }
    }
}

impl From<anyhow::Error> for RequestError {
    fn from(e: anyhow::Error) -> Self {
        RequestError::Other(e)
    }
}

/// Longest answer read.
const MAX_REPLY: usize = 64 * 1024;

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, a.port())),
            None => SocketAddr::V6(a),
        },
        v4 => v4,
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
}

fn unreachable(kind: UnreachableKind, from: Option<IpAddr>) -> RequestError {
    RequestError::Unreachable(Unreachable { kind, from })
}

/// Classifies a socket error by errno (no ICMP details).
fn classify(e: std::io::Error, udp: bool, what: &str) -> RequestError {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) if udp => unreachable(UnreachableKind::Port, None),
        Some(libc::ECONNREFUSED) => RequestError::Refused,
        Some(libc::ECONNRESET) => RequestError::Reset,
        Some(libc::EHOSTUNREACH) => unreachable(UnreachableKind::Host, None),
        Some(libc::ENETUNREACH) => unreachable(UnreachableKind::Net, None),
        Some(libc::EACCES) => unreachable(UnreachableKind::Prohibited, None),
        Some(libc::ETIMEDOUT | libc::EAGAIN) => RequestError::Timeout,
        _ if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            RequestError::Timeout
        }
        _ => RequestError::Other(anyhow::Error::new(e).context(what.to_string())),
    }
}

/// Connects to `dst` over TCP (IPv4 or IPv6), sends nothing, reads the answer until the
/// server closes, all within `timeout`; failures are classified ([`RequestError`]).
pub fn tcp_request_any(
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<ReplyAny, RequestError> {
    let dst = dst.into();
    let timeout = timeout.max(Duration::from_millis(1));
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&dst, timeout)
        .map_err(|e| classify(e, false, &format!("tcp connect to {dst}")))?;
    let peer = canonical(s.peer_addr().context("getpeername")?);
    let local = canonical(s.local_addr().context("getsockname")?);
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(RequestError::Timeout);
        };
        s.set_read_timeout(Some(left)).context("SO_RCVTIMEO")?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if data.len() > MAX_REPLY {
                    return Err(RequestError::Other(anyhow!(
                        "tcp {local} -> {dst}: answer longer than {MAX_REPLY} bytes"
                    )));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify(e, false, &format!("tcp {local} -> {dst}: read"))),
        }
    }
    Ok(ReplyAny {
        text: String::from_utf8_lossy(&data).trim().to_string(),
        peer,
        local,
    })
}

/// Sends one datagram to `dst` (IPv4 or IPv6) from a *connected* UDP socket (so the kernel
/// drops replies whose source is not exactly `dst`) and waits up to `timeout` for the answer.
/// The socket has `IP_RECVERR`/`IPV6_RECVERR` on, so every ICMP error is reported, with its
/// type, code and sender ([`RequestError::Unreachable`]).
pub fn udp_request_any(
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<ReplyAny, RequestError> {
    let dst = dst.into();
    let timeout = timeout.max(Duration::from_millis(1));
    let any: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).context("udp bind")?;
    set_recverr(s.as_raw_fd(), dst.is_ipv4()).context("setting IP_RECVERR")?;
    s.connect(dst)
        .map_err(|e| classify(e, true, &format!("udp connect to {dst}")))?;
    let local = canonical(s.local_addr().context("getsockname")?);
    s.send(b"who\n")
        .map_err(|e| udp_error(&s, e, &format!("udp {local} -> {dst}: send")))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_REPLY];
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(RequestError::Timeout);
        };
        s.set_read_timeout(Some(left)).context("SO_RCVTIMEO")?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Ok(ReplyAny {
                    text: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    peer: canonical(from),
                    local,
                })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(udp_error(&s, e, &format!("udp {local} -> {dst}: recv"))),
        }
    }
}

fn set_recverr(fd: RawFd, v4: bool) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    let (level, name) = if v4 {
        (libc::SOL_IP, libc::IP_RECVERR)
    } else {
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    };
    // SAFETY: setsockopt with a valid pointer to an int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A UDP socket error: timeouts as such, else the ICMP error from the error queue if there
/// is one, else classified by errno.
fn udp_error(s: &UdpSocket, e: std::io::Error, what: &str) -> RequestError {
    if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) {
        return RequestError::Timeout;
    }
    match read_errqueue(s.as_raw_fd()) {
        Some(icmp) => icmp.into_error(what),
        None => classify(e, true, what),
    }
}

/// One entry of a socket's error queue (`struct sock_extended_err` and its offender).
#[derive(Debug, Clone, Copy)]
struct QueuedError {
    errno: i32,
    origin: u8,
    icmp_type: u8,
    code: u8,
    from: Option<IpAddr>,
}

impl QueuedError {
    fn into_error(self, what: &str) -> RequestError {
        let kind = match (self.origin, self.icmp_type) {
            // ICMP destination unreachable.
            (libc::SO_EE_ORIGIN_ICMP, 3) => Some(match self.code {
                0 | 6 | 11 => UnreachableKind::Net,
                1 | 7 | 12 => UnreachableKind::Host,
                3 => UnreachableKind::Port,
                9 | 10 | 13 => UnreachableKind::Prohibited,
                code => UnreachableKind::Other { code },
            }),
            // ICMPv6 destination unreachable.
            (libc::SO_EE_ORIGIN_ICMP6, 1) => Some(match self.code {
                0 => UnreachableKind::Net,
                3 => UnreachableKind::Host,
                4 => UnreachableKind::Port,
                1 | 5 | 6 => UnreachableKind::Prohibited,
                code => UnreachableKind::Other { code },
            }),
            _ => None,
        };
        match kind {
            Some(kind) => unreachable(kind, self.from),
            None => RequestError::Other(anyhow!(
                "{what}: {} (error queue: origin {} type {} code {} from {:?})",
                std::io::Error::from_raw_os_error(self.errno),
                self.origin,
                self.icmp_type,
                self.code,
                self.from
            )),
        }
    }
}

/// Reads one entry of the socket's error queue (`MSG_ERRQUEUE`), without blocking.
fn read_errqueue(fd: RawFd) -> Option<QueuedError> {
    let mut data = [0u8; 256];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr and sockaddr_storage are plain data; all-zero is a valid value.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in msg refers to live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    // SAFETY: walking the control messages the kernel wrote into `control`, with the libc
    // macros; the extended error and its offender address lie inside the message.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR)
            {
                let ee_ptr = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let ee = std::ptr::read_unaligned(ee_ptr);
                let offender = libc::SO_EE_OFFENDER(ee_ptr) as *const u8;
                let data_end = (cmsg as *const u8).add(c.cmsg_len as usize);
                let from = sockaddr_ip(offender, data_end);
                return Some(QueuedError {
                    errno: ee.ee_errno as i32,
                    origin: ee.ee_origin,
                    icmp_type: ee.ee_type,
                    code: ee.ee_code,
                    from,
                });
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    None
}

/// The IP address of the `sockaddr_in`/`sockaddr_in6` at `p` (ending before `end`).
///
/// # Safety
/// `p..end` must be readable.
unsafe fn sockaddr_ip(p: *const u8, end: *const u8) -> Option<IpAddr> {
    let avail = (end as usize).saturating_sub(p as usize);
    if avail < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    let family = std::ptr::read_unaligned(p as *const libc::sa_family_t);
    match family as i32 {
        libc::AF_INET if avail >= std::mem::size_of::<libc::sockaddr_in>() => {
            let sin = std::ptr::read_unaligned(p as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 if avail >= std::mem::size_of::<libc::sockaddr_in6>() => {
            let sin6 = std::ptr::read_unaligned(p as *const libc::sockaddr_in6);
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            })
        }
        _ => None,
    }
}

fn to_v4(r: ReplyAny) -> Result<Reply> {
    let what = format!("{r:?}");
    r.to_v4()
        .with_context(|| format!("unexpected IPv6 address in {what}"))
}

/// Connects to `dst` over TCP, sends nothing, reads the answer until the server closes, all
/// within `timeout`. (IPv4; [`tcp_request_any`] for IPv6 and classified errors.)
pub fn tcp_request(dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    match tcp_request_any(dst, timeout) {
        Ok(r) => to_v4(r),
        Err(RequestError::Timeout) => bail!("tcp -> {dst}: timed out after {timeout:?}"),
        Err(e) => Err(anyhow::Error::new(e).context(format!("tcp request to {dst}"))),
    }
}

/// Sends one datagram to `dst` from a *connected* UDP socket (so the kernel drops replies
/// whose source is not exactly `dst`) and waits up to `timeout` for the answer. (IPv4;
/// [`udp_request_any`] for IPv6 and classified errors.)
pub fn udp_request(dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    match udp_request_any(dst, timeout) {
        Ok(r) => to_v4(r),
        Err(RequestError::Timeout) => bail!("udp -> {dst}: no answer within {timeout:?}"),
        Err(e) => Err(anyhow::Error::new(e).context(format!("udp request to {dst}"))),
    }
}

/// `n` sequential [`tcp_request`]s (each with its own `timeout`).
pub fn tcp_requests(dst: SocketAddrV4, n: usize, timeout: Duration) -> Vec<Result<Reply>> {
    (0..n).map(|_| tcp_request(dst, timeout)).collect()
}

/// `n` sequential [`udp_request`]s, each from a new socket (a new source port).
pub fn udp_requests(dst: SocketAddrV4, n: usize, timeout: Duration) -> Vec<Result<Reply>> {
    (0..n).map(|_| udp_request(dst, timeout)).collect()
}

/// `n` sequential [`tcp_request_any`]s.
pub fn tcp_requests_any(
    dst: impl Into<SocketAddr>,
    n: usize,
    timeout: Duration,
) -> Vec<Result<ReplyAny, RequestError>> {
    let dst = dst.into();
    (0..n).map(|_| tcp_request_any(dst, timeout)).collect()
}

/// `n` sequential [`udp_request_any`]s, each from a new socket.
pub fn udp_requests_any(
    dst: impl Into<SocketAddr>,
    n: usize,
    timeout: Duration,
) -> Vec<Result<ReplyAny, RequestError>> {
    let dst = dst.into();
    (0..n).map(|_| udp_request_any(dst, timeout)).collect()
}

/// The answer text of a reply, for [`tally`].
pub trait ReplyText {
    fn reply_text(&self) -> &str;
}

impl ReplyText for Reply {
    fn reply_text(&self) -> &str {
        &self.text
    }
}

impl ReplyText for ReplyAny {
    fn reply_text(&self) -> &str {
        &self.text
    }
}

/// Counts answers by text; failures are counted under `"ERROR"`. Handy for load-balancing
/// assertions: `tally(&replies) == {"web-1": 52, "web-2": 48}`. Takes the results of the
/// IPv4 and of the `_any` clients alike.
pub fn tally<R: ReplyText, E>(results: &[Result<R, E>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        let key = match r {
            Ok(reply) => reply.reply_text().to_string(),
            Err(_) => "ERROR".to_string(),
        };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

/// `ip:port` for either family, e.g. `socket_addr(pod.ipv6().unwrap(), 80)`.
pub fn socket_addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    match ip.into() {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    }
}
