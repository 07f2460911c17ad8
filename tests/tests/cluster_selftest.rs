//! The multi-node cluster on its own: plain routing between nodes, pods and the external host,
//! IPv4 and IPv6, no Sluice involved. Needs root. Every test builds its own cluster, so they
//! run in parallel.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sluice_testbed::cluster::{CLUSTER_CIDR, CLUSTER_CIDR6, EXTERNAL_IP, EXTERNAL_IP6};
use sluice_testbed::{Cluster, ClusterOptions, Proto, RequestError, Unreachable, UnreachableKind};

const T: Duration = Duration::from_secs(5);
/// For requests expected to time out.
const SHORT: Duration = Duration::from_millis(400);

/// `ip`, also where `PATH` lacks the sbin directories.
fn ip_cmd() -> Command {
    let p = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    Command::new(p)
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

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} is not IPv4"),
    }
}

fn unreachable(kind: UnreachableKind, from: Option<IpAddr>) -> Unreachable {
    Unreachable { kind, from }
}

#[test]
fn pods_nodes_and_the_external_host_route_like_kind() {
    let c = Cluster::dual_stack("route", 2).unwrap();
    let (n1, n2, ext) = (c.node(1), c.node(2), c.external());

    // Addressing plan.
    assert_eq!(n1.name(), "node-1");
    assert_eq!(n2.name(), "node-2");
    assert_eq!(n1.node_ip(), Some("172.18.0.11".parse().unwrap()));
    assert_eq!(
        n2.node_ipv6(),
        Some("fc00:f853:ccd:e793::12".parse().unwrap())
    );
    assert_eq!(n2.pod_cidr().to_string(), "10.244.2.0/24");
    assert_eq!(n2.pod_cidr6().unwrap().to_string(), "fd00:10:244:2::/64");
    assert_eq!(n2.gateway(), "10.244.2.1".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        n2.gateway6(),
        "fd00:10:244:2::1".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(n1.pod_ip(10), "10.244.1.10".parse::<Ipv4Addr>().unwrap());
    assert_eq!(n1.pod_ip6(10), Some("fd00:10:244:1::10".parse().unwrap()));
    assert_eq!(ext.ip(), EXTERNAL_IP);
    assert_eq!(ext.ipv6(), Some(EXTERNAL_IP6));
    assert_eq!(c.cluster_cidrs().len(), 2);
    assert!(c.node_named("node-2").is_some());
    assert!(CLUSTER_CIDR.contains(&n2.pod_ip(3)));
    assert!(CLUSTER_CIDR6.contains(&n2.pod_ip6(3).unwrap()));

    let a = n1
        .add_pod_dual("client", n1.pod_ip(10), n1.pod_ip6(10).unwrap())
        .unwrap();
    let b = n2
        .add_pod_dual("web", n2.pod_ip(20), n2.pod_ip6(20).unwrap())
        .unwrap();
    let v4only = n2.add_pod("old", n2.pod_ip(21)).unwrap();
    b.serve(&[8080]).unwrap();
    v4only.serve(&[8080]).unwrap();

    // Pod to pod across nodes, both families, TCP and UDP; the server sees the pod address.
    for dst in [SocketAddr::V4(b.addr(8080)), SocketAddr::V6(b.addr6(8080))] {
        let want_local = if dst.is_ipv4() {
            IpAddr::V4(a.ip())
        } else {
            IpAddr::V6(a.ipv6().unwrap())
        };
        let r = a.tcp_request_any(dst, T).unwrap();
        assert_eq!(
            (r.text.as_str(), r.peer, r.local.ip()),
            ("web", dst, want_local)
        );
        let r = a.udp_request_any(dst, T).unwrap();
        assert_eq!(
            (r.text.as_str(), r.peer, r.local.ip()),
            ("web", dst, want_local)
        );
    }
    let sources: BTreeSet<(Proto, IpAddr)> =
        b.seen().iter().map(|s| (s.proto, s.source_ip())).collect();
    for proto in [Proto::Tcp, Proto::Udp] {
        for ip in a.ips() {
            assert!(
                sources.contains(&(proto, ip)),
                "{proto:?} from {ip}: {sources:?}"
            );
        }
    }
    // The IPv4 view of what the server saw still works (IPv6 entries show 0.0.0.0).
    assert!(b.seen().iter().any(|s| *s.peer.ip() == a.ip()));
    // The v4 API and a v4-only pod across nodes.
    let r = a.tcp_request(v4only.addr(8080), T).unwrap();
    assert_eq!((r.text.as_str(), r.peer), ("old", v4only.addr(8080)));
    assert_eq!(a.udp_request(v4only.addr(8080), T).unwrap().text, "old");
    assert_eq!(
        v4only.seen()[0].source,
        SocketAddr::V4(v4only.seen()[0].peer)
    );

    // Node to node (host-network servers answer the node name).
    n2.serve(&[10250]).unwrap();
    let n2v4 = SocketAddrV4::new(n2.node_ip().unwrap(), 10250);
    let n2v6 = SocketAddrV6::new(n2.node_ipv6().unwrap(), 10250, 0, 0);
    assert_eq!(n1.tcp_request(n2v4, T).unwrap().text, "node-2");
    assert_eq!(n1.udp_request_any(n2v6, T).unwrap().text, "node-2");
    assert!(n2
        .seen()
        .iter()
        .any(|s| s.source_ip() == IpAddr::V4(n1.node_ip().unwrap())));
    // A pod reaches another node's IP (through its own node).
    assert_eq!(a.tcp_request(n2v4, T).unwrap().text, "node-2");

    // The external host reaches node IPs...
    assert_eq!(ext.tcp_request(n2v4, T).unwrap().text, "node-2");
    assert_eq!(ext.tcp_request_any(n2v6, T).unwrap().text, "node-2");
    let from_ext: Vec<IpAddr> = n2.seen().iter().map(|s| s.source_ip()).collect();
    assert!(from_ext.contains(&IpAddr::V4(EXTERNAL_IP)), "{from_ext:?}");
    assert!(from_ext.contains(&IpAddr::V6(EXTERNAL_IP6)), "{from_ext:?}");
    // ...but not pods: it has no route to them.
    let ext_routes = ext.exec_ok(&["ip", "route"]).unwrap();
    assert!(!ext_routes.contains("10.244"), "{ext_routes}");
    for dst in [SocketAddr::V4(b.addr(8080)), SocketAddr::V6(b.addr6(8080))] {
        let no_route = unreachable(UnreachableKind::Net, None);
        let e = ext.tcp_request_any(dst, T).unwrap_err();
        assert_eq!(e.unreachable(), Some(no_route), "tcp {dst}: {e:?}");
        let e = ext.udp_request_any(dst, T).unwrap_err();
        assert_eq!(e.unreachable(), Some(no_route), "udp {dst}: {e:?}");
    }

    // With a route through node 1 it does, also to pods on node 2, and the pod sees the
    // external address (no NAT anywhere).
    ext.add_route("10.244.0.0/16", n1.node_ip().unwrap())
        .unwrap();
    ext.add_route_via(CLUSTER_CIDR6.into(), n1).unwrap();
    ext.add_route("10.244.0.0/16", n1.node_ip().unwrap())
        .unwrap(); // idempotent
    b.clear_seen();
    for dst in [SocketAddr::V4(b.addr(8080)), SocketAddr::V6(b.addr6(8080))] {
        assert_eq!(
            ext.tcp_request_any(dst, T).unwrap().text,
            "web",
            "tcp {dst}"
        );
        assert_eq!(
            ext.udp_request_any(dst, T).unwrap().text,
            "web",
            "udp {dst}"
        );
    }
    let sources: BTreeSet<IpAddr> = b.seen().iter().map(|s| s.source_ip()).collect();
    assert_eq!(sources, ext.ips().into_iter().collect());
    // Pods reach the external host; its servers see the pod addresses.
    ext.serve(&[9000]).unwrap();
    assert_eq!(a.tcp_request(ext.addr(9000), T).unwrap().text, "ext");
    assert_eq!(a.udp_request_any(ext.addr6(9000), T).unwrap().text, "ext");
    let sources: BTreeSet<IpAddr> = ext.seen().iter().map(|s| s.source_ip()).collect();
    assert_eq!(sources, a.ips().into_iter().collect());
    ext.del_route("10.244.0.0/16").unwrap();
    assert!(ext.tcp_request_any(b.addr(8080), T).is_err());

    // The layout: kindnet's routes, ptp pods, forwarding.
    let routes = n1.exec_ok(&["ip", "-4", "route"]).unwrap();
    assert!(
        routes.contains("10.244.2.0/24 via 172.18.0.12 dev eth0"),
        "{routes}"
    );
    let routes6 = n1.exec_ok(&["ip", "-6", "route"]).unwrap();
    assert!(
        routes6.contains("fd00:10:244:2::/64 via fc00:f853:ccd:e793::12 dev eth0"),
        "{routes6}"
    );
    let want = format!("fd00:10:244:1::10 dev {}", a.host_ifname());
    assert!(routes6.contains(&want), "{want} not in {routes6}");
    let pod6 = a.exec_ok(&["ip", "-6", "route"]).unwrap();
    assert!(
        pod6.contains("default via fd00:10:244:1::1 dev eth0"),
        "{pod6}"
    );
    let pod4 = a.exec_ok(&["ip", "-4", "route"]).unwrap();
    assert!(
        pod4.contains("default via 10.244.1.1 dev eth0 onlink"),
        "{pod4}"
    );
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        assert_eq!(n2.exec_ok(&["sysctl", "-n", key]).unwrap().trim(), "1");
    }
    let bridge = c
        .fabric_exec(&["ip", "-o", "link", "show", "master", "br0"])
        .unwrap();
    let ports = String::from_utf8_lossy(&bridge.stdout);
    for port in ["node-1", "node-2", "ext"] {
        assert!(ports.contains(&format!(" {port}@")), "{ports}");
    }
}

