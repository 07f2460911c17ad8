//! A test-owned child cgroup v2, for the socket programs (`sluice agent --cgroup-root`), and
//! client processes run inside it.
//!
//! Only ever a child cgroup this crate creates, `/sys/fs/cgroup/unified/sluice-test-<unique>`
//! (or under `/sys/fs/cgroup` where that is the cgroup2 mount): never the root cgroup, so
//! programs attached to it see only the processes a test puts there. Dropping a
//! [`TestCgroup`] kills what still runs in it (`cgroup.kill`) and removes it; the cgroup
//! links attached to it die with it. [`TestCgroup::new`] first removes the cgroups of dead
//! test processes ([`crate::unique_name`]'s pid).
//!
//! Clients are `sluice-probe` processes (tests/src/bin/sluice-probe.rs) that join the cgroup
//! and then the network namespace between fork and exec, so every socket they open is made
//! inside both.

use std::ffi::CString;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::{cmd, names};

/// Prefix of the test cgroups' names.
pub const CGROUP_PREFIX: &str = "sluice-test";

/// The cgroup2 mount: the hybrid layout's `/sys/fs/cgroup/unified`, else `/sys/fs/cgroup`.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let target = fields.nth(1)?;
            (fields.next()? == "cgroup2").then(|| PathBuf::from(target))
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .find(|p| p == Path::new("/sys/fs/cgroup/unified") || p == Path::new("/sys/fs/cgroup"))
        .ok_or_else(|| anyhow!("no cgroup2 filesystem at /sys/fs/cgroup(/unified)"))
}

/// A child cgroup v2 owned by the test; removed on drop.
pub struct TestCgroup {
    path: PathBuf,
}

/// One request of a probe (see `sluice-probe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    /// The peer the application saw, and the server's answer.
    Ok { peer: SocketAddr, text: String },
    /// The call failed with this errno (0: timed out).
    Err { errno: i32, message: String },
}

impl Probed {
    /// The answer, if the request succeeded.
    pub fn text(&self) -> Option<&str> {
        match self {
            Probed::Ok { text, .. } => Some(text),
            Probed::Err { .. } => None,
        }
    }
}

/// How `sluice-probe` talks to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMode {
    /// A TCP connection; the peer is `getpeername()`'s.
    Tcp,
    /// An unconnected UDP socket (`sendto`, `recvfrom`); the peer is the reply's source.
    Udp,
    /// A connected UDP socket; the peer is `getpeername()`'s.
    UdpConnected,
}

impl ProbeMode {
    fn arg(self) -> &'static str {
        match self {
            ProbeMode::Tcp => "tcp",
            ProbeMode::Udp => "udp",
            ProbeMode::UdpConnected => "udp-connected",
        }
    }
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/sluice-test-<pid>-<n>-<random>`.
    pub fn new() -> Result<TestCgroup> {
        let root = cgroup2_root()?;
        sweep_stale_cgroups(&root);
        let path = root.join(names::unique_name(CGROUP_PREFIX));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let procs = self.path.join("cgroup.procs");
        let text =
            fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// A command that joins this cgroup and then enters the network namespace `netns` before
    /// it executes (what `sh -c 'echo $$ > cgroup.procs; exec nsenter --net=<netns> ...'`
    /// does).
    pub fn command(&self, netns: &Path, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut command = Command::new(program);
        let procs = CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .context("cgroup path")?;
        // SAFETY: open/write/close are async-signal-safe syscalls; nothing is allocated.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
        // Registered after the cgroup hook, so it runs after it.
        cmd::enter_netns_on_exec(&mut command, netns)?;
        Ok(command)
    }

    /// Runs `sluice-probe` (at `probe`) in this cgroup and `netns`: `count` requests to `dst`,
    /// each on a new socket with `timeout`.
    pub fn probe(
        &self,
        probe: &Path,
        netns: &Path,
        mode: ProbeMode,
        dst: SocketAddr,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Probed>> {
        let mut command = self.command(netns, probe)?;
        command.args([
            mode.arg(),
            &dst.to_string(),
            &count.to_string(),
            &timeout.as_millis().to_string(),
        ]);
        let bound = timeout * 2 * (count as u32 + 1) + Duration::from_secs(5);
        let out = cmd::run(&mut command, bound)?;
        let stdout = cmd::check(&format!("sluice-probe {} {dst}", mode.arg()), out)?;
        stdout.lines().map(parse_probe_line).collect()
    }
}

fn parse_probe_line(line: &str) -> Result<Probed> {
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ok"), Some(peer), text) => Ok(Probed::Ok {
            peer: peer
                .parse()
                .with_context(|| format!("probe peer in {line:?}"))?,
            text: text.unwrap_or_default().to_string(),
        }),
        (Some("err"), Some(errno), message) => Ok(Probed::Err {
            errno: errno
                .parse()
                .with_context(|| format!("probe errno in {line:?}"))?,
            message: message.unwrap_or_default().to_string(),
        }),
        _ => bail!("unexpected sluice-probe output {line:?}"),
    }
}

/// Kills every process in `path` and removes it (bounded).
fn remove_cgroup(path: &Path) -> Result<()> {
    // cgroup.kill (kernel 5.14) SIGKILLs the whole cgroup.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while the killed processes are still exiting.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", path.display())),
        }
    }
}

/// Removes the test cgroups of test processes that are gone.
fn sweep_stale_cgroups(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if names::owner_pid(&name, CGROUP_PREFIX).is_some_and(|pid| !names::pid_alive(pid)) {
            if let Err(e) = remove_cgroup(&entry.path()) {
                eprintln!("sluice-testbed: sweeping stale cgroup: {e:#}");
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("sluice-testbed: {e:#}");
        }
    }
}
