//! The node and its pods.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::cmd::{self};
use crate::endpoint::endpoint_methods;
use crate::names::{self, PREFIX};
use crate::netns::{self};
use crate::process::NodeProcess;
use crate::server::{Bind, ServerSet};

/// The address every node-side pod veth carries (as a /32) and every pod routes through,
/// like the ptp CNI plugin / kindnet with pod CIDR 10.244.0.0/24.
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// The IPv6 pod gateway of a standalone [`Node`] (pod CIDR `fd00:10:244::/64`): carried as a
/// /128 by the node-side veth of every dual-stack pod.
pub const DEFAULT_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);

/// The Kubernetes node name of a standalone [`Node`].
pub const DEFAULT_NODE_NAME: &str = "node-0";

/// Sysctls of every node netns (before any interface exists, so `default` applies to all).
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    // No redirects: traffic a node forwards back out of the interface it came in on (an
    // external client routed through node 1 to a pod on node 2) must keep going through the
    // node, not be short-cut by the sender.
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    // ICMP errors are part of what tests observe: never rate limited.
    ("net.ipv4.icmp_ratelimit", "0"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv6.conf.default.forwarding", "1"),
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_redirects", "0"),
    ("net.ipv6.conf.default.accept_redirects", "0"),
    ("net.ipv6.icmp.ratelimit", "0"),
];

/// Sysctls of every pod netns (and of the cluster's external host).
pub(crate) const POD_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.icmp_ratelimit", "0"),
    // Addresses usable at once: no duplicate address detection.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.icmp.ratelimit", "0"),
];

/// What distinguishes one node from another (internal; [`Node::new`] and
/// [`crate::Cluster`] fill it in).
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    pub(crate) k8s_name: String,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) gateway6: Ipv6Addr,
    pub(crate) pod_cidr: Ipv4Net,
    pub(crate) pod_cidr6: Option<Ipv6Net>,
    pub(crate) zone: Option<String>,
}

impl NodeSpec {
    fn standalone(gateway: Ipv4Addr) -> NodeSpec {
        NodeSpec {
            k8s_name: DEFAULT_NODE_NAME.to_string(),
            gateway,
            gateway6: DEFAULT_GATEWAY6,
            pod_cidr: Ipv4Net::new(gateway, 24).expect("/24").trunc(),
            pod_cidr6: Some(Ipv6Net::new(DEFAULT_GATEWAY6, 64).expect("/64").trunc()),
            zone: None,
        }
    }
}

static SWEEP: Once = Once::new();
/// Log dirs of dead test processes older than this are removed by the first [`Node::new`].
const LOG_MAX_AGE: Duration = Duration::from_secs(3600);
static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs [`crate::sweep_stale`]`(PREFIX)` and removes old log dirs of dead processes, once per
/// process (before the first namespace is created).
pub(crate) fn sweep_once() {
    SWEEP.call_once(|| {
        if let Err(e) = names::sweep_stale(PREFIX) {
            eprintln!("sluice-testbed: sweeping stale namespaces: {e:#}");
        }
        // Log dirs of dead runs (kept after a panic, or left by a SIGKILL): after an hour.
        let _ = names::sweep_paths(&std::env::temp_dir(), PREFIX, LOG_MAX_AGE);
    });
}

/// A Kubernetes node made of a network namespace; see the crate documentation for the layout.
///
/// Dropping it (also while unwinding from a panic) stops the pods' servers, kills every
/// process left in its namespaces and deletes the pod and node namespaces (and with them
/// the veths and routes). Drop [`NodeProcess`]es before their node to stop them gracefully
/// (declare the node first); otherwise the node SIGKILLs them.
pub struct Node {
    name: String,
    path: PathBuf,
    spec: NodeSpec,
    /// Set by [`crate::Cluster`] once `eth0` is wired.
    pub(crate) node_ip: Option<Ipv4Addr>,
    pub(crate) node_ip6: Option<Ipv6Addr>,
    log_dir: PathBuf,
    pods: Mutex<Vec<Pod>>,
    pod_counter: AtomicU64,
    servers: ServerSet,
}

