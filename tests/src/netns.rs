//! Running code in a network namespace from a thread of the test process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Moves the calling thread into the network namespace at `path`. Only this thread moves
/// (a thread's netns is per-thread on Linux); sockets it creates afterwards live there.
pub fn enter_netns(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({})", path.display()));
    }
    Ok(())
}

/// Runs `f` on a fresh thread that first entered the network namespace at `path`
/// (`setns(fd, CLONE_NEWNET)`), and returns its result. Sockets `f` creates live in that
/// namespace; `/sys` and `/proc/self` are not remounted (only `/proc/sys/net` follows the
/// thread). A panic in `f` is propagated to the caller.
pub fn in_netns<T: Send>(path: impl AsRef<Path>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = path.as_ref();
    let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<T> {
            // SAFETY: plain syscall on a valid descriptor.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns({})", path.display()));
            }
            drop(file);
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes a sysctl (dotted name, e.g. `net.ipv4.ip_forward`) inside the netns at `path`.
/// `/proc/sys/net` is resolved against the writing thread's netns. `net.ipv6.*` settings are
/// skipped on a kernel without IPv6.
pub(crate) fn sysctl_in(path: &Path, pairs: &[(&str, &str)]) -> Result<()> {
    in_netns(path, || -> Result<()> {
        let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
        for (name, value) in pairs {
            if name.starts_with("net.ipv6.") && !ipv6 {
                continue;
            }
            let file = format!("/proc/sys/{}", name.replace('.', "/"));
            std::fs::write(&file, value).with_context(|| format!("writing {value} to {file}"))?;
        }
        Ok(())
    })?
}

/// Pids of the processes whose (main thread's) netns is the one at `path`, excluding ours.
pub(crate) fn netns_pids(path: &Path) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == target.ino() && m.dev() == target.dev())
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs every process (other than ours) inside the netns at `path`, and waits (bounded)
/// for them to go.
pub(crate) fn kill_pids_in_netns(path: &Path) {
    let pids = netns_pids(path);
    if pids.is_empty() {
        return;
    }
    for &pid in &pids {
        // SAFETY: sending a signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|&p| crate::names::pid_alive(p)) {
        // Our own children become zombies until reaped; a zombie has no netns any more.
        if netns_pids(path).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
