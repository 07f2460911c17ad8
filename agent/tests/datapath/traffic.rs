//! Real traffic through the attached programs.

use crate::support::*;

#[test]
fn real_traffic_reaches_services_through_the_attached_programs() {
    let bpffs = PrivateBpffs::new();
    let pin_path = bpffs.pin_path();
    // client (192.0.2.10) --c0|ext0-- node (192.0.2.1) --pod0|eth0-- pod (10.244.0.7)
    //                                   node (198.51.100.1) --ext1|eth0-- other (198.51.100.20)
    let (client, node, pod, other) = (
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
    );
    for ns in [&client, &node, &pod, &other] {
        ns.ip(&["link", "set", "dev", "lo", "up"]);
    }
    client.link_to("c0", &node, "ext0");
    node.link_to("pod0", &pod, "eth0");
    node.link_to("ext1", &other, "eth0");
    client.ip(&["addr", "add", "192.0.2.10/24", "dev", "c0"]);
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", "ext0"]);
    node.ip(&["addr", "add", "198.51.100.1/24", "dev", "ext1"]);
    node.ip(&["addr", "add", "10.244.0.1/24", "dev", "pod0"]);
    pod.ip(&["addr", "add", "10.244.0.7/24", "dev", "eth0"]);
    pod.ip(&["route", "add", "default", "via", "10.244.0.1"]);
    other.ip(&["addr", "add", "198.51.100.20/24", "dev", "eth0"]);
    other.ip(&["route", "add", "default", "via", "198.51.100.1"]);
    node.run(|| fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding"));
    let _servers = [
        serve_peer_address(&pod, 8080),
        serve_peer_address(&other, 8080),
    ];

    let node_ip = Ipv4Addr::new(192, 0, 2, 1);
    let in_pod = be(Ipv4Addr::new(10, 244, 0, 7), 8080);
    let elsewhere = be(Ipv4Addr::new(198, 51, 100, 20), 8080);
    let services = vec![
        (
            frontend(node_ip, 30_080, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[in_pod], &[in_pod]),
        ),
        (
            frontend(node_ip, 30_081, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[elsewhere], &[]),
        ),
        (
            frontend(node_ip, 30_081, Protocol::Udp),
            entry(FrontendKind::NodePort, &[elsewhere], &[]),
        ),
        (
            frontend(node_ip, 30_082, Protocol::Tcp),
            entry(FrontendKind::NodePort, &[], &[]),
        ),
        (
            frontend(node_ip, 30_082, Protocol::Udp),
            entry(FrontendKind::NodePort, &[], &[]),
        ),
        (
            frontend(VIP, 80, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[in_pod], &[in_pod]),
        ),
        // A ClusterIP over the host behind the other interface, and UDP frontends whose
        // backend has no socket (its kernel answers with a port unreachable).
        (
            frontend(VIP, 81, Protocol::Tcp),
            entry(FrontendKind::ClusterIp, &[elsewhere], &[]),
        ),
        (
            frontend(VIP, 53, Protocol::Udp),
            entry(FrontendKind::ClusterIp, &[be(elsewhere.ip, 9999)], &[]),
        ),
        (
            frontend(node_ip, 30_083, Protocol::Udp),
            entry(FrontendKind::NodePort, &[be(elsewhere.ip, 9999)], &[]),
        ),
    ];
    let node_context = NodeContext {
        node_ips: vec![node_ip.into()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let datapath = node.run(|| {
        let mut datapath = Datapath::load(&pin_path).expect("load");
        datapath.set_node_config(&node_context).expect("config");
        resync(&mut datapath, services);
        for ifname in ["ext0", "ext1"] {
            datapath
                .attach_external(ifindex(ifname), ifname)
                .expect("attach external");
        }
        datapath
            .attach(ifindex("pod0"), "pod0")
            .expect("attach pod");
        datapath
    });

    let results = client.run(|| {
        let at = |port| std::net::SocketAddr::from((node_ip, port));
        (
            ask_tcp(at(30_080)),
            ask_tcp(at(30_081)),
            ask_udp(at(30_081)),
            ask_tcp(at(30_082)).map_err(|e| e.kind()),
            ask_udp(at(30_082)).map_err(|e| e.kind()),
            ask_udp(at(30_083)).map_err(|e| e.kind()),
        )
    });
    // A NodePort to a pod of the node: the pod sees the client, the client gets the answer
    // (the pod's reply, from the node's address, redirected past the martian check).
    assert_eq!(ip_of(results.0, "NodePort, local backend"), "192.0.2.10");
    // externalTrafficPolicy Cluster, the backend behind another interface: it sees the node,
    // and its answer, back through that interface, reaches the client from the NodePort.
    assert_eq!(
        ip_of(results.1, "NodePort, remote backend, TCP"),
        "192.0.2.1"
    );
    assert_eq!(
        ip_of(results.2, "NodePort, remote backend, UDP"),
        "192.0.2.1"
    );
    // No endpoints: refused at once, by a RST and by a port unreachable.
    assert_eq!(results.3.err(), Some(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(results.4.err(), Some(std::io::ErrorKind::ConnectionRefused));
    // The backend's port unreachable about a masqueraded datagram reaches the client about
    // the NodePort it used (ICMP error translation): the datagram did go to the backend,
    // masqueraded; untranslated, the error would have stayed at the node.
    assert_eq!(results.5.err(), Some(std::io::ErrorKind::ConnectionRefused));
    let masqueraded_to_9999 = datapath.conntrack_entries().unwrap().iter().any(|(k, v)| {
        k.dir == CT_DIR_FORWARD
            && k.proto == PROTO_UDP
            && v.nat_port == 9999u16.to_be()
            && v.flags & CT_F_SNAT != 0
    });
    assert!(masqueraded_to_9999);

    let (hairpin, cluster_ip, unreachable) = pod.run(|| {
        (
            ask_tcp(std::net::SocketAddr::from((VIP, 80))),
            ask_tcp(std::net::SocketAddr::from((VIP, 81))),
            ask_udp(std::net::SocketAddr::from((VIP, 53))).map_err(|e| e.kind()),
        )
    });
    // Hairpin: the pod reaches itself through its ClusterIP and sees the service loopback.
    assert_eq!(ip_of(hairpin, "hairpin"), "169.254.42.1");
    // A pod's ClusterIP flow to a backend elsewhere goes through the node's routing both ways,
    // its answer restored at the pod's veth; the backend sees the pod.
    assert_eq!(ip_of(cluster_ip, "ClusterIP, remote backend"), "10.244.0.7");
    // ... and so does a port unreachable about it.
    assert_eq!(
        unreachable.err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );

    drop(datapath);
    Datapath::cleanup(&pin_path).expect("cleanup");
}
