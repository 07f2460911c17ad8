//! NetworkPolicy with real traffic on a two-node cluster: the agents read Pods, Namespaces and
//! NetworkPolicies from the manifests directory and enforce them, policy changes apply while
//! the agents run, an established flow survives a policy that would deny it, service traffic
//! is judged by its backend, and the drops show in `sluice state` and `sluice monitor`.
//! (The x/y/z 9x9 reachability suite is tests/tests/policy.rs.)

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use sluice_testbed::{
    client::RequestError,
    reach::{assert_answered, assert_dropped, wait_dropped, APPLY},
    retry_until,
    sluice::SluiceCluster,
    Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const SHORT: Duration = Duration::from_millis(600);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 10);

/// A Pod object for a testbed pod: namespace `ns`, label pod=`label`, on node-`node`, with a
/// named container port serve-80-tcp.
fn pod_manifest(pod: &Pod, ns: &str, label: &str, node: usize) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {ns}, labels: {{pod: {label}}}}}\n\
         spec:\n  nodeName: node-{node}\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n\
         status: {{podIP: {}}}\n",
        pod.name(),
        pod.ip()
    )
}

const NAMESPACES: &str =
    "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n\
    ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y}}\n";

/// Service `a` in x: VIP:80 -> x-a:80.
fn service(a: &Pod) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: a, namespace: x}}
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, targetPort: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: a-1, namespace: x, labels: {{kubernetes.io/service-name: a}}}}
addressType: IPv4
endpoints: [{{addresses: ["{}"], nodeName: node-1, conditions: {{ready: true}}}}]
ports: [{{name: http, port: 80, protocol: TCP}}]
"#,
        a.ip()
    )
}

/// Ingress of x's pod=a only from x's pod=b, on its named port.
const ALLOW_B_TO_A: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}]
"#;

/// Egress of x's pod=b only to x's pod=a on port 80.
const B_ONLY_TO_A: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-only-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: a}}}]
    ports: [{port: 80}]
"#;

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddrV4::new(ip, port).into()
}

#[test]
fn agents_enforce_network_policy_from_the_manifests() {
    let mut cluster = SluiceCluster::new("pol-smoke", 2).unwrap();
    let node_1 = cluster.node(1);
    let a = node_1.add_pod("x-a", node_1.pod_ip(21)).unwrap();
    let b = node_1.add_pod("x-b", node_1.pod_ip(22)).unwrap();
    let node_2 = cluster.node(2);
    let c = node_2.add_pod("y-c", node_2.pod_ip(21)).unwrap();
    for pod in [&a, &b, &c] {
        pod.serve(&[80]).unwrap();
    }
    let pods = [
        pod_manifest(&a, "x", "a", 1),
        pod_manifest(&b, "x", "b", 1),
        pod_manifest(&c, "y", "c", 2),
    ]
    .concat();
    cluster
        .manifests
        .write("pods.yaml", &format!("{NAMESPACES}{pods}"))
        .unwrap();
    cluster.manifests.write("svc.yaml", &service(&a)).unwrap();
    cluster.start_agents().unwrap();
    let pin_1 = cluster.pins[0].path().to_str().unwrap().to_string();

    // No policy: everyone reaches everyone.
    let to_a = sock(a.ip(), 80);
    let to_vip = sock(VIP, 80);
    assert_answered(&c, to_a, &a);
    assert_answered(&b, to_a, &a);
    assert_answered(&c, to_vip, &a);
    assert_answered(&b, sock(c.ip(), 80), &c);

    // A UDP flow from y-c to x-a, established before the policy that would deny it.
    let established = c
        .run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(TIMEOUT)).unwrap();
            socket.connect(to_a).unwrap();
            socket
        })
        .unwrap();
    let udp_round_trip = |socket: &UdpSocket| -> std::io::Result<String> {
        socket.send(b"ping")?;
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    assert_eq!(udp_round_trip(&established).unwrap(), a.name());

    // x-a admits only x-b: y-c (other node, other namespace) is dropped, directly and
    // through the ClusterIP (DNATed on node 2, judged on node 1 by its backend's policy).
    cluster
        .manifests
        .write("policy.yaml", ALLOW_B_TO_A)
        .unwrap();
    wait_dropped(&c, to_a);
    assert_dropped(&c, to_vip);
    assert_answered(&b, to_a, &a);
    assert_answered(&b, to_vip, &a);
    // The established UDP flow goes on; a new one from y-c does not.
    established.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(
        udp_round_trip(&established).expect("the established flow still flows"),
        a.name()
    );
    let fresh = c.udp_request_any(to_a, SHORT);
    assert!(
        matches!(fresh, Err(RequestError::Timeout)),
        "a new UDP flow from y-c answered: {fresh:?}"
    );

    // Egress: x-b may only reach pod=a (the service's backend qualifies, y-c does not).
    cluster
        .manifests
        .write("policy.yaml", &format!("{ALLOW_B_TO_A}{B_ONLY_TO_A}"))
        .unwrap();
    wait_dropped(&b, sock(c.ip(), 80));
    assert_answered(&b, to_vip, &a);
    assert_answered(&b, to_a, &a);

    // The drops are counted by reason and listed with the policy entries.
    let state: serde_json::Value =
        serde_json::from_str(&cluster.run_sluice(1, &["state", "--pin-path", &pin_1, "--json"]))
            .unwrap();
    let ingress = state["drops"]["drop-policy-ingress-denied"]
        .as_u64()
        .unwrap();
    let egress = state["drops"]["drop-policy-egress-denied"]
        .as_u64()
        .unwrap();
    assert!(ingress >= 3 && egress >= 1, "{:#}", state["drops"]);
    let rows = state["policy"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["pod"] == a.ip().to_string()
            && r["direction"] == "ingress"
            && r["peer"] == format!("{}/32", b.ip())
            && r["ports"] == serde_json::json!(["80"])),
        "{rows:#?}"
    );

    // `sluice monitor` streams the drops; nobody read the ring yet, so the first it prints is
    // the first drop: y-c's connection to x-a once the policy applied.
    let monitor = cluster.run_sluice(
        1,
        &[
            "monitor",
            "--pin-path",
            &pin_1,
            "--manifests",
            cluster.manifests.path().to_str().unwrap(),
            "--count",
            "1",
        ],
    );
    assert!(
        monitor.starts_with(&format!("ingress tcp {}:", c.ip()))
            && monitor.contains(&format!(
                "-> {}:80 pod x/x-a: drop-policy-ingress-denied",
                a.ip()
            )),
        "{monitor}"
    );

    // Deleting the policies opens everything again, without restarting anything.
    cluster.manifests.remove("policy.yaml").unwrap();
    retry_until(APPLY, Duration::from_millis(100), || {
        c.tcp_request_any(to_a, SHORT)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .unwrap();
    assert_answered(&b, sock(c.ip(), 80), &c);
}