#[test]
fn refused_unreachable_and_timeout_are_told_apart() {
    let c = Cluster::dual_stack("errors", 2).unwrap();
    let (n1, n2) = (c.node(1), c.node(2));
    let n2ip = IpAddr::V4(n2.node_ip().unwrap());
    let a = n1
        .add_pod_dual("a", n1.pod_ip(2), n1.pod_ip6(2).unwrap())
        .unwrap();
    let b = n2
        .add_pod_dual("b", n2.pod_ip(2), n2.pod_ip6(2).unwrap())
        .unwrap();
    b.serve(&[80]).unwrap();

    // A closed port on a pod: TCP RST, UDP ICMP port unreachable sent by the pod itself.
    for (dst, from) in [
        (SocketAddr::V4(b.addr(81)), IpAddr::V4(b.ip())),
        (SocketAddr::V6(b.addr6(81)), IpAddr::V6(b.ipv6().unwrap())),
    ] {
        let e = a.tcp_request_any(dst, T).unwrap_err();
        assert!(e.is_refused(), "tcp {dst}: {e:?}");
        let e = a.udp_request_any(dst, T).unwrap_err();
        assert!(e.is_port_unreachable(), "udp {dst}: {e:?}");
        assert_eq!(
            e.unreachable(),
            Some(unreachable(UnreachableKind::Port, Some(from)))
        );
    }
    // Repeatedly: ICMP errors are not rate limited in the testbed.
    for _ in 0..20 {
        let e = a.udp_request_any(b.addr(81), T).unwrap_err();
        assert!(e.is_port_unreachable(), "{e:?}");
    }
    // The v4 API reports them as errors too.
    assert!(a.tcp_request(b.addr(81), T).is_err());
    assert!(a.udp_request(b.addr(81), T).is_err());

    // An address node 2 drops silently: timeout.
    n2.exec_ok(&["ip", "route", "add", "blackhole", "10.244.2.250/32"])
        .unwrap();
    n2.exec_ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "blackhole",
        "fd00:10:244:2::250/128",
    ])
    .unwrap();
    for dst in ["10.244.2.250:80", "[fd00:10:244:2::250]:80"] {
        let dst: SocketAddr = dst.parse().unwrap();
        let start = std::time::Instant::now();
        let e = a.tcp_request_any(dst, SHORT).unwrap_err();
        assert!(e.is_timeout(), "tcp {dst}: {e:?}");
        let e = a.udp_request_any(dst, SHORT).unwrap_err();
        assert!(e.is_timeout(), "udp {dst}: {e:?}");
        assert!(start.elapsed() < SHORT * 4, "{:?}", start.elapsed());
    }

    // Host unreachable and administratively prohibited from node 2 (UDP learns who said so).
    n2.exec_ok(&["ip", "route", "add", "unreachable", "10.244.2.251/32"])
        .unwrap();
    n2.exec_ok(&["ip", "route", "add", "prohibit", "10.244.2.252/32"])
        .unwrap();
    let dst: SocketAddr = "10.244.2.251:80".parse().unwrap();
    let e = a.udp_request_any(dst, T).unwrap_err();
    assert_eq!(
        e.unreachable(),
        Some(unreachable(UnreachableKind::Host, Some(n2ip))),
        "{e:?}"
    );
    let e = a.tcp_request_any(dst, T).unwrap_err();
    assert_eq!(
        e.unreachable(),
        Some(unreachable(UnreachableKind::Host, None)),
        "{e:?}"
    );
    let e = a
        .udp_request_any("10.244.2.252:80".parse::<SocketAddr>().unwrap(), T)
        .unwrap_err();
    assert_eq!(
        e.unreachable(),
        Some(unreachable(UnreachableKind::Prohibited, Some(n2ip))),
        "{e:?}"
    );
    // No route at all on node 2 (it has no default route): network unreachable.
    let e = a
        .udp_request_any("10.244.2.99:80".parse::<SocketAddr>().unwrap(), T)
        .unwrap_err();
    assert_eq!(
        e.unreachable(),
        Some(unreachable(UnreachableKind::Net, Some(n2ip))),
        "{e:?}"
    );
    // IPv6: an address inside node 2's pod CIDR without a pod: node 2 has no route for it.
    let e = a
        .udp_request_any("[fd00:10:244:2::99]:80".parse::<SocketAddr>().unwrap(), T)
        .unwrap_err();
    assert_eq!(
        e.unreachable().map(|u| (u.kind, u.from)),
        Some((
            UnreachableKind::Net,
            Some(IpAddr::V6(n2.node_ipv6().unwrap()))
        )),
        "{e:?}"
    );
    // Still fine to the open port; Display says what happened.
    assert_eq!(a.tcp_request_any(b.addr(80), T).unwrap().text, "b");
    assert_eq!(RequestError::Refused.to_string(), "connection refused");
    assert!(e.to_string().contains("network unreachable"), "{e}");
}

