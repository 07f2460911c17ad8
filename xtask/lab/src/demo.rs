//! `cargo xtask demo`: the networking guide's e-commerce platform on a two-node Sluice cluster.
//!
//! Two nodes and an outside client made of network namespaces (nothing touches the machine's
//! own network) run the platform's pods with the guide's IPs; one `sluice agent` per node
//! reads `examples/ecommerce/`, and the demo sends requests the way the guide's traffic flows
//! (ingress -> frontend -> backend -> redis, postgres through its headless service), then from
//! outside through the guide's NodePort and LoadBalancer examples and from node 1 itself (its
//! own sockets, balanced by the socket programs), printing which pod answered and which client
//! address it saw. Then it scales the backend up, and the new pod starts receiving without a
//! restart. Last, the platform's Pods and the guide's NetworkPolicies are added, and the demo
//! shows who can still reach whom.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use sluice_testbed::{
    cgroup::{ProbeMode, Probed, TestCgroup},
    client::{ReplyAny, RequestError},
    retry_until,
    sluice::{sluice_bin, SluiceCluster},
    tally, Pod,
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// The guide's `frontend-lb` gets this address from the (pretend) cloud load balancer.
const FRONTEND_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

/// A platform pod: name, node, the guide's IP, and the port it serves.
const PODS: &[(&str, usize, [u8; 4], u16)] = &[
    ("frontend-1", 1, [10, 244, 1, 5], 3000),
    ("postgres-0", 1, [10, 244, 1, 7], 5432),
    ("backend-1", 1, [10, 244, 1, 10], 8080),
    ("frontend-2", 2, [10, 244, 2, 6], 3000),
    ("redis-0", 2, [10, 244, 2, 8], 6379),
    ("backend-2", 2, [10, 244, 2, 15], 8080),
];

