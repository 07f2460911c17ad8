//! `sluice agent` against the Kubernetes API (a test API server speaking the real list/watch
//! protocol, listening inside each node netns), with real traffic: the agent programs nothing
//! before every initial list is in, sees an EndpointSlice change at once (no periodic resync:
//! the agents run with a one-hour `--resync-interval`), keeps the datapath through API
//! disconnects and restarts and catches up afterwards, relists on 410 Gone (both forms),
//! stops translating a deleted Service, keeps the pinned datapath when an agent restarts
//! while the API is down, and takes kube-proxy's configuration file.
//!
//! Layout of every test: a two-node cluster, a client pod on node 1 (whose agent is the one
//! that matters: DNAT and reverse NAT happen at the client's veth), `web` backends on node 2.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use sluice_testbed::{
    apiserver::{Gone, BOOKMARK_INTERVAL},
    retry_until,
    sluice::SluiceCluster,
    tally, Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 10);
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// Far longer than any test: a change the agent picks up came through the watch, not a resync.
const NO_RESYNC: &[&str] = &["--resync-interval", "3600"];
/// How soon an EndpointSlice change must reach the datapath.
const PROPAGATION: Duration = Duration::from_secs(3);

struct Setup {
    cluster: SluiceCluster,
    client: Pod,
    web_a: Pod,
    web_b: Pod,
}

fn setup(hint: &str) -> Setup {
    let cluster = SluiceCluster::with_api_server(hint, 2).unwrap();
    let client = cluster
        .node(1)
        .add_pod("client", cluster.node(1).pod_ip(10))
        .unwrap();
    let web = |name: &str, n: u8| {
        let pod = cluster
            .node(2)
            .add_pod(name, cluster.node(2).pod_ip(n))
            .unwrap();
        pod.serve(&[8080]).unwrap();
        pod
    };
    let (web_a, web_b) = (web("web-a", 21), web("web-b", 22));
    Setup {
        cluster,
        client,
        web_a,
        web_b,
    }
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.60.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// The `web` EndpointSlice with `pods` (ready, on node 2).
fn slice(pods: &[&Pod]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|pod| {
            format!(
                "- {{addresses: [\"{}\"], nodeName: node-2, conditions: {{ready: true}}}}\n",
                pod.ip()
            )
        })
        .collect();
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{name: http, port: 8080, protocol: TCP}}]
"#
    )
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// The pods that answered `n` requests to the VIP; every request must have been answered.
fn answered_by(client: &Pod, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let replies = client.tcp_requests_any(vip(), n, TIMEOUT)?;
    let counts = tally(&replies);
    if let Some(Err(e)) = replies.iter().find(|r| r.is_err()) {
        anyhow::bail!("a request to {} failed: {e}; tally {counts:?}", vip());
    }
    Ok(counts.into_keys().collect())
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_string()).collect()
}

/// Waits until `n` requests in a row are answered by exactly `pods`; returns how long it took.
fn wait_answered_by(client: &Pod, pods: &[&Pod], timeout: Duration) -> Duration {
    let start = Instant::now();
    let expected = names(pods);
    retry_until(timeout, Duration::from_millis(20), || {
        let seen = answered_by(client, 20)?;
        anyhow::ensure!(
            seen == expected,
            "answered by {seen:?}, expected {expected:?}"
        );
        Ok(())
    })
    .unwrap();
    start.elapsed()
}

/// Asserts that for `duration` every request is answered, only by `pods`, and by each of them
/// over the whole time.
fn assert_stays_answered_by(client: &Pod, pods: &[&Pod], duration: Duration) {
    let expected = names(pods);
    let start = Instant::now();
    let mut all = BTreeSet::new();
    while start.elapsed() < duration {
        let seen = answered_by(client, 10).unwrap();
        assert!(
            seen.is_subset(&expected),
            "answered by {seen:?}, expected {expected:?}"
        );
        all.extend(seen);
    }
    assert_eq!(all, expected);
}

