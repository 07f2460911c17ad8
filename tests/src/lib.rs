//! A kind-like Kubernetes node, or a multi-node cluster with an external client, built from
//! network namespaces, for Sluice's integration tests and demo. Needs root, `ip` (iproute2)
//! and, for [`Node::set_offload`], `ethtool`.
//!
//! # One node
//!
//! ```text
//!  root netns: untouched (no address, route, link, qdisc or rule is ever added there)
//!
//!  node netns  sluicetb-<pid>-<n>-<rand>-<hint>      ip_forward=1 (v4+v6), rp_filter=0,
//!                                                     no redirects, no ICMP rate limit,
//!                                                     no IPv6 DAD, lo up
//!  ┌──────────────────────────────────────────────────────────────────────────┐
//!  │ main table:                                                              │
//!  │   10.244.0.2 dev veth1a2b3c4d scope host    <- one /32 host route per    │
//!  │   10.244.0.3 dev veth5e6f7a8b scope host       pod (how the agent finds  │
//!  │   fd00:10:244::3 dev veth5e6f7a8b              pod interfaces), and a    │
//!  │                                                /128 per dual-stack pod   │
//!  │ veth1a2b3c4d: 10.244.0.1/32          veth5e6f7a8b: 10.244.0.1/32         │
//!  │                                                    fd00:10:244::1/128    │
//!  └──────┬───────────────────────────────────────────┬───────────────────────┘
//!         │ veth pair                                 │ veth pair
//!  ┌──────┴────────────────────────────┐ ┌────────────┴──────────────────────┐
//!  │ pod netns <node>-p0-<pod>         │ │ pod netns <node>-p1-<pod>  (dual) │
//!  │ eth0: 10.244.0.2/32               │ │ eth0: 10.244.0.3/32               │
//!  │ default via 10.244.0.1 dev eth0   │ │       fd00:10:244::3/128          │
//!  │         onlink                    │ │ default via 10.244.0.1 onlink     │
//!  │ servers: tcp+udp 0.0.0.0:<port>   │ │ default via fd00:10:244::1 onlink │
//!  │   answer "<pod name>\n"           │ │ servers: tcp+udp [::]:<port>      │
//!  │                                   │ │   (IPv4 and IPv6)                 │
//!  └───────────────────────────────────┘ └───────────────────────────────────┘
//! ```
//!
//! This is the ptp CNI plugin's layout (kindnet's): every pod-facing veth in the node
//! carries the same gateway address [`DEFAULT_GATEWAY`] (10.244.0.1/32, configurable with
//! [`Node::with_gateway`]), so a pod ARPs for the gateway and the node answers for its own
//! address (no proxy ARP needed); the node reaches a pod through its /32 host route. All
//! pod-to-pod traffic, even on one node, is routed through the node netns and so crosses
//! both pods' node-side veths (where Sluice attaches). Pod addresses are free-form (any
//! IPv4 address but the gateway).
//!
//! Dual-stack pods ([`Node::add_pod_dual`]) get the same for IPv6: a /128 on `eth0`, the
//! gateway [`Node::gateway6`] (`fd00:10:244::1` on a standalone node) as a /128 on the node
//! side, `default via <gateway6> dev eth0 onlink` and a /128 route on the node. Addresses
//! skip duplicate address detection (`nodad`, `accept_dad=0`), so they work at once;
//! neighbour discovery runs over the veth like ARP. IPv4-only pods keep IPv6 link-local only.
//!
//! Names: node netns `sluicetb-<pid>-<counter>-<6 hex>-<hint>`, pod netns
//! `<node netns>-p<i>-<pod name>`, node-side veth `veth<8 hex>` (12 chars), pod side `eth0`.
//! The veth pair is created inside the node netns with its peer directly in the pod netns,
//! so no veth ever appears in the root namespace.
//!
//! # A cluster ([`Cluster`])
//!
//! Like kind: nodes on one docker network, kindnet routes between the pod CIDRs, and an
//! external client. IPv6 parts (in brackets) only with [`ClusterOptions::dual_stack`]; IPv6
//! addresses use the same digits as their IPv4 counterparts (`.12` / `::12`).
//!
//! ```text
//!  fabric netns  sluicetb-…-<hint>-fabric          (the "docker network", a plain switch)
//!  ┌─────────────────────────────────────────────────────────────────────────────────┐
//!  │ br0 (bridge, no STP delay, no multicast snooping, no addresses)                  │
//!  │  ├── node-1 ─┐        ├── node-2 ─┐         …          └── ext ─┐                │
//!  └──────────────┼───────────────────┼──────────────────────────────┼────────────────┘
//!                 │ veth              │ veth                          │ veth
//!  ┌──────────────┴───────────┐ ┌─────┴────────────────────┐ ┌────────┴────────────────┐
//!  │ node-1  (a Node)         │ │ node-2                   │ │ ext  (a Host)           │
//!  │ eth0 02:42:ac:12:00:0b   │ │ eth0 02:42:ac:12:00:0c   │ │ eth0 02:42:ac:12:00:64  │
//!  │  172.18.0.11/16          │ │  172.18.0.12/16          │ │  172.18.0.100/16        │
//!  │ [fc00:f853:ccd:e793::11  │ │ [fc00:f853:ccd:e793::12  │ │ [fc00:f853:ccd:e793::100│
//!  │                    /64]  │ │                    /64]  │ │                    /64] │
//!  │ pod CIDR 10.244.1.0/24   │ │ pod CIDR 10.244.2.0/24   │ │ no routes to pods or    │
//!  │ [fd00:10:244:1::/64]     │ │ [fd00:10:244:2::/64]     │ │ services until          │
//!  │ gateway 10.244.1.1       │ │ gateway 10.244.2.1       │ │ Host::add_route, e.g.   │
//!  │ [fd00:10:244:1::1]       │ │ [fd00:10:244:2::1]       │ │ 10.96.0.0/12 via        │
//!  │ routes (kindnet):        │ │ routes:                  │ │   172.18.0.11           │
//!  │  10.244.2.0/24 via       │ │  10.244.1.0/24 via       │ │ accept_redirects=0      │
//!  │   172.18.0.12 dev eth0   │ │   172.18.0.11 dev eth0   │ └─────────────────────────┘
//!  │  [fd00:10:244:2::/64 via │ │  [fd00:10:244:1::/64 via │
//!  │   fc00:…:e793::12]       │ │   fc00:…:e793::11]       │
//!  │  + /32 (/128) per pod    │ │  + /32 (/128) per pod    │
//!  │  no default route        │ │  no default route        │
//!  │ pods as above, e.g.      │ │                          │
//!  │  10.244.1.10/32          │ │                          │
//!  │  [fd00:10:244:1::10/128] │ │                          │
//!  └──────────────────────────┘ └──────────────────────────┘
//! ```
//!
//! Node `i` (1-based) is named `node-<i>` ([`Node::name`], the Kubernetes name for
//! `--node-name`; the netns is `sluicetb-…-<hint>-n<i>`), has [`Node::node_ip`]
//! 172.18.0.(10+i) and [`Node::pod_cidr`] 10.244.i.0/24; [`Node::pod_ip`]`(n)` and
//! [`Node::pod_ip6`]`(n)` give 10.244.i.n and fd00:10:244:i::n. Nodes forward and never send
//! ICMP redirects, so traffic the external host routes through node 1 to a pod on node 2
//! keeps going through node 1. Nodes have no default route: traffic to an address nobody
//! routes gets an ICMP network unreachable from the last node. The external host
//! ([`Cluster::external`], [`Host`]) runs clients and servers like a pod.
//! [`Cluster::node_manifests`] renders the v1 Node objects (zone label, pod CIDRs, InternalIP
//! addresses); [`sluice::SluiceCluster`] runs an agent per node against them, from a manifests
//! directory or from a test API server ([`apiserver::ApiServer`], listening on loopback inside
//! each node netns).
//!
//! # Running code and processes inside
//!
//! * [`in_netns`] runs a closure on a thread that `setns`'d into a namespace (a thread's
//!   netns is per-thread): the servers ([`Pod::serve`], [`Node::serve`] for host-network
//!   servers, [`Host::serve`]) and clients ([`Pod::tcp_request`], [`Pod::udp_request`], the
//!   batch versions, the IPv6-capable [`Pod::tcp_request_any`] / [`Pod::udp_request_any`],
//!   the same on [`Node`] and [`Host`], and [`client`]) work this way, with no process.
//! * The `_any` clients classify failures ([`RequestError`]): refused (TCP RST), ICMP
//!   destination unreachable with its kind and, for UDP, its sender (a closed UDP port gives
//!   port unreachable), reset, timeout. ICMP errors are not rate limited in any namespace.
//! * [`Node::exec`] / [`Pod::exec`] / [`Host::exec`] run a command in a namespace (like
//!   `nsenter --net=`, never `ip netns exec`, which remounts `/sys` and hides bpffs).
//! * [`Node::spawn`] starts a long-running process (the agent) there; the [`NodeProcess`]
//!   captures its output to a log file and stops it on drop.
//!
//! # Cleanup
//!
//! Dropping a [`Node`] (or a [`Cluster`]), also while a panic unwinds, stops its servers,
//! kills what runs in its namespaces and deletes them (and with them every veth, bridge,
//! address and route). Names carry the creating pid, so [`sweep_stale`] (run once per
//! process by [`Node::new`] and [`Cluster::new`]) deletes what a killed run left, and
//! [`sweep_stale_paths`] does the same for e.g. bpffs pins named with [`unique_name`]. Every
//! command and loop is bounded by a timeout.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let node = sluice_testbed::Node::new("demo")?;
//! let a = node.add_pod("client", "10.244.0.2".parse()?)?;
//! let b = node.add_pod("web-1", "10.244.0.3".parse()?)?;
//! b.serve(&[8080])?;
//! let reply = a.tcp_request(b.addr(8080), Duration::from_secs(2))?;
//! assert_eq!(reply.text, "web-1");
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use sluice_testbed::Cluster;
//! let c = Cluster::dual_stack("demo", 2)?;
//! let (n1, n2) = (c.node(1), c.node(2));
//! let client = n1.add_pod_dual("client", n1.pod_ip(10), n1.pod_ip6(10).unwrap())?;
//! let web = n2.add_pod_dual("web", n2.pod_ip(20), n2.pod_ip6(20).unwrap())?;
//! web.serve(&[8080])?;
//! let reply = client.tcp_request_any(web.addr6(8080), Duration::from_secs(2))?;
//! assert_eq!(reply.text, "web");
//! // The external host needs a route into the cluster.
//! c.external().add_route("10.244.0.0/16", n1.node_ip().unwrap())?;
//! assert_eq!(c.external().tcp_request(web.addr(8080), Duration::from_secs(2))?.text, "web");
//! assert!(web.seen().iter().any(|s| s.source_ip() == c.external().ip()));
//! # Ok(()) }
//! ```

pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod cluster;
mod cmd;
mod endpoint;
mod names;
mod netns;
mod node;
pub mod objects;
mod process;
pub mod reach;
pub mod server;
pub mod sluice;

use std::time::{Duration, Instant};

/// The `ipnet` crate, whose types [`Node::pod_cidr`] and friends return.
pub use ipnet;

pub use client::{tally, Reply, ReplyAny, RequestError, Unreachable, UnreachableKind};
pub use cluster::{Cluster, ClusterOptions, Host};
pub use cmd::{run as run_with_timeout, EXEC_TIMEOUT};
pub use names::{sweep_stale, sweep_stale_paths, unique_name, PREFIX};
pub use netns::{enter_netns, in_netns};
pub use node::{Node, Offload, Pod, DEFAULT_GATEWAY, DEFAULT_GATEWAY6, DEFAULT_NODE_NAME};
pub use process::{NodeProcess, DROP_GRACE, TERMINATE_GRACE};
pub use server::{Proto, Seen};

/// Calls `f` every `interval` until it returns `Ok` or `timeout` has passed; returns the
/// first `Ok` or the last error (with the elapsed time). `f` runs at least once.
pub fn retry_until<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                if start.elapsed() >= timeout {
                    return Err(e.context(format!("still failing after {:?}", start.elapsed())));
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// What a [`tcp_loop_while`] client saw.
#[derive(Debug, Default)]
pub struct LoopOutcome {
    pub ok: usize,
    /// Each failed request: the error, or a reply from an address other than the one dialled.
    pub failures: Vec<String>,
}

/// Runs `during` on this thread while `client` opens TCP connections to `dst` back to back
/// (one at a time, each with `timeout`). The loop stops when `during` returns or panics, and
/// after 60 s at the latest; a panic in `during` is re-raised once the loop has stopped.
pub fn tcp_loop_while(
    client: &Pod,
    dst: std::net::SocketAddrV4,
    timeout: Duration,
    during: impl FnOnce(),
) -> LoopOutcome {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let looping = s.spawn(|| {
            client.run(|| {
                let mut outcome = LoopOutcome::default();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match client::tcp_request(dst, timeout) {
                        Ok(r) if r.peer == dst => outcome.ok += 1,
                        Ok(r) => outcome
                            .failures
                            .push(format!("reply from the wrong peer: {r:?}")),
                        Err(e) => outcome.failures.push(format!("{e:#}")),
                    }
                }
                outcome
            })
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        stop.store(true, Ordering::Relaxed);
        let outcome = looping.join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        outcome
            .expect("client loop panicked")
            .expect("entering the client's netns")
    })
}
