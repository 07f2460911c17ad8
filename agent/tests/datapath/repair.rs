//! Verify and repair (issue #13), on a private bpffs and a veth in a namespace of its own: what
//! `bpftool link detach`, `rm` of a pin, `tc qdisc del ... clsact` or a foreign object pinned
//! under Sluice's name break is found and put back by `Datapath::verify_and_repair`; at load,
//! a pin that is not Sluice's is named and refused, and nothing is removed.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use sluice::datapath::repair::{self, Pinned};

use crate::{
    sock::{links_on, ChildCgroup},
    support::*,
};

// bpf(2) commands and types (uapi/linux/bpf.h).
const BPF_MAP_CREATE: i64 = 0;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_PIN: i64 = 6;
const BPF_LINK_GET_FD_BY_ID: i64 = 30;
const BPF_LINK_DETACH: i64 = 34;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

fn sys_bpf(cmd: i64, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, zero-initialised buffer of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn put(attr: &mut [u8; 128], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A map nobody but the caller holds: an array, `key`/`value` bytes, `entries` entries.
fn array_map(value_size: u32, entries: u32) -> OwnedFd {
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_MAP_TYPE_ARRAY.to_ne_bytes());
    put(&mut attr, 4, &4u32.to_ne_bytes());
    put(&mut attr, 8, &value_size.to_ne_bytes());
    put(&mut attr, 12, &entries.to_ne_bytes());
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE");
    // SAFETY: a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A socket filter returning 0: a program that is not Sluice's.
fn trivial_program() -> OwnedFd {
    // r0 = 0; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    put(&mut attr, 4, &2u32.to_ne_bytes());
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).expect("BPF_PROG_LOAD");
    // SAFETY: a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn pin(fd: &OwnedFd, path: &Path) {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(c_path.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
    sys_bpf(BPF_OBJ_PIN, &mut attr).unwrap_or_else(|e| panic!("pinning {}: {e}", path.display()));
}

/// `bpftool link detach`: the link stays (and its pin), attached to nothing.
fn detach_link(pin: &Path) {
    const BPF_OBJ_GET: i64 = 7;
    let c_path = CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr).expect("BPF_OBJ_GET");
    // SAFETY: a new descriptor we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(link.as_raw_fd() as u32).to_ne_bytes());
    sys_bpf(BPF_LINK_DETACH, &mut attr).expect("BPF_LINK_DETACH");
}