#[test]
fn nothing_is_programmed_before_every_initial_list_and_then_the_api_objects_serve() {
    let mut s = setup("api-initial-sync");
    s.cluster.api().apply(SERVICE).unwrap();
    s.cluster
        .api()
        .apply(&slice(&[&s.web_a, &s.web_b]))
        .unwrap();
    // EndpointSlices are forbidden (as with an incomplete ClusterRole): Services, Nodes and
    // the rest list fine, but a Service without its endpoints must not be programmed.
    s.cluster.api().forbid(SLICES);

    s.cluster.spawn_agent(1, NO_RESYNC).unwrap();
    api_wait(&s.cluster, "a refused EndpointSlice list", |r| {
        r.iter().any(|r| r.path == SLICES && r.status == 403)
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = s.cluster.agent_mut(1).unwrap().log();
    assert!(
        s.cluster.agent_mut(1).unwrap().is_running(),
        "the agent must wait, not exit: {log}"
    );
    for premature in [
        "sluice agent ready",
        "datapath synced",
        "node configuration programmed",
    ] {
        assert!(
            !log.contains(premature),
            "{premature:?} before the lists were synced:\n{log}"
        );
    }
    assert!(
        log.contains("endpointslices"),
        "the failing list is not reported:\n{log}"
    );
    // Nothing answers the VIP (it is not programmed, and no route leads anywhere).
    assert!(s.client.tcp_request_any(vip(), TIMEOUT).is_err());

    s.cluster.api().allow(SLICES);
    let agent = s.cluster.agent_mut(1).unwrap();
    agent
        .wait_for_log("sluice agent ready", Duration::from_secs(40))
        .unwrap();
    let log = agent.log();
    assert!(
        log.contains("initial lists synced from the API server"),
        "{log}"
    );
    // The objects created through the API serve.
    assert_eq!(
        answered_by(&s.client, 60).unwrap(),
        names(&[&s.web_a, &s.web_b])
    );
}

fn api_wait(
    cluster: &SluiceCluster,
    what: &str,
    predicate: impl Fn(&[sluice_testbed::apiserver::RequestRecord]) -> bool,
) {
    cluster
        .api()
        .wait_for_requests(Duration::from_secs(30), what, predicate)
        .unwrap();
}

/// A cluster with `web` served by both pods and the agent on node 1 running and ready.
fn serving(hint: &str) -> Setup {
    let mut s = setup(hint);
    s.cluster.api().apply(SERVICE).unwrap();
    s.cluster
        .api()
        .apply(&slice(&[&s.web_a, &s.web_b]))
        .unwrap();
    s.cluster.start_agent(1, NO_RESYNC).unwrap();
    assert_eq!(
        answered_by(&s.client, 60).unwrap(),
        names(&[&s.web_a, &s.web_b])
    );
    s
}

#[test]
fn an_endpoint_slice_change_reaches_the_datapath_at_once_and_a_deleted_service_stops() {
    let mut s = serving("api-watch");
    let lists_before = s.cluster.api().lists_of(SLICES);

    s.cluster.api().apply(&slice(&[&s.web_b])).unwrap();
    let took = wait_answered_by(&s.client, &[&s.web_b], PROPAGATION);
    eprintln!("EndpointSlice change reached the datapath in {took:?}");
    s.cluster.api().apply(&slice(&[&s.web_a])).unwrap();
    wait_answered_by(&s.client, &[&s.web_a], PROPAGATION);
    // Through the watch: no relist happened.
    assert_eq!(s.cluster.api().lists_of(SLICES), lists_before);
    // Quiet watches get bookmarks; they move the agent's resourceVersion and nothing else.
    let bookmarks = s.cluster.api().bookmarks_sent();
    std::thread::sleep(BOOKMARK_INTERVAL * 2);
    assert!(s.cluster.api().bookmarks_sent() > bookmarks);
    s.cluster
        .api()
        .apply(&slice(&[&s.web_a, &s.web_b]))
        .unwrap();
    wait_answered_by(&s.client, &[&s.web_a, &s.web_b], PROPAGATION);
    let log = s.cluster.agent_mut(1).unwrap().log();
    assert!(
        !log.contains(" WARN "),
        "warnings with a healthy API server:\n{log}"
    );

    s.cluster
        .api()
        .delete("v1", "Service", "shop", "web")
        .unwrap();
    retry_until(PROPAGATION, Duration::from_millis(50), || {
        match s.client.tcp_request_any(vip(), Duration::from_millis(500)) {
            Ok(reply) => anyhow::bail!("the deleted Service still answers: {reply:?}"),
            Err(_) => Ok(()),
        }
    })
    .unwrap();
    let log = s.cluster.agent_mut(1).unwrap().log();
    assert!(log.contains("removed=1"), "{log}");
}

#[test]
fn a_dropped_connection_resumes_the_watch_and_a_restarted_api_server_is_caught_up() {
    let mut s = serving("api-restart");
    let lists_before = s.cluster.api().lists_of(SLICES);

    // Connections cut: the watch resumes from its resourceVersion, no relist needed.
    s.cluster.api().drop_connections();
    s.cluster.api().apply(&slice(&[&s.web_b])).unwrap();
    wait_answered_by(&s.client, &[&s.web_b], Duration::from_secs(10));
    assert_eq!(s.cluster.api().lists_of(SLICES), lists_before);

    // The API server goes away: the datapath stays as it was programmed.
    s.cluster.api.as_mut().unwrap().stop();
    assert_stays_answered_by(&s.client, &[&s.web_b], Duration::from_secs(3));
    // A change made while it is down (it persists, like etcd) is not seen yet...
    s.cluster
        .api()
        .apply(&slice(&[&s.web_a, &s.web_b]))
        .unwrap();
    assert_stays_answered_by(&s.client, &[&s.web_b], Duration::from_secs(1));
    assert!(s.cluster.agent_mut(1).unwrap().is_running());
    // ...and arrives once it is back (after the watchers' backoff).
    s.cluster.api.as_mut().unwrap().start().unwrap();
    wait_answered_by(&s.client, &[&s.web_a, &s.web_b], Duration::from_secs(40));
}

fn gone_relists(hint: &str, gone: Gone) {
    let s = serving(hint);
    let lists_before = s.cluster.api().lists_of(SLICES);

    // The watches stop delivering: a change made now is only seen by a relist.
    s.cluster.api().freeze_watches();
    s.cluster.api().apply(&slice(&[&s.web_b])).unwrap();
    assert_stays_answered_by(&s.client, &[&s.web_a, &s.web_b], Duration::from_secs(1));

    s.cluster.api().expire(gone);
    wait_answered_by(&s.client, &[&s.web_b], Duration::from_secs(20));
    assert!(
        s.cluster.api().lists_of(SLICES) > lists_before,
        "no relist of EndpointSlices: {:#?}",
        s.cluster.api().requests()
    );
    if gone == Gone::Http {
        assert!(
            s.cluster
                .api()
                .requests()
                .iter()
                .any(|r| r.path == SLICES && r.watch && r.status == 410),
            "the re-watch was never answered 410"
        );
    }
    // And the watch works again after the relist.
    s.cluster.api().apply(&slice(&[&s.web_a])).unwrap();
    wait_answered_by(&s.client, &[&s.web_a], PROPAGATION);
}

#[test]
fn gone_as_a_watch_event_relists_and_picks_up_changes_made_meanwhile() {
    gone_relists("api-gone-event", Gone::Event);
}

#[test]
fn gone_as_http_410_relists_and_picks_up_changes_made_meanwhile() {
    gone_relists("api-gone-http", Gone::Http);
}

/// An HTTP/1.0 GET from `pod`; the status code.
fn http_status(pod: &Pod, addr: SocketAddrV4, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read as _, Write as _};
    let path = path.to_string();
    pod.run(move || -> anyhow::Result<u16> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: node\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split(' ').nth(1).unwrap_or_default();
        status
            .parse()
            .map_err(|_| anyhow::anyhow!("no status in {response:?}"))
    })?
}

