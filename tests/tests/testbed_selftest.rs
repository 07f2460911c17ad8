//! The testbed on its own: real traffic between pods of a namespace node, no Sluice involved.
//! Needs root. Every test builds its own node, so they run in parallel.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sluice_testbed::{in_netns, tally, Node, Proto};

const T: Duration = Duration::from_secs(5);

/// `ip`, also where `PATH` lacks the sbin directories.
fn ip_cmd() -> Command {
    let p = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    Command::new(p)
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Named network namespaces (`ip netns list`, first word of each line).
fn netns_list() -> BTreeSet<String> {
    let out = ip_cmd().args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Link names of the root namespace (read only).
fn root_links() -> BTreeSet<String> {
    let out = ip_cmd().args(["-o", "link", "show"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_string())
        .collect()
}

fn looks_like_ours(ifname: &str) -> bool {
    ifname.len() == 12
        && ifname.starts_with("veth")
        && ifname[4..].chars().all(|c| c.is_ascii_hexdigit())
}

#[test]
fn three_pods_talk_over_tcp_and_udp_and_cleanup_is_complete() {
    let root_before = root_links();
    let (names, veths);
    {
        let node = Node::new("selftest").unwrap();
        let a = node.add_pod("pod-a", ip4("10.244.0.2")).unwrap();
        let b = node.add_pod("pod-b", ip4("10.244.0.3")).unwrap();
        let c = node.add_pod("pod-c", ip4("10.244.0.4")).unwrap();
        b.serve(&[8080, 5353]).unwrap();
        c.serve(&[8080]).unwrap();

        for (pod, port) in [(&b, 8080), (&b, 5353), (&c, 8080)] {
            let dst = pod.addr(port);
            let r = a.tcp_request(dst, T).unwrap();
            assert_eq!(r.text, pod.name());
            assert_eq!(r.peer, dst, "tcp peer is the pod address");
            assert_eq!(*r.local.ip(), a.ip());
            let r = a.udp_request(dst, T).unwrap();
            assert_eq!(r.text, pod.name());
            assert_eq!(r.peer, dst, "udp reply comes from the pod address");
            assert_eq!(*r.local.ip(), a.ip());
        }
        // The servers saw the client's real address.
        let seen = b.seen();
        assert!(seen
            .iter()
            .any(|s| s.proto == Proto::Tcp && *s.peer.ip() == a.ip()));
        assert!(seen.iter().any(|s| s.proto == Proto::Udp && s.port == 5353));
        // Nobody listens on a's ports: refused, quickly.
        assert!(b.tcp_request(a.addr(8080), T).is_err());
        assert!(b.udp_request(a.addr(8080), T).is_err());

        // Node layout: /32 host routes to the node-side veths, forwarding on.
        let routes = node
            .exec_ok(&["ip", "-4", "route", "show", "table", "main"])
            .unwrap();
        for p in [&a, &b, &c] {
            let want = format!("{} dev {} scope host", p.ip(), p.host_ifname());
            assert!(routes.contains(&want), "{want:?} not in\n{routes}");
            assert!(p.host_ifname().len() <= 15);
        }
        let fwd = node
            .exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .unwrap();
        assert_eq!(fwd.trim(), "1");
        let pod_routes = a.exec_ok(&["ip", "-4", "route"]).unwrap();
        assert!(
            pod_routes.contains("default via 10.244.0.1 dev eth0 onlink"),
            "{pod_routes}"
        );
        let addrs = a
            .exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(addrs.contains("10.244.0.2/32"), "{addrs}");

        // The node itself reaches pods too (source: the gateway address).
        let r = node
            .run(|| sluice_testbed::client::tcp_request(b.addr(8080), T))
            .unwrap()
            .unwrap();
        assert_eq!(r.text, "pod-b");
        assert_eq!(*r.local.ip(), node.gateway());

        // Everything is in our namespaces: the root namespace never sees our veths.
        let root_now = root_links();
        for p in [&a, &b, &c] {
            assert!(!root_now.contains(p.host_ifname()));
        }
        let list = netns_list();
        assert!(list.contains(node.netns_name()));
        for p in [&a, &b, &c] {
            assert!(list.contains(p.netns_name()));
        }
        names = [
            node.netns_name(),
            a.netns_name(),
            b.netns_name(),
            c.netns_name(),
        ]
        .map(str::to_string);
        veths = [a.host_ifname(), b.host_ifname(), c.host_ifname()].map(str::to_string);
        // Pod handles outliving the node must not break its drop.
        drop(node);
        assert!(a.is_removed());
        assert!(a.tcp_request(b.addr(8080), T).is_err());
    }
    let list = netns_list();
    for n in &names {
        assert!(!list.contains(n), "netns {n} survived the drop");
    }
    let root_after = root_links();
    for v in &veths {
        assert!(!root_after.contains(v));
    }
    let new: Vec<_> = root_after
        .difference(&root_before)
        .filter(|n| looks_like_ours(n))
        .collect();
    assert!(new.is_empty(), "new veths in the root namespace: {new:?}");
}

#[test]
fn a_panicking_test_body_still_cleans_up() {
    let created = Mutex::new(Vec::<String>::new());
    let result = std::panic::catch_unwind(|| {
        let node = Node::new("panics").unwrap();
        let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();
        let b = node.add_pod("b", ip4("10.244.0.3")).unwrap();
        b.serve(&[80]).unwrap();
        assert_eq!(a.tcp_request(b.addr(80), T).unwrap().text, "b");
        let mut p = node.spawn(Command::new("sleep").arg("100")).unwrap();
        assert!(p.is_running());
        created.lock().unwrap().extend([
            node.netns_name().to_string(),
            a.netns_name().to_string(),
            b.netns_name().to_string(),
            format!("pid:{}", p.pid()),
            node.log_dir().display().to_string(),
        ]);
        panic!("deliberate panic inside a test body");
    });
    assert!(result.is_err());
    let created = created.into_inner().unwrap();
    assert_eq!(created.len(), 5);
    // A node dropped during a panic keeps its logs for the post-mortem; this panic was planned.
    let log_dir = std::path::Path::new(&created[4]);
    assert!(log_dir.exists());
    std::fs::remove_dir_all(log_dir).unwrap();
    let list = netns_list();
    for n in &created[..3] {
        assert!(!list.contains(n), "netns {n} survived a panic");
    }
    let pid: i32 = created[3].strip_prefix("pid:").unwrap().parse().unwrap();
    // SAFETY: signal 0 only probes.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "the spawned process survived the panic");
}

#[test]
fn checksum_offload_off_and_on() {
    let node = Node::new("offload").unwrap();
    let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();
    let b = node.add_pod("b", ip4("10.244.0.3")).unwrap();
    b.serve(&[9000]).unwrap();
    assert!(
        node.offload(&a).unwrap().all_on(),
        "veth default is offload on"
    );

    for p in [&a, &b] {
        node.set_offload(p, false).unwrap();
        assert!(node.offload(p).unwrap().all_off());
    }
    // With offload off the stack writes and verifies real checksums: traffic still flows.
    assert_eq!(a.tcp_request(b.addr(9000), T).unwrap().text, "b");
    assert_eq!(a.udp_request(b.addr(9000), T).unwrap().text, "b");

    for p in [&a, &b] {
        node.set_offload(p, true).unwrap();
        assert!(node.offload(p).unwrap().all_on());
    }
    assert_eq!(a.tcp_request(b.addr(9000), T).unwrap().text, "b");
    assert_eq!(a.udp_request(b.addr(9000), T).unwrap().text, "b");
}

#[test]
fn servers_take_many_short_connections() {
    let node = Node::new("load").unwrap();
    let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();
    let b = node.add_pod("b", ip4("10.244.0.3")).unwrap();
    let c = node.add_pod("c", ip4("10.244.0.4")).unwrap();
    b.serve(&[80]).unwrap();

    let start = std::time::Instant::now();
    let tcp = a.tcp_requests(b.addr(80), 200, T).unwrap();
    let udp = a.udp_requests(b.addr(80), 200, T).unwrap();
    assert_eq!(tally(&tcp).get("b"), Some(&200), "{:?}", tally(&tcp));
    assert_eq!(tally(&udp).get("b"), Some(&200), "{:?}", tally(&udp));
    // Concurrent clients from two pods at once.
    let (ra, rc) = std::thread::scope(|s| {
        let ha = s.spawn(|| a.tcp_requests(b.addr(80), 200, T).unwrap());
        let hc = s.spawn(|| c.tcp_requests(b.addr(80), 200, T).unwrap());
        (ha.join().unwrap(), hc.join().unwrap())
    });
    assert_eq!(tally(&ra).get("b"), Some(&200));
    assert_eq!(tally(&rc).get("b"), Some(&200));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "too slow: {:?}",
        start.elapsed()
    );
    // Distinct source ports: each request used a new socket.
    let ports: BTreeSet<u16> = udp
        .iter()
        .map(|r| r.as_ref().unwrap().local.port())
        .collect();
    assert!(ports.len() > 150);
    assert!(b.seen().len() >= 800);
}

#[test]
fn removing_a_pod_removes_its_route_veth_and_netns() {
    let node = Node::new("remove").unwrap();
    let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();
    let b = node.add_pod("b", ip4("10.244.0.3")).unwrap();
    let c = node.add_pod("c", ip4("10.244.0.4")).unwrap();
    b.serve(&[80]).unwrap();
    c.serve(&[80]).unwrap();
    assert_eq!(a.tcp_request(b.addr(80), T).unwrap().text, "b");

    // Duplicates are refused.
    assert!(node.add_pod("b", ip4("10.244.0.9")).is_err());
    assert!(node.add_pod("d", ip4("10.244.0.3")).is_err());
    assert!(node.add_pod("gw", node.gateway()).is_err());

    node.remove_pod(&b).unwrap();
    node.remove_pod(&b).unwrap(); // idempotent
    assert!(b.is_removed());
    let routes = node.exec_ok(&["ip", "-4", "route"]).unwrap();
    assert!(!routes.contains("10.244.0.3"), "{routes}");
    let links = node.exec_ok(&["ip", "-o", "link"]).unwrap();
    assert!(!links.contains(b.host_ifname()), "{links}");
    assert!(!netns_list().contains(b.netns_name()));
    assert!(a
        .tcp_request(b.addr(80), Duration::from_millis(500))
        .is_err());
    assert_eq!(a.tcp_request(c.addr(80), T).unwrap().text, "c");
    assert_eq!(node.pods().len(), 2);

    // The address can be reused by a new pod.
    let b2 = node.add_pod("b2", ip4("10.244.0.3")).unwrap();
    b2.serve(&[80]).unwrap();
    assert_eq!(a.tcp_request(b2.addr(80), T).unwrap().text, "b2");
    b2.stop_servers();
    assert!(a.tcp_request(b2.addr(80), T).is_err());
}

#[test]
fn node_processes_run_in_the_node_and_are_stopped() {
    let node = Node::new("procs").unwrap();
    let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();

    // Runs in the node netns: it sees the pod's veth; killed with SIGTERM by terminate().
    let mut p = node
        .spawn(Command::new("sh").args(["-c", "ip -o link; echo ready; exec sleep 100"]))
        .unwrap();
    p.wait_for_log("ready", T).unwrap();
    assert!(p.log().contains(a.host_ifname()), "{}", p.log());
    let status = p.terminate().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(!p.is_running());

    // One that ignores SIGTERM gets SIGKILL after the grace period.
    let mut p = node
        .spawn(Command::new("sh").args(["-c", "trap '' TERM; echo up; sleep 100; echo late"]))
        .unwrap();
    p.wait_for_log("up", T).unwrap();
    let status = p.terminate_timeout(Duration::from_millis(300)).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    let mut p = node.spawn(Command::new("sleep").arg("100")).unwrap();
    assert_eq!(p.kill_hard().unwrap().signal(), Some(libc::SIGKILL));

    // A process that exits by itself: its status and output.
    let mut p = node
        .spawn(Command::new("sh").args(["-c", "echo bye >&2; exit 3"]))
        .unwrap();
    let status = p.wait_timeout(T).unwrap().unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(p.log().contains("bye"));
    assert!(p.wait_for_log("never printed", T).is_err());

    // exec in the pod netns.
    let out = a.exec(&["ip", "-o", "link", "show", "eth0"]).unwrap();
    assert!(out.status.success());
    assert!(node.exec(&["false"]).map(|o| !o.status.success()).unwrap());
    assert!(node.exec_ok(&["false"]).is_err());
}

#[test]
fn in_netns_threads_see_only_their_namespace() {
    let node = Node::new("netns").unwrap();
    let a = node.add_pod("a", ip4("10.244.0.2")).unwrap();
    // The pod's address is bindable only inside the pod.
    let inside = in_netns(a.netns_path(), || UdpSocket::bind((a.ip(), 0)).is_ok()).unwrap();
    assert!(inside);
    let in_node = node.run(|| UdpSocket::bind((a.ip(), 0)).is_ok()).unwrap();
    assert!(!in_node);
    // The calling thread did not move.
    assert!(UdpSocket::bind(SocketAddrV4::new(a.ip(), 0)).is_err());
    assert!(in_netns("/run/netns/does-not-exist", || ()).is_err());
}

#[test]
fn stale_namespaces_and_paths_of_dead_runs_are_swept() {
    // A pid that is certainly dead: a child we reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let prefix = format!("sluicetbsweep{}", std::process::id());
    let stale = format!("{prefix}-{dead}-0-abcdef-node");
    let live = format!("{prefix}-{}-0-abcdef-node", std::process::id());
    for n in [&stale, &live] {
        let s = ip_cmd().args(["netns", "add", n]).status().unwrap();
        assert!(s.success());
    }
    let swept = sluice_testbed::sweep_stale(&prefix).unwrap();
    let list = netns_list();
    let _ = ip_cmd().args(["netns", "del", &live]).status();
    assert_eq!(swept, vec![stale.clone()]);
    assert!(!list.contains(&stale));
    assert!(list.contains(&live));

    let dir = std::env::temp_dir().join(sluice_testbed::unique_name("sluicetbsweepdir"));
    std::fs::create_dir_all(dir.join(format!("{prefix}-{dead}-1-000000/maps"))).unwrap();
    std::fs::create_dir_all(dir.join(sluice_testbed::unique_name(&prefix))).unwrap();
    let removed = sluice_testbed::sweep_stale_paths(&dir, &prefix).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dual_stack_pods_and_host_network_servers_on_one_node() {
    use std::net::{IpAddr, SocketAddr};
    let node = Node::new("dual").unwrap();
    assert_eq!(node.name(), sluice_testbed::DEFAULT_NODE_NAME);
    assert_eq!(node.node_ip(), None);
    assert_eq!(node.pod_cidr().to_string(), "10.244.0.0/24");
    assert_eq!(node.pod_cidr6().unwrap().to_string(), "fd00:10:244::/64");
    let a = node
        .add_pod_dual("a", ip4("10.244.0.2"), "fd00:10:244::2".parse().unwrap())
        .unwrap();
    let b = node
        .add_pod_dual("b", node.pod_ip(3), node.pod_ip6(3).unwrap())
        .unwrap();
    let old = node.add_pod("old", ip4("10.244.0.4")).unwrap();
    assert_eq!(old.ipv6(), None);
    assert_eq!(b.ipv6(), Some("fd00:10:244::3".parse().unwrap()));
    // Duplicates and the gateway are refused.
    assert!(node
        .add_pod_dual("c", ip4("10.244.0.5"), "fd00:10:244::3".parse().unwrap())
        .is_err());
    assert!(node
        .add_pod_dual("c", ip4("10.244.0.5"), node.gateway6())
        .is_err());
    b.serve(&[80]).unwrap();
    old.serve(&[80]).unwrap();

    // Both families to the dual-stack pod, v4 to the old one (from a dual-stack client too).
    let r = a.tcp_request_any(b.addr6(80), T).unwrap();
    assert_eq!(r.text, "b");
    assert_eq!(r.peer, SocketAddr::V6(b.addr6(80)));
    assert_eq!(r.local.ip(), IpAddr::V6(a.ipv6().unwrap()));
    assert_eq!(a.udp_request_any(b.addr6(80), T).unwrap().text, "b");
    assert_eq!(a.tcp_request(b.addr(80), T).unwrap().text, "b");
    assert_eq!(a.udp_request(b.addr(80), T).unwrap().text, "b");
    assert_eq!(a.tcp_request(old.addr(80), T).unwrap().text, "old");
    let seen: BTreeSet<(Proto, IpAddr)> =
        b.seen().iter().map(|s| (s.proto, s.source_ip())).collect();
    assert_eq!(
        seen,
        [
            (Proto::Tcp, IpAddr::V4(a.ip())),
            (Proto::Tcp, IpAddr::V6(a.ipv6().unwrap())),
            (Proto::Udp, IpAddr::V4(a.ip())),
            (Proto::Udp, IpAddr::V6(a.ipv6().unwrap())),
        ]
        .into_iter()
        .collect()
    );
    // An IPv4 peer is reported as IPv4 on a dual-stack socket, in both fields.
    let s = b.seen().into_iter().find(|s| s.source.is_ipv4()).unwrap();
    assert_eq!(s.source, SocketAddr::V4(s.peer));
    // The IPv4-only pod has no IPv6 route: its traffic cannot even leave.
    let e = old.tcp_request_any(b.addr6(80), T).unwrap_err();
    assert!(e.unreachable().is_some(), "{e:?}");

    // Layout: the /128 gateway on the node side, a /128 route per pod.
    let routes6 = node.exec_ok(&["ip", "-6", "route"]).unwrap();
    let want = format!("fd00:10:244::3 dev {}", b.host_ifname());
    assert!(routes6.contains(&want), "{want} not in {routes6}");
    let addrs = node
        .exec_ok(&["ip", "-6", "-o", "addr", "show", "dev", b.host_ifname()])
        .unwrap();
    assert!(addrs.contains("fd00:10:244::1/128"), "{addrs}");

    // Host-network servers on the node answer the node name, to pods over both families.
    node.serve(&[10250]).unwrap();
    let gw = std::net::SocketAddrV4::new(node.gateway(), 10250);
    assert_eq!(a.tcp_request(gw, T).unwrap().text, "node-0");
    let gw6 = std::net::SocketAddrV6::new(node.gateway6(), 10250, 0, 0);
    assert_eq!(a.udp_request_any(gw6, T).unwrap().text, "node-0");
    assert!(node
        .seen()
        .iter()
        .any(|s| s.source_ip() == IpAddr::V6(a.ipv6().unwrap())));
    // And the node is a client too.
    assert_eq!(node.tcp_request_any(b.addr6(80), T).unwrap().text, "b");
    node.stop_servers();
    let e = a.tcp_request_any(gw, T).unwrap_err();
    assert!(e.is_refused(), "{e:?}");

    // Removing a dual-stack pod removes its IPv6 route too.
    node.remove_pod(&b).unwrap();
    let routes6 = node.exec_ok(&["ip", "-6", "route"]).unwrap();
    assert!(!routes6.contains("fd00:10:244::3"), "{routes6}");
    assert!(a.tcp_request_any(b.addr6(80), T).is_err());
    // The manifest of a standalone node.
    let m = node.manifest();
    assert!(m.contains("name: \"node-0\""), "{m}");
    assert!(m.contains("podCIDR: \"10.244.0.0/24\""), "{m}");
}
