//! The socket programs' cgroup links (host traffic): attached to a child cgroup v2 of the
//! test's own (never the root cgroup; no process ever joins it, so nothing is translated),
//! pinned in a private bpffs, swapped in place by a restart, moved by another cgroup, removed
//! by `detach_cgroup` and `Datapath::cleanup`. What the programs do to real sockets is tested
//! with traffic in tests/tests/host.rs (`BPF_PROG_RUN` cannot run cgroup sock_addr programs).

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use sluice::datapath::{
    features::KernelFeatures, sock::own_netns_cookie, sock::SOCK_PROGRAMS, Datapath,
};

use crate::support::{unique_name, PrivateBpffs};

/// A child of the cgroup2 mount, removed on drop (repair.rs uses it too).
pub(crate) struct ChildCgroup {
    pub(crate) path: PathBuf,
}

impl ChildCgroup {
    pub(crate) fn new() -> ChildCgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
            .expect("no cgroup2 filesystem at /sys/fs/cgroup(/unified)");
        let path = root.join(unique_name("sluice-test-dp"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        ChildCgroup { path }
    }

    pub(crate) fn id(&self) -> u64 {
        fs::metadata(&self.path).unwrap().ino()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// (program, link id) of every pinned link, asserting they all run on `cgroup`.
pub(crate) fn links_on(datapath: &Datapath, cgroup: &ChildCgroup) -> BTreeSet<(String, u32)> {
    let links = datapath.cgroup_links().unwrap();
    let names: BTreeSet<&str> = links.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, SOCK_PROGRAMS.into_iter().collect(), "{links:?}");
    for (name, _, cgroup_id) in &links {
        assert_eq!(*cgroup_id, cgroup.id(), "{name} runs on another cgroup");
    }
    links.into_iter().map(|(n, id, _)| (n, id)).collect()
}

#[test]
fn cgroup_links_are_pinned_swapped_on_restart_moved_and_removed() {
    let bpffs = PrivateBpffs::new();
    let pin = bpffs.pin_path();
    let first = ChildCgroup::new();
    let second = ChildCgroup::new();

    let mut datapath = Datapath::load(&pin).unwrap();
    assert!(datapath.cgroup_links().unwrap().is_empty());
    if !KernelFeatures::get().netns_cookie {
        // Linux before 5.14: the socket programs cannot tell the node's sockets from pods',
        // so they are not attached, and attaching says why.
        let error = datapath.attach_cgroup(&first.path).unwrap_err();
        assert!(
            format!("{error:#}").contains("kernel 5.14 or later needed"),
            "{error:#}"
        );
        assert!(datapath.cgroup_links().unwrap().is_empty());
        return;
    }
    let attached = datapath.attach_cgroup(&first.path).unwrap();
    assert_eq!(attached.replaced, 0);
    assert_eq!(attached.netns_cookie, own_netns_cookie().unwrap());
    assert_ne!(attached.netns_cookie, 0);
    let links = links_on(&datapath, &first);
    drop(datapath);

    // The pins outlive the agent; a restarted one swaps its programs into the same links.
    let mut datapath = Datapath::load(&pin).unwrap();
    assert_eq!(links_on(&datapath, &first), links);
    let attached = datapath.attach_cgroup(&first.path).unwrap();
    assert_eq!(attached.replaced, SOCK_PROGRAMS.len());
    assert_eq!(
        links_on(&datapath, &first),
        links,
        "new links instead of swaps"
    );

    // Another cgroup (the flag changed): new links there, the old ones gone.
    let attached = datapath.attach_cgroup(&second.path).unwrap();
    assert_eq!(attached.replaced, 0);
    let moved = links_on(&datapath, &second);
    assert!(moved.is_disjoint(&links), "{moved:?} {links:?}");

    // Without the flag: removed (twice is fine).
    assert_eq!(datapath.detach_cgroup().unwrap(), SOCK_PROGRAMS.len());
    assert_eq!(datapath.detach_cgroup().unwrap(), 0);
    assert!(datapath.cgroup_links().unwrap().is_empty());

    // Cleanup removes links and pins.
    datapath.attach_cgroup(&first.path).unwrap();
    drop(datapath);
    Datapath::cleanup(&pin).unwrap();
    assert!(!pin.exists(), "{} left behind", pin.display());
}

#[test]
fn attaching_to_something_else_than_a_cgroup_says_what_is_wrong() {
    let bpffs = PrivateBpffs::new();
    let mut datapath = Datapath::load(&bpffs.pin_path()).unwrap();
    let not_a_cgroup = std::env::temp_dir();
    let error = format!("{:#}", datapath.attach_cgroup(&not_a_cgroup).unwrap_err());
    assert!(
        error.contains("is not a cgroup v2 directory")
            && error.contains(&*not_a_cgroup.to_string_lossy()),
        "{error}"
    );
    let missing = Path::new("/sys/fs/cgroup/unified/sluice-no-such-cgroup");
    let error = format!("{:#}", datapath.attach_cgroup(missing).unwrap_err());
    assert!(error.contains("sluice-no-such-cgroup"), "{error}");
    assert!(datapath.cgroup_links().unwrap().is_empty());

    let cgroup = ChildCgroup::new();
    let mut private = Datapath::load_unpinned().unwrap();
    let error = format!("{:#}", private.attach_cgroup(&cgroup.path).unwrap_err());
    assert!(error.contains("private maps"), "{error}");
}