#[test]
fn a_kube_proxy_configuration_file_configures_the_agent() {
    let mut s = setup("api-config");
    s.cluster.api().apply(SERVICE).unwrap();
    s.cluster
        .api()
        .apply(&slice(&[&s.web_a, &s.web_b]))
        .unwrap();
    s.cluster
        .manifests
        .write(
            "kube-proxy.conf",
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             healthzBindAddress: 0.0.0.0:10299\n\
             metricsBindAddress: 127.0.0.1:10249\n\
             mode: iptables\n\
             iptables: {masqueradeAll: true, syncPeriod: 30s}\n\
             conntrack: {udpTimeout: 45s}\n",
        )
        .unwrap();
    let config = s.cluster.manifests.path().join("kube-proxy.conf");
    let mut args = NO_RESYNC.to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    s.cluster.start_agent(1, &args).unwrap();

    // masqueradeAll: the backends see node 1, not the client pod.
    assert_eq!(
        answered_by(&s.client, 40).unwrap(),
        names(&[&s.web_a, &s.web_b])
    );
    let node_1 = s.cluster.node(1).node_ip().unwrap();
    for pod in [&s.web_a, &s.web_b] {
        let sources: BTreeSet<_> = pod.seen().iter().map(|seen| seen.source.ip()).collect();
        assert_eq!(sources, BTreeSet::from([std::net::IpAddr::V4(node_1)]));
    }
    // healthzBindAddress moved /healthz to 10299.
    assert_eq!(
        http_status(&s.client, SocketAddrV4::new(node_1, 10299), "/healthz").unwrap(),
        200
    );
    assert!(http_status(&s.client, SocketAddrV4::new(node_1, 10256), "/healthz").is_err());
    // What does not apply was said.
    let log = s.cluster.agent_mut(1).unwrap().log();
    for warning in [
        "metricsBindAddress \"127.0.0.1:10249\": Sluice serves no metrics endpoint yet",
        "mode \"iptables\"",
        "iptables.syncPeriod: applies to the iptables proxy mode only",
    ] {
        assert!(log.contains(warning), "no warning {warning:?} in:\n{log}");
    }
    // conntrack.udpTimeout reached the datapath's configuration.
    assert!(
        log.contains("udp_ms: 45000"),
        "udpTimeout not applied:\n{log}"
    );
}

