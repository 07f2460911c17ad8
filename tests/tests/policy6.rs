//! NetworkPolicy over IPv6 with real traffic on a dual-stack two-node cluster: the agents
//! resolve the pods' IPv6 addresses (`status.podIPs`) and enforce the same policies on the
//! IPv6 maps (`policy6`, `isolated6`, `policy_flows6`): a deny-all ingress namespace, an
//! allow-from-namespace policy, and an IPv6 ipBlock with an except, checked between pods on
//! both nodes, plus an IPv6 ClusterIP judged at its backend, the IPv6 drops in `sluice state`
//! and `sluice monitor`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use sluice_testbed::{
    cluster::ClusterOptions,
    reach::{assert_answered, assert_dropped, wait_answered, wait_dropped},
    sluice::SluiceCluster,
    Pod,
};

const VIP6: &str = "fd00:10:96::61:10";

/// A dual-stack Pod object: namespace `ns`, label pod=`label`, on node-`node`.
fn pod_manifest(pod: &Pod, ns: &str, label: &str, node: usize) -> String {
    let v6 = pod.ipv6().expect("a dual-stack pod");
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {ns}, labels: {{pod: {label}}}}}\n\
         spec:\n  nodeName: node-{node}\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n\
         status: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{v6}\"}}]}}\n",
        pod.name(),
        pod.ip(),
        pod.ip()
    )
}

const NAMESPACES: &str =
    "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n\
    ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y}}\n";

const DENY_ALL_INGRESS_X: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

const ALLOW_FROM_Y: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#;

/// x's pod=a takes TCP 80 from node 2's IPv6 pod range but `except` (one pod's /128).
fn ip_block_policy(cidr: &str, except: Ipv6Addr) -> String {
    format!(
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: a-from-node-2-block, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: "{cidr}", except: ["{except}/128"]}}}}]
    ports: [{{port: 80}}]
"#
    )
}

/// IPv6-only ClusterIP service `a6` in x: VIP6:80 -> x-a:80.
fn service6(a: &Pod) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: a6, namespace: x}}
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: "{VIP6}"
  clusterIPs: ["{VIP6}"]
  ports: [{{name: http, port: 80, targetPort: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: a6-1, namespace: x, labels: {{kubernetes.io/service-name: a6}}}}
addressType: IPv6
endpoints: [{{addresses: ["{}"], nodeName: node-1, conditions: {{ready: true}}}}]
ports: [{{name: http, port: 80, protocol: TCP}}]
"#,
        a.ipv6().unwrap()
    )
}

fn to6(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(pod.ipv6().unwrap()), port)
}

