//! Running commands with timeouts, optionally inside a network namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Timeout of the `ip`/`ethtool`/`sysctl` commands the testbed runs itself.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default timeout of [`crate::Node::exec`] and [`crate::Pod::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises `ip netns add/del` in this process: the first `ip netns add` makes `/run/netns`
/// a shared mount, and concurrent first calls would stack mounts.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Resolves a tool name through `PATH` and then the sbin directories (a non-login root shell
/// may lack `/usr/sbin` in `PATH`). Names containing `/` are returned as they are.
pub(crate) fn tool(name: &str) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path_var).chain(
        ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// Makes `cmd` enter the network namespace at `netns` between fork and exec (what
/// `nsenter --net=<netns> --` does, without remounting `/sys` like `ip netns exec`).
///
/// The namespace file is opened now; the descriptor is leaked into the `Command`'s closure
/// (it is close-on-exec, so no child inherits it).
pub(crate) fn enter_netns_on_exec(cmd: &mut Command, netns: &Path) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let fd = file.as_raw_fd();
    // The Command may be spawned later (or again); keep the descriptor open for its lifetime.
    std::mem::forget(file);
    // SAFETY: setns is async-signal-safe (a plain syscall) and touches no parent state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured; kills it after
/// `timeout`. A non-zero exit is not an error here (see [`check`]).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    let out_rx = reader(child.stdout.take());
    let err_rx = reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_micros(200);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {desc}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_rx
                .recv_timeout(Duration::from_secs(1))
                .unwrap_or_default();
            bail!(
                "{desc} timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    };
    // A grandchild that kept the pipes open must not hang us: bounded wait for the readers.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// `Ok(stdout)` if the command exited 0, else an error carrying its status and output.
pub(crate) fn check(desc: &str, out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(anyhow!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            {
                let so = String::from_utf8_lossy(&out.stdout);
                let so = so.trim();
                if so.is_empty() {
                    String::new()
                } else {
                    format!(" [stdout: {so}]")
                }
            }
        ))
    }
}

/// A printable command line.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Builds a command from `args[0]` (resolved with [`tool`]) and the rest.
pub(crate) fn command<S: AsRef<OsStr>>(args: &[S]) -> Result<Command> {
    let (prog, rest) = args.split_first().context("empty command line")?;
    let prog = prog
        .as_ref()
        .to_str()
        .context("program name is not UTF-8")?;
    let mut cmd = Command::new(tool(prog));
    cmd.args(rest);
    Ok(cmd)
}

/// Runs `args` inside the netns at `netns` (or in the caller's netns if `None`); `Output`
/// whatever the exit status.
pub(crate) fn exec_in<S: AsRef<OsStr>>(
    netns: Option<&Path>,
    args: &[S],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = command(args)?;
    if let Some(ns) = netns {
        enter_netns_on_exec(&mut cmd, ns)?;
    }
    run(&mut cmd, timeout)
}

/// Runs `args` (in `netns` if given) and returns stdout, or an error if it did not exit 0.
pub(crate) fn exec_ok_in<S: AsRef<OsStr>>(
    netns: Option<&Path>,
    args: &[S],
    timeout: Duration,
) -> Result<String> {
    let mut cmd = command(args)?;
    if let Some(ns) = netns {
        enter_netns_on_exec(&mut cmd, ns)?;
    }
    let desc = match netns {
        Some(ns) => format!("[netns {}] {}", ns.display(), describe(&cmd)),
        None => describe(&cmd),
    };
    let out = run(&mut cmd, timeout)?;
    check(&desc, out)
}

/// `ip <args>` run from the root namespace (only ever with `-n <our netns>` or `netns ...`).
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    exec_ok_in(None, &full, SETUP_TIMEOUT)
}

pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name]).map(drop)
}

pub(crate) fn netns_del(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}
