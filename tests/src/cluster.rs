//! A multi-node cluster: nodes on a shared L2 "docker network" (a bridge in a fabric netns),
//! kindnet's routes between their pod CIDRs, and an external client host outside the cluster.
//! See the crate documentation for the layout and addresses.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{bail, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::cmd::{self, EXEC_TIMEOUT};
use crate::endpoint::endpoint_methods;
use crate::names::{self, PREFIX};
use crate::netns::{self};
use crate::node::{dec_as_hex, sweep_once, NodeSpec, POD_SYSCTLS};
use crate::server::{Bind, ServerSet};
use crate::Node;

/// The cluster network (kind's docker network): every node's and the external host's `eth0`.
pub const NODE_NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 18, 0, 0), 16);
/// The cluster network's IPv6 subnet (dual-stack clusters).
pub const NODE_NETWORK6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0), 64);
/// All pod CIDRs (kube-proxy's `clusterCIDR`); node `i` has 10.244.`i`.0/24.
pub const CLUSTER_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
/// All IPv6 pod CIDRs; node `i` has fd00:10:244:`i`::/64.
pub const CLUSTER_CIDR6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 56);
/// kind's service CIDR, e.g. for [`Host::add_route`] towards ClusterIPs.
pub const SERVICE_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 12);
/// kind's IPv6 service CIDR.
pub const SERVICE_CIDR6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
/// The external host's address on the cluster network.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The external host's IPv6 address (dual-stack clusters).
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0x100);
/// Most nodes a [`Cluster`] takes (node addresses .11 to .60 stay below the external host's).
pub const MAX_NODES: usize = 50;

/// The IPv4 address of node `i` (1-based): 172.18.0.(10+i).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, (10 + i) as u8)
}

/// The IPv6 address of node `i`: fc00:f853:ccd:e793::(10+i), written with the same digits.
pub fn node_ip6(i: usize) -> Ipv6Addr {
    let [a, b, c, d, ..] = NODE_NETWORK6.network().segments();
    Ipv6Addr::new(a, b, c, d, 0, 0, 0, dec_as_hex((10 + i) as u16))
}

/// Node `i`'s IPv4 pod CIDR: 10.244.`i`.0/24.
pub fn pod_cidr(i: usize) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(10, 244, i as u8, 0), 24)
}

/// Node `i`'s IPv6 pod CIDR: fd00:10:244:`i`::/64 (same digits).
pub fn pod_cidr6(i: usize) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, dec_as_hex(i as u16), 0, 0, 0, 0),
        64,
    )
}

fn mac(last: u8) -> String {
    // Docker's scheme: 02:42 and the IPv4 address.
    format!("02:42:ac:12:00:{last:02x}")
}

/// How to build a [`Cluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Give nodes and the external host IPv6 addresses too, IPv6 pod CIDRs and kindnet's IPv6
    /// routes, so pods can be dual-stack ([`Node::add_pod_dual`]).
    pub dual_stack: bool,
    /// The `topology.kubernetes.io/zone` label of node `i` is `zones[i - 1]`; nodes beyond
    /// the list get `zone-<i>`.
    pub zones: Vec<String>,
}

impl ClusterOptions {
    /// IPv4 only, zones `zone-<i>`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Dual-stack (see [`ClusterOptions::dual_stack`]).
    pub fn dual_stack(mut self, on: bool) -> Self {
        self.dual_stack = on;
        self
    }

    /// The nodes' zones, in node order.
    pub fn zones<S: Into<String>>(mut self, zones: impl IntoIterator<Item = S>) -> Self {
        self.zones = zones.into_iter().map(Into::into).collect();
        self
    }
}