/// A raw HTTP client connection to the test API server, opened inside `node`'s netns.
struct RawWatch {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl RawWatch {
    /// Sends `GET target` and reads the status line and headers; returns the status code.
    fn get(node: &sluice_testbed::Node, port: u16, target: &str) -> (u16, RawWatch) {
        use std::io::{BufRead as _, Write as _};
        let mut stream = sluice_testbed::in_netns(node.netns_path(), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
        })
        .unwrap()
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        write!(stream, "GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            if header.trim().is_empty() {
                break;
            }
        }
        (status, RawWatch { reader })
    }

    /// The next chunk as JSON; `None` on a timeout, the end of the stream or a closed
    /// connection.
    fn next(&mut self) -> Option<serde_json::Value> {
        use std::io::{BufRead as _, Read as _};
        let mut size = String::new();
        self.reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return None;
        }
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).ok()?;
        serde_json::from_slice(&chunk[..size]).ok()
    }

    /// The rest of a Content-Length body as JSON.
    fn body(&mut self) -> serde_json::Value {
        serde_json::Deserializer::from_reader(&mut self.reader)
            .into_iter::<serde_json::Value>()
            .next()
            .unwrap()
            .unwrap()
    }
}

#[test]
fn the_test_api_server_speaks_list_and_watch() {
    use sluice_testbed::apiserver::ApiServer;
    let node = sluice_testbed::Node::new("api-proto").unwrap();
    let mut api = ApiServer::new();
    let port = api.listen_in(node.netns_path()).unwrap();
    api.apply(SERVICE).unwrap();

    // A list: the store's version, items without apiVersion and kind.
    let (status, mut list) = RawWatch::get(&node, port, "/api/v1/services?limit=500");
    assert_eq!(status, 200);
    let list = list.body();
    assert_eq!(list["kind"], "ServiceList");
    let version = api.resource_version();
    assert_eq!(list["metadata"]["resourceVersion"], version.to_string());
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    assert!(list["items"][0].get("kind").is_none());

    // A watch from the list's version gets every later change, in order, and no bookmark
    // unless asked for.
    let target = format!("/api/v1/services?watch=true&resourceVersion={version}");
    let (status, mut watch) = RawWatch::get(&node, port, &target);
    assert_eq!(status, 200);
    api.apply(&SERVICE.replace("10.96.60.10", "10.96.60.11"))
        .unwrap();
    api.delete("v1", "Service", "shop", "web").unwrap();
    api.apply(SERVICE).unwrap();
    let mut versions = Vec::new();
    for expected in ["MODIFIED", "DELETED", "ADDED"] {
        let event = watch.next().expect("an event");
        assert_eq!(event["type"], expected, "{event}");
        assert_eq!(event["object"]["kind"], "Service");
        versions.push(
            event["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(*versions.last().unwrap(), api.resource_version());
    assert!(watch.next().is_none(), "a bookmark nobody asked for");

    // With allowWatchBookmarks, a quiet watch gets the current version.
    let current = api.resource_version();
    let target =
        format!("/api/v1/services?watch=true&resourceVersion={current}&allowWatchBookmarks=true");
    let (_, mut bookmarked) = RawWatch::get(&node, port, &target);
    let bookmark = bookmarked.next().expect("a bookmark");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        current.to_string()
    );

    // Gone: an ERROR event with a 410 Status on the open watch, then HTTP 410 for the old
    // version.
    api.expire(Gone::Event);
    let error = bookmarked.next().expect("an ERROR event");
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["code"], 410);
    let target = format!("/api/v1/services?watch=true&resourceVersion={version}");
    let (status, mut refused) = RawWatch::get(&node, port, &target);
    assert_eq!(status, 410);
    assert_eq!(refused.body()["code"], 410);

    // Dropped connections end open watches.
    let (_, mut open) = RawWatch::get(
        &node,
        port,
        &format!("/api/v1/services?watch=true&resourceVersion={current}"),
    );
    api.drop_connections();
    assert!(open.next().is_none());
    // Unknown paths are 404.
    assert_eq!(RawWatch::get(&node, port, "/api/v1/secrets").0, 404);
    // Stopped, the port refuses connections; started again, it serves the same store.
    api.stop();
    let refused = sluice_testbed::in_netns(node.netns_path(), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
    })
    .unwrap();
    assert!(refused.is_err());
    api.start().unwrap();
    let (status, mut list) = RawWatch::get(&node, port, "/api/v1/services");
    assert_eq!(status, 200);
    assert_eq!(list.body()["items"][0]["metadata"]["name"], "web");
}

#[test]
fn an_agent_restarted_while_the_api_server_is_down_keeps_the_pinned_datapath() {
    let mut s = serving("api-agent-restart");
    s.cluster.api.as_mut().unwrap().stop();
    // A new agent (a DaemonSet rollout) cannot list: it programs nothing, and what the old one
    // pinned keeps serving.
    s.cluster.spawn_agent(1, NO_RESYNC).unwrap();
    assert_stays_answered_by(&s.client, &[&s.web_a, &s.web_b], Duration::from_secs(3));
    let log = s.cluster.agent_mut(1).unwrap().log();
    for premature in ["sluice agent ready", "datapath synced"] {
        assert!(
            !log.contains(premature),
            "{premature:?} without the API:\n{log}"
        );
    }
    // Back: it syncs, finds the maps already right, and follows changes again.
    s.cluster.api().apply(&slice(&[&s.web_b])).unwrap();
    s.cluster.api.as_mut().unwrap().start().unwrap();
    s.cluster
        .agent_mut(1)
        .unwrap()
        .wait_for_log("sluice agent ready", Duration::from_secs(40))
        .unwrap();
    wait_answered_by(&s.client, &[&s.web_b], PROPAGATION);
}
