//! Running the real `sluice` binary in a testbed [`Node`]: a manifests directory it watches, a
//! private pin directory on bpffs, and the agent process itself.
//!
//! Field order is drop order: the agent stops first, then the pinned datapath is removed, then
//! the node's namespaces, then the manifests. All of it also on panic.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{unique_name, Node, NodeProcess};

/// How long an agent gets to load, sync and attach before a test gives up on it.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
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
    pub fn new(hint: &str) -> Result<SluiceNode> {
        Ok(SluiceNode {
            agent: None,
            pins: PinDir::new(),
            node: Node::new(hint)?,
            manifests: ManifestDir::new()?,
        })
    }

    /// Starts `sluice agent` in the node and waits until it reports ready. An agent already
    /// running is stopped (SIGTERM) only once the new one is ready, like a rolling update.
    pub fn start_agent(&mut self) -> Result<&mut NodeProcess> {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("agent")
            .arg("--manifests")
            .arg(self.manifests.path())
            .arg("--pin-path")
            .arg(self.pins.path())
            .env("RUST_LOG", "info,sluice=debug");
        let mut agent = self.node.spawn(&mut cmd)?;
        agent.wait_for_log(AGENT_READY_LINE, AGENT_READY_TIMEOUT)?;
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
