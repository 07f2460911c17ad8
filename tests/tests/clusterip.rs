//! ClusterIP load balancing with real traffic: the real `sluice agent` in a network-namespace
//! node, pods as clients and backends, manifests changed while traffic flows.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use sluice_testbed::{retry_until, sluice::SluiceNode, tally, tcp_loop_while, Pod, Reply};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, last)
}

/// A Service `web` with ports http (80/TCP -> 8080), dns (53/UDP -> 5353) and alt (81/TCP ->
/// 9090 on other pods).
fn service_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
  - {{name: alt, port: 81, targetPort: 9090}}
"#
    )
}

/// A slice of `web` with the given endpoints (pod IPs) serving `ports` (name, number, proto).
fn slice_yaml(name: &str, endpoints: &[Ipv4Addr], ports: &[(&str, u16, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    let ports: String = ports
        .iter()
        .map(|(n, p, proto)| format!("- {{name: {n}, port: {p}, protocol: {proto}}}\n"))
        .collect();
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
{ports}"#
    )
}

const HTTP_DNS: &[(&str, u16, &str)] = &[("http", 8080, "TCP"), ("dns", 5353, "UDP")];

/// A node with a client pod and `backends` web pods serving TCP 8080 and UDP 5353.
fn node_with_backends(hint: &str, backends: u8) -> (SluiceNode, Pod, Vec<Pod>) {
    let cluster = SluiceNode::new(hint).unwrap();
    let client = cluster.node.add_pod("client", ip(10)).unwrap();
    let pods: Vec<Pod> = (1..=backends)
        .map(|i| {
            let pod = cluster
                .node
                .add_pod(&format!("web-{i}"), ip(20 + i))
                .unwrap();
            pod.serve_tcp(&[8080]).unwrap();
            pod.serve_udp(&[5353]).unwrap();
            pod
        })
        .collect();
    (cluster, client, pods)
}

/// Writes the `web` service with `backends` as its http/dns endpoints and starts the agent.
fn serve_web(cluster: &mut SluiceNode, backends: &[Pod]) {
    cluster
        .manifests
        .write("service.yaml", &service_yaml())
        .unwrap();
    cluster
        .manifests
        .write("web-a.yaml", &slice_yaml("web-a", &ips(backends), HTTP_DNS))
        .unwrap();
    cluster.start_agent().unwrap();
}

fn ips(pods: &[Pod]) -> Vec<Ipv4Addr> {
    pods.iter().map(Pod::ip).collect()
}

/// Every reply came from the service address, and every backend answered at least `min` times.
fn assert_spread(replies: &[anyhow::Result<Reply>], vip: SocketAddrV4, pods: &[Pod], min: usize) {
    let counts = tally(replies);
    for reply in replies {
        match reply {
            Ok(r) => assert_eq!(r.peer, vip, "reply not from the service address: {r:?}"),
            Err(e) => panic!("request to {vip} failed: {e:#}; tally {counts:?}"),
        }
    }
    for pod in pods {
        let n = counts.get(pod.name()).copied().unwrap_or(0);
        assert!(
            n >= min,
            "{} answered {n} < {min} times: {counts:?}",
            pod.name()
        );
    }
    let known: Vec<&str> = pods.iter().map(Pod::name).collect();
    assert!(
        counts.keys().all(|k| known.contains(&k.as_str())),
        "answers from pods outside {known:?}: {counts:?}"
    );
}

fn spread_over_backends(offload: bool) {
    let (mut cluster, client, web) = node_with_backends("spread", 3);
    let alt: Vec<Pod> = (4..=5)
        .map(|i| {
            let pod = cluster
                .node
                .add_pod(&format!("alt-{i}"), ip(20 + i))
                .unwrap();
            pod.serve_tcp(&[9090]).unwrap();
            pod
        })
        .collect();
    for pod in cluster.node.pods() {
        cluster.node.set_offload(&pod, offload).unwrap();
    }
    let m = &cluster.manifests;
    m.write("service.yaml", &service_yaml()).unwrap();
    m.write("web-a.yaml", &slice_yaml("web-a", &ips(&web), HTTP_DNS))
        .unwrap();
    m.write(
        "web-b.yaml",
        &slice_yaml("web-b", &ips(&alt), &[("alt", 9090, "TCP")]),
    )
    .unwrap();
    // Pods exist before the agent starts: it must find their interfaces at start-up.
    cluster.start_agent().unwrap();

    let http = SocketAddrV4::new(VIP, 80);
    let replies = client.tcp_requests(http, 200, TIMEOUT).unwrap();
    assert_spread(&replies, http, &web, 20);

    let dns = SocketAddrV4::new(VIP, 53);
    let replies = client.udp_requests(dns, 200, TIMEOUT).unwrap();
    assert_spread(&replies, dns, &web, 20);

    // The second TCP port of the same ClusterIP reaches its own backends only.
    let alt_port = SocketAddrV4::new(VIP, 81);
    let replies = client.tcp_requests(alt_port, 60, TIMEOUT).unwrap();
    assert_spread(&replies, alt_port, &alt, 10);

    // The backends saw the client's own address: a ClusterIP is DNAT only.
    for pod in &web {
        assert!(
            pod.seen().iter().all(|s| *s.peer.ip() == client.ip()),
            "{} saw a source other than the client: {:?}",
            pod.name(),
            pod.seen()
        );
    }
}

#[test]
fn tcp_and_udp_spread_over_backends_with_checksum_offload() {
    spread_over_backends(true);
}

/// With offload off, veth verifies every checksum: only correctly updated checksums arrive.
#[test]
fn tcp_and_udp_spread_over_backends_without_checksum_offload() {
    spread_over_backends(false);
}

#[test]
fn endpoint_changes_and_service_deletion_apply_while_running() {
    let (mut cluster, client, web) = node_with_backends("changes", 4);
    let (current, spare) = web.split_at(3);
    cluster
        .manifests
        .write("service.yaml", &service_yaml())
        .unwrap();
    cluster
        .manifests
        .write("web-a.yaml", &slice_yaml("web-a", &ips(current), HTTP_DNS))
        .unwrap();
    cluster.start_agent().unwrap();
    let http = SocketAddrV4::new(VIP, 80);
    assert_spread(
        &client.tcp_requests(http, 150, TIMEOUT).unwrap(),
        http,
        current,
        10,
    );

    // Remove web-3: within a second it gets no new connections.
    cluster
        .manifests
        .write(
            "web-a.yaml",
            &slice_yaml("web-a", &ips(&current[..2]), HTTP_DNS),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_spread(
        &client.tcp_requests(http, 100, TIMEOUT).unwrap(),
        http,
        &current[..2],
        10,
    );
    let dns = SocketAddrV4::new(VIP, 53);
    assert_spread(
        &client.udp_requests(dns, 100, TIMEOUT).unwrap(),
        dns,
        &current[..2],
        10,
    );

    // Add web-4: it starts receiving.
    let mut grown = current[..2].to_vec();
    grown.push(spare[0].clone());
    cluster
        .manifests
        .write("web-a.yaml", &slice_yaml("web-a", &ips(&grown), HTTP_DNS))
        .unwrap();
    retry_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let replies = client.tcp_requests(http, 20, TIMEOUT)?;
        anyhow::ensure!(
            tally(&replies).contains_key("web-4"),
            "web-4 not reached yet"
        );
        Ok(())
    })
    .unwrap();
    assert_spread(
        &client.tcp_requests(http, 150, TIMEOUT).unwrap(),
        http,
        &grown,
        10,
    );

    // Delete the service: its ClusterIP is no longer translated (nothing answers there).
    cluster.manifests.remove("service.yaml").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = client.tcp_request(http, Duration::from_millis(500));
    assert!(after.is_err(), "deleted service still answered: {after:?}");
    let after = client.udp_request(dns, Duration::from_millis(500));
    assert!(
        after.is_err(),
        "deleted UDP service still answered: {after:?}"
    );
}

