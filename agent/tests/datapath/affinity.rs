//! sessionAffinity per service port (both families share the rules; the IPv6 twin is in
//! ipv6.rs): the frontends of a service port with the same backends share a client's
//! affinity, as kube-proxy keys it in the service port's KUBE-SVC chain.

use crate::support::*;

/// A client keeps its backend through the ClusterIP and the NodePort of one service port (one
/// affinity entry); an externalTrafficPolicy Local load balancer IP of the same port, which
/// balances over the local endpoints only, has an affinity of its own. Entries live as long as
/// a frontend uses their id, and go with the last one.
#[test]
fn ipv4_affinity_is_shared_by_the_frontends_of_a_service_port() {
    let backends: Vec<BackendAddr> = (1..=8)
        .map(|i| be(Ipv4Addr::new(10, 244, 1, i), 8080))
        .collect();
    let local = be(LOCAL_POD, 8080);
    let cluster_ip = frontend(VIP, 80, Protocol::Tcp);
    let node_port = frontend(NODE_IP, NODE_PORT, Protocol::Tcp);
    let lb = frontend(Ipv4Addr::new(198, 51, 100, 7), 80, Protocol::Tcp);
    let sticky = |kind, backends: &[BackendAddr]| {
        let mut e = entry(kind, backends, &[local]);
        e.name = "default/web:http".into();
        e.affinity_timeout = Some(10_800);
        e
    };
    let mut all = backends.clone();
    all.push(local);
    let mut local_lb = sticky(FrontendKind::LoadBalancer, &[local]);
    local_lb.external_local = true;
    let services = vec![
        (cluster_ip, sticky(FrontendKind::ClusterIp, &all)),
        (node_port, sticky(FrontendKind::NodePort, &all)),
        (lb, local_lb),
    ];
    let mut datapath = node_datapath(services.clone(), &node_context(false));
    let id = |f: &Frontend| datapath.affinity_id(f).unwrap();
    assert_eq!(id(&cluster_ip), id(&node_port));
    assert_ne!(id(&cluster_ip), id(&lb));
    assert!(id(&cluster_ip) != 0 && id(&lb) != 0);

    let backend_of = |datapath: &Datapath, to: Frontend, sport: u16| {
        let f = flow(PROTO_TCP, LOCAL_CLIENT, sport, v4(to.ip), to.port);
        dnat_target(&f, &from_pod(datapath, &tcp_packet(&f, TCP_SYN)))
    };
    let first = backend_of(&datapath, cluster_ip, 20_000);
    for sport in 20_001..20_030 {
        let through = if sport % 2 == 0 {
            cluster_ip
        } else {
            node_port
        };
        assert_eq!(
            backend_of(&datapath, through, sport),
            first,
            "through {through}"
        );
    }
    assert_eq!(backend_of(&datapath, lb, 20_100), local);
    assert_eq!(datapath.affinity_entries().unwrap().len(), 2);

    // The NodePort goes: the ClusterIP keeps the id and the client its backend.
    let shared = id(&cluster_ip);
    resync(&mut datapath, services[..1].to_vec());
    assert_eq!(datapath.affinity_id(&cluster_ip), Some(shared));
    assert_eq!(backend_of(&datapath, cluster_ip, 20_200), first);
    // The LB's id is retired: its entry went.
    let entries = datapath.affinity_entries().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].0.affinity_id, shared);
    // The last frontend goes: so does every entry of its id.
    resync(&mut datapath, vec![]);
    assert!(datapath.affinity_entries().unwrap().is_empty());
}
