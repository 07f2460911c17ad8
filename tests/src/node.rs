//! The node and its pods.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::client::{self, Reply};
use crate::cmd::{self, EXEC_TIMEOUT};
use crate::names::{self, PREFIX};
use crate::netns::{self, in_netns};
use crate::process::NodeProcess;
use crate::server::{Seen, ServerThread};

/// The address every node-side pod veth carries (as a /32) and every pod routes through,
/// like the ptp CNI plugin / kindnet with pod CIDR 10.244.0.0/24.
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

static SWEEP: Once = Once::new();
/// Log dirs of dead test processes older than this are removed by the first [`Node::new`].
const LOG_MAX_AGE: Duration = Duration::from_secs(3600);
static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A Kubernetes node made of a network namespace; see the crate documentation for the layout.
///
/// Dropping it (also while unwinding from a panic) stops the pods' servers, kills every
/// process left in its namespaces and deletes the pod and node namespaces (and with them
/// the veths and routes). Drop [`NodeProcess`]es before their node to stop them gracefully
/// (declare the node first); otherwise the node SIGKILLs them.
pub struct Node {
    name: String,
    path: PathBuf,
    gateway: Ipv4Addr,
    log_dir: PathBuf,
    pods: Mutex<Vec<Pod>>,
    pod_counter: AtomicU64,
}

impl Node {
    /// Creates the node netns `sluicetb-<pid>-<n>-<rand>-<hint>` with `lo` up, IPv4
    /// forwarding on and `rp_filter` off; nothing links it to the root namespace. The first
    /// call in a process also runs [`crate::sweep_stale`]`(PREFIX)` and removes the log dirs
    /// of dead processes that are more than an hour old.
    pub fn new(name_hint: &str) -> Result<Node> {
        Self::with_gateway(name_hint, DEFAULT_GATEWAY)
    }

    /// Like [`Node::new`] with another pod gateway address than [`DEFAULT_GATEWAY`].
    pub fn with_gateway(name_hint: &str, gateway: Ipv4Addr) -> Result<Node> {
        SWEEP.call_once(|| {
            if let Err(e) = names::sweep_stale(PREFIX) {
                eprintln!("sluice-testbed: sweeping stale namespaces: {e:#}");
            }
            // Log dirs of dead runs (kept after a panic, or left by a SIGKILL): after an hour.
            let _ = names::sweep_paths(&std::env::temp_dir(), PREFIX, LOG_MAX_AGE);
        });
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
            gateway,
            pods: Mutex::new(Vec::new()),
            pod_counter: AtomicU64::new(0),
        };
        // From here on Drop cleans up whatever fails.
        cmd::ip(&["-n", &node.name, "link", "set", "lo", "up"])?;
        netns::sysctl_in(
            &node.path,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )
        .context("node sysctls")?;
        Ok(node)
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
        self.gateway
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
        if name.is_empty() {
            bail!("empty pod name");
        }
        if ip == self.gateway || ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
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
                netns_path: Path::new("/run/netns").join(&netns_name),
                netns_name,
                host_ifname,
                node_netns_name: self.name.clone(),
                node_netns_path: self.path.clone(),
                log_dir: self.log_dir.clone(),
                removed: AtomicBool::new(false),
                servers: Mutex::new(Vec::new()),
                seen: Arc::new(Mutex::new(Vec::new())),
            }),
        };
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pod.clone());
        if let Err(e) = self.wire_pod(&pod) {
            let _ = self.remove_pod(&pod);
            return Err(e.context(format!("creating pod {name} ({ip})")));
        }
        Ok(pod)
    }

    fn wire_pod(&self, pod: &Pod) -> Result<()> {
        let node = self.name.as_str();
        let pns = pod.netns_name();
        let veth = pod.host_ifname();
        let gw = format!("{}/32", self.gateway);
        let ip32 = format!("{}/32", pod.ip());
        let gw_plain = self.gateway.to_string();
        cmd::ip(&["-n", pns, "link", "set", "lo", "up"])?;
        netns::sysctl_in(
            pod.netns_path(),
            &[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )
        .context("pod sysctls")?;
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

    /// Runs `args` (program resolved through `PATH` and the sbin directories) inside the
    /// node netns, like `nsenter --net=<netns> -- args…`; 30 s timeout. `Output` whatever
    /// the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::exec_in(Some(&self.path), args, EXEC_TIMEOUT)
    }

    /// Like [`Node::exec`], but an error unless it exits 0; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::exec_ok_in(Some(&self.path), args, EXEC_TIMEOUT)
    }

    /// Like [`Node::exec`] with a chosen timeout.
    pub fn exec_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<Output> {
        cmd::exec_in(Some(&self.path), args, timeout)
    }

    /// Starts `cmd` inside the node netns (setns between fork and exec, like
    /// `nsenter --net=<netns> --`), stdout+stderr to a log file in [`Node::log_dir`].
    pub fn spawn(&self, cmd: &mut Command) -> Result<NodeProcess> {
        spawn_logged(&self.path, &self.log_dir, cmd)
    }

    /// Runs `f` on a thread inside the node netns (e.g. a client on the node itself).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.path, f)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
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
            .field("netns", &self.name)
            .field("gateway", &self.gateway)
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