/// Waits until link `id` is released (an unpinned link nobody holds goes after the pin's
/// inode does).
fn wait_until_released(id: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &id.to_ne_bytes());
        match sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
            // SAFETY: a new descriptor we own (closed right away).
            Ok(fd) => drop(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return,
            Err(e) => panic!("BPF_LINK_GET_FD_BY_ID {id}: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "link {id} still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The cgroup link pinned at `pin`.
fn cgroup_link_at(pin: &Path) -> repair::LinkInfo {
    match repair::inspect_pin(pin) {
        Pinned::Link(link) if link.link_type == repair::BPF_LINK_TYPE_CGROUP => link,
        other => panic!("{} holds {other:?}", pin.display()),
    }
}

fn map_id_at(pin: &Path) -> u32 {
    match repair::inspect_pin(pin) {
        Pinned::Map { id, .. } => id,
        other => panic!("{} holds {other:?}", pin.display()),
    }
}

fn program_names(ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    if datapath::use_tcx() {
        return tcx_programs(ifname, attach_type)
            .into_iter()
            .map(|(_, name)| name)
            .collect();
    }
    // The netlink path: the filters at Sluice's priority, by program id.
    let filters = repair::netlink_filters(ifindex(ifname), attach_type).expect("tc filters");
    filters
        .iter()
        .filter_map(|f| f.prog_id)
        .map(|id| {
            aya::programs::loaded_programs()
                .flatten()
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(str::to_owned))
                .unwrap_or_default()
        })
        .collect()
}

fn keys(repairs: &[repair::Repair]) -> BTreeSet<String> {
    repairs.iter().map(|r| r.key.clone()).collect()
}

/// What the issue reports: a pod veth's programs detached (`bpftool link detach` of one link,
/// `rm` of the other's pin; on the netlink path the filters deleted) and the `services` and
/// `conntrack` pins removed or replaced. One pass puts it all back, with the same maps.
#[test]
fn one_pass_reattaches_detached_programs_and_repins_the_maps() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-rep0", "sl-reppeer");
    // The path the agent takes: tcx links, or (before 6.6, or with SLUICE_TC_ATTACH=netlink)
    // clsact and tc filters.
    let tcx = datapath::use_tcx();

    netns.run(|| {
        let ifindex = ifindex("sl-rep0");
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.attach(ifindex, "sl-rep0").expect("attach");
        assert_eq!(datapath.verify_and_repair(), [], "nothing to repair yet");
        let services = map_id_at(&pin_path.join("services"));
        let conntrack = map_id_at(&pin_path.join("conntrack"));

        let ingress_pin = pin_path.join(format!("links/{ifindex}-ingress"));
        let egress_pin = pin_path.join(format!("links/{ifindex}-egress"));
        if tcx {
            detach_link(&ingress_pin);
            fs::remove_file(&egress_pin).unwrap();
            wait_until_detached("sl-rep0");
        } else {
            for (attach_type, program) in [
                (TcAttachType::Ingress, "from_pod"),
                (TcAttachType::Egress, "to_pod"),
            ] {
                aya::programs::tc::qdisc_detach_program("sl-rep0", attach_type, program)
                    .expect("deleting the filter");
            }
        }
        assert!(program_names("sl-rep0", TcAttachType::Ingress).is_empty());
        fs::remove_file(pin_path.join("services")).unwrap();
        // Someone pins a fresh map of their own where conntrack was.
        fs::remove_file(pin_path.join("conntrack")).unwrap();
        let foreign = array_map(8, 1);
        pin(&foreign, &pin_path.join("conntrack"));

        let repairs = datapath.verify_and_repair();
        assert_eq!(
            keys(&repairs),
            BTreeSet::from([
                format!("link {ifindex}-ingress"),
                format!("link {ifindex}-egress"),
                "map services".to_owned(),
                "map conntrack".to_owned(),
            ]),
            "{repairs:#?}"
        );
        for repair in &repairs {
            assert!(repair.outcome.is_ok(), "{repair:#?}");
            assert_eq!(repair.foreign, repair.key == "map conntrack", "{repair:#?}");
        }
        let ingress = repairs
            .iter()
            .find(|r| r.key.ends_with("-ingress"))
            .unwrap();
        assert_eq!(
            ingress.what,
            format!("from_pod on sl-rep0 (ifindex {ifindex})")
        );
        assert!(ingress.found.contains("detached"), "{ingress:#?}");
        let replaced = repairs.iter().find(|r| r.key == "map conntrack").unwrap();
        assert!(replaced.found.contains("Array"), "{replaced:#?}");

        assert_eq!(
            program_names("sl-rep0", TcAttachType::Ingress),
            ["from_pod"]
        );
        assert_eq!(program_names("sl-rep0", TcAttachType::Egress), ["to_pod"]);
        assert_eq!(map_id_at(&pin_path.join("services")), services);
        assert_eq!(map_id_at(&pin_path.join("conntrack")), conntrack);
        assert_eq!(datapath.verify_and_repair(), [], "repaired for good");

        if tcx {
            // A link that lost only its pin (someone else holds it) is pinned again, not
            // doubled.
            let held = FdLink::from(PinnedLink::from_pin(&ingress_pin).unwrap());
            let id = held.info().unwrap().id();
            fs::remove_file(&ingress_pin).unwrap();
            let repairs = datapath.verify_and_repair();
            assert_eq!(repairs.len(), 1, "{repairs:#?}");
            assert!(
                repairs[0].found.contains("lost its link pin"),
                "{repairs:#?}"
            );
            assert_eq!(link_id(&ingress_pin), id);
            assert_eq!(tcx_programs("sl-rep0", TcAttachType::Ingress).len(), 1);
            drop(held);
        }

        // An interface deleted since the scan is not the pass's business.
        sh(Command::new("ip").args(["link", "del", "sl-rep0"]));
        assert_eq!(datapath.verify_and_repair(), []);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
    });
}

