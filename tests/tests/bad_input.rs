//! Bad input against a running agent (manifests source, netns node; issue #14): each kind is
//! named in the log with its file and object, and never touches what it does not name.
//!
//! * A second file defining a Service never takes it over: the definition in effect keeps
//!   answering, the duplicate is named with both files; when the first file goes, the other
//!   definition is used.
//! * A NetworkPolicy the API server would refuse is rejected whole and isolates nothing.
//! * An object's problem names its file; a removed file is logged with its objects.
//! * A pathological YAML file (megabytes of `[`) is refused at once: new Services in other
//!   files are programmed meanwhile, /healthz stays 200, SIGTERM is prompt.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use sluice_testbed::{objects::cluster_ip_service, retry_until, sluice::SluiceNode, Pod};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 80, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

/// A node with a client pod and two web pods serving 8080 behind `shop/web` on [`VIP`].
fn node_with_web(hint: &str) -> (SluiceNode, Pod, Vec<Pod>) {
    SluiceNode::with_web(hint, VIP, 2).unwrap()
}

/// How many of `n` requests from `client` to `vip:80` are answered.
fn answered(client: &Pod, vip: Ipv4Addr, n: usize) -> usize {
    client
        .tcp_requests(SocketAddrV4::new(vip, 80), n, TIMEOUT)
        .unwrap()
        .iter()
        .filter(|r| r.is_ok())
        .count()
}

/// Writes `file` with a Service `shop/name` on `vip:80` over the `web` pods, and waits until
/// it answers.
fn add_service(cluster: &SluiceNode, client: &Pod, web: &[Pod], file: &str, vip: Ipv4Addr) {
    let name = file.trim_end_matches(".yaml");
    let ips: Vec<Ipv4Addr> = web.iter().map(Pod::ip).collect();
    cluster
        .manifests
        .write(file, &cluster_ip_service("shop", name, vip, 80, 8080, &ips))
        .unwrap();
    retry_until(Duration::from_secs(5), Duration::from_millis(100), || {
        anyhow::ensure!(answered(client, vip, 1) == 1, "shop/{name} not programmed");
        Ok(())
    })
    .unwrap();
}

fn wait_for_log(cluster: &mut SluiceNode, needle: &str) {
    cluster
        .agent_mut()
        .unwrap()
        .wait_for_log(needle, Duration::from_secs(10))
        .unwrap();
}

#[test]
fn duplicates_refused_policies_and_bad_objects_touch_nothing_else() {
    let (mut cluster, client, web) = node_with_web("badin");
    cluster.start_agent().unwrap();
    assert_eq!(answered(&client, VIP, 10), 10);
    let web_ips: Vec<Ipv4Addr> = web.iter().map(Pod::ip).collect();

    // 1. The same Service in two more files, sorting after and before web.yaml, with other
    // cluster IPs: ignored, each named with the file in effect.
    let dup = |vip: Ipv4Addr| cluster_ip_service("shop", "web", vip, 80, 8080, &web_ips);
    let late = Ipv4Addr::new(10, 96, 80, 66);
    let early = Ipv4Addr::new(10, 96, 80, 77);
    cluster.manifests.write("zz-dup.yaml", &dup(late)).unwrap();
    cluster.manifests.write("00-dup.yaml", &dup(early)).unwrap();
    let web_yaml = cluster.manifests.path().join("web.yaml");
    for file in ["zz-dup.yaml", "00-dup.yaml"] {
        wait_for_log(
            &mut cluster,
            &format!(
                "{file}: Service shop/web: also defined in {}, whose definition is in effect",
                web_yaml.display()
            ),
        );
    }
    assert_eq!(answered(&client, VIP, 10), 10, "the definition in effect");
    assert_eq!(answered(&client, late, 3), 0);
    assert_eq!(answered(&client, early, 3), 0);
    // The file in effect goes: the first other file in name order takes over, and saying so.
    cluster.manifests.remove("web.yaml").unwrap();
    wait_for_log(
        &mut cluster,
        "web.yaml is gone: no longer defined: Service shop/web, EndpointSlice shop/web-a",
    );
    retry_until(Duration::from_secs(5), Duration::from_millis(200), || {
        anyhow::ensure!(
            answered(&client, early, 1) == 1,
            "00-dup.yaml not in effect"
        );
        Ok(())
    })
    .unwrap();
    assert_eq!(answered(&client, VIP, 3), 0);
    cluster.manifests.remove("zz-dup.yaml").unwrap();
    cluster.manifests.write("00-dup.yaml", &dup(VIP)).unwrap();
    retry_until(Duration::from_secs(5), Duration::from_millis(200), || {
        anyhow::ensure!(answered(&client, VIP, 1) == 1, "back on {VIP}");
        Ok(())
    })
    .unwrap();

    // 2. A policy selecting the web pods with a CIDR the API server would refuse: rejected
    // whole, every request still answered (applied without its peer, it cut them off).
    cluster
        .manifests
        .write(
            "bad-cidr.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: bad-cidr, namespace: shop}\n\
             spec:\n  podSelector: {matchLabels: {app: web}}\n\
             \x20 ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
        )
        .unwrap();
    let bad_cidr = cluster.manifests.path().join("bad-cidr.yaml");
    wait_for_log(
        &mut cluster,
        &format!(
            "{}: NetworkPolicy shop/bad-cidr: rejected whole, as the API server would refuse \
             it: spec.ingress[0].from[0].ipBlock.cidr: invalid value \"10.0.0.0/33\"",
            bad_cidr.display()
        ),
    );
    assert_eq!(answered(&client, VIP, 10), 10);

    // 3. A translation problem names the file too; the good Service next to it works.
    let other = Ipv4Addr::new(10, 96, 80, 20);
    cluster
        .manifests
        .write(
            "mixed.yaml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: bad-ip, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.80.300, ports: [{{port: 80}}]}}\n{}",
                cluster_ip_service("shop", "other", other, 80, 8080, &web_ips)
            ),
        )
        .unwrap();
    let mixed = cluster.manifests.path().join("mixed.yaml");
    wait_for_log(
        &mut cluster,
        &format!(
            "{}: Service shop/bad-ip: invalid cluster IP",
            mixed.display()
        ),
    );
    retry_until(Duration::from_secs(5), Duration::from_millis(200), || {
        anyhow::ensure!(
            answered(&client, other, 1) == 1,
            "shop/other not programmed"
        );
        Ok(())
    })
    .unwrap();
    let agent = cluster.agent_mut().unwrap();
    assert!(agent.is_running(), "{}", agent.log());
}