#[test]
fn handles_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cluster>();
    send_sync::<sluice_testbed::Host>();
    send_sync::<sluice_testbed::sluice::SluiceCluster>();
    send_sync::<RequestError>();
}

#[test]
fn node_manifests_are_v1_nodes() {
    let opts = ClusterOptions::new().zones(["us-east-1a", "us-east-1b"]);
    let c = Cluster::with_options("manifests", 3, &opts).unwrap();
    let yaml = c.node_manifests();
    println!("{yaml}");
    let docs: Vec<serde_yaml::Value> = yaml
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    assert_eq!(docs.len(), 3, "{yaml}");
    for (i, doc) in (1..).zip(&docs) {
        let s = |path: &[&str]| -> String {
            let mut v = doc;
            for p in path {
                v = &v[*p];
            }
            v.as_str()
                .unwrap_or_else(|| panic!("{path:?} in {doc:?}"))
                .to_string()
        };
        assert_eq!(s(&["apiVersion"]), "v1");
        assert_eq!(s(&["kind"]), "Node");
        assert_eq!(s(&["metadata", "name"]), format!("node-{i}"));
        let zone = s(&["metadata", "labels", "topology.kubernetes.io/zone"]);
        let want = match i {
            1 => "us-east-1a".to_string(),
            2 => "us-east-1b".to_string(),
            _ => format!("zone-{i}"),
        };
        assert_eq!(zone, want);
        assert_eq!(c.node(i).zone(), Some(want.as_str()));
        assert_eq!(s(&["spec", "podCIDR"]), format!("10.244.{i}.0/24"));
        assert_eq!(doc["spec"]["podCIDRs"].as_sequence().unwrap().len(), 1);
        let addrs = doc["status"]["addresses"].as_sequence().unwrap();
        let internal: Vec<&str> = addrs
            .iter()
            .filter(|a| a["type"].as_str() == Some("InternalIP"))
            .map(|a| a["address"].as_str().unwrap())
            .collect();
        assert_eq!(internal, [format!("172.18.0.{}", 10 + i)]);
        assert_eq!(
            v4(internal[0].parse().unwrap()),
            c.node(i).node_ip().unwrap()
        );
    }

    // Dual-stack: both pod CIDRs and both addresses.
    let c = Cluster::dual_stack("manifests6", 1).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&c.node_manifests()).unwrap();
    let cidrs: Vec<&str> = doc["spec"]["podCIDRs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cidrs, ["10.244.1.0/24", "fd00:10:244:1::/64"]);
    let internal: Vec<&str> = doc["status"]["addresses"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|a| a["type"].as_str() == Some("InternalIP"))
        .map(|a| a["address"].as_str().unwrap())
        .collect();
    assert_eq!(internal, ["172.18.0.11", "fc00:f853:ccd:e793::11"]);
    assert_eq!(
        doc["metadata"]["labels"]["topology.kubernetes.io/zone"].as_str(),
        Some("zone-1")
    );
}

