//! kube-proxy's health endpoints, served by the real agent in a netns node and queried over
//! HTTP from a pod: healthCheckNodePort follows the node's local endpoints, /healthz and /livez
//! report the proxy.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::Context as _;
use sluice_testbed::{retry_until, sluice::SluiceNode, Pod};

const HEALTH_CHECK_PORT: u16 = 32100;

/// An HTTP/1.0 GET from `pod`; returns the status code and the body.
fn http_get(pod: &Pod, addr: SocketAddrV4, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    pod.run(move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: node\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no end of headers")?;
        let status = head
            .split(' ')
            .nth(1)
            .context("no status")?
            .parse()
            .context("status not a number")?;
        Ok((status, body.to_string()))
    })?
}

/// A LoadBalancer service with externalTrafficPolicy Local whose one endpoint runs on `node`.
fn manifests(endpoint_node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: frontend-lb, namespace: ecommerce}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_CHECK_PORT}
  ports: [{{port: 80, targetPort: 3000, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: frontend-lb-1
  namespace: ecommerce
  labels: {{kubernetes.io/service-name: frontend-lb}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.0.21], nodeName: {endpoint_node}}}
ports: [{{port: 3000}}]
"#
    )
}

#[test]
fn health_check_node_port_and_healthz_in_kube_proxy_format() {
    let mut cluster = SluiceNode::new("health").unwrap();
    let client = cluster
        .node
        .add_pod("client", "10.244.0.10".parse().unwrap())
        .unwrap();
    let node_name = cluster.node.name().to_string();
    cluster
        .manifests
        .write("node.yaml", &cluster.node.manifest())
        .unwrap();
    cluster
        .manifests
        .write("service.yaml", &manifests(&node_name))
        .unwrap();
    cluster
        .start_agent_with(&["--node-name", &node_name])
        .unwrap();
    // The pods reach the node at their gateway address.
    let node = cluster.node.gateway();
    let health_check = SocketAddrV4::new(node, HEALTH_CHECK_PORT);

    let (status, body) = http_get(&client, health_check, "/").unwrap();
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "ecommerce", "name": "frontend-lb"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    for path in ["/healthz", "/livez"] {
        let (status, body) = http_get(&client, SocketAddrV4::new(node, 10256), path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["nodeEligible"], true, "{body}");
        assert!(body["lastUpdated"].as_str().is_some_and(|t| !t.is_empty()));
    }

    // The endpoint moves to another node: this node has none left, 503.
    cluster
        .manifests
        .write("service.yaml", &manifests("node-elsewhere"))
        .unwrap();
    retry_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let (status, body) = http_get(&client, health_check, "/")?;
        anyhow::ensure!(
            status == 503 && body.contains("\"localEndpoints\":0"),
            "{status} {body}"
        );
        Ok(())
    })
    .unwrap();

    // The service goes away: so does its health check server.
    cluster.manifests.remove("service.yaml").unwrap();
    retry_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || match http_get(&client, health_check, "/") {
            Ok(answer) => anyhow::bail!("still served: {answer:?}"),
            Err(_) => Ok(()),
        },
    )
    .unwrap();
    let agent = cluster.agent_mut().unwrap();
    assert!(agent.is_running(), "{}", agent.log());
}
