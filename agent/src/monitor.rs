//! `sluice monitor`: streams the packets NetworkPolicy drops, as the programs report them in
//! the pinned `policy_events` ring buffer (see `sluice-common`, "NetworkPolicy"): IPv4 drops
//! as `PolicyEvent`s, IPv6 ones as the longer `PolicyEvent6`s, told apart by their length.
//!
//! The ring buffer has one consumer position: run one monitor at a time per node (a second one
//! takes events from the first). Events the programs could not write because nobody read the
//! ring are lost; the `drops` counters (`sluice state drops`) count every drop regardless.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use aya::maps::{Map, MapData, RingBuf};
use sluice_common::{
    reason_name, PolicyEvent, PolicyEvent6, DEFAULT_PIN_PATH, MAP_POLICY_EVENTS, WAY_EGRESS,
    WAY_INGRESS,
};

use crate::{
    datapath::{sync6::addr6_from_map, wire},
    inspect::proto_name,
    manifests,
};

/// Arguments of `sluice monitor`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each line: DIRECTION PROTO CLIENT -> SERVER pod POD: REASON, the client \
    being the side that opened the connection (the peer for ingress drops, the pod for egress \
    ones)."
)]
pub struct MonitorArgs {
    /// Directory (on bpffs) where the agent pinned its maps.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Manifests to name pods by (as `sluice agent --manifests`); addresses only without.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A policy drop, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDrop {
    pub pod: SocketAddr,
    pub peer: SocketAddr,
    pub proto: u8,
    pub way: u8,
    pub reason: u32,
    pub time_ns: u64,
}

impl PolicyDrop {
    /// A ring record: a [`PolicyEvent6`] when it is that long, else a [`PolicyEvent`].
    pub fn decode(bytes: &[u8]) -> Option<PolicyDrop> {
        if bytes.len() >= std::mem::size_of::<PolicyEvent6>() {
            // SAFETY: as below, for the IPv6 record.
            let event: PolicyEvent6 = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let addr = |ip: [u32; 4], port: u16| {
                SocketAddr::new(IpAddr::V6(addr6_from_map(ip)), u16::from_be(port))
            };
            return Some(PolicyDrop {
                pod: addr(event.pod, event.pod_port),
                peer: addr(event.peer, event.peer_port),
                proto: event.proto,
                way: event.way,
                reason: event.reason,
                time_ns: event.time_ns,
            });
        }
        if bytes.len() < std::mem::size_of::<PolicyEvent>() {
            return None;
        }
        // SAFETY: the programs write whole PolicyEvents (plain integers); the length is checked
        // and the read is unaligned.
        let event: PolicyEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let addr = |ip: u32, port: u16| {
            SocketAddr::new(IpAddr::V4(wire::addr_from_map(ip)), u16::from_be(port))
        };
        Some(PolicyDrop {
            pod: addr(event.pod, event.pod_port),
            peer: addr(event.peer, event.peer_port),
            proto: event.proto,
            way: event.way,
            reason: event.reason,
            time_ns: event.time_ns,
        })
    }

    fn direction(&self) -> &'static str {
        match self.way {
            WAY_INGRESS => "ingress",
            WAY_EGRESS => "egress",
            _ => "unknown",
        }
    }

    /// (client, server): who opened the connection, and to where.
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        if self.way == WAY_INGRESS {
            (self.peer, self.pod)
        } else {
            (self.pod, self.peer)
        }
    }

    /// One line: `ingress tcp 10.244.0.20:40001 -> 10.244.0.10:443 pod x/a: drop-policy-...`.
    pub fn line(&self, names: &BTreeMap<IpAddr, String>) -> String {
        let (client, server) = self.ends();
        let pod = names
            .get(&self.pod.ip())
            .cloned()
            .unwrap_or_else(|| self.pod.ip().to_string());
        format!(
            "{} {} {client} -> {server} pod {pod}: {}",
            self.direction(),
            proto_name(self.proto).to_lowercase(),
            reason_name(self.reason)
        )
    }

    pub fn json(&self, names: &BTreeMap<IpAddr, String>) -> serde_json::Value {
        let (client, server) = self.ends();
        serde_json::json!({
            "direction": self.direction(),
            "protocol": proto_name(self.proto),
            "client": client.to_string(),
            "server": server.to_string(),
            "pod_ip": self.pod.ip().to_string(),
            "pod": names.get(&self.pod.ip()),
            "peer": self.peer.to_string(),
            "reason": reason_name(self.reason),
            "time_ns": self.time_ns,
        })
    }
}

/// Pod names by address (each of `status.podIPs`), from the manifests.
fn pod_names(dir: &std::path::Path) -> anyhow::Result<BTreeMap<IpAddr, String>> {
    let (objects, _) = manifests::load_dir(dir)?;
    Ok(objects
        .pods
        .iter()
        .flat_map(|(key, pod)| {
            let status = pod.status.as_ref();
            let ips: Vec<IpAddr> = status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(status.and_then(|s| s.pod_ip.as_deref()))
                .filter_map(|ip| ip.parse().ok())
                .collect();
            ips.into_iter().map(move |ip| (ip, key.to_string()))
        })
        .collect())
}