#[test]
fn ipv4_only_clusters_refuse_dual_stack_pods() {
    let c = Cluster::new("v4only", 1).unwrap();
    let n = c.node(1);
    assert_eq!(n.node_ipv6(), None);
    assert_eq!(n.pod_cidr6(), None);
    assert_eq!(c.external().ipv6(), None);
    assert!(n
        .add_pod_dual("x", n.pod_ip(5), "fd00:10:244:1::5".parse().unwrap())
        .is_err());
    assert!(Cluster::new("none", 0).is_err());
    // One node and the external host still talk.
    let p = n.add_pod("p", n.pod_ip(5)).unwrap();
    p.serve(&[80]).unwrap();
    c.external()
        .add_route(&n.pod_cidr().to_string(), n.node_ip().unwrap())
        .unwrap();
    assert_eq!(c.external().tcp_request(p.addr(80), T).unwrap().text, "p");
}

#[test]
fn dropping_a_cluster_removes_everything_also_on_panic() {
    let root_before = root_links();
    let created = Mutex::new(Vec::<String>::new());
    let result = std::panic::catch_unwind(|| {
        let c = Cluster::dual_stack("cleanup", 2).unwrap();
        let p = c
            .node(2)
            .add_pod_dual("p", c.node(2).pod_ip(2), c.node(2).pod_ip6(2).unwrap())
            .unwrap();
        p.serve(&[80]).unwrap();
        c.node(1).serve(&[80]).unwrap();
        c.external().serve(&[80]).unwrap();
        let mut sleeper = c
            .external()
            .spawn(Command::new("sleep").arg("100"))
            .unwrap();
        assert!(sleeper.is_running());
        let mut names = vec![
            c.fabric_netns_name().to_string(),
            c.external().netns_name().to_string(),
            p.netns_name().to_string(),
        ];
        names.extend(c.nodes().iter().map(|n| n.netns_name().to_string()));
        let list = netns_list();
        for n in &names {
            assert!(list.contains(n), "{n} missing");
        }
        names.push(format!("pid:{}", sleeper.pid()));
        names.push(c.external().log_dir().display().to_string());
        *created.lock().unwrap() = names;
        panic!("deliberate panic with a cluster alive");
    });
    assert!(result.is_err());
    let created = created.into_inner().unwrap();
    let (log_dir, rest) = created.split_last().unwrap();
    let (pid, names) = rest.split_last().unwrap();
    // Logs are kept after a panic for the post-mortem; this one was planned.
    let _ = std::fs::remove_dir_all(log_dir);
    let list = netns_list();
    for n in names {
        assert!(!list.contains(n), "netns {n} survived");
    }
    let pid: i32 = pid.strip_prefix("pid:").unwrap().parse().unwrap();
    // SAFETY: signal 0 only probes.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "a process in the external host survived");

    // A normal drop too.
    let names: Vec<String> = {
        let c = Cluster::new("cleanup2", 2).unwrap();
        let mut v = vec![
            c.fabric_netns_name().to_string(),
            c.external().netns_name().to_string(),
        ];
        v.extend(c.nodes().iter().map(|n| n.netns_name().to_string()));
        v
    };
    let list = netns_list();
    for n in &names {
        assert!(!list.contains(n), "netns {n} survived");
    }

    // Nothing of ours ever appeared in the root namespace.
    let root_after = root_links();
    let new: Vec<&String> = root_after
        .difference(&root_before)
        .filter(|n| {
            ["br0", "node-1", "node-2", "ext"].contains(&n.as_str()) || n.starts_with("veth")
        })
        .collect();
    assert!(new.is_empty(), "new links in the root namespace: {new:?}");
    for ours in ["node-1", "node-2", "ext"] {
        assert!(!root_after.contains(ours), "{ours} in the root namespace");
    }
}
