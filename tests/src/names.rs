//! Unique names and the sweeping of what crashed runs left behind.
//!
//! Every name this crate makes has the form `<prefix>-<pid>-<counter>-<random>[-<hint>]`: the
//! pid of the process that made it lets [`sweep_stale`] tell leftovers of a dead run (a test
//! binary that was SIGKILLed, so no `Drop` ran) from the live objects of a parallel run.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd;

/// The prefix of every network namespace this crate creates.
pub const PREFIX: &str = "sluicetb";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A random 32-bit number from the kernel (falls back to the clock if `getrandom` fails).
pub(crate) fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: the buffer is valid for 4 bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(buf)
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        nanos ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u32).rotate_left(16)
    }
}

/// `<prefix>-<pid>-<counter>-<6 random hex digits>`: unique across the threads of this process
/// and across processes; [`sweep_stale`]/[`sweep_stale_paths`] recognise it once `pid` is dead.
///
/// Use it for anything a test creates outside its namespaces, e.g. a bpffs pin path:
/// `format!("/sys/fs/bpf/{}", unique_name("sluicetb"))`.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{}-{n}-{:06x}",
        std::process::id(),
        random_u32() & 0xff_ffff
    )
}

/// A name hint reduced to `[a-z0-9-]`, at most `max` characters.
pub(crate) fn sanitize(hint: &str, max: usize) -> String {
    let s: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    if s.is_empty() {
        "x".to_string()
    } else {
        s
    }
}

/// The pid encoded in a name made by [`unique_name`]`(prefix)`, if `name` is one.
pub(crate) fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let pid: i32 = rest.split('-').next()?.parse().ok()?;
    (pid > 0).then_some(pid)
}

/// Whether a process with this pid exists.
pub(crate) fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Deletes the named network namespaces (`/run/netns/<prefix>-<pid>-…`) whose creating process
/// `pid` is no longer alive, after SIGKILLing any process still inside them. Returns the names
/// deleted. Namespaces of live processes (parallel test runs) are left alone.
///
/// [`crate::Node::new`] runs this once per process with [`PREFIX`].
pub fn sweep_stale(prefix: &str) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    let entries = match fs::read_dir("/run/netns") {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
        Err(e) => return Err(e).context("reading /run/netns"),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| owner_pid(n, prefix).is_some_and(|pid| !pid_alive(pid)))
        .collect();
    // Pods ("<node>-p<i>-<name>") sort after their node; delete them first.
    names.sort();
    names.reverse();
    for name in names {
        let path = Path::new("/run/netns").join(&name);
        crate::netns::kill_pids_in_netns(&path);
        match cmd::netns_del(&name) {
            Ok(()) => deleted.push(name),
            Err(e) => eprintln!("sluice-testbed: sweeping stale netns {name}: {e:#}"),
        }
    }
    Ok(deleted)
}

/// Removes (recursively) the entries of `dir` named `<prefix>-<pid>-…` whose process `pid` is
/// no longer alive, e.g. bpffs pin directories from [`unique_name`] that a killed run left in
/// `/sys/fs/bpf`. Returns the paths removed. A missing `dir` is not an error.
pub fn sweep_stale_paths(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    sweep_paths(dir, prefix, Duration::ZERO)
}

/// [`sweep_stale_paths`] limited to entries last modified at least `min_age` ago.
pub(crate) fn sweep_paths(dir: &Path, prefix: &str, min_age: Duration) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if owner_pid(&name, prefix).is_none_or(pid_alive) {
            continue;
        }
        let old_enough = min_age.is_zero()
            || entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
        if !old_enough {
            continue;
        }
        let path = entry.path();
        let r = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match r {
            Ok(()) => removed.push(path),
            Err(e) => eprintln!("sluice-testbed: removing {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let a = unique_name("sluicetb");
        let b = unique_name("sluicetb");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a, "sluicetb"), Some(std::process::id() as i32));
        assert_eq!(
            owner_pid(&format!("{a}-node-p0-web"), "sluicetb"),
            Some(std::process::id() as i32)
        );
        assert_eq!(owner_pid("sluicetbx-12-1", "sluicetb"), None);
        assert_eq!(owner_pid("other-12-1", "sluicetb"), None);
        assert_eq!(owner_pid("sluicetb-abc-1", "sluicetb"), None);
        assert!(pid_alive(std::process::id() as i32));
    }

    #[test]
    fn sanitize_keeps_it_short_and_plain() {
        assert_eq!(sanitize("Web_Server 1", 8), "web-serv");
        assert_eq!(sanitize("", 8), "x");
    }
}
