//! `cargo xtask demo`: the networking guide's e-commerce platform on a Sluice node.
//!
//! A node made of network namespaces (nothing touches the machine's own network) runs the
//! platform's pods with the guide's IPs; `sluice agent` reads `examples/ecommerce/` and the demo
//! sends requests the way the guide's traffic flows (ingress -> frontend -> backend -> redis,
//! postgres through its headless service), printing which pod answered. Then it scales the
//! backend up, and the new pod starts receiving without a restart.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use sluice_testbed::{retry_until, sluice::SluiceNode, tally, Pod};

const TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(root: &Path) -> Result<()> {
    crate::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--quiet", "-p", "sluice"]),
    )?;
    // SluiceNode runs the binary next to this one (target/debug/sluice), built just above.
    let mut cluster = SluiceNode::new("demo")?;
    let pod = |cluster: &SluiceNode, name: &str, ip: [u8; 4], port: u16| -> Result<Pod> {
        let pod = cluster.node.add_pod(name, Ipv4Addr::from(ip))?;
        pod.serve_tcp(&[port])?;
        Ok(pod)
    };
    let ingress = cluster
        .node
        .add_pod("ingress-nginx", Ipv4Addr::new(10, 244, 0, 10))?;
    let frontend_1 = pod(&cluster, "frontend-1", [10, 244, 1, 5], 3000)?;
    pod(&cluster, "frontend-2", [10, 244, 1, 6], 3000)?;
    let postgres = pod(&cluster, "postgres-0", [10, 244, 1, 7], 5432)?;
    pod(&cluster, "redis-0", [10, 244, 1, 8], 6379)?;
    let backend_1 = pod(&cluster, "backend-1", [10, 244, 1, 10], 8080)?;
    pod(&cluster, "backend-2", [10, 244, 1, 15], 8080)?;

    let examples = root.join("examples/ecommerce");
    for file in ["services.yaml", "endpointslices.yaml"] {
        let text = std::fs::read_to_string(examples.join(file))
            .with_context(|| format!("reading {file}"))?;
        cluster.manifests.write(file, &text)?;
    }
    println!(
        "Starting sluice agent on node {} with {}",
        cluster.node.netns_name(),
        examples.display()
    );
    cluster.start_agent()?;

    println!();
    println!("{:<52} {:>8}  answered by", "request", "count");
    let show = |from: &Pod, what: &str, dst: SocketAddrV4, n: usize| -> Result<()> {
        let replies = from.tcp_requests(dst, n, TIMEOUT)?;
        let spread: Vec<String> = tally(&replies)
            .into_iter()
            .map(|(pod, count)| format!("{pod} x{count}"))
            .collect();
        let via = if replies.iter().flatten().all(|r| r.peer == dst) {
            ""
        } else {
            "  (some replies NOT from the service address!)"
        };
        println!(
            "{:<52} {n:>8}  {}{via}",
            format!("{} -> {what} {dst}", from.name()),
            spread.join(", ")
        );
        Ok(())
    };
    let svc = |ip: [u8; 4], port: u16| SocketAddrV4::new(Ipv4Addr::from(ip), port);
    show(&ingress, "frontend-service", svc([10, 96, 0, 2], 3000), 100)?;
    show(
        &frontend_1,
        "backend-service",
        svc([10, 96, 0, 1], 8080),
        100,
    )?;
    show(&backend_1, "redis-service", svc([10, 96, 0, 6], 6379), 20)?;
    show(&backend_1, "postgres-0 (headless)", postgres.addr(5432), 5)?;

    println!();
    println!("Scaling backend to 3 replicas: backend-3 (10.244.1.20) joins backend-service's EndpointSlice");
    pod(&cluster, "backend-3", [10, 244, 1, 20], 8080)?;
    let slices = std::fs::read_to_string(examples.join("endpointslices.yaml"))?;
    let scaled = slices.replacen(
        "  targetRef: {kind: Pod, name: backend-2, namespace: ecommerce}\n",
        "  targetRef: {kind: Pod, name: backend-2, namespace: ecommerce}\n\
         - addresses: [10.244.1.20]\n  conditions: {ready: true}\n  targetRef: {kind: Pod, name: backend-3, namespace: ecommerce}\n",
        1,
    );
    cluster.manifests.write("endpointslices.yaml", &scaled)?;
    let backend = svc([10, 96, 0, 1], 8080);
    retry_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let replies = frontend_1.tcp_requests(backend, 10, TIMEOUT)?;
        anyhow::ensure!(
            tally(&replies).contains_key("backend-3"),
            "backend-3 not reached yet"
        );
        Ok(())
    })?;
    show(&frontend_1, "backend-service", backend, 150)?;

    println!();
    println!("Agent log:");
    if let Some(agent) = cluster.agent_mut() {
        for line in agent.log().lines() {
            println!("  {line}");
        }
    }
    println!("\nDone: the namespaces, pinned maps and programs are removed.");
    Ok(())
}
