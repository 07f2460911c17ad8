//! Kubernetes objects as the tests write them into a manifests directory (or apply to the
//! test API server): small builders, so each test file says only what is particular to it.

use std::net::Ipv4Addr;

/// A Pod of `namespace` on `node-1` with one address and an `app` label.
pub fn pod(namespace: &str, name: &str, ip: Ipv4Addr, app: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// A ClusterIP Service `namespace/name` on `vip:port` (TCP, port name `http`) with one
/// EndpointSlice of ready `backends` on `target_port`.
pub fn cluster_ip_service(
    namespace: &str,
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    target_port: u16,
    backends: &[Ipv4Addr],
) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: {port}, targetPort: {target_port}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-a, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nendpoints:\n{endpoints}ports: [{{name: http, port: {target_port}, protocol: TCP}}]\n"
    )
}
