//! Long-running processes inside a namespace (the Sluice agent, under test).

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Grace period between SIGTERM and SIGKILL when a [`NodeProcess`] is dropped.
pub const DROP_GRACE: Duration = Duration::from_secs(5);
/// Grace period of [`NodeProcess::terminate`].
pub const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// A process started by [`crate::Node::spawn`] (or [`crate::Pod::spawn`]) inside a network
/// namespace, with stdout and stderr appended to one log file.
///
/// It runs in its own process group; signals go to the whole group. It gets
/// `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the test process even on SIGKILL. Note that
/// Linux ties that to the *thread* that spawned it: spawn from the test's thread (or one that
/// outlives the process), not from a short-lived helper thread.
///
/// Dropping it sends SIGTERM, waits [`DROP_GRACE`], then SIGKILLs and reaps. When dropped
/// during a panic it prints the log path and the log's last lines to stderr.
pub struct NodeProcess {
    child: Child,
    desc: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl NodeProcess {
    /// Spawns `cmd` inside the netns at `netns`, logging to `log_path` (created, appended to).
    pub(crate) fn spawn(netns: &Path, cmd: &mut Command, log_path: PathBuf) -> Result<Self> {
        let desc = cmd::describe(cmd);
        // Only the process's own output goes to the log (so `wait_for_log` never matches the
        // command line); the command is in `desc` and in Debug/panic output.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating log {}", log_path.display()))?;
        let log_err: File = log.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        cmd::enter_netns_on_exec(cmd, netns)?;
        // SAFETY: prctl and getppid are async-signal-safe syscalls.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between fork and prctl: don't outlive it.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {desc} in {}", netns.display()))?;
        Ok(Self {
            child,
            desc,
            log_path,
            status: None,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The captured stdout+stderr so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the process has exited (reaps it), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log contains `needle`; fails on timeout or if the process exits first
    /// (the error carries the log).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // It may have written the line just before exiting.
                if self.log().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.desc,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.desc,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the process group, unless the process was already reaped.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // The leader is not reaped yet, so the group id cannot have been reused.
        // SAFETY: sending a signal.
        if unsafe { libc::kill(-(self.child.id() as i32), sig) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).context("kill");
            }
        }
        Ok(())
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill_hard(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.signal(libc::SIGKILL)?;
        self.reap()
    }

    /// SIGTERM, then waits up to [`TERMINATE_GRACE`] before SIGKILL; returns the exit status
    /// (`status.signal() == Some(9)` tells it had to be killed).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.terminate_timeout(TERMINATE_GRACE)
    }

    /// Like [`Self::terminate`] with a chosen grace period.
    pub fn terminate_timeout(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while !self.exited_unreaped() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Kills the leader if it ignored SIGTERM, and any leftover member of its group.
        self.signal(libc::SIGKILL)?;
        self.reap()
    }

    /// Whether the leader has exited, without reaping it (so its pgid stays reserved).
    fn exited_unreaped(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only inspects; siginfo is plain data.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r != 0 || info.si_pid() != 0
        }
    }

    fn reap(&mut self) -> Result<ExitStatus> {
        // After SIGKILL this returns promptly (unless the task is stuck in the kernel).
        let s = self.child.wait().context("waiting for process")?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "sluice-testbed: {} (log {}), last lines:\n{}",
                self.desc,
                self.log_path.display(),
                tail.join("\n")
            );
        }
        if let Err(e) = self.terminate_timeout(DROP_GRACE) {
            eprintln!("sluice-testbed: stopping {}: {e:#}", self.desc);
        }
    }
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("pid", &self.child.id())
            .field("cmd", &self.desc)
            .field("log", &self.log_path)
            .field("status", &self.status)
            .finish()
    }
}