#[test]
fn ipv6_traffic_obeys_deny_all_ingress_allow_from_namespace_and_ip_blocks_on_both_nodes() {
    let mut cluster =
        SluiceCluster::with_options("pol6", 2, &ClusterOptions::new().dual_stack(true)).unwrap();
    let dual = |node: usize, name: &str, n: u8| {
        let node_ref = cluster.node(node);
        let pod = node_ref
            .add_pod_dual(name, node_ref.pod_ip(n), node_ref.pod_ip6(n).unwrap())
            .unwrap();
        pod.serve(&[80]).unwrap();
        pod
    };
    // x-a, x-b, y-b on node 1; x-c, y-c on node 2.
    let xa = dual(1, "x-a", 31);
    let xb = dual(1, "x-b", 32);
    let yb = dual(1, "y-b", 33);
    let xc = dual(2, "x-c", 31);
    let yc = dual(2, "y-c", 32);
    let pods = [
        pod_manifest(&xa, "x", "a", 1),
        pod_manifest(&xb, "x", "b", 1),
        pod_manifest(&yb, "y", "b", 1),
        pod_manifest(&xc, "x", "c", 2),
        pod_manifest(&yc, "y", "c", 2),
    ]
    .concat();
    cluster
        .manifests
        .write("pods.yaml", &format!("{NAMESPACES}{pods}"))
        .unwrap();
    cluster
        .manifests
        .write("svc6.yaml", &service6(&xa))
        .unwrap();
    cluster.start_agents().unwrap();
    let pin_1 = cluster.pins[0].path().to_str().unwrap().to_string();
    let vip6 = SocketAddr::new(VIP6.parse::<IpAddr>().unwrap(), 80);

    // No policy: everything reaches everything over IPv6.
    assert_answered(&yc, to6(&xa, 80), &xa);
    assert_answered(&xb, to6(&xc, 80), &xc);
    assert_answered(&yc, vip6, &xa);

    // Deny-all ingress in x: no IPv6 connection reaches an x pod, on either node, from
    // either namespace; y's pods still take connections; IPv4 is denied as well.
    cluster
        .manifests
        .write("policy.yaml", DENY_ALL_INGRESS_X)
        .unwrap();
    wait_dropped(&yc, to6(&xa, 80));
    assert_dropped(&yb, to6(&xa, 80)); // same node
    assert_dropped(&xb, to6(&xa, 80)); // same namespace
    assert_dropped(&yb, to6(&xc, 80)); // node 1 -> node 2
    assert_dropped(&yc, vip6); // the ClusterIP's backend is x-a
    assert_dropped(&yc, SocketAddr::new(xa.ip().into(), 80));
    assert_answered(&xa, to6(&yc, 80), &yc);
    assert_answered(&xc, to6(&yb, 80), &yb);

    // Allow from namespace y (deny-all stays): y's pods reach x's over IPv6, across nodes
    // and through the IPv6 ClusterIP; x's own pods still do not.
    cluster
        .manifests
        .write(
            "policy.yaml",
            &format!("{DENY_ALL_INGRESS_X}{ALLOW_FROM_Y}"),
        )
        .unwrap();
    wait_answered(&yc, to6(&xa, 80), &xa);
    assert_answered(&yb, to6(&xa, 80), &xa);
    assert_answered(&yb, to6(&xc, 80), &xc);
    assert_answered(&yc, vip6, &xa);
    assert_dropped(&xb, to6(&xa, 80));
    assert_dropped(&xc, to6(&xa, 80));

    // An IPv6 ipBlock: x-a takes port 80 from node 2's IPv6 pod range except y-c.
    let node_2_range = cluster.node(2).pod_cidr6().unwrap().to_string();
    cluster
        .manifests
        .write(
            "policy.yaml",
            &ip_block_policy(&node_2_range, yc.ipv6().unwrap()),
        )
        .unwrap();
    wait_dropped(&yc, to6(&xa, 80));
    assert_answered(&xc, to6(&xa, 80), &xa); // node 2, in the block
    assert_dropped(&yb, to6(&xa, 80)); // node 1, outside it
    assert_answered(&yb, to6(&xb, 80), &xb); // x-b is selected by no policy now

    // The IPv6 entries and drops show in `sluice state`.
    let state: serde_json::Value =
        serde_json::from_str(&cluster.run_sluice(1, &["state", "--pin-path", &pin_1, "--json"]))
            .unwrap();
    let rows = state["policy"].as_array().unwrap();
    // The block minus one /128: 64 disjoint prefixes, all inside node 2's range.
    let range: ipnet::Ipv6Net = node_2_range.parse().unwrap();
    let block_rows: Vec<ipnet::Ipv6Net> = rows
        .iter()
        .filter(|r| {
            r["pod"] == xa.ipv6().unwrap().to_string()
                && r["direction"] == "ingress"
                && r["ports"] == serde_json::json!(["80"])
        })
        .map(|r| r["peer"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(block_rows.len(), 64, "{rows:#?}");
    assert!(
        block_rows.iter().all(|p| range.contains(p)),
        "{block_rows:?}"
    );
    assert!(!block_rows.iter().any(|p| p.contains(&yc.ipv6().unwrap())));
    assert!(
        state["drops"]["drop-policy-ingress-denied"]
            .as_u64()
            .unwrap()
            >= 5,
        "{:#}",
        state["drops"]
    );
    // `sluice monitor` prints the IPv6 drops: nobody read node 1's ring yet, so the first
    // is the first drop there, an IPv6 connection to x-a.
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
        monitor.starts_with("ingress tcp [")
            && monitor.contains(&format!(
                "-> [{}]:80 pod x/x-a: drop-policy-ingress-denied",
                xa.ipv6().unwrap()
            )),
        "{monitor}"
    );

    // Deleting the policy opens x again.
    cluster.manifests.remove("policy.yaml").unwrap();
    wait_answered(&yc, to6(&xa, 80), &xa);
    assert_answered(&yb, to6(&xa, 80), &xa);
}