#[test]
fn agent_started_before_the_pods() {
    let mut cluster = SluiceNode::new("early").unwrap();
    cluster
        .manifests
        .write("service.yaml", &service_yaml())
        .unwrap();
    cluster
        .manifests
        .write(
            "web-a.yaml",
            &slice_yaml("web-a", &[ip(21), ip(22)], HTTP_DNS),
        )
        .unwrap();
    cluster.start_agent().unwrap();

    // The pods (and their veths and host routes) appear after the agent is running.
    let client = cluster.node.add_pod("client", ip(10)).unwrap();
    let web: Vec<Pod> = (1..=2)
        .map(|i| {
            let pod = cluster
                .node
                .add_pod(&format!("web-{i}"), ip(20 + i))
                .unwrap();
            pod.serve(&[8080, 5353]).unwrap();
            pod
        })
        .collect();
    let http = SocketAddrV4::new(VIP, 80);
    retry_until(Duration::from_secs(10), Duration::from_millis(100), || {
        client.tcp_request(http, Duration::from_millis(500))
    })
    .unwrap();
    assert_spread(
        &client.tcp_requests(http, 100, TIMEOUT).unwrap(),
        http,
        &web,
        20,
    );

    // A pod replaced under the same name gets a new veth: the agent attaches to it too.
    cluster.node.remove_pod(&web[1]).unwrap();
    let replacement = cluster.node.add_pod("web-2", ip(22)).unwrap();
    replacement.serve(&[8080]).unwrap();
    retry_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let replies = client.tcp_requests(http, 40, TIMEOUT)?;
        let counts = tally(&replies);
        anyhow::ensure!(
            counts.get("web-2").copied().unwrap_or(0) >= 5 && !counts.contains_key("ERROR"),
            "replacement pod not reached cleanly: {counts:?}"
        );
        Ok(())
    })
    .unwrap();
}

