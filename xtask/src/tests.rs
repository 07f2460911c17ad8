use std::{collections::BTreeSet, process::Command};

use serde_json::Value;

use crate::workspace_root;

/// Issue #12: `cargo xtask` is what installs the eBPF toolchain, so xtask must compile without
/// it. The agent's build script builds ebpf/; if xtask (or anything it builds, normal or build
/// dependencies, transitively) depended on the agent or the eBPF crate, a fresh machine could
/// not run `cargo xtask setup` (nor `demo`/`test`, which start with it).
#[test]
fn xtask_builds_without_the_ebpf_toolchain() {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--offline"])
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let name_of = |id: &str| -> String {
        metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| p["name"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let nodes = metadata["resolve"]["nodes"].as_array().unwrap();
    let xtask_id = nodes
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .find(|id| name_of(id) == "xtask")
        .expect("xtask in the workspace");
    // Walk normal and build edges (dev dependencies are only for xtask's own tests).
    let mut seen = BTreeSet::new();
    let mut stack = vec![xtask_id.to_string()];
    while let Some(id) = stack.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).unwrap();
        for dep in node["deps"].as_array().unwrap() {
            let built = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if built {
                stack.push(dep["pkg"].as_str().unwrap().to_string());
            }
        }
    }
    let names: BTreeSet<String> = seen.iter().map(|id| name_of(id)).collect();
    for forbidden in ["sluice", "sluice-ebpf", "sluice-lab", "aya-build"] {
        assert!(
            !names.contains(forbidden),
            "xtask depends on {forbidden} (through {names:?}): a fresh machine could not build \
             `cargo xtask setup` before the eBPF toolchain is installed"
        );
    }
    // And the test does look at the graph it means to: xtask's own dependencies are there.
    assert!(
        names.contains("clap") && names.contains("anyhow"),
        "{names:?}"
    );
}
