//! Running the real `sluice` binary in a testbed [`Node`] ([`SluiceNode`]) or on every node of a
//! [`Cluster`] ([`SluiceCluster`]): a manifests directory the agents watch, a private pin
//! directory on bpffs per agent, and the agent processes themselves.
//!
//! Field order is drop order: the agents stop first, then the pinned datapaths are removed,
//! then the namespaces, then the manifests. All of it also on panic.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    apiserver::ApiServer, objects, unique_name, Cluster, ClusterOptions, Node, NodeProcess, Pod,
};

/// How long an agent gets to load, sync and attach before a test gives up on it: 30 s, or
/// `$SLUICE_AGENT_READY_TIMEOUT` seconds (the kernel matrix's emulated guests verify the
/// programs in a minute or more).
pub fn agent_ready_timeout() -> Duration {
    std::env::var("SLUICE_AGENT_READY_TIMEOUT")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs)
}
/// The line `sluice agent` logs once the initial sync and attach are done.
pub const AGENT_READY_LINE: &str = "sluice agent ready";

/// The `sluice` binary under test: `$SLUICE_BIN`, else the one cargo built next to this test
/// executable (`target/<profile>/sluice`; `cargo test --workspace` builds it).
pub fn sluice_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<binary>
    let mut dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile dir");
    }
    let bin = dir.join("sluice");
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build -p sluice` or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// A bpffs pin directory removed (with `sluice cleanup`, which also detaches programs) on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        // Pins left by a test run that was SIGKILLed keep programs and maps alive; remove them.
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| {
            if let Err(e) = crate::sweep_stale_paths(Path::new("/sys/fs/bpf"), crate::PREFIX) {
                eprintln!("sweeping stale pin directories: {e:#}");
            }
        });
        PinDir {
            path: Path::new("/sys/fs/bpf").join(unique_name(crate::PREFIX)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let status = Command::new(sluice_bin())
            .arg("cleanup")
            .arg("--pin-path")
            .arg(&self.path)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "sluice cleanup of {} failed: {status:?}",
                self.path.display()
            );
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A directory of manifests, written atomically (write to a hidden temp file, then rename) so
/// the agent never reads half a file. Removed on drop.
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    pub fn new() -> Result<ManifestDir> {
        let path = std::env::temp_dir().join(unique_name(crate::PREFIX));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ManifestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path.join(name)).context("renaming manifest into place")
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.path.join(name)).with_context(|| format!("removing {name}"))
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A testbed node with a manifests directory and a pin directory for Sluice.
pub struct SluiceNode {
    agent: Option<NodeProcess>,
    pub pins: PinDir,
    pub node: Node,
    pub manifests: ManifestDir,
}

impl SluiceNode {
    /// A node with a `client` pod (pod IP .10) and `backends` web pods (.21, .22, ...) serving
    /// TCP 8080, written as Pods of namespace `shop` (`pods.yaml`) and the Service `shop/web` on
    /// `vip:80` over them (`web.yaml`); the agent is not started.
    pub fn with_web(
        hint: &str,
        vip: Ipv4Addr,
        backends: u8,
    ) -> Result<(SluiceNode, Pod, Vec<Pod>)> {
        let cluster = SluiceNode::new(hint)?;
        let client = cluster.node.add_pod("client", cluster.node.pod_ip(10))?;
        let mut web = Vec::new();
        for i in 1..=backends {
            let pod = cluster
                .node
                .add_pod(&format!("web-{i}"), cluster.node.pod_ip(20 + i))?;
            pod.serve_tcp(&[8080])?;
            web.push(pod);
        }
        let mut pods = objects::pod("shop", "client", client.ip(), "client");
        for pod in &web {
            pods += &objects::pod("shop", pod.name(), pod.ip(), "web");
        }
        cluster.manifests.write("pods.yaml", &pods)?;
        let ips: Vec<Ipv4Addr> = web.iter().map(Pod::ip).collect();
        cluster.manifests.write(
            "web.yaml",
            &objects::cluster_ip_service("shop", "web", vip, 80, 8080, &ips),
        )?;
        Ok((cluster, client, web))
    }

    pub fn new(hint: &str) -> Result<SluiceNode> {
        Ok(SluiceNode {
            agent: None,
            pins: PinDir::new(),
            node: Node::new(hint)?,
            manifests: ManifestDir::new()?,
        })
    }

    /// Starts `sluice agent` in the node and waits until it reports ready. An agent already
    /// running is stopped first (as a DaemonSet rolling update with maxUnavailable does): two
    /// agents in one node would compete for its fixed ports (the healthz server's 10256).
    pub fn start_agent(&mut self) -> Result<&mut NodeProcess> {
        self.start_agent_with(&[])
    }

    /// [`SluiceNode::start_agent`] with extra arguments (e.g. `--node-name`).
    pub fn start_agent_with(&mut self, extra_args: &[&str]) -> Result<&mut NodeProcess> {
        if let Some(mut old) = self.agent.take() {
            old.terminate().context("stopping the running agent")?;
        }
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("agent")
            .arg("--manifests")
            .arg(self.manifests.path())
            .arg("--pin-path")
            .arg(self.pins.path())
            .args(extra_args)
            .env("RUST_LOG", "info,sluice=debug");
        let mut agent = self.node.spawn(&mut cmd)?;
        agent.wait_for_log(AGENT_READY_LINE, agent_ready_timeout())?;
        Ok(self.agent.insert(agent))
    }

    pub fn agent_mut(&mut self) -> Option<&mut NodeProcess> {
        self.agent.as_mut()
    }

    /// Takes the agent out (to kill it); dropping the returned process stops it.
    pub fn take_agent(&mut self) -> Option<NodeProcess> {
        self.agent.take()
    }
}

/// A [`Cluster`] running `sluice agent` on every node: one shared [`ManifestDir`] (holding the
/// cluster's Node objects from the start, as `nodes.yaml`) and one [`PinDir`] per node.
///
/// Agent `i` (1-based, like the nodes) runs in node `i`'s netns with
/// `--manifests <dir> --pin-path <pins[i-1]> --node-name node-<i>` (`--kubeconfig <node i's>`
/// instead of `--manifests` with [`Self::with_api_server`]), then [`Self::agent_args`]
/// (by default `--cluster-cidr` with the cluster's pod CIDRs), then the extra arguments of
/// [`Self::start_agent`].
pub struct SluiceCluster {
    agents: Vec<Option<NodeProcess>>,
    /// With [`SluiceCluster::with_api_server`]: the API server the agents watch (instead of
    /// the manifests directory), listening in every node netns.
    pub api: Option<ApiServer>,
    /// One kubeconfig per node (in the manifests directory) when there is an API server.
    kubeconfigs: Vec<PathBuf>,
    /// One pin directory per node, node 1 first.
    pub pins: Vec<PinDir>,
    pub cluster: Cluster,
    pub manifests: ManifestDir,
    /// Arguments every agent gets after the per-node ones; change before starting agents.
    pub agent_args: Vec<String>,
}

