//! Pinning and attaching: a private bpffs, a veth pair in a network namespace of its own.

use crate::support::*;

#[test]
fn pinned_maps_survive_a_restart_with_their_services_and_ids() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let svc = frontend(VIP, 80, Protocol::Tcp);
    let other = frontend(VIP, 443, Protocol::Tcp);
    let state = desired(&[(svc, two_backends()), (other, vec![])]);

    let (id, flow_backend) = {
        let mut datapath = Datapath::load(&pin_path).expect("load pinned");
        assert_eq!(datapath.pin_path(), Some(pin_path.as_path()));
        assert!(datapath.sync(&state).unwrap().is_complete());
        for map in ["services", "backends", "conntrack"] {
            assert!(pin_path.join(map).exists(), "{map} is not pinned");
        }
        let flow = Flow::tcp(40_000, VIP, 80);
        let backend = dnat_target(&flow, &from_pod(&datapath, &tcp_packet(&flow, TCP_SYN)));
        (datapath.service_id(&svc).unwrap(), backend)
    };

    // The "restarted agent" finds the services, their ids and the conntrack entries again, and
    // resyncing the same state writes nothing.
    let mut datapath = Datapath::load(&pin_path).expect("reload pinned");
    assert_eq!(datapath.service_id(&svc), Some(id));
    assert_eq!(datapath.programmed_services().len(), 2);
    assert_eq!(datapath.conntrack_entries().unwrap().len(), 2);
    let stats = datapath.sync(&state).unwrap();
    assert_eq!((stats.unchanged, stats.map_writes), (2, 0), "{stats:?}");
    let flow = Flow::tcp(40_000, VIP, 80);
    let ack = from_pod(&datapath, &tcp_packet(&flow, TCP_PSH_ACK));
    assert_eq!(dnat_target(&flow, &ack), flow_backend);

    // A private datapath does not see the pinned one's state.
    assert!(load_private().programmed_services().is_empty());

    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
    assert!(!pin_path.exists());
    Datapath::cleanup(&pin_path).expect("cleanup of nothing");
}

#[test]
fn load_explains_a_pin_path_that_is_not_on_bpffs() {
    let dir = std::env::temp_dir().join(unique_name("sluice-test-not-bpffs"));
    let error = Datapath::load(&dir).err().expect("load must fail");
    assert!(!dir.exists(), "load created {} anyway", dir.display());
    let message = format!("{error:#}");
    assert!(message.contains("not on a bpf filesystem"), "{message}");
    assert!(message.contains(&dir.display().to_string()), "{message}");
}

#[test]
fn unpinned_datapath_refuses_to_attach() {
    let mut datapath = load_private();
    let error = datapath.attach(1, "lo").unwrap_err();
    assert!(format!("{error:#}").contains("private maps"), "{error:#}");
}

#[test]
fn attach_pins_tcx_links_and_a_restart_swaps_programs_in_place() {
    if !has_tcx() {
        return;
    }
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-pod0", "sl-peer0");

    netns.run(|| {
        let ifindex = ifindex("sl-pod0");
        let ingress_pin = pin_path.join(format!("links/{ifindex}-ingress"));
        let egress_pin = pin_path.join(format!("links/{ifindex}-egress"));

        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.attach(ifindex, "sl-pod0").expect("attach");
        datapath
            .attach(ifindex, "sl-pod0")
            .expect("attaching again is a no-op");
        assert_eq!(
            datapath.attached_interfaces().collect::<Vec<_>>(),
            [ifindex]
        );
        let ingress = tcx_programs("sl-pod0", TcAttachType::Ingress);
        let egress = tcx_programs("sl-pod0", TcAttachType::Egress);
        assert_eq!(ingress.len(), 1, "{ingress:?}");
        assert_eq!(ingress[0].1, "from_pod");
        assert_eq!(egress.len(), 1, "{egress:?}");
        assert_eq!(egress[0].1, "to_pod");
        let (ingress_link, egress_link) = (link_id(&ingress_pin), link_id(&egress_pin));

        // The agent stops: the programs stay attached.
        drop(datapath);
        assert_eq!(tcx_programs("sl-pod0", TcAttachType::Ingress), ingress);

        // The agent restarts: the same links now run the new programs; nothing was detached or
        // attached twice.
        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath.attach(ifindex, "sl-pod0").expect("re-attach");
        let new_ingress = tcx_programs("sl-pod0", TcAttachType::Ingress);
        let new_egress = tcx_programs("sl-pod0", TcAttachType::Egress);
        assert_eq!(new_ingress.len(), 1, "{new_ingress:?}");
        assert_eq!(new_egress.len(), 1, "{new_egress:?}");
        assert_ne!(
            new_ingress[0].0, ingress[0].0,
            "ingress runs the new program"
        );
        assert_ne!(new_egress[0].0, egress[0].0, "egress runs the new program");
        assert_eq!(link_id(&ingress_pin), ingress_link, "ingress link reused");
        assert_eq!(link_id(&egress_pin), egress_link, "egress link reused");

        // An interface that is still there but no longer wanted is detached.
        let forgotten = datapath
            .forget_interfaces_except(&BTreeSet::new())
            .expect("forget");
        assert_eq!(forgotten, [ifindex]);
        assert!(!ingress_pin.exists() && !egress_pin.exists());
        wait_until_detached("sl-pod0");

        // Attached again, then the whole datapath is removed: cleanup detaches everything.
        datapath
            .attach(ifindex, "sl-pod0")
            .expect("attach after forget");
        assert_eq!(tcx_programs("sl-pod0", TcAttachType::Ingress).len(), 1);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
        assert!(!pin_path.exists());
        wait_until_detached("sl-pod0");
    });
}