pub fn run(args: MonitorArgs) -> ExitCode {
    match monitor(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice monitor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn monitor(args: &MonitorArgs) -> anyhow::Result<()> {
    let names = match &args.manifests {
        Some(dir) => pod_names(dir)?,
        None => BTreeMap::new(),
    };
    let path = args.pin_path.join(MAP_POLICY_EVENTS);
    if !path.exists() {
        bail!(
            "{} does not exist: no Sluice datapath with policy events is pinned at {} (is the \
             agent running?)",
            path.display(),
            args.pin_path.display()
        );
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("inspecting {}", path.display()))?;
    let mut ring = RingBuf::try_from(map)
        .with_context(|| format!("{} is not a ring buffer", path.display()))?;
    eprintln!(
        "sluice monitor: streaming policy drops from {} (Ctrl-C stops)",
        path.display()
    );
    let mut seen = 0usize;
    let mut out = io::stdout().lock();
    loop {
        while let Some(item) = ring.next() {
            let Some(event) = PolicyDrop::decode(&item) else {
                continue;
            };
            let line = if args.json {
                event.json(&names).to_string()
            } else {
                event.line(&names)
            };
            match writeln!(out, "{line}").and_then(|()| out.flush()) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                other => other.context("writing the output")?,
            }
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
        let mut poll = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout so a signal-free wait still returns.
        let rc = unsafe { libc::poll(&mut poll, 1, 1000) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("waiting for policy events");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::{PROTO_TCP, REASON_DROP_POLICY_EGRESS, REASON_DROP_POLICY_INGRESS};

    fn event(way: u8, reason: u32) -> Vec<u8> {
        let e = PolicyEvent {
            pod: u32::from_ne_bytes([10, 244, 0, 10]),
            peer: u32::from_ne_bytes([10, 244, 0, 20]),
            pod_port: 443u16.to_be(),
            peer_port: 40_001u16.to_be(),
            proto: PROTO_TCP,
            way,
            reason,
            time_ns: 7,
            ..Default::default()
        };
        // SAFETY: PolicyEvent is plain integers without implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (&e as *const PolicyEvent).cast::<u8>(),
                std::mem::size_of::<PolicyEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn monitor_lines_put_the_connection_opener_first() {
        let names = BTreeMap::from([("10.244.0.10".parse().unwrap(), "x/a".to_string())]);
        let ingress = PolicyDrop::decode(&event(WAY_INGRESS, REASON_DROP_POLICY_INGRESS)).unwrap();
        assert_eq!(
            ingress.line(&names),
            "ingress tcp 10.244.0.20:40001 -> 10.244.0.10:443 pod x/a: drop-policy-ingress-denied"
        );
        let egress = PolicyDrop::decode(&event(WAY_EGRESS, REASON_DROP_POLICY_EGRESS)).unwrap();
        assert_eq!(
            egress.line(&BTreeMap::new()),
            "egress tcp 10.244.0.10:443 -> 10.244.0.20:40001 pod 10.244.0.10: drop-policy-egress-denied"
        );
        let json = egress.json(&names);
        assert_eq!(json["pod"], "x/a");
        assert_eq!(json["server"], "10.244.0.20:40001");
        assert!(PolicyDrop::decode(&[0u8; 8]).is_none());
    }

    #[test]
    fn ipv6_drops_are_told_apart_by_their_length() {
        let e = PolicyEvent6 {
            pod: addr6("fd00:10:244::a"),
            peer: addr6("fd00:10:244:1::14"),
            pod_port: 80u16.to_be(),
            peer_port: 40_001u16.to_be(),
            proto: PROTO_TCP,
            way: WAY_INGRESS,
            reason: REASON_DROP_POLICY_INGRESS,
            time_ns: 9,
            ..Default::default()
        };
        // SAFETY: PolicyEvent6 is plain integers without implicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const PolicyEvent6).cast::<u8>(),
                std::mem::size_of::<PolicyEvent6>(),
            )
        };
        let names = BTreeMap::from([("fd00:10:244::a".parse().unwrap(), "x/a".to_string())]);
        let drop = PolicyDrop::decode(bytes).unwrap();
        assert_eq!(
            drop.line(&names),
            "ingress tcp [fd00:10:244:1::14]:40001 -> [fd00:10:244::a]:80 pod x/a: \
             drop-policy-ingress-denied"
        );
        assert_eq!(drop.time_ns, 9);
    }

    fn addr6(s: &str) -> [u32; 4] {
        crate::datapath::sync6::addr6_to_map(s.parse().unwrap())
    }
}