impl Node {
    /// Creates the node netns `sluicetb-<pid>-<n>-<rand>-<hint>` with `lo` up, IPv4 and IPv6
    /// forwarding on, `rp_filter` off, no ICMP redirects, no ICMP rate limit and no IPv6
    /// duplicate address detection; nothing links it to the root namespace. Its Kubernetes
    /// name is [`DEFAULT_NODE_NAME`], its pod CIDRs 10.244.0.0/24 and fd00:10:244::/64. The
    /// first call in a process also runs [`crate::sweep_stale`]`(PREFIX)` and removes the log
    /// dirs of dead processes that are more than an hour old.
    pub fn new(name_hint: &str) -> Result<Node> {
        Self::with_gateway(name_hint, DEFAULT_GATEWAY)
    }

    /// Like [`Node::new`] with another pod gateway address than [`DEFAULT_GATEWAY`]; the pod
    /// CIDR is the gateway's /24.
    pub fn with_gateway(name_hint: &str, gateway: Ipv4Addr) -> Result<Node> {
        Self::create(name_hint, NodeSpec::standalone(gateway))
    }

    pub(crate) fn create(name_hint: &str, spec: NodeSpec) -> Result<Node> {
        sweep_once();
        let name = format!(
            "{}-{}",
            names::unique_name(PREFIX),
            names::sanitize(name_hint, 16)
        );
        cmd::netns_add(&name)?;
        let node = Node {
            path: Path::new("/run/netns").join(&name),
            log_dir: std::env::temp_dir().join(&name),
            name,
            spec,
            node_ip: None,
            node_ip6: None,
            pods: Mutex::new(Vec::new()),
            pod_counter: AtomicU64::new(0),
            servers: ServerSet::default(),
        };
        // From here on Drop cleans up whatever fails.
        cmd::ip(&["-n", &node.name, "link", "set", "lo", "up"])?;
        netns::sysctl_in(&node.path, NODE_SYSCTLS).context("node sysctls")?;
        Ok(node)
    }

    /// The Kubernetes node name (`node-<i>` in a [`crate::Cluster`], [`DEFAULT_NODE_NAME`]
    /// for a standalone node): what its servers answer and what `--node-name` takes. Not the
    /// netns name ([`Node::netns_name`]).
    pub fn name(&self) -> &str {
        &self.spec.k8s_name
    }