#[test]
fn a_link_left_pinned_for_a_deleted_interface_is_replaced() {
    if !has_tcx() {
        return;
    }
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-old", "sl-oldpeer");
    netns.ip(&[
        "link",
        "add",
        "sl-new",
        "type",
        "veth",
        "peer",
        "name",
        "sl-newpeer",
    ]);

    netns.run(|| {
        let (old, new) = (ifindex("sl-old"), ifindex("sl-new"));
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.attach(old, "sl-old").expect("attach");
        drop(datapath);

        // The pod goes away while no agent runs, and its ifindex is reused by a new interface:
        // simulated by deleting the veth and giving its links the new interface's names.
        sh(Command::new("ip").args(["link", "del", "sl-old"]));
        for direction in ["ingress", "egress"] {
            fs::rename(
                pin_path.join(format!("links/{old}-{direction}")),
                pin_path.join(format!("links/{new}-{direction}")),
            )
            .expect("rename pin");
        }

        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath
            .attach(new, "sl-new")
            .expect("attach over a defunct link");
        assert_eq!(tcx_programs("sl-new", TcAttachType::Ingress).len(), 1);
        assert_eq!(tcx_programs("sl-new", TcAttachType::Egress).len(), 1);
        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
    });
}

#[test]
fn attach_external_runs_the_world_programs_with_their_own_links() {
    if !has_tcx() {
        return;
    }
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    let netns = TestNetns::with_veth("sl-ext0", "sl-extpeer");
    netns.ip(&[
        "link",
        "add",
        "sl-pod1",
        "type",
        "veth",
        "peer",
        "name",
        "sl-podpeer",
    ]);

    netns.run(|| {
        let (ext, pod) = (ifindex("sl-ext0"), ifindex("sl-pod1"));
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath
            .attach_external(ext, "sl-ext0")
            .expect("attach external");
        datapath.attach(pod, "sl-pod1").expect("attach pod");
        datapath
            .attach_external(ext, "sl-ext0")
            .expect("attaching again is a no-op");
        let error = datapath.attach(ext, "sl-ext0").unwrap_err();
        assert!(
            format!("{error:#}").contains("attached as External"),
            "{error:#}"
        );

        let names = |ifname: &str, attach_type| {
            tcx_programs(ifname, attach_type)
                .into_iter()
                .map(|(_, name)| name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("sl-ext0", TcAttachType::Ingress), ["from_world"]);
        assert_eq!(names("sl-ext0", TcAttachType::Egress), ["to_world"]);
        assert_eq!(names("sl-pod1", TcAttachType::Ingress), ["from_pod"]);
        for link in ["world-ingress", "world-egress"] {
            assert!(
                pin_path.join(format!("links/{ext}-{link}")).exists(),
                "{link}"
            );
        }
        let mut roles: Vec<_> = datapath.attached_roles().collect();
        roles.sort_by_key(|(ifindex, _)| *ifindex);
        assert_eq!(roles.len(), 2);

        // A restarted agent finds the external interface's links and swaps its programs in.
        drop(datapath);
        let mut datapath = Datapath::load(&pin_path).expect("reload");
        datapath.attach_external(ext, "sl-ext0").expect("re-attach");
        assert_eq!(names("sl-ext0", TcAttachType::Ingress), ["from_world"]);

        // Forgetting every interface but the pod's detaches the external one.
        let forgotten = datapath
            .forget_interfaces_except(&[pod].into())
            .expect("forget");
        assert_eq!(forgotten, [ext]);
        assert!(!pin_path.join(format!("links/{ext}-world-ingress")).exists());
        wait_until_detached("sl-ext0");
        assert_eq!(names("sl-pod1", TcAttachType::Ingress), ["from_pod"]);

        drop(datapath);
        Datapath::cleanup(&pin_path).expect("cleanup");
        assert!(!pin_path.exists());
        wait_until_detached("sl-pod1");
    });
}

/// Whether this kernel has tcx links, which the tests above are about. Before Linux 6.6 the
/// agent attaches with clsact and tc filters instead (traffic.rs and the kernel matrix's real
/// traffic test run that path); the tcx tests then check only that the kernel is one without.
fn has_tcx() -> bool {
    let tcx = sluice::datapath::features::KernelFeatures::get().tcx;
    if !tcx {
        let version = aya::util::KernelVersion::current().expect("the kernel's version");
        assert!(
            version < aya::util::KernelVersion::new(6, 6, 0),
            "Linux {version:?} has tcx, but the agent would not use it"
        );
        eprintln!("Linux {version:?} has no tcx links: the agent attaches with clsact here");
    }
    tcx
}