/// A client opens connections in a loop while the agent is killed (SIGKILL), restarted,
/// stopped cleanly (SIGTERM) and started again: the pinned datapath keeps serving throughout.
#[test]
fn agent_restart_does_not_interrupt_traffic() {
    let (mut cluster, client, web) = node_with_backends("restart", 3);
    serve_web(&mut cluster, &web);
    let http = SocketAddrV4::new(VIP, 80);

    let outcome = tcp_loop_while(&client, http, TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(300));
        let mut killed = cluster.take_agent().unwrap();
        killed.kill_hard().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        cluster.start_agent().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut stopped = cluster.take_agent().unwrap();
        let status = stopped.terminate().unwrap();
        assert!(
            status.success(),
            "agent did not stop cleanly: {status:?}\n{}",
            stopped.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        cluster.start_agent().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let (ok, failures) = (outcome.ok, outcome.failures);
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 50, "only {ok} connections during the restarts");
    // And the restarted agent still balances over every backend.
    assert_spread(
        &client.tcp_requests(http, 150, TIMEOUT).unwrap(),
        http,
        &web,
        20,
    );
}

#[test]
fn malformed_manifests_are_reported_and_the_rest_keeps_working() {
    let (mut cluster, client, web) = node_with_backends("malformed", 2);
    serve_web(&mut cluster, &web);
    let http = SocketAddrV4::new(VIP, 80);
    assert_spread(
        &client.tcp_requests(http, 60, TIMEOUT).unwrap(),
        http,
        &web,
        10,
    );

    // Broken YAML, an invalid object next to a valid one, and a new valid service, at once.
    cluster
        .manifests
        .write(
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
        )
        .unwrap();
    cluster
        .manifests
        .write(
            "mixed.yaml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: bad-ip, namespace: shop}}\nspec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: shop}}\nspec: {{clusterIP: 10.96.100.11, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n{}",
                slice_yaml("web2-a", &ips(&web[..1]), &[("http", 8080, "TCP")])
                    .replace("service-name: web}", "service-name: web2}")
            ),
        )
        .unwrap();
    let agent = cluster.agent_mut().unwrap();
    agent
        .wait_for_log("broken.yaml", Duration::from_secs(5))
        .unwrap();
    agent
        .wait_for_log(
            "Service shop/bad-ip: invalid cluster IP",
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        agent.is_running(),
        "agent died on bad input:\n{}",
        agent.log()
    );

    assert_spread(
        &client.tcp_requests(http, 60, TIMEOUT).unwrap(),
        http,
        &web,
        10,
    );
    let web2 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 100, 11), 80);
    let replies = retry_until(Duration::from_secs(5), Duration::from_millis(100), || {
        client.tcp_request(web2, TIMEOUT)
    })
    .unwrap();
    assert_eq!(replies.text, "web-1");
    assert_spread(
        &client.tcp_requests(web2, 20, TIMEOUT).unwrap(),
        web2,
        &web[..1],
        20,
    );
}

/// 10,000 services, resynced unchanged while a client connects in a loop: nothing is
/// rewritten and no connection fails.
#[test]
fn resyncing_ten_thousand_unchanged_services_does_not_disturb_traffic() {
    let (mut cluster, client, web) = node_with_backends("resync", 2);
    let mut many = String::new();
    for i in 0..10_000u32 {
        let vip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8);
        many.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bulk}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: bulk, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [\"{}\"]}}]\nports: [{{port: 8080}}]\n",
            web[(i % 2) as usize].ip()
        ));
    }
    cluster.manifests.write("bulk.yaml", &many).unwrap();
    serve_web(&mut cluster, &web);
    let http = SocketAddrV4::new(VIP, 80);
    // One of the bulk services, to show they are programmed.
    let bulk = SocketAddrV4::new(Ipv4Addr::new(10, 97, 39, 250), 80);
    assert_eq!(client.tcp_request(bulk, TIMEOUT).unwrap().text, "web-2");

    // Rewrite every manifest with the same content: a full resync of an unchanged state.
    let outcome = tcp_loop_while(&client, http, TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(200));
        cluster.manifests.write("bulk.yaml", &many).unwrap();
        cluster
            .manifests
            .write("service.yaml", &service_yaml())
            .unwrap();
        let agent = cluster.agent_mut().unwrap();
        agent
            .wait_for_log("datapath unchanged services=10003", Duration::from_secs(30))
            .unwrap();
    });
    assert!(
        outcome.failures.is_empty(),
        "connections failed during the resync: {:?}",
        outcome.failures
    );
    assert!(outcome.ok > 10, "only {} connections", outcome.ok);
    let log = cluster.agent_mut().unwrap().log();
    assert_eq!(
        log.matches("datapath synced").count(),
        1,
        "the unchanged resync wrote to the maps:\n{log}"
    );
}
