//! What `cargo xtask` needs before anything else is installed: setup and the small process
//! helpers. This crate must build on a fresh machine, so it never depends on the agent (whose
//! build script builds the eBPF programs); `tests::xtask_builds_without_the_ebpf_toolchain`
//! fails if it ever does again.

pub mod fuzz;
pub mod image;
pub mod kernels;
pub mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// The items of `all` that `names` names (by `name_of`), in `names`' order; all of them when
/// `names` is empty. An unknown name is an error listing the known ones (`what`: "fuzz target").
pub fn choose<'a, T>(
    all: &'a [T],
    names: &[String],
    name_of: impl Fn(&T) -> &str,
    what: &str,
) -> anyhow::Result<Vec<&'a T>> {
    if names.is_empty() {
        return Ok(all.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            all.iter().find(|t| name_of(t) == name).with_context(|| {
                let known: Vec<&str> = all.iter().map(&name_of).collect();
                format!("no {what} {name} (there are {})", known.join(", "))
            })
        })
        .collect()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Is `name` a command on PATH (or in /usr/sbin, /sbin), or, starting with `/`, a file?
pub fn has_command(name: &str) -> bool {
    if name.starts_with('/') {
        return Path::new(name).is_file();
    }
    which(name).is_some()
}

/// The path of command `name` on PATH, /usr/sbin or /sbin.
pub fn which(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Runs `program args`, returning its standard output; a failure names the command and its
/// standard error.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    command_output(Command::new(program).args(args))
}

/// [`output`] of a command built by the caller.
pub fn command_output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
