//! A client for tests that need a separate process (one placed in a cgroup, for the socket
//! programs): `sluice-probe <tcp|udp|udp-connected> <addr:port> <count> <timeout-ms>` makes
//! `count` requests, each on a new socket, and prints one line per request:
//!
//! * `ok <peer> <answer>`: the peer as the application sees it (`getpeername()` for TCP and
//!   connected UDP, the source `recvfrom()` reports for unconnected UDP) and the answer;
//! * `err <errno> <message>` (errno 0: timed out or no errno).
//!
//! `udp` uses an unconnected socket (`sendto`/`recvfrom`: the sendmsg and recvmsg hooks),
//! `udp-connected` a connected one (`connect`, `getpeername`, `recvfrom`).
//!
//! `sluice-probe hold <addr:port> <count> <timeout-ms>` opens `count` TCP connections one
//! after the other and keeps them all open (a process of its own: a process may hold only so
//! many descriptors), prints `held <ok> slow <slow> failed <failed>` (slow: connected only
//! after a SYN retransmission, 900 ms or more), then waits for its stdin to close.

use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (|| {
        let mode = args.get(1)?.clone();
        let dst: SocketAddr = args.get(2)?.parse().ok()?;
        let count: usize = args.get(3)?.parse().ok()?;
        let timeout = Duration::from_millis(args.get(4)?.parse().ok()?);
        Some((mode, dst, count.min(20_000), timeout))
    })();
    let Some((mode, dst, count, timeout)) = parsed else {
        eprintln!("usage: sluice-probe <tcp|udp|udp-connected> <addr:port> <count> <timeout-ms>");
        return ExitCode::from(2);
    };
    if mode == "hold" {
        return hold(dst, count, timeout);
    }
    for _ in 0..count {
        let result = match mode.as_str() {
            "tcp" => tcp(dst, timeout),
            "udp" => udp(dst, timeout, false),
            "udp-connected" => udp(dst, timeout, true),
            other => {
                eprintln!("unknown mode {other:?}");
                return ExitCode::from(2);
            }
        };
        match result {
            Ok((peer, text)) => println!("ok {peer} {}", text.trim()),
            Err(e) => {
                let errno = match e.kind() {
                    ErrorKind::TimedOut | ErrorKind::WouldBlock => 0,
                    _ => e.raw_os_error().unwrap_or(0),
                };
                println!("err {errno} {e}");
            }
        }
    }
    ExitCode::SUCCESS
}

fn tcp(dst: SocketAddr, timeout: Duration) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    let peer = s.peer_addr()?;
    s.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok((peer, text))
}

fn udp(
    dst: SocketAddr,
    timeout: Duration,
    connected: bool,
) -> std::io::Result<(SocketAddr, String)> {
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(timeout))?;
    let peer = if connected {
        s.connect(dst)?;
        let peer = s.peer_addr()?;
        s.send(b"who\n")?;
        Some(peer)
    } else {
        s.send_to(b"who\n", dst)?;
        None
    };
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Connected: report getpeername(), and say if recvfrom() disagreed.
    match peer {
        Some(peer) if peer != from => Ok((peer, format!("{text} (recvfrom {from})"))),
        Some(peer) => Ok((peer, text)),
        None => Ok((from, text)),
    }
}

fn hold(dst: SocketAddr, count: usize, timeout: Duration) -> ExitCode {
    // SAFETY: getrlimit/setrlimit on a valid struct: the soft limit up to the hard one.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let (mut held, mut slow, mut failed) = (Vec::with_capacity(count), 0, 0);
    for _ in 0..count {
        let started = std::time::Instant::now();
        match TcpStream::connect_timeout(&dst, timeout) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
        if started.elapsed() >= Duration::from_millis(900) {
            slow += 1;
        }
    }
    println!("held {} slow {slow} failed {failed}", held.len());
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    drop(held);
    ExitCode::SUCCESS
}