/// The name of the manifest [`SluiceCluster`] writes the Node objects to.
pub const NODES_MANIFEST: &str = "nodes.yaml";

impl SluiceCluster {
    /// An IPv4 cluster of `nodes` nodes, its Node objects written, no agent started yet.
    pub fn new(hint: &str, nodes: usize) -> Result<SluiceCluster> {
        Self::with_options(hint, nodes, &ClusterOptions::default())
    }

    /// Like [`SluiceCluster::new`] with cluster options (dual-stack, zones).
    pub fn with_options(
        hint: &str,
        nodes: usize,
        options: &ClusterOptions,
    ) -> Result<SluiceCluster> {
        let manifests = ManifestDir::new()?;
        let cluster = Cluster::with_options(hint, nodes, options)?;
        let pins = (0..nodes).map(|_| PinDir::new()).collect();
        manifests.write(NODES_MANIFEST, &cluster.node_manifests())?;
        let cidrs: Vec<String> = cluster
            .cluster_cidrs()
            .iter()
            .map(|c| c.to_string())
            .collect();
        Ok(SluiceCluster {
            agents: (0..nodes).map(|_| None).collect(),
            api: None,
            kubeconfigs: Vec::new(),
            pins,
            cluster,
            manifests,
            agent_args: vec!["--cluster-cidr".to_string(), cidrs.join(",")],
        })
    }

    /// Like [`SluiceCluster::new`], but the agents list and watch a test [`ApiServer`]
    /// (`--kubeconfig`, no `--manifests`) that already holds the cluster's Node objects.
    /// Each node netns gets its own listener on 127.0.0.1, and each agent a kubeconfig for it.
    pub fn with_api_server(hint: &str, nodes: usize) -> Result<SluiceCluster> {
        let mut cluster = Self::new(hint, nodes)?;
        let mut api = ApiServer::new();
        for i in 1..=nodes {
            let port = api
                .listen_in(cluster.cluster.node(i).netns_path())
                .with_context(|| format!("API server listener in node-{i}"))?;
            let path = cluster
                .manifests
                .path()
                .join(format!("kubeconfig-node-{i}"));
            std::fs::write(&path, ApiServer::kubeconfig(port))
                .with_context(|| format!("writing {}", path.display()))?;
            cluster.kubeconfigs.push(path);
        }
        api.apply(&cluster.cluster.node_manifests())?;
        cluster.api = Some(api);
        Ok(cluster)
    }

