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

fn pod_yaml(name: &str, ip: Ipv4Addr, app: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn service_yaml(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  clusterIP: {VIP}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-a, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nendpoints:\n{endpoints}ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

/// Ingress of the web pods only from pods labelled app=friend: the client is not one.
const WEB_FROM_FRIENDS_ONLY: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: web-from-friends, namespace: shop}\n\
    spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: friend}}}]}]\n";

#[test]
fn a_cluster_ip_balances_over_three_backends_and_a_network_policy_denies() {
    let mut cluster = SluiceNode::new("kern").unwrap();
    let client = cluster
        .node
        .add_pod("client", cluster.node.pod_ip(10))
        .unwrap();
    let backends: Vec<_> = (1..=3)
        .map(|i| {
            let pod = cluster
                .node
                .add_pod(&format!("web-{i}"), cluster.node.pod_ip(20 + i))
                .unwrap();
            pod.serve_tcp(&[8080]).unwrap();
            pod
        })
        .collect();
    let ips: Vec<Ipv4Addr> = backends.iter().map(|p| p.ip()).collect();
    let mut pods = pod_yaml("client", client.ip(), "client");
    for pod in &backends {
        pods += &pod_yaml(pod.name(), pod.ip(), "web");
    }
    cluster.manifests.write("pods.yaml", &pods).unwrap();
    cluster
        .manifests
        .write("web.yaml", &service_yaml(&ips))
        .unwrap();
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