    /// The node's IPv4 address on the cluster network (`eth0`), `None` for a standalone node.
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        self.node_ip
    }

    /// The node's IPv6 address on the cluster network, in a dual-stack [`crate::Cluster`].
    pub fn node_ipv6(&self) -> Option<Ipv6Addr> {
        self.node_ip6
    }

    /// The node's addresses: IPv4 then IPv6 (empty for a standalone node).
    pub fn node_ips(&self) -> Vec<IpAddr> {
        self.node_ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.node_ip6.map(IpAddr::V6))
            .collect()
    }

    /// The node's IPv4 pod CIDR (`spec.podCIDR`), e.g. 10.244.1.0/24.
    pub fn pod_cidr(&self) -> Ipv4Net {
        self.spec.pod_cidr
    }

    /// The node's IPv6 pod CIDR, e.g. fd00:10:244:1::/64; `None` on the nodes of an
    /// IPv4-only [`crate::Cluster`] (which take no dual-stack pods).
    pub fn pod_cidr6(&self) -> Option<Ipv6Net> {
        self.spec.pod_cidr6
    }

    /// The `n`th address of the IPv4 pod CIDR (`pod_ip(5)` = 10.244.1.5 on node 1).
    pub fn pod_ip(&self, n: u8) -> Ipv4Addr {
        let base = u32::from(self.spec.pod_cidr.network());
        Ipv4Addr::from(base | (u32::from(n) & !u32::from(self.spec.pod_cidr.netmask())))
    }

    /// The IPv6 pod address written with the same digits as [`Node::pod_ip`]`(n)`:
    /// `pod_ip6(12)` = fd00:10:244:1::12 on node 1 (next to 10.244.1.12). `None` without an
    /// IPv6 pod CIDR.
    pub fn pod_ip6(&self, n: u8) -> Option<Ipv6Addr> {
        self.spec
            .pod_cidr6
            .map(|c| Ipv6Addr::from(u128::from(c.network()) | u128::from(dec_as_hex(n.into()))))
    }

    /// The `topology.kubernetes.io/zone` label of the node's manifest, if any.
    pub fn zone(&self) -> Option<&str> {
        self.spec.zone.as_deref()
    }

    /// The node's v1 Node object as YAML: name, labels (`kubernetes.io/hostname`,
    /// `kubernetes.io/os`, the zone if any), `spec.podCIDR(s)` and `status.addresses`
    /// (InternalIP per node address, Hostname).
    pub fn manifest(&self) -> String {
        let name = &self.spec.k8s_name;
        let mut labels =
            format!("    kubernetes.io/hostname: \"{name}\"\n    kubernetes.io/os: linux\n");
        if let Some(zone) = &self.spec.zone {
            labels.push_str(&format!("    topology.kubernetes.io/zone: \"{zone}\"\n"));
        }
        let cidrs: Vec<String> = std::iter::once(self.spec.pod_cidr.to_string())
            .chain(self.spec.pod_cidr6.map(|c| c.to_string()))
            .map(|c| format!("\"{c}\""))
            .collect();
        let addresses: String = self
            .node_ips()
            .iter()
            .map(|ip| format!("  - {{type: InternalIP, address: \"{ip}\"}}\n"))
            .chain(std::iter::once(format!(
                "  - {{type: Hostname, address: \"{name}\"}}\n"
            )))
            .collect();
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: \"{name}\"\n  labels:\n{labels}\
             spec:\n  podCIDR: \"{}\"\n  podCIDRs: [{}]\n\
             status:\n  addresses:\n{addresses}",
            self.spec.pod_cidr,
            cidrs.join(", ")
        )
    }

    /// The netns name (as in `ip netns list`).
    pub fn netns_name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` or [`in_netns`].
    pub fn netns_path(&self) -> &Path {
        &self.path
    }

    /// The pods' gateway address (on every node-side veth).
    pub fn gateway(&self) -> Ipv4Addr {
        self.spec.gateway
    }

    /// The dual-stack pods' IPv6 gateway (a /128 on their node-side veths).
    pub fn gateway6(&self) -> Ipv6Addr {
        self.spec.gateway6
    }

    /// Where [`Node::spawn`] writes logs: `$TMPDIR/<netns name>/`, removed on drop unless
    /// the drop happens during a panic.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The live pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live pod of this name.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods().into_iter().find(|p| p.name() == name)
    }

    /// Creates pod `name` with address `ip`: its own netns, `eth0` = `ip/32` with
    /// `default via <gateway> dev eth0 onlink`, the node side `veth<8 hex>` carrying
    /// `<gateway>/32`, and the node route `ip/32 dev veth<..> scope host` in the main table.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        self.add_pod_inner(name, ip, None)
    }

    /// Creates a dual-stack pod: like [`Node::add_pod`], plus `eth0` = `ipv6/128` (no DAD)
    /// with `default via <gateway6> dev eth0 onlink`, the node-side veth carrying
    /// `<gateway6>/128`, and the node route `ipv6/128 dev veth<..>`. Its servers listen on
    /// both families. Fails on the nodes of an IPv4-only [`crate::Cluster`].
    pub fn add_pod_dual(&self, name: &str, ip: Ipv4Addr, ipv6: Ipv6Addr) -> Result<Pod> {
        if self.spec.pod_cidr6.is_none() {
            bail!(
                "pod {name}: node {} is IPv4-only (build the cluster dual-stack)",
                self.name()
            );
        }
        if ipv6 == self.spec.gateway6
            || ipv6.is_unspecified()
            || ipv6.is_loopback()
            || ipv6.is_multicast()
            || ipv6.is_unicast_link_local()
            || ipv6.to_ipv4_mapped().is_some()
        {
            bail!("pod {name}: unusable pod address {ipv6}");
        }
        self.add_pod_inner(name, ip, Some(ipv6))
    }

    fn add_pod_inner(&self, name: &str, ip: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Result<Pod> {
        if name.is_empty() {
            bail!("empty pod name");
        }
        if ip == self.spec.gateway || ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            bail!("pod {name}: unusable pod address {ip}");
        }
        let idx = self.pod_counter.fetch_add(1, Ordering::Relaxed);
        let netns_name = format!("{}-p{idx}-{}", self.name, names::sanitize(name, 16));
        let host_ifname = {
            let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods.iter().any(|p| p.name() == name) {
                bail!("pod {name} already exists on this node");
            }
            if let Some(p) = pods.iter().find(|p| p.ip() == ip) {
                bail!("pod {name}: address {ip} already used by pod {}", p.name());
            }
            if let Some(v6) = ipv6 {
                if let Some(p) = pods.iter().find(|p| p.ipv6() == Some(v6)) {
                    bail!("pod {name}: address {v6} already used by pod {}", p.name());
                }
            }
            loop {
                let n = format!("veth{:08x}", names::random_u32());
                if !pods.iter().any(|p| p.host_ifname() == n) {
                    break n;
                }
            }
        };
        cmd::netns_add(&netns_name)?;
        let pod = Pod {
            inner: Arc::new(PodInner {
                name: name.to_string(),
                ip,
                ipv6,
                netns_path: Path::new("/run/netns").join(&netns_name),
                netns_name,
                host_ifname,
                node_netns_name: self.name.clone(),
                node_netns_path: self.path.clone(),
                log_dir: self.log_dir.clone(),
                removed: AtomicBool::new(false),
                servers: ServerSet::default(),
            }),
        };
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pod.clone());
        if let Err(e) = self.wire_pod(&pod) {
            let _ = self.remove_pod(&pod);
            let addrs = match ipv6 {
                Some(v6) => format!("{ip}, {v6}"),
                None => ip.to_string(),
            };
            return Err(e.context(format!("creating pod {name} ({addrs})")));
        }
        Ok(pod)
    }

    fn wire_pod(&self, pod: &Pod) -> Result<()> {
        let node = self.name.as_str();
        let pns = pod.netns_name();
        let veth = pod.host_ifname();
        let gw = format!("{}/32", self.spec.gateway);
        let ip32 = format!("{}/32", pod.ip());
        let gw_plain = self.spec.gateway.to_string();
        cmd::ip(&["-n", pns, "link", "set", "lo", "up"])?;
        netns::sysctl_in(pod.netns_path(), POD_SYSCTLS).context("pod sysctls")?;
        // Created inside the node netns with the peer directly in the pod's: no veth ever
        // exists in the root namespace.
        cmd::ip(&[
            "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pns,
        ])?;
        cmd::ip(&["-n", node, "addr", "add", &gw, "dev", veth])?;
        cmd::ip(&["-n", node, "link", "set", veth, "up"])?;
        cmd::ip(&["-n", pns, "addr", "add", &ip32, "dev", "eth0"])?;
        cmd::ip(&["-n", pns, "link", "set", "eth0", "up"])?;
        cmd::ip(&[
            "-n", pns, "route", "add", "default", "via", &gw_plain, "dev", "eth0", "onlink",
        ])?;
        if let Some(v6) = pod.ipv6() {
            let gw6 = format!("{}/128", self.spec.gateway6);
            let gw6_plain = self.spec.gateway6.to_string();
            let ip128 = format!("{v6}/128");
            #[rustfmt::skip]
            let steps: [&[&str]; 4] = [
                &["-n", node, "-6", "addr", "add", &gw6, "dev", veth, "nodad", "noprefixroute"],
                &["-n", pns, "-6", "addr", "add", &ip128, "dev", "eth0", "nodad", "noprefixroute"],
                &["-n", pns, "-6", "route", "add", "default", "via", &gw6_plain, "dev", "eth0", "onlink"],
                &["-n", node, "-6", "route", "add", &ip128, "dev", veth],
            ];
            for args in steps {
                cmd::ip(args)?;
            }
        }
        // Last: the /32 route is how the agent recognises a pod interface, so the pod is
        // complete when it shows up.
        cmd::ip(&[
            "-n", node, "route", "add", &ip32, "dev", veth, "scope", "host",
        ])?;
        Ok(())
    }

    /// Deletes the pod: stops its servers, deletes the node-side veth (synchronously, so its
    /// host route is gone when this returns), kills processes in its netns and deletes it.
    /// Idempotent; other handles of the pod then fail to reach its netns.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| !Arc::ptr_eq(&p.inner, &pod.inner));
        pod.inner.destroy(true)
    }

    /// Turns tx and rx checksum offload on or off on both ends of the pod's veth
    /// (`ethtool -K <if> tx <on|off> rx <on|off>`). With offload on, veth never computes or
    /// verifies checksums; turn it off to make the receiver verify them.
    pub fn set_offload(&self, pod: &Pod, on: bool) -> Result<()> {
        let v = if on { "on" } else { "off" };
        self.exec_ok(&["ethtool", "-K", pod.host_ifname(), "tx", v, "rx", v])?;
        pod.exec_ok(&["ethtool", "-K", "eth0", "tx", v, "rx", v])?;
        Ok(())
    }

    /// The checksum offload state of both ends of the pod's veth (`ethtool -k`).
    pub fn offload(&self, pod: &Pod) -> Result<Offload> {
        let host = self.exec_ok(&["ethtool", "-k", pod.host_ifname()])?;
        let peer = pod.exec_ok(&["ethtool", "-k", "eth0"])?;
        Ok(Offload {
            host_tx: feature_on(&host, "tx-checksumming")?,
            host_rx: feature_on(&host, "rx-checksumming")?,
            pod_tx: feature_on(&peer, "tx-checksumming")?,
            pod_rx: feature_on(&peer, "rx-checksumming")?,
        })
    }

    // Host-network servers (answering the node name) and clients on the node itself.
    endpoint_methods!("node");

    fn ep_netns(&self) -> &Path {
        &self.path
    }
    fn ep_log_dir(&self) -> &Path {
        &self.log_dir
    }
    fn ep_servers(&self) -> &ServerSet {
        &self.servers
    }
    fn ep_answer(&self) -> &str {
        &self.spec.k8s_name
    }
    fn ep_bind(&self) -> Bind {
        Bind::Dual
    }
    fn ep_check(&self) -> Result<()> {
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.servers.stop();
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        for pod in &pods {
            // The node netns goes too: no need to delete each veth first.
            if let Err(e) = pod.inner.destroy(false) {
                eprintln!("sluice-testbed: deleting pod {}: {e:#}", pod.name());
            }
        }
        netns::kill_pids_in_netns(&self.path);
        if let Err(e) = cmd::netns_del(&self.name) {
            eprintln!("sluice-testbed: deleting netns {}: {e:#}", self.name);
        }
        if self.log_dir.exists() {
            if std::thread::panicking() {
                eprintln!(
                    "sluice-testbed: keeping logs of node {} in {}",
                    self.name,
                    self.log_dir.display()
                );
            } else {
                let _ = std::fs::remove_dir_all(&self.log_dir);
            }
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.spec.k8s_name)
            .field("netns", &self.name)
            .field("node_ips", &self.node_ips())
            .field("pod_cidr", &self.spec.pod_cidr)
            .field("pod_cidr6", &self.spec.pod_cidr6)
            .field("gateway", &self.spec.gateway)
            .field("pods", &self.pods())
            .finish()
    }
}

/// Checksum offload flags of a pod's veth pair, as `ethtool -k` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    pub host_tx: bool,
    pub host_rx: bool,
    pub pod_tx: bool,
    pub pod_rx: bool,
}

impl Offload {
    /// All four on.
    pub fn all_on(&self) -> bool {
        self.host_tx && self.host_rx && self.pod_tx && self.pod_rx
    }
    /// All four off.
    pub fn all_off(&self) -> bool {
        !(self.host_tx || self.host_rx || self.pod_tx || self.pod_rx)
    }
}

/// `n`'s decimal digits read as hexadecimal (12 -> 0x12), so IPv6 addresses read like their
/// IPv4 counterparts: 172.18.0.12 / fc00:f853:ccd:e793::12. `n` < 10000.
pub(crate) fn dec_as_hex(n: u16) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("n < 10000")
}

fn feature_on(ethtool_k: &str, feature: &str) -> Result<bool> {
    let prefix = format!("{feature}:");
    let line = ethtool_k
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {feature} in ethtool -k output"))?;
    Ok(line[prefix.len()..].trim().starts_with("on"))
}

pub(crate) fn spawn_logged(netns: &Path, log_dir: &Path, cmd: &mut Command) -> Result<NodeProcess> {
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("creating log dir {}", log_dir.display()))?;
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let log = log_dir.join(format!("{n}-{}.log", names::sanitize(&prog, 32)));
    NodeProcess::spawn(netns, cmd, log)
}

struct PodInner {
    name: String,
    ip: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    netns_name: String,
    netns_path: PathBuf,
    host_ifname: String,
    node_netns_name: String,
    node_netns_path: PathBuf,
    log_dir: PathBuf,
    removed: AtomicBool,
    servers: ServerSet,
}

impl PodInner {
    fn stop_servers(&self) {
        self.servers.stop();
    }

    fn destroy(&self, delete_link: bool) -> Result<()> {
        if self.removed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.stop_servers();
        let mut result = Ok(());
        if delete_link && self.node_netns_path.exists() {
            // Deleting one end deletes the pair and the host route, synchronously (a
            // namespace's devices are only torn down asynchronously after `ip netns del`).
            if let Err(e) = cmd::ip(&[
                "-n",
                &self.node_netns_name,
                "link",
                "del",
                &self.host_ifname,
            ]) {
                if cmd::ip(&[
                    "-n",
                    &self.node_netns_name,
                    "link",
                    "show",
                    &self.host_ifname,
                ])
                .is_ok()
                {
                    result = Err(e);
                }
            }
        }
        netns::kill_pids_in_netns(&self.netns_path);
        cmd::netns_del(&self.netns_name)?;
        result
    }
}

/// A pod on a [`Node`]: a cheap handle (clones share the pod). The node owns the pod: it is
/// deleted by [`Node::remove_pod`] or when the node is dropped, not when handles are dropped.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

impl Pod {
    /// The pod's name: what its servers answer.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The pod's address (on its `eth0`, /32).
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// `ip:port`.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.inner.ip, port)
    }

    /// The pod's IPv6 address (dual-stack pods, [`Node::add_pod_dual`]).
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.inner.ipv6
    }

    /// `[ipv6]:port`. Panics if the pod has no IPv6 address.
    pub fn addr6(&self, port: u16) -> SocketAddrV6 {
        let ip = self
            .inner
            .ipv6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.inner.name));
        SocketAddrV6::new(ip, port, 0, 0)
    }

    /// The pod's addresses: IPv4, then IPv6 if it has one.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.inner.ip))
            .chain(self.inner.ipv6.map(IpAddr::V6))
            .collect()
    }

    /// The pod netns name.
    pub fn netns_name(&self) -> &str {
        &self.inner.netns_name
    }

    /// `/run/netns/<pod netns name>`.
    pub fn netns_path(&self) -> &Path {
        &self.inner.netns_path
    }

    /// The node-side veth (`veth<8 hex>`, in the node netns); the pod side is `eth0`.
    pub fn host_ifname(&self) -> &str {
        &self.inner.host_ifname
    }

    /// The node netns path.
    pub fn node_netns_path(&self) -> &Path {
        &self.inner.node_netns_path
    }

    /// Whether the pod was removed (or its node dropped).
    pub fn is_removed(&self) -> bool {
        self.inner.removed.load(Ordering::SeqCst)
    }

    endpoint_methods!("pod");

    fn ep_netns(&self) -> &Path {
        &self.inner.netns_path
    }
    /// The node's log directory: a pod's processes log next to the node's.
    fn ep_log_dir(&self) -> &Path {
        &self.inner.log_dir
    }
    fn ep_servers(&self) -> &ServerSet {
        &self.inner.servers
    }
    fn ep_answer(&self) -> &str {
        &self.inner.name
    }
    fn ep_bind(&self) -> Bind {
        if self.inner.ipv6.is_some() {
            Bind::Dual
        } else {
            Bind::V4
        }
    }
    fn ep_check(&self) -> Result<()> {
        if self.is_removed() {
            bail!("pod {} was removed", self.name());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.inner.name)
            .field("ip", &self.inner.ip)
            .field("ipv6", &self.inner.ipv6)
            .field("host_ifname", &self.inner.host_ifname)
            .field("netns", &self.inner.netns_name)
            .finish()
    }
}
