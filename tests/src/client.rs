//! Clients that run in the calling thread's network namespace.
//!
//! [`crate::Pod::tcp_request`] and friends call these on a thread inside the pod's netns; call
//! them directly inside [`crate::in_netns`] for custom loops.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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

/// Longest answer read.
const MAX_REPLY: usize = 64 * 1024;

fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("unexpected IPv6 address {a}"),
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
}

/// Connects to `dst` over TCP, sends nothing, reads the answer until the server closes, all
/// within `timeout`.
pub fn tcp_request(dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("tcp connect to {dst}"))?;
    let peer = v4(s.peer_addr().context("getpeername")?)?;
    let local = v4(s.local_addr().context("getsockname")?)?;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(left) = remaining(deadline) else {
            bail!(
                "tcp {local} -> {dst}: no end of answer within {timeout:?} (got {:?})",
                String::from_utf8_lossy(&data)
            );
        };
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if data.len() > MAX_REPLY {
                    bail!("tcp {local} -> {dst}: answer longer than {MAX_REPLY} bytes");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!(
                    "tcp {local} -> {dst}: timed out after {timeout:?} (got {:?})",
                    String::from_utf8_lossy(&data)
                )
            }
            Err(e) => return Err(e).with_context(|| format!("tcp {local} -> {dst}: read")),
        }
    }
    Ok(Reply {
        text: String::from_utf8_lossy(&data).trim().to_string(),
        peer,
        local,
    })
}

/// Sends one datagram to `dst` from a *connected* UDP socket (so the kernel drops replies
/// whose source is not exactly `dst`) and waits up to `timeout` for the answer.
pub fn udp_request(dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("udp bind")?;
    s.connect(dst)
        .with_context(|| format!("udp connect to {dst}"))?;
    let local = v4(s.local_addr().context("getsockname")?)?;
    s.send(b"who\n")
        .with_context(|| format!("udp {local} -> {dst}: send"))?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let mut buf = vec![0u8; MAX_REPLY];
    let deadline = Instant::now() + timeout;
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Ok(Reply {
                    text: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                    peer: v4(from)?,
                    local,
                })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                let Some(left) = remaining(deadline) else {
                    bail!("udp {local} -> {dst}: no answer within {timeout:?}");
                };
                s.set_read_timeout(Some(left))?;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("udp {local} -> {dst}: no answer within {timeout:?}")
            }
            Err(e) => return Err(e).with_context(|| format!("udp {local} -> {dst}: recv")),
        }
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

/// Counts answers by text; failures are counted under `"ERROR"`. Handy for load-balancing
/// assertions: `tally(&replies) == {"web-1": 52, "web-2": 48}`.
pub fn tally(results: &[Result<Reply>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        let key = match r {
            Ok(reply) => reply.text.clone(),
            Err(_) => "ERROR".to_string(),
        };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}
