//! An agent whose datapath fails to load removes what it pinned (issue #12: an agent refused by
//! Debian 12's verifier left 23 maps behind). The failure here is a real one midway through
//! the load: the agent runs with so few file descriptors that the kernel refuses a map after
//! the first ones were created and pinned.

use std::{process::Command, time::Duration};

use sluice_testbed::{
    sluice::{sluice_bin, ManifestDir, PinDir},
    Node,
};

#[test]
fn an_agent_that_cannot_load_its_datapath_leaves_no_pins_behind() {
    let node = Node::new("loadfail").unwrap();
    let manifests = ManifestDir::new().unwrap();
    let pins = PinDir::new();
    // prlimit (util-linux) lowers RLIMIT_NOFILE for the agent alone: 20 descriptors run out
    // after a few of the datapath's 23 maps.
    let mut agent = Command::new("nsenter");
    agent
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["prlimit", "--nofile=20", "--"])
        .arg(sluice_bin())
        .arg("agent")
        .arg("--manifests")
        .arg(manifests.path())
        .arg("--pin-path")
        .arg(pins.path())
        .args(["--healthz-bind-address", "off"]);
    let output = sluice_testbed::run_with_timeout(&mut agent, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains("Too many open files"),
        "the load did not fail for want of descriptors: {stderr}"
    );
    // It had pinned maps before the failure, and removed them, saying so.
    assert!(
        stderr.contains("removed the pins this load made")
            && stderr.contains(&format!("removed=[\"{}/", pins.path().display())),
        "the agent did not say what it removed: {stderr}"
    );
    let left: Vec<_> = match std::fs::read_dir(pins.path()) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", pins.path().display()),
    };
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        !pins.path().exists(),
        "the pin directory it created is left"
    );
}
