//! `sluice state` against a real agent: the real `sluice agent` in a network-namespace node
//! balances a client's TCP and UDP requests, then `sluice state` must show exactly the
//! programmed frontends and backends and the client's flows as the datapath recorded them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Output,
    time::Duration,
};

use serde_json::Value;
use sluice_testbed::{
    sluice::{sluice_bin, SluiceNode},
    Pod, Reply,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 20);
/// A service without endpoints.
const IDLE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 21);
const TIMEOUT: Duration = Duration::from_secs(2);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, last)
}

fn manifests(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
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
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: idle, namespace: shop}}
spec:
  clusterIP: {IDLE_VIP}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
"#
    )
}

/// Runs `sluice state <args>` in the node (it only reads bpffs; the netns does not matter, but
/// this is where an operator would run it).
fn state(cluster: &SluiceNode, args: &[&str]) -> Output {
    let bin = sluice_bin();
    let mut argv: Vec<&std::ffi::OsStr> = vec![bin.as_os_str(), "state".as_ref()];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    cluster.node.exec(&argv).expect("running sluice state")
}

fn stdout_of(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

fn state_json(cluster: &SluiceNode, pins: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--pin-path", pins.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let text = stdout_of(&state(cluster, &args), "sluice state --json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{field}` in {v}"))
}

/// The frontends in the JSON, by their `frontend` string.
fn frontends(json: &Value) -> BTreeMap<String, &Value> {
    json["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no services array in {json}"))
        .iter()
        .map(|s| (str_of(s, "frontend").to_string(), s))
        .collect()
}

fn backend_addrs(service: &Value) -> BTreeSet<String> {
    service["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends array in {service}"))
        .iter()
        .map(|b| str_of(b, "address").to_string())
        .collect()
}

#[test]
fn state_shows_services_backends_and_the_clients_flows() {
    let mut cluster = SluiceNode::new("state").unwrap();
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
    // Serves the same ports but is no endpoint: it must not be listed.
    let stranger = cluster.node.add_pod("stranger", ip(30)).unwrap();
    stranger.serve(&[8080, 5353]).unwrap();
    let web_ips: Vec<Ipv4Addr> = web.iter().map(Pod::ip).collect();
    cluster
        .manifests
        .write("web.yaml", &manifests(&web_ips))
        .unwrap();
    cluster.start_agent().unwrap();
    let pins = cluster.pins.path().to_owned();

    let http = SocketAddrV4::new(VIP, 80);
    let dns = SocketAddrV4::new(VIP, 53);
    let tcp: Vec<Reply> = client
        .tcp_requests(http, 8, TIMEOUT)
        .unwrap()
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let udp: Vec<Reply> = client
        .udp_requests(dns, 8, TIMEOUT)
        .unwrap()
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let pod_ip = |name: &str| {
        web.iter()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| panic!("answer from {name:?}, not a web pod"))
            .ip()
    };

    // --- services: exactly the programmed frontends, each with exactly its backends.
    let json = state_json(&cluster, &pins, &[]);
    let services = frontends(&json);
    let http_fe = format!("{VIP}:80/TCP");
    let dns_fe = format!("{VIP}:53/UDP");
    let idle_fe = format!("{IDLE_VIP}:80/TCP");
    assert_eq!(
        services.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([http_fe.clone(), dns_fe.clone(), idle_fe.clone()]),
        "frontends in {json:#}"
    );
    let expect_backends = |port: u16| -> BTreeSet<String> {
        web_ips
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, port).to_string())
            .collect()
    };
    assert_eq!(backend_addrs(services[&http_fe]), expect_backends(8080));
    assert_eq!(backend_addrs(services[&dns_fe]), expect_backends(5353));
    assert_eq!(services[&http_fe]["backend_count"], 2);
    assert_eq!(services[&http_fe]["protocol"], "TCP");
    assert_eq!(services[&dns_fe]["protocol"], "UDP");
    assert_eq!(services[&idle_fe]["backend_count"], 0);
    assert!(backend_addrs(services[&idle_fe]).is_empty());
    let id_of = |fe: &str| {
        services[fe]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no id for {fe}"))
    };
    assert_ne!(id_of(&http_fe), id_of(&dns_fe), "frontends share an id");

    // --- conntrack: every request of the client is a complete flow to the pod that answered.
    let flows = json["conntrack"]
        .as_array()
        .unwrap_or_else(|| panic!("no conntrack array in {json:#}"));
    for flow in flows {
        assert_eq!(
            str_of(flow, "client").parse::<SocketAddrV4>().unwrap().ip(),
            &client.ip(),
            "a flow from something other than the client: {flow}"
        );
    }
    // A client port reused for a later request holds the later flow only.
    let mut last_reply: BTreeMap<(&str, SocketAddrV4), (&Reply, SocketAddrV4, u16)> =
        BTreeMap::new();
    for r in &tcp {
        last_reply.insert(("TCP", r.local), (r, http, 8080));
    }
    for r in &udp {
        last_reply.insert(("UDP", r.local), (r, dns, 5353));
    }
    for ((proto, local), (reply, service, target_port)) in &last_reply {
        assert_eq!(reply.peer, *service, "reverse NAT broken: {reply:?}");
        let matching: Vec<&Value> = flows
            .iter()
            .filter(|f| {
                str_of(f, "protocol") == *proto
                    && str_of(f, "client") == local.to_string()
                    && str_of(f, "service") == service.to_string()
                    && f["forward"] == true
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{proto} flow of {local} -> {service} in {flows:#?}"
        );
        let flow = matching[0];
        let backend = SocketAddrV4::new(pod_ip(&reply.text), *target_port);
        assert_eq!(
            str_of(flow, "backend"),
            backend.to_string(),
            "{reply:?} was answered by another backend than conntrack says: {flow}"
        );
        assert_eq!(flow["reply"], true, "reply entry missing: {flow}");
        let fe = if *proto == "TCP" { &http_fe } else { &dns_fe };
        assert_eq!(flow["service_id"].as_u64(), Some(id_of(fe)), "{flow}");
        let age = flow["age_seconds"].as_u64().expect("age_seconds");
        assert!(age < 300, "age {age}s of a flow made seconds ago: {flow}");
    }

    // --- one table only.
    let only = state_json(&cluster, &pins, &["conntrack"]);
    assert!(only.get("services").is_none(), "{only:#}");
    assert!(!only["conntrack"].as_array().unwrap().is_empty());

    // --- the tables a person reads.
    let text = stdout_of(
        &state(&cluster, &["--pin-path", pins.to_str().unwrap()]),
        "sluice state",
    );
    for needle in [
        "FRONTEND",
        "SERVICE ID",
        "CLIENT",
        http_fe.as_str(),
        dns_fe.as_str(),
        idle_fe.as_str(),
        "(no backends)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    for port in [8080, 5353] {
        for backend in expect_backends(port) {
            assert!(text.contains(&backend), "{backend} missing from:\n{text}");
        }
    }
    assert!(
        !text.contains(&stranger.ip().to_string()),
        "a pod that is no endpoint is listed:\n{text}"
    );
    let tcp_reply = tcp.last().unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("{} ", tcp_reply.local)))
        .unwrap_or_else(|| panic!("no row for {}:\n{text}", tcp_reply.local));
    assert!(
        line.contains(&http.to_string())
            && line.contains(&format!("{}:8080", pod_ip(&tcp_reply.text)))
            && line.contains("forward+reply"),
        "row of {tcp_reply:?}: {line}"
    );

    // --- errors: no datapath at the path, bad arguments.
    let missing = pins.with_file_name(format!(
        "{}-missing",
        pins.file_name().unwrap().to_str().unwrap()
    ));
    let out = state(&cluster, &["--pin-path", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!(
            "no Sluice datapath pinned at {}: is the agent running?",
            missing.display()
        )),
        "unclear error: {stderr}"
    );
    assert!(out.stdout.is_empty());
    let out = state(&cluster, &["--pin-path", pins.to_str().unwrap(), "bogus"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // --- reading changed nothing, and the pins outlive the agent: state still works without it.
    let mut agent = cluster.take_agent().unwrap();
    let status = agent.terminate().unwrap();
    assert!(status.success(), "agent: {status:?}\n{}", agent.log());
    let after = state_json(&cluster, &pins, &[]);
    assert_eq!(after["services"], json["services"]);
    let flow_keys = |j: &Value| -> BTreeSet<(String, String, String)> {
        j["conntrack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    str_of(f, "protocol").to_string(),
                    str_of(f, "client").to_string(),
                    str_of(f, "backend").to_string(),
                )
            })
            .collect()
    };
    assert_eq!(flow_keys(&after), flow_keys(&json));
}