    /// The API server of [`SluiceCluster::with_api_server`].
    pub fn api(&self) -> &ApiServer {
        self.api
            .as_ref()
            .expect("a SluiceCluster made with_api_server")
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        self.cluster.node(i)
    }

    fn check(&self, i: usize) -> Result<()> {
        if !(1..=self.agents.len()).contains(&i) {
            anyhow::bail!(
                "no node {i}: the cluster has nodes 1 to {}",
                self.agents.len()
            );
        }
        Ok(())
    }

    fn agent_command(&self, i: usize, extra_args: &[&str]) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("agent");
        match self.kubeconfigs.get(i - 1) {
            Some(kubeconfig) => cmd.arg("--kubeconfig").arg(kubeconfig),
            None => cmd.arg("--manifests").arg(self.manifests.path()),
        };
        cmd.arg("--pin-path")
            .arg(self.pins[i - 1].path())
            .arg("--node-name")
            .arg(self.cluster.node(i).name())
            .args(&self.agent_args)
            .args(extra_args)
            .env("RUST_LOG", "info,sluice=debug");
        cmd
    }

    /// Starts agent `i` with `extra_args` and waits until it reports ready. An agent already
    /// running there is stopped first (SIGTERM, then SIGKILL after
    /// [`crate::TERMINATE_GRACE`]): two agents in one node would compete for its fixed ports
    /// (the healthz server's 10256). Like [`SluiceNode::start_agent`].
    pub fn start_agent(&mut self, i: usize, extra_args: &[&str]) -> Result<&mut NodeProcess> {
        self.check(i)?;
        if let Some(mut old) = self.agents[i - 1].take() {
            old.terminate()
                .with_context(|| format!("stopping the agent on node-{i}"))?;
        }
        let mut cmd = self.agent_command(i, extra_args);
        let mut agent = self.cluster.node(i).spawn(&mut cmd)?;
        agent
            .wait_for_log(AGENT_READY_LINE, agent_ready_timeout())
            .with_context(|| format!("agent on node-{i}"))?;
        Ok(self.agents[i - 1].insert(agent))
    }

    /// Starts agent `i` with `extra_args` without waiting for it to be ready (to watch what it
    /// does before); an agent already running there is stopped first.
    pub fn spawn_agent(&mut self, i: usize, extra_args: &[&str]) -> Result<&mut NodeProcess> {
        self.check(i)?;
        if let Some(mut old) = self.agents[i - 1].take() {
            old.terminate()
                .with_context(|| format!("stopping the agent on node-{i}"))?;
        }
        let mut cmd = self.agent_command(i, extra_args);
        let agent = self.cluster.node(i).spawn(&mut cmd)?;
        Ok(self.agents[i - 1].insert(agent))
    }

    /// Starts the agents of all nodes that have none running (all at once, then waits for
    /// each to be ready).
    pub fn start_agents(&mut self) -> Result<()> {
        let mut started = Vec::new();
        for i in 1..=self.agents.len() {
            if self.agents[i - 1].as_mut().is_some_and(|a| a.is_running()) {
                continue;
            }
            let mut cmd = self.agent_command(i, &[]);
            started.push((i, self.cluster.node(i).spawn(&mut cmd)?));
        }
        for (i, mut agent) in started {
            let ready = agent
                .wait_for_log(AGENT_READY_LINE, agent_ready_timeout())
                .with_context(|| format!("agent on node-{i}"));
            // Kept even when not ready, so a later failure's drop prints its log.
            self.agents[i - 1] = Some(agent);
            ready?;
        }
        Ok(())
    }

    /// Agent `i`, if started and not taken.
    pub fn agent_mut(&mut self, i: usize) -> Option<&mut NodeProcess> {
        self.agents.get_mut(i.checked_sub(1)?)?.as_mut()
    }

    /// Takes agent `i` out (to kill it); dropping the returned process stops it.
    pub fn take_agent(&mut self, i: usize) -> Option<NodeProcess> {
        self.agents.get_mut(i.checked_sub(1)?)?.take()
    }

    /// `sluice <args>` run in node `i` (so it reads that node's pinned maps); its stdout.
    /// Panics when it fails.
    pub fn run_sluice(&self, i: usize, args: &[&str]) -> String {
        let bin = sluice_bin();
        let mut argv: Vec<&std::ffi::OsStr> = vec![bin.as_os_str()];
        argv.extend(args.iter().map(std::ffi::OsStr::new));
        let out = self.cluster.node(i).exec(&argv).expect("running sluice");
        assert!(
            out.status.success(),
            "sluice {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Writes [`NODES_MANIFEST`] again from the cluster's nodes (e.g. to restore it after a
    /// test replaced or removed it).
    pub fn write_node_manifests(&self) -> Result<()> {
        self.manifests
            .write(NODES_MANIFEST, &self.cluster.node_manifests())
    }
}