pub fn run(root: &Path) -> Result<()> {
    xtask::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "sluice",
        "-p",
        "sluice-testbed",
        "--bin",
        "sluice",
        "--bin",
        "sluice-probe",
    ]))?;
    // SluiceCluster runs the binary next to this one (target/debug/sluice), built just above.
    let mut cluster = SluiceCluster::new("demo", 2)?;
    let ingress = cluster
        .node(1)
        .add_pod("ingress-nginx", Ipv4Addr::new(10, 244, 1, 100))?;
    let mut pods = BTreeMap::new();
    for &(name, node, ip, port) in PODS {
        let pod = cluster.node(node).add_pod(name, Ipv4Addr::from(ip))?;
        pod.serve_tcp(&[port])?;
        pods.insert(name, pod);
    }

    let examples = root.join("examples/ecommerce");
    for file in ["services.yaml", "endpointslices.yaml"] {
        let text = std::fs::read_to_string(examples.join(file))
            .with_context(|| format!("reading {file}"))?;
        cluster.manifests.write(file, &text)?;
    }
    println!(
        "Two nodes, one sluice agent each, reading {}",
        examples.display()
    );
    for node in cluster.cluster.nodes() {
        let names: Vec<&str> = PODS
            .iter()
            .filter(|p| {
                Some(p.1)
                    == node
                        .name()
                        .strip_prefix("node-")
                        .and_then(|n| n.parse().ok())
            })
            .map(|p| p.0)
            .collect();
        println!(
            "  {} ({}, pods {}): {}",
            node.name(),
            node.node_ip().map(|ip| ip.to_string()).unwrap_or_default(),
            node.pod_cidr(),
            names.join(", ")
        );
    }
    // Node 1's agent also balances the node's own sockets (a test cgroup stands for the host's
    // root cgroup); node 2's does not.
    let host_cgroup = TestCgroup::new()?;
    let cgroup_arg = host_cgroup.path().to_string_lossy().into_owned();
    cluster.start_agent(1, &["--cgroup-root", &cgroup_arg])?;
    cluster.start_agent(2, &[])?;

    println!();
    println!("{:<58} {:>5}  answered by", "request", "count");
    let svc =
        |ip: [u8; 4], port: u16| SocketAddr::from(SocketAddrV4::new(Ipv4Addr::from(ip), port));
    let pod = |name: &str| &pods[name];
    show(&ingress, "frontend-service", svc([10, 96, 0, 2], 3000), 100)?;
    show(
        pod("frontend-1"),
        "backend-service",
        svc([10, 96, 0, 1], 8080),
        100,
    )?;
    show(
        pod("backend-2"),
        "redis-service",
        svc([10, 96, 0, 6], 6379),
        20,
    )?;
    show(
        pod("backend-2"),
        "postgres-0 (headless)",
        SocketAddr::from(pod("postgres-0").addr(5432)),
        5,
    )?;

    println!();
    println!(
        "From outside the cluster ({}):",
        cluster.cluster.external().ip()
    );
    let ext = cluster.cluster.external();
    let node_1 = cluster.node(1).node_ip().context("node 1 has an IP")?;
    let node_2 = cluster.node(2).node_ip().context("node 2 has an IP")?;
    ext.add_route(&format!("{FRONTEND_LB_IP}/32"), node_1)?;
    for (what, dst) in [
        (
            "backend-nodeport on node-1",
            SocketAddr::from((node_1, 30080)),
        ),
        (
            "backend-nodeport on node-2",
            SocketAddr::from((node_2, 30080)),
        ),
        ("frontend-lb", SocketAddr::from((FRONTEND_LB_IP, 80))),
    ] {
        for p in pods.values() {
            p.clear_seen();
        }
        let replies = ext.tcp_requests_any(dst, 60, TIMEOUT)?;
        print_row(&format!("ext -> {what} {dst}"), dst, &replies);
        let mut seen: Vec<String> = pods
            .iter()
            .filter_map(|(name, p)| {
                let sources: std::collections::BTreeSet<IpAddr> =
                    p.seen().iter().map(|s| s.source.ip()).collect();
                (!sources.is_empty()).then(|| {
                    let list: Vec<String> = sources.iter().map(ToString::to_string).collect();
                    format!("{name} saw {}", list.join(", "))
                })
            })
            .collect();
        seen.sort();
        println!("{:<58}        {}", "", seen.join("; "));
    }
    println!("  (externalTrafficPolicy: Cluster keeps the client address for a backend on the");
    println!("   node the request arrived at, and masquerades to that node's IP for the other)");

    println!();
    println!(
        "From node-1 itself (a host-network process such as the kubelet, balanced at connect()):"
    );
    let probe = sluice_bin().with_file_name("sluice-probe");
    let backend_service = svc([10, 96, 0, 1], 8080);
    let probed = host_cgroup.probe(
        &probe,
        cluster.node(1).netns_path(),
        ProbeMode::Tcp,
        backend_service,
        60,
        TIMEOUT,
    )?;
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong_peer = false;
    for p in &probed {
        match p {
            Probed::Ok { peer, text } => {
                wrong_peer |= *peer != backend_service;
                *spread.entry(text.clone()).or_default() += 1;
            }
            Probed::Err { message, .. } => {
                *spread.entry(format!("error: {message}")).or_default() += 1
            }
        }
    }
    let spread: Vec<String> = spread.iter().map(|(p, n)| format!("{p} x{n}")).collect();
    println!(
        "{:<58} {:>5}  {}{}",
        format!("node-1 -> backend-service {backend_service}"),
        probed.len(),
        spread.join(", "),
        if wrong_peer {
            "  (getpeername() NOT the service address!)"
        } else {
            ""
        }
    );

    println!();
    println!(
        "Scaling backend to 3 replicas: backend-3 (10.244.2.20, node-2) joins backend-service"
    );
    let backend_3 = cluster
        .node(2)
        .add_pod("backend-3", Ipv4Addr::new(10, 244, 2, 20))?;
    backend_3.serve_tcp(&[8080])?;
    let slices = std::fs::read_to_string(examples.join("endpointslices.yaml"))?;
    let scaled = slices.replacen(
        "  targetRef: {kind: Pod, name: backend-2, namespace: ecommerce}\n",
        "  targetRef: {kind: Pod, name: backend-2, namespace: ecommerce}\n\
         - addresses: [10.244.2.20]\n  conditions: {ready: true}\n  nodeName: node-2\n  \
         targetRef: {kind: Pod, name: backend-3, namespace: ecommerce}\n",
        1,
    );
    cluster.manifests.write("endpointslices.yaml", &scaled)?;
    let backend = svc([10, 96, 0, 1], 8080);
    retry_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let replies = pod("frontend-1").tcp_requests_any(backend, 10, TIMEOUT)?;
        anyhow::ensure!(
            tally(&replies).contains_key("backend-3"),
            "backend-3 not reached yet"
        );
        Ok(())
    })?;
    show(pod("frontend-1"), "backend-service", backend, 150)?;

    policies(&cluster, &examples, &ingress, &pods)?;

    println!();
    println!("Agent log of node-1 (info):");
    if let Some(agent) = cluster.agent_mut(1) {
        for line in agent.log().lines().filter(|l| l.contains(" INFO ")) {
            println!("  {line}");
        }
    }
    println!("\nDone: the namespaces, pinned maps and programs are removed.");
    Ok(())
}

