//! The real-traffic check the kernel matrix runs on every kernel (issue #12; `cargo xtask
//! kernels` boots 5.10, 6.1 and 6.12 in QEMU and runs this there, the host runs it on its own
//! kernel): an agent on a netns node balances a ClusterIP over three backends, then enforces
//! a NetworkPolicy that denies the client.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use sluice_testbed::{reach::wait_dropped, sluice::SluiceNode, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
const TIMEOUT: Duration = Duration::from_secs(3);

/// Ingress of the web pods only from pods labelled app=friend: the client is not one.
const WEB_FROM_FRIENDS_ONLY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: web-from-friends, namespace: shop}\n\
    spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: friend}}}]}]\n";

#[test]
fn a_cluster_ip_balances_over_three_backends_and_a_network_policy_denies() {
    let (mut cluster, client, backends) = SluiceNode::with_web("kern", VIP, 3).unwrap();
    cluster.start_agent().unwrap();

    let vip = SocketAddrV4::new(VIP, 80);
    let replies = client.tcp_requests(vip, 60, TIMEOUT).unwrap();
    let counts = tally(&replies);
    for reply in &replies {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|e| panic!("request to {vip} failed: {e:#}; tally {counts:?}"));
        assert_eq!(reply.peer, vip, "reply not from the service address");
    }
    // Every backend answers (random choice: one missing from 60 has odds of 3e-11; a floor
    // above one made the test fail by chance).
    for pod in &backends {
        assert!(
            counts.contains_key(pod.name()),
            "{} never answered 60 requests: {counts:?}",
            pod.name()
        );
    }

    cluster
        .manifests
        .write("policy.yaml", WEB_FROM_FRIENDS_ONLY)
        .unwrap();
    wait_dropped(&client, SocketAddr::V4(vip));
    for pod in &backends {
        wait_dropped(&client, SocketAddr::new(pod.ip().into(), 8080));
    }
}