/// At load, a map pin holding a map of another type, or no map at all, is named with what it
/// holds and refused; nothing is removed, and the load leaves no pin of its own behind.
#[test]
fn a_pin_that_is_not_one_of_sluices_maps_is_refused_at_load_and_kept() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    fs::create_dir_all(&pin_path).unwrap();
    let array = array_map(8, 1);
    let program = trivial_program();
    for (name, object, named) in [
        ("conntrack", &array, "Array"),
        ("services", &program, "a BPF program"),
    ] {
        let at = pin_path.join(name);
        pin(object, &at);
        let before = repair::inspect_pin(&at);
        let error = match Datapath::load(&pin_path) {
            Ok(_) => panic!("{name}: a foreign object was reused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains(&at.display().to_string()), "{error}");
        assert!(error.contains(named), "{error}");
        assert!(error.contains("sluice cleanup"), "{error}");
        assert_eq!(repair::inspect_pin(&at), before, "{name} was touched");
        let left: Vec<String> = fs::read_dir(&pin_path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [name], "the failed load left pins behind");
        fs::remove_file(&at).unwrap();
    }
}

/// At attach, a link pin of Sluice's name holding something else (a map here) is named and
/// refused, and left where it is; the other interfaces attach.
#[test]
fn a_link_pin_that_is_not_sluices_is_refused_at_attach_and_kept() {
    if !datapath::use_tcx() {
        // The netlink path pins no links.
        return;
    }
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-forn0", "sl-fornpeer");
    netns.ip(&[
        "link",
        "add",
        "sl-forn1",
        "type",
        "veth",
        "peer",
        "name",
        "sl-fornpeer1",
    ]);
    netns.run(|| {
        let (taken, free) = (ifindex("sl-forn0"), ifindex("sl-forn1"));
        let mut datapath = Datapath::load(&pin_path).expect("load");
        let at = pin_path.join(format!("links/{taken}-ingress"));
        let map = array_map(4, 1);
        pin(&map, &at);
        let before = repair::inspect_pin(&at);

        let error = format!("{:#}", datapath.attach(taken, "sl-forn0").unwrap_err());
        assert!(error.contains(&at.display().to_string()), "{error}");
        assert!(error.contains("Array map"), "{error}");
        assert!(error.contains("refusing"), "{error}");
        assert_eq!(repair::inspect_pin(&at), before);
        assert!(tcx_programs("sl-forn0", TcAttachType::Ingress).is_empty());

        datapath
            .attach(free, "sl-forn1")
            .expect("another interface");
        assert_eq!(tcx_programs("sl-forn1", TcAttachType::Ingress).len(), 1);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
    });
}

/// The socket programs' cgroup links (host traffic), in a test-owned child cgroup: one link
/// detached (`bpftool link detach`), another's pin removed (the link goes with it). One pass
/// attaches both again, pinned, on that cgroup, with the loaded programs; a link that lost
/// only its pin (someone else holds it) is pinned again, not doubled.
#[test]
fn one_pass_reattaches_detached_cgroup_links() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let cgroup = ChildCgroup::new();
    let mut datapath = Datapath::load(&pin_path).expect("load");
    if !datapath::features::KernelFeatures::get().netns_cookie {
        // Before 5.14 the socket programs are never attached (tests/datapath/sock.rs).
        return;
    }
    datapath.attach_cgroup(&cgroup.path).expect("attach_cgroup");
    assert_eq!(datapath.attached_cgroup(), Some(cgroup.path.as_path()));
    assert_eq!(datapath.verify_and_repair(), [], "nothing to repair yet");
    let links_dir = pin_path.join("cgroup-links");
    // Freshly attached: the pins run the loaded programs.
    let loaded: BTreeMap<&str, repair::LinkInfo> = sluice::datapath::sock::SOCK_PROGRAMS
        .into_iter()
        .map(|name| (name, cgroup_link_at(&links_dir.join(name))))
        .collect();
    let before = links_on(&datapath, &cgroup);

    detach_link(&links_dir.join("sock_connect4"));
    assert_eq!(
        cgroup_link_at(&links_dir.join("sock_connect4")).cgroup_id,
        0
    );
    fs::remove_file(links_dir.join("sock_sendmsg6")).unwrap();
    wait_until_released(loaded["sock_sendmsg6"].id);

    let repairs = datapath.verify_and_repair();
    assert_eq!(
        keys(&repairs),
        BTreeSet::from([
            "cgroup-link sock_connect4".to_owned(),
            "cgroup-link sock_sendmsg6".to_owned(),
        ]),
        "{repairs:#?}"
    );
    for repair in &repairs {
        assert!(repair.outcome.is_ok(), "{repair:#?}");
        assert!(!repair.foreign, "{repair:#?}");
        assert!(repair.found.contains("detached"), "{repair:#?}");
        assert!(
            repair.what.contains(&*cgroup.path.to_string_lossy()),
            "{repair:#?}"
        );
    }
    let connect = repairs
        .iter()
        .find(|r| r.key == "cgroup-link sock_connect4")
        .unwrap();
    assert_eq!(
        connect.what,
        format!("`sock_connect4` on cgroup {}", cgroup.path.display())
    );
    assert!(
        connect.found.contains(&format!(
            "cgroup link {} is attached to no cgroup",
            loaded["sock_connect4"].id
        )),
        "{connect:#?}"
    );

    // All attached and pinned on the cgroup, with the loaded programs; the two in new links.
    let after = links_on(&datapath, &cgroup);
    for (name, was) in &loaded {
        let now = cgroup_link_at(&links_dir.join(name));
        assert_eq!(now.cgroup_id, cgroup.id(), "{name}");
        assert_eq!(now.prog_id, was.prog_id, "{name}");
        let repaired = ["sock_connect4", "sock_sendmsg6"].contains(name);
        assert_eq!(now.id != was.id, repaired, "{name}: {was:?} -> {now:?}");
    }
    assert_eq!(before.len(), after.len());
    assert_eq!(datapath.verify_and_repair(), [], "repaired for good");

    // A link that lost only its pin is pinned again, not doubled.
    let held_pin = links_dir.join("sock_recvmsg4");
    let held = FdLink::from(PinnedLink::from_pin(&held_pin).unwrap());
    let id = held.info().unwrap().id();
    fs::remove_file(&held_pin).unwrap();
    let repairs = datapath.verify_and_repair();
    assert_eq!(
        keys(&repairs),
        BTreeSet::from(["cgroup-link sock_recvmsg4".to_owned()])
    );
    assert!(
        repairs[0].found.contains("lost its link pin"),
        "{repairs:#?}"
    );
    assert!(repairs[0].outcome.is_ok(), "{repairs:#?}");
    assert_eq!(cgroup_link_at(&held_pin).id, id);
    drop(held);
    assert_eq!(datapath.verify_and_repair(), []);

    // Detached on purpose (no --cgroup-root): nothing to check any more.
    datapath.detach_cgroup().unwrap();
    assert_eq!(datapath.attached_cgroup(), None);
    assert_eq!(datapath.verify_and_repair(), []);
    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
}
