use std::{collections::BTreeSet, process::Command};

use crate::workspace_root;

/// Issue #12: `cargo xtask` is what installs the eBPF toolchain, so xtask must compile without
/// it. The agent's build script builds ebpf/; if xtask (or anything it builds, normal or build
/// dependencies, transitively) depended on the agent or the eBPF crate, a fresh machine could
/// not run `cargo xtask setup` (nor `demo`/`test`, which start with it).
#[test]
fn xtask_builds_without_the_ebpf_toolchain() {
    // Normal and build edges (dev dependencies are only for xtask's own tests), for this
    // machine's target, as cargo resolves them when it builds xtask.
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            "xtask",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}"])
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    for forbidden in ["sluice", "sluice-ebpf", "sluice-lab", "aya-build", "aya"] {
        assert!(
            !names.contains(forbidden),
            "xtask depends on {forbidden} (through {names:?}): a fresh machine could not build \
             `cargo xtask setup` before the eBPF toolchain is installed"
        );
    }
    // And the test looks at the graph it means to: xtask and its own dependencies are there.
    for expected in ["xtask", "clap", "anyhow"] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }
}