/// The guide's NetworkPolicies (default-deny-all, frontend-policy, backend-policy) with the
/// platform's Pods: each of the guide's flows, reached or denied as those policies decide.
fn policies(
    cluster: &SluiceCluster,
    examples: &Path,
    ingress: &Pod,
    pods: &BTreeMap<&str, Pod>,
) -> Result<()> {
    for file in ["pods.yaml", "network-policies.yaml"] {
        let mut text = std::fs::read_to_string(examples.join(file))
            .with_context(|| format!("reading {file}"))?;
        if file == "pods.yaml" {
            // The backend replica added above is a backend pod too.
            text.push_str(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {name: backend-3, namespace: \
                 ecommerce, labels: {app: backend}}\nspec: {nodeName: node-2, containers: \
                 [{name: backend, ports: [{name: http, containerPort: 8080}]}]}\n\
                 status: {podIP: 10.244.2.20}\n",
            );
        }
        cluster.manifests.write(file, &text)?;
    }
    // The ingress controller's pod, in its own namespace.
    cluster.manifests.write(
        "ingress-nginx.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ingress-nginx}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: ingress-nginx, namespace: ingress-nginx, \
         labels: {app: ingress}}\nspec: {nodeName: node-1, containers: [{name: nginx}]}\n\
         status: {podIP: 10.244.1.100}\n",
    )?;
    println!();
    println!("Adding the platform's Pods and the guide's NetworkPolicies (default-deny-all,");
    println!("frontend-policy, backend-policy); no restart:");
    let svc =
        |ip: [u8; 4], port: u16| SocketAddr::from(SocketAddrV4::new(Ipv4Addr::from(ip), port));
    let pod = |name: &str| &pods[name];
    let flows: [(&Pod, &str, SocketAddr, bool, &str); 7] = [
        (
            ingress,
            "frontend-service",
            svc([10, 96, 0, 2], 3000),
            true,
            "frontend-policy: anyone in the cluster on 3000",
        ),
        (
            pod("frontend-1"),
            "backend-service",
            svc([10, 96, 0, 1], 8080),
            true,
            "frontend-policy egress + backend-policy ingress",
        ),
        (
            ingress,
            "backend-service",
            svc([10, 96, 0, 1], 8080),
            false,
            "backend-policy admits only the frontend",
        ),
        (
            pod("frontend-2"),
            "postgres-0",
            SocketAddr::from(pod("postgres-0").addr(5432)),
            false,
            "the frontend may reach only the backend and DNS",
        ),
        (
            pod("backend-2"),
            "redis-service",
            svc([10, 96, 0, 6], 6379),
            false,
            "default-deny-all: no policy admits the backend into redis",
        ),
        (
            pod("backend-1"),
            "postgres-0",
            SocketAddr::from(pod("postgres-0").addr(5432)),
            false,
            "default-deny-all: no policy admits the backend into postgres",
        ),
        (
            pod("frontend-1"),
            "frontend-service",
            svc([10, 96, 0, 2], 3000),
            false,
            "frontend-policy egress: only the backend and DNS",
        ),
    ];
    // The first denied flow tells when the agents applied the policies.
    let (from, _, dst, _, _) = flows[4];
    retry_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match from.tcp_request_any(dst, Duration::from_millis(500)) {
            Err(RequestError::Timeout) => Ok(()),
            other => anyhow::bail!("not applied yet: {other:?}"),
        },
    )?;
    let mut unexpected = Vec::new();
    for (from, what, dst, expected, why) in flows {
        let reached = from
            .tcp_request_any(dst, Duration::from_millis(700))
            .is_ok();
        if reached != expected {
            unexpected.push(format!("{} -> {what}", from.name()));
        }
        println!(
            "  {:<48} {:<9} {why}{}",
            format!("{} -> {what} {dst}", from.name()),
            if reached { "reached" } else { "DENIED" },
            if reached == expected {
                ""
            } else {
                "  (NOT what the seed's policies say!)"
            }
        );
    }
    println!("  (the guide's backend -> postgres/redis flows need policies admitting the backend,");
    println!("   which the seed platform does not define; `sluice trace` and `sluice monitor`");
    println!("   name the policies behind each drop)");
    anyhow::ensure!(
        unexpected.is_empty(),
        "flows that do not behave as the seed's policies say: {}",
        unexpected.join(", ")
    );
    Ok(())
}

fn show(from: &Pod, what: &str, dst: SocketAddr, n: usize) -> Result<()> {
    let replies = from.tcp_requests_any(dst, n, TIMEOUT)?;
    print_row(&format!("{} -> {what} {dst}", from.name()), dst, &replies);
    Ok(())
}

fn print_row(request: &str, dst: SocketAddr, replies: &[Result<ReplyAny, RequestError>]) {
    let spread: Vec<String> = tally(replies)
        .into_iter()
        .map(|(pod, count)| format!("{pod} x{count}"))
        .collect();
    let via = if replies.iter().flatten().all(|r| r.peer == dst) {
        ""
    } else {
        "  (some replies NOT from the service address!)"
    };
    println!(
        "{request:<58} {:>5}  {}{via}",
        replies.len(),
        spread.join(", ")
    );
}