/// The fabric netns holding the bridge; deleted on drop.
struct Fabric {
    name: String,
    path: PathBuf,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        netns::kill_pids_in_netns(&self.path);
        if let Err(e) = cmd::netns_del(&self.name) {
            eprintln!("sluice-testbed: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Nodes on a shared network plus an external client, like a kind cluster; see the crate
/// documentation for the layout.
///
/// Dropping it (also during a panic) drops the nodes (their pods, servers and processes), the
/// external host and the fabric, which removes every interface, address and route it made.
pub struct Cluster {
    nodes: Vec<Node>,
    ext: Host,
    fabric: Fabric,
    dual_stack: bool,
}

impl Cluster {
    /// An IPv4 cluster of `nodes` nodes (1 to [`MAX_NODES`]) and the external host.
    pub fn new(hint: &str, nodes: usize) -> Result<Cluster> {
        Self::with_options(hint, nodes, &ClusterOptions::default())
    }

    /// A dual-stack cluster of `nodes` nodes.
    pub fn dual_stack(hint: &str, nodes: usize) -> Result<Cluster> {
        Self::with_options(hint, nodes, &ClusterOptions::new().dual_stack(true))
    }

    /// A cluster built with `options`.
    pub fn with_options(hint: &str, nodes: usize, options: &ClusterOptions) -> Result<Cluster> {
        if nodes == 0 || nodes > MAX_NODES {
            bail!("a cluster has 1 to {MAX_NODES} nodes, not {nodes}");
        }
        sweep_once();
        let hint = names::sanitize(hint, 12);
        let dual = options.dual_stack;

        let fabric_name = format!("{}-{hint}-fabric", names::unique_name(PREFIX));
        cmd::netns_add(&fabric_name)?;
        let fabric = Fabric {
            path: Path::new("/run/netns").join(&fabric_name),
            name: fabric_name,
        };
        setup_fabric(&fabric).context("setting up the fabric")?;

        let mut built: Vec<Node> = Vec::with_capacity(nodes);
        for i in 1..=nodes {
            let spec = NodeSpec {
                k8s_name: format!("node-{i}"),
                gateway: Ipv4Addr::new(10, 244, i as u8, 1),
                gateway6: Ipv6Addr::from(u128::from(pod_cidr6(i).network()) | 1),
                pod_cidr: pod_cidr(i),
                pod_cidr6: dual.then(|| pod_cidr6(i)),
                zone: Some(
                    options
                        .zones
                        .get(i - 1)
                        .cloned()
                        .unwrap_or_else(|| format!("zone-{i}")),
                ),
            };
            let mut node = Node::create(&format!("{hint}-n{i}"), spec)?;
            node.node_ip = Some(node_ip(i));
            node.node_ip6 = dual.then(|| node_ip6(i));
            built.push(node);
            let node = built.last().expect("just pushed");
            wire_node(&fabric, node, i, nodes, dual)
                .with_context(|| format!("wiring node-{i} ({})", node.netns_name()))?;
        }

        let ext = Host::create(&fabric, &hint, dual).context("creating the external host")?;
        Ok(Cluster {
            nodes: built,
            ext,
            fabric,
            dual_stack: dual,
        })
    }

    /// Node `i`, 1-based like its name `node-<i>`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "no node {i}: the cluster has nodes 1 to {}",
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    /// All nodes, node 1 first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this Kubernetes name.
    pub fn node_named(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    /// The external client (`ext`), outside the cluster: on the node network, no routes to
    /// pods or services until [`Host::add_route`].
    pub fn external(&self) -> &Host {
        &self.ext
    }

    /// Whether nodes, pods CIDRs and the external host have IPv6 too.
    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// The pod CIDRs of the whole cluster ([`CLUSTER_CIDR`], and [`CLUSTER_CIDR6`] when
    /// dual-stack), e.g. for `--cluster-cidr`.
    pub fn cluster_cidrs(&self) -> Vec<IpNet> {
        std::iter::once(IpNet::V4(CLUSTER_CIDR))
            .chain(self.dual_stack.then_some(IpNet::V6(CLUSTER_CIDR6)))
            .collect()
    }

    /// v1 Node objects of all nodes as one YAML stream (`---` between documents), see
    /// [`Node::manifest`]; write it into a manifests directory for `--node-name`.
    pub fn node_manifests(&self) -> String {
        self.nodes
            .iter()
            .map(Node::manifest)
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// The fabric netns name (holds the bridge `br0` and one port per node, named like the
    /// node, plus `ext`).
    pub fn fabric_netns_name(&self) -> &str {
        &self.fabric.name
    }

    /// `/run/netns/<fabric netns>`.
    pub fn fabric_netns_path(&self) -> &Path {
        &self.fabric.path
    }

    /// Runs `args` in the fabric netns (e.g. `tcpdump -i br0`), 30 s timeout.
    pub fn fabric_exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::exec_in(Some(&self.fabric.path), args, EXEC_TIMEOUT)
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("fabric", &self.fabric.name)
            .field("dual_stack", &self.dual_stack)
            .field("nodes", &self.nodes)
            .field("external", &self.ext)
            .finish()
    }
}

fn setup_fabric(fabric: &Fabric) -> Result<()> {
    let f = fabric.name.as_str();
    cmd::ip(&["-n", f, "link", "set", "lo", "up"])?;
    // A plain switch: no IPv6 of its own on the bridge or its ports (no router
    // solicitations or MLD reports in captures).
    netns::sysctl_in(
        &fabric.path,
        &[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ],
    )?;
    // No STP delay, and no multicast snooping (which could stop flooding IPv6 neighbour
    // solicitations to a port whose MLD report it missed).
    #[rustfmt::skip]
    cmd::ip(&[
        "-n", f, "link", "add", "br0", "type", "bridge",
        "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
    ])?;
    cmd::ip(&["-n", f, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Creates `eth0` in `ns` with its peer `port` on the fabric's bridge, addresses it and
/// brings it up.
fn attach(
    fabric: &Fabric,
    ns: &str,
    port: &str,
    mac_last: u8,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
) -> Result<()> {
    let f = fabric.name.as_str();
    let mac = mac(mac_last);
    #[rustfmt::skip]
    cmd::ip(&[
        "-n", ns, "link", "add", "eth0", "address", &mac, "type", "veth",
        "peer", "name", port, "netns", f,
    ])?;
    cmd::ip(&["-n", f, "link", "set", port, "master", "br0"])?;
    cmd::ip(&["-n", f, "link", "set", port, "up"])?;
    let a4 = format!("{v4}/{}", NODE_NETWORK.prefix_len());
    cmd::ip(&["-n", ns, "addr", "add", &a4, "dev", "eth0"])?;
    if let Some(v6) = v6 {
        let a6 = format!("{v6}/{}", NODE_NETWORK6.prefix_len());
        cmd::ip(&["-n", ns, "-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
    }
    cmd::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    Ok(())
}

fn wire_node(fabric: &Fabric, node: &Node, i: usize, nodes: usize, dual: bool) -> Result<()> {
    let ns = node.netns_name();
    attach(
        fabric,
        ns,
        node.name(),
        (10 + i) as u8,
        node_ip(i),
        dual.then(|| node_ip6(i)),
    )?;
    // kindnet: a route to every other node's pod CIDR via that node.
    for j in (1..=nodes).filter(|&j| j != i) {
        let (cidr, via) = (pod_cidr(j).to_string(), node_ip(j).to_string());
        cmd::ip(&["-n", ns, "route", "add", &cidr, "via", &via, "dev", "eth0"])?;
        if dual {
            let (cidr, via) = (pod_cidr6(j).to_string(), node_ip6(j).to_string());
            cmd::ip(&[
                "-n", ns, "-6", "route", "add", &cidr, "via", &via, "dev", "eth0",
            ])?;
        }
    }
    Ok(())
}

/// A host with one interface on the cluster network: the cluster's external client `ext`.
/// Runs servers (answering `ext`) and clients like a [`crate::Pod`]; owned by its
/// [`Cluster`].
pub struct Host {
    name: String,
    netns_name: String,
    path: PathBuf,
    ip: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    log_dir: PathBuf,
    servers: ServerSet,
}

impl Host {
    fn create(fabric: &Fabric, hint: &str, dual: bool) -> Result<Host> {
        let netns_name = format!("{}-{hint}-ext", names::unique_name(PREFIX));
        cmd::netns_add(&netns_name)?;
        let host = Host {
            name: "ext".to_string(),
            path: Path::new("/run/netns").join(&netns_name),
            log_dir: std::env::temp_dir().join(&netns_name),
            netns_name,
            ip: EXTERNAL_IP,
            ipv6: dual.then_some(EXTERNAL_IP6),
            servers: ServerSet::default(),
        };
        // From here on Drop cleans up.
        cmd::ip(&["-n", &host.netns_name, "link", "set", "lo", "up"])?;
        let mut sysctls = POD_SYSCTLS.to_vec();
        sysctls.extend([
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.conf.default.accept_redirects", "0"),
            ("net.ipv6.conf.all.accept_redirects", "0"),
            ("net.ipv6.conf.default.accept_redirects", "0"),
        ]);
        netns::sysctl_in(&host.path, &sysctls).context("host sysctls")?;
        attach(fabric, &host.netns_name, "ext", 100, host.ip, host.ipv6)?;
        Ok(host)
    }

    /// `ext`: what its servers answer.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its IPv4 address ([`EXTERNAL_IP`]).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv6 address ([`EXTERNAL_IP6`]) in a dual-stack cluster.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// Its addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip))
            .chain(self.ipv6.map(IpAddr::V6))
            .collect()
    }

    /// `ip:port`.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// `[ipv6]:port`. Panics without an IPv6 address.
    pub fn addr6(&self, port: u16) -> SocketAddrV6 {
        let ip = self
            .ipv6
            .unwrap_or_else(|| panic!("{} has no IPv6 address", self.name));
        SocketAddrV6::new(ip, port, 0, 0)
    }

    /// The netns name.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// `/run/netns/<netns name>`.
    pub fn netns_path(&self) -> &Path {
        &self.path
    }

    /// Where [`Host::spawn`] logs: `$TMPDIR/<netns name>/`, removed on drop unless panicking.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Adds (or replaces) the route `dst via <via> dev eth0`, e.g.
    /// `add_route("10.96.0.0/12", node1_ip)` to reach ClusterIPs through node 1, or
    /// `add_route("default", …)`. `dst` is anything `ip route` takes; its family must match
    /// `via`'s.
    pub fn add_route(&self, dst: &str, via: impl Into<IpAddr>) -> Result<()> {
        let via = via.into();
        let fam = if via.is_ipv4() { "-4" } else { "-6" };
        let via = via.to_string();
        cmd::ip(&[
            "-n",
            &self.netns_name,
            fam,
            "route",
            "replace",
            dst,
            "via",
            &via,
            "dev",
            "eth0",
        ])
        .map(drop)
    }

    /// Adds the route `cidr via <node's address of that family>`.
    pub fn add_route_via(&self, cidr: IpNet, node: &Node) -> Result<()> {
        let via: IpAddr = match cidr {
            IpNet::V4(_) => node.node_ip().map(IpAddr::V4),
            IpNet::V6(_) => node.node_ipv6().map(IpAddr::V6),
        }
        .with_context(|| format!("node {} has no address for {cidr}", node.name()))?;
        self.add_route(&cidr.to_string(), via)
    }

    /// Deletes the route to `dst` (either family).
    pub fn del_route(&self, dst: &str) -> Result<()> {
        let fam = if dst.contains(':') { "-6" } else { "-4" };
        cmd::ip(&["-n", &self.netns_name, fam, "route", "del", dst]).map(drop)
    }

    endpoint_methods!("host");

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
        &self.name
    }
    fn ep_bind(&self) -> Bind {
        if self.ipv6.is_some() {
            Bind::Dual
        } else {
            Bind::V4
        }
    }
    fn ep_check(&self) -> Result<()> {
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.servers.stop();
        netns::kill_pids_in_netns(&self.path);
        if let Err(e) = cmd::netns_del(&self.netns_name) {
            eprintln!("sluice-testbed: deleting netns {}: {e:#}", self.netns_name);
        }
        if self.log_dir.exists() {
            if std::thread::panicking() {
                eprintln!(
                    "sluice-testbed: keeping logs of {} in {}",
                    self.name,
                    self.log_dir.display()
                );
            } else {
                let _ = std::fs::remove_dir_all(&self.log_dir);
            }
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("netns", &self.netns_name)
            .field("ip", &self.ip)
            .field("ipv6", &self.ipv6)
            .finish()
    }
}