/// An HTTP/1.0 GET of the agent's /healthz from `pod`: the status code.
fn healthz(pod: &Pod, node: Ipv4Addr) -> anyhow::Result<u16> {
    pod.run(move || -> anyhow::Result<u16> {
        let address = SocketAddrV4::new(node, 10256);
        let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET /healthz HTTP/1.0\r\nHost: node\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .split(' ')
            .nth(1)
            .context("no status")?
            .parse()
            .context("status not a number")
    })?
}

#[test]
fn a_pathological_file_neither_stalls_the_agent_nor_hides_its_health() {
    let (mut cluster, client, web) = node_with_web("bomb");
    // A short resync: /healthz's staleness timeout is twice it (4 s).
    cluster
        .start_agent_with(&["--resync-interval", "2"])
        .unwrap();
    let node = cluster.node.gateway();
    assert_eq!(healthz(&client, node).unwrap(), 200);

    // Two megabytes of `[` (libyaml's scanner took 90 s over it), then a new Service in
    // another file: programmed within seconds, the bomb named.
    cluster
        .manifests
        .write("bomb.yaml", &"[".repeat(2 << 20))
        .unwrap();
    let written = Instant::now();
    add_service(
        &cluster,
        &client,
        &web,
        "fresh.yaml",
        Ipv4Addr::new(10, 96, 80, 30),
    );
    let bomb = cluster.manifests.path().join("bomb.yaml");
    wait_for_log(
        &mut cluster,
        &format!(
            "{}: file: flow collections ('[' or '{{') nested more than 128 deep at line 1",
            bomb.display()
        ),
    );
    eprintln!(
        "new service answered {:?} after the bomb",
        written.elapsed()
    );
    // Healthy past the staleness timeout: nothing waits to be programmed.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(healthz(&client, node).unwrap(), 200);
    assert_eq!(answered(&client, VIP, 5), 5);

    // SIGTERM is answered at once.
    let mut agent = cluster.take_agent().unwrap();
    let asked = Instant::now();
    let status = agent.terminate_timeout(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{status:?}: {}", agent.log());
    assert!(asked.elapsed() < Duration::from_secs(5));
}

/// A file that takes seconds to parse (100,000 objects of a kind Sluice skips) is parsed off
/// the loop: another file's new Service is programmed meanwhile, and /healthz reports the
/// datapath stale (503) once the file has waited longer than the timeout, then healthy when
/// it is taken in.
#[test]
fn a_file_still_being_parsed_is_reported_stale_and_holds_nothing_else() {
    let (mut cluster, client, web) = node_with_web("slowp");
    // /healthz's staleness timeout: twice the resync interval, 2 s.
    cluster
        .start_agent_with(&["--resync-interval", "1"])
        .unwrap();
    let node = cluster.node.gateway();
    assert_eq!(healthz(&client, node).unwrap(), 200);

    let big: String = (0..100_000)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: shop}}\n\
                 data: {{key: value-{i}}}\n"
            )
        })
        .collect();
    cluster.manifests.write("big.yaml", &big).unwrap();
    add_service(
        &cluster,
        &client,
        &web,
        "fresh.yaml",
        Ipv4Addr::new(10, 96, 80, 40),
    );
    let big_yaml = cluster.manifests.path().join("big.yaml");
    let log = cluster.agent_mut().unwrap().log();
    assert!(
        log.contains(&format!("{}: file: still being parsed", big_yaml.display())),
        "the big file was parsed within the reload's budget (1 s): make it bigger\n{log}"
    );
    // Stale while it is parsed, healthy once it is in.
    let mut statuses = Vec::new();
    retry_until(Duration::from_secs(120), Duration::from_millis(200), || {
        let status = healthz(&client, node)?;
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
        anyhow::ensure!(statuses.ends_with(&[503, 200]), "{statuses:?}");
        Ok(())
    })
    .unwrap();
    assert_eq!(answered(&client, VIP, 5), 5);
}