fn feature_on(ethtool_k: &str, feature: &str) -> Result<bool> {
    let prefix = format!("{feature}:");
    let line = ethtool_k
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {feature} in ethtool -k output"))?;
    Ok(line[prefix.len()..].trim().starts_with("on"))
}

fn spawn_logged(netns: &Path, log_dir: &Path, cmd: &mut Command) -> Result<NodeProcess> {
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
    netns_name: String,
    netns_path: PathBuf,
    host_ifname: String,
    node_netns_name: String,
    node_netns_path: PathBuf,
    log_dir: PathBuf,
    removed: AtomicBool,
    servers: Mutex<Vec<ServerThread>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl PodInner {
    fn stop_servers(&self) {
        let servers = std::mem::take(&mut *self.servers.lock().unwrap_or_else(|e| e.into_inner()));
        drop(servers);
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

    /// Starts TCP and UDP servers on each port (`0.0.0.0:port` in the pod netns, one thread
    /// for all of them). Each TCP connection gets `<pod name>\n` and a close; each UDP
    /// datagram gets `<pod name>\n` back to its source. Bind errors are returned here.
    /// Servers stop when the pod is removed, its node dropped, or [`Pod::stop_servers`].
    pub fn serve(&self, ports: &[u16]) -> Result<()> {
        self.serve_on(ports, ports)
    }

    /// TCP servers only.
    pub fn serve_tcp(&self, ports: &[u16]) -> Result<()> {
        self.serve_on(ports, &[])
    }

    /// UDP servers only.
    pub fn serve_udp(&self, ports: &[u16]) -> Result<()> {
        self.serve_on(&[], ports)
    }

    fn serve_on(&self, tcp: &[u16], udp: &[u16]) -> Result<()> {
        if self.is_removed() {
            bail!("pod {} was removed", self.name());
        }
        let t = ServerThread::start(
            self.inner.netns_path.clone(),
            self.inner.name.clone(),
            tcp,
            udp,
            self.inner.seen.clone(),
        )?;
        self.inner
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
        Ok(())
    }

    /// Stops all of the pod's servers (their ports are closed when this returns).
    pub fn stop_servers(&self) {
        self.inner.stop_servers();
    }

    /// Every request the pod's servers answered so far (client address as the server saw
    /// it), oldest first; at most [`crate::server::MAX_SEEN`].
    pub fn seen(&self) -> Vec<Seen> {
        self.inner
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets what [`Pod::seen`] recorded.
    pub fn clear_seen(&self) {
        self.inner
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// One TCP request from this pod (see [`client::tcp_request`]).
    pub fn tcp_request(&self, dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
        in_netns(self.netns_path(), || client::tcp_request(dst, timeout))?
    }

    /// One UDP request from this pod over a connected socket (see [`client::udp_request`]).
    pub fn udp_request(&self, dst: SocketAddrV4, timeout: Duration) -> Result<Reply> {
        in_netns(self.netns_path(), || client::udp_request(dst, timeout))?
    }

    /// `n` sequential TCP requests from one thread that stays in the pod netns; the outer
    /// error is only for failing to enter the netns.
    pub fn tcp_requests(
        &self,
        dst: SocketAddrV4,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Result<Reply>>> {
        in_netns(self.netns_path(), || client::tcp_requests(dst, n, timeout))
    }

    /// `n` sequential UDP requests (new socket each) from one thread in the pod netns.
    pub fn udp_requests(
        &self,
        dst: SocketAddrV4,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Result<Reply>>> {
        in_netns(self.netns_path(), || client::udp_requests(dst, n, timeout))
    }

    /// Runs `f` on a thread inside the pod netns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.netns_path(), f)
    }

    /// Runs `args` inside the pod netns (30 s timeout); `Output` whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        cmd::exec_in(Some(self.netns_path()), args, EXEC_TIMEOUT)
    }

    /// Like [`Pod::exec`], but an error unless it exits 0; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::exec_ok_in(Some(self.netns_path()), args, EXEC_TIMEOUT)
    }

    /// Starts `cmd` inside the pod netns, logging to the node's log dir.
    pub fn spawn(&self, cmd: &mut Command) -> Result<NodeProcess> {
        spawn_logged(self.netns_path(), &self.inner.log_dir, cmd)
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.inner.name)
            .field("ip", &self.inner.ip)
            .field("host_ifname", &self.inner.host_ifname)
            .field("netns", &self.inner.netns_name)
            .finish()
    }
}
