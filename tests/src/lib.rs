//! A kind-like Kubernetes node built from network namespaces, for Sluice's integration tests
//! and demo. Needs root, `ip` (iproute2) and, for [`Node::set_offload`], `ethtool`.
//!
//! # Topology
//!
//! ```text
//!  root netns: untouched (no address, route, link, qdisc or rule is ever added there)
//!
//!  node netns  sluicetb-<pid>-<n>-<rand>-<hint>      ip_forward=1, rp_filter=0, lo up
//!  ┌──────────────────────────────────────────────────────────────────────────┐
//!  │ main table:                                                              │
//!  │   10.244.0.2 dev veth1a2b3c4d scope host    <- one /32 host route per    │
//!  │   10.244.0.3 dev veth5e6f7a8b scope host       pod (how the agent finds  │
//!  │                                                 pod interfaces)          │
//!  │ veth1a2b3c4d: 10.244.0.1/32          veth5e6f7a8b: 10.244.0.1/32         │
//!  └──────┬───────────────────────────────────────────┬───────────────────────┘
//!         │ veth pair                                 │ veth pair
//!  ┌──────┴────────────────────────────┐ ┌────────────┴──────────────────────┐
//!  │ pod netns <node>-p0-<pod>         │ │ pod netns <node>-p1-<pod>         │
//!  │ eth0: 10.244.0.2/32               │ │ eth0: 10.244.0.3/32               │
//!  │ default via 10.244.0.1 dev eth0   │ │ default via 10.244.0.1 dev eth0   │
//!  │         onlink                    │ │         onlink                    │
//!  │ servers: tcp+udp 0.0.0.0:<port>   │ │                                   │
//!  │   answer "<pod name>\n"           │ │                                   │
//!  └───────────────────────────────────┘ └───────────────────────────────────┘
//! ```
//!
//! This is the ptp CNI plugin's layout (kindnet's): every pod-facing veth in the node
//! carries the same gateway address [`DEFAULT_GATEWAY`] (10.244.0.1/32, configurable with
//! [`Node::with_gateway`]), so a pod ARPs for the gateway and the node answers for its own
//! address (no proxy ARP needed); the node reaches a pod through its /32 host route. All
//! pod-to-pod traffic, even on one node, is routed through the node netns and so crosses
//! both pods' node-side veths (where Sluice attaches). Pod addresses are free-form (any
//! IPv4 address but the gateway). IPv6 is left at the kernel defaults (link-local only).
//!
//! Names: node netns `sluicetb-<pid>-<counter>-<6 hex>-<hint>`, pod netns
//! `<node netns>-p<i>-<pod name>`, node-side veth `veth<8 hex>` (12 chars), pod side `eth0`.
//! The veth pair is created inside the node netns with its peer directly in the pod netns,
//! so no veth ever appears in the root namespace.
//!
//! # Running code and processes inside
//!
//! * [`in_netns`] runs a closure on a thread that `setns`'d into a namespace (a thread's
//!   netns is per-thread): the servers ([`Pod::serve`]) and clients ([`Pod::tcp_request`],
//!   [`Pod::udp_request`], the batch versions, [`client`]) work this way, with no process.
//! * [`Node::exec`] / [`Pod::exec`] run a command in a namespace (like `nsenter --net=`,
//!   never `ip netns exec`, which remounts `/sys` and hides bpffs).
//! * [`Node::spawn`] starts a long-running process (the agent) there; the [`NodeProcess`]
//!   captures its output to a log file and stops it on drop.
//!
//! # Cleanup
//!
//! Dropping a [`Node`], also while a panic unwinds, stops its pods' servers, kills what
//! runs in its namespaces and deletes them. Names carry the creating pid, so
//! [`sweep_stale`] (run once per process by [`Node::new`]) deletes what a killed run left,
//! and [`sweep_stale_paths`] does the same for e.g. bpffs pins named with [`unique_name`].
//! Every command and loop is bounded by a timeout.
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

pub mod client;
mod cmd;
mod names;
mod netns;
mod node;
mod process;
pub mod server;
pub mod sluice;

use std::time::{Duration, Instant};

pub use client::{tally, Reply};
pub use cmd::EXEC_TIMEOUT;
pub use names::{sweep_stale, sweep_stale_paths, unique_name, PREFIX};
pub use netns::{enter_netns, in_netns};
pub use node::{Node, Offload, Pod, DEFAULT_GATEWAY};
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
