//! Tampering with a running node's datapath (issue #13): the real `sluice agent` in a
//! network-namespace node, its programs detached or its pins removed from outside, as the
//! issue reports them. Each test first shows the damage while the agent is frozen (SIGSTOP,
//! so it cannot repair anything yet), then that one resync (`--resync-interval 2`) repairs
//! it and logs what it found. And at start, a pin that is not Sluice's is named and refused,
//! never replaced.
//!
//! Everything runs in the node's namespace (`nsenter --net`, never `ip netns exec`, which
//! hides bpffs) on a pin directory of the test's own, removed afterwards, also on failure.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_testbed::{
    in_netns,
    sluice::{agent_ready_timeout, sluice_bin, SluiceCluster, SluiceNode, AGENT_READY_LINE},
    Node, NodeProcess, Pod,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 130, 10);
/// What `serve` answers on (with the pod's name), and the echo servers' port.
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7070;
/// Seconds between the agent's resyncs.
const RESYNC: u64 = 2;
const TIMEOUT: Duration = Duration::from_secs(2);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, last)
}

/// Service `web`: VIP:80 -> 8080 and VIP:7070 -> 7070 over `backends`.
fn manifests(backends: &[Pod]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|p| {
            format!(
                "- {{addresses: [\"{}\"], conditions: {{ready: true}}}}\n",
                p.ip()
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: tamper}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}
  - {{name: echo, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: tamper
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: {HTTP_PORT}, protocol: TCP}}
- {{name: echo, port: {ECHO_PORT}, protocol: TCP}}
"#
    )
}

/// A node with a client pod and three `web` pods (name server on 8080, echo on 7070), the
/// service written, no agent yet.
fn node_with_service(hint: &str) -> (SluiceNode, Pod, Vec<Pod>, EchoServers) {
    let node = SluiceNode::new(hint).unwrap();
    let client = node.node.add_pod("client", ip(10)).unwrap();
    let web: Vec<Pod> = (1..=3)
        .map(|i| {
            let pod = node.node.add_pod(&format!("web-{i}"), ip(20 + i)).unwrap();
            pod.serve(&[HTTP_PORT]).unwrap();
            pod
        })
        .collect();
    let echo = EchoServers::start(&web);
    node.manifests.write("web.yaml", &manifests(&web)).unwrap();
    (node, client, web, echo)
}

fn agent_args() -> Vec<String> {
    vec!["--resync-interval".into(), RESYNC.to_string()]
}

/// How many of `n` new connections from `client` to the service got an answer from it.
fn answered(client: &Pod, n: usize) -> usize {
    let http = SocketAddrV4::new(VIP, 80);
    client
        .tcp_requests(http, n, TIMEOUT)
        .unwrap()
        .iter()
        .filter(|r| matches!(r, Ok(reply) if reply.peer == http))
        .count()
}

/// The ifindex of `ifname` in the node.
fn ifindex(node: &Node, ifname: &str) -> u32 {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid NUL-terminated string.
    let index = in_netns(node.netns_path(), || unsafe {
        libc::if_nametoindex(name.as_ptr())
    })
    .unwrap();
    assert_ne!(index, 0, "no interface {ifname} in the node");
    index
}

/// `bpftool -j <args>` in the node, parsed.
fn bpftool(node: &Node, args: &[&str]) -> Value {
    let mut argv = vec!["bpftool", "-j"];
    argv.extend_from_slice(args);
    let out = node.exec_ok(&argv).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool {args:?}: {e}: {out}"))
}

fn id_of(json: &Value) -> u64 {
    json["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {json}"))
}

/// The id of the map pinned at `pin`.
fn pinned_map_id(node: &Node, pin: &Path) -> u64 {
    id_of(&bpftool(
        node,
        &["map", "show", "pinned", pin.to_str().unwrap()],
    ))
}

/// The ids of the maps the program in the tcx link pinned at `link_pin` uses.
fn maps_of_linked_program(node: &Node, link_pin: &Path) -> Vec<u64> {
    let link = bpftool(
        node,
        &["link", "show", "pinned", link_pin.to_str().unwrap()],
    );
    let prog = link["prog_id"].as_u64().expect("prog_id").to_string();
    let prog = bpftool(node, &["prog", "show", "id", &prog]);
    prog["map_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no map_ids in {prog}"))
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect()
}

/// The agent, stopped (SIGSTOP) until dropped (SIGCONT), also when a check fails meanwhile:
/// the damage can be seen before anything repairs it.
struct Frozen<'a>(&'a mut NodeProcess);

impl<'a> Frozen<'a> {
    fn new(agent: &'a mut NodeProcess) -> Frozen<'a> {
        agent.signal(libc::SIGSTOP).unwrap();
        let stat = format!("/proc/{}/stat", agent.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        // The state follows the command (in parentheses, which may hold spaces).
        while !std::fs::read_to_string(&stat)
            .unwrap_or_default()
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
        {
            assert!(Instant::now() < deadline, "the agent did not stop");
            thread::sleep(Duration::from_millis(10));
        }
        Frozen(agent)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = self.0.signal(libc::SIGCONT);
    }
}

/// Waits (at most one resync and a margin) for the agent to log `needle`; returns the line.
fn repair_line(agent: &mut NodeProcess, needle: &str) -> String {
    let within = Duration::from_secs(RESYNC + 3);
    agent
        .wait_for_log(needle, within)
        .unwrap_or_else(|e| panic!("no repair within one resync: {e:#}"));
    agent
        .log()
        .lines()
        .find(|l| l.contains(needle))
        .expect("the line just seen")
        .to_owned()
}

/// The issue's first failure: a pod veth's tcx link detached with `bpftool link detach` (the
/// pin stays, the link runs nowhere) and the other one's pin removed (which releases it)
/// blackhole the pod's service traffic; the next resync attaches both again.
#[test]
fn a_detached_pod_program_is_attached_again_within_one_resync() {
    let (mut node, client, _web, _echo) = node_with_service("tamper-link");
    let args = agent_args();
    node.start_agent_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let mut agent = node.take_agent().unwrap();
    assert_eq!(answered(&client, 10), 10);
    let veth = client.host_ifname().to_owned();
    let index = ifindex(&node.node, &veth);
    let ingress = node.pins.path().join(format!("links/{index}-ingress"));
    let egress = node.pins.path().join(format!("links/{index}-egress"));
    let link = id_of(&bpftool(
        &node.node,
        &["link", "show", "pinned", ingress.to_str().unwrap()],
    ));

    {
        let _frozen = Frozen::new(&mut agent);
        node.node
            .exec_ok(&["bpftool", "link", "detach", "id", &link.to_string()])
            .unwrap();
        std::fs::remove_file(&egress).unwrap();
        assert_eq!(
            answered(&client, 3),
            0,
            "the pod's service traffic still flows without its programs"
        );
    }
    let started = Instant::now();
    let from_pod = repair_line(
        &mut agent,
        &format!("repaired: from_pod on {veth} (ifindex {index})"),
    );
    let to_pod = repair_line(
        &mut agent,
        &format!("repaired: to_pod on {veth} (ifindex {index})"),
    );
    assert!(
        started.elapsed() <= Duration::from_secs(RESYNC + 1),
        "repaired after {:?}",
        started.elapsed()
    );
    assert!(
        from_pod.contains(&format!("tcx link {link}")) && from_pod.contains("detached"),
        "{from_pod}"
    );
    assert!(from_pod.contains("re-attached (tcx link id"), "{from_pod}");
    assert!(to_pod.contains("detached"), "{to_pod}");
    assert_eq!(answered(&client, 10), 10);
    assert!(egress.exists(), "the egress link is pinned again");
    assert_ne!(
        id_of(&bpftool(
            &node.node,
            &["link", "show", "pinned", ingress.to_str().unwrap()],
        )),
        link,
        "a new link replaced the detached one"
    );
    // Once repaired, nothing more to repair: two later passes log nothing new.
    thread::sleep(Duration::from_secs(2 * RESYNC + 1));
    assert_eq!(
        agent.log().matches("repaired:").count(),
        2,
        "{}",
        agent.log()
    );
    // `sluice state drops` counts them too.
    let state = node
        .node
        .exec_ok(&[
            sluice_bin().to_str().unwrap(),
            "state",
            "--pin-path",
            node.pins.path().to_str().unwrap(),
            "--json",
            "drops",
        ])
        .unwrap();
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["drops"]["datapath-repaired"], 2, "{state}");
}

/// The same on the netlink path of kernels before 6.6 (forced with `SLUICE_TC_ATTACH=netlink`
/// on this machine): `tc qdisc del dev <veth> clsact` removes both of the pod's filters; the
/// next resync adds the qdisc and the filters again.
#[test]
fn a_deleted_clsact_qdisc_is_attached_again_within_one_resync() {
    let (node, client, _web, _echo) = node_with_service("tamper-tc");
    let mut cmd = Command::new(sluice_bin());
    cmd.arg("agent")
        .arg("--manifests")
        .arg(node.manifests.path())
        .arg("--pin-path")
        .arg(node.pins.path())
        .args(agent_args())
        .env("RUST_LOG", "info,sluice=debug")
        .env("SLUICE_TC_ATTACH", "netlink");
    // Declared after the node: stopped before it goes.
    let mut agent = node.node.spawn(&mut cmd).unwrap();
    agent
        .wait_for_log(AGENT_READY_LINE, agent_ready_timeout())
        .unwrap();
    assert_eq!(answered(&client, 10), 10);
    let veth = client.host_ifname().to_owned();
    let index = ifindex(&node.node, &veth);
    let filters = |side: &str| {
        node.node
            .exec_ok(&["tc", "filter", "show", "dev", &veth, side])
            .unwrap()
    };
    assert!(
        filters("ingress").contains("from_pod"),
        "{}",
        filters("ingress")
    );
    assert!(
        !node
            .pins
            .path()
            .join(format!("links/{index}-ingress"))
            .exists(),
        "a tcx link was pinned"
    );

    {
        let _frozen = Frozen::new(&mut agent);
        node.node
            .exec_ok(&["tc", "qdisc", "del", "dev", &veth, "clsact"])
            .unwrap();
        assert_eq!(answered(&client, 3), 0, "traffic flows without the filters");
    }
    for program in ["from_pod", "to_pod"] {
        let line = repair_line(
            &mut agent,
            &format!("repaired: {program} on {veth} (ifindex {index})"),
        );
        assert!(line.contains("was detached"), "{line}");
        assert!(line.contains("re-attached (tc filter"), "{line}");
    }
    assert_eq!(answered(&client, 10), 10);
    assert!(
        filters("ingress").contains("from_pod"),
        "{}",
        filters("ingress")
    );
    assert!(
        filters("egress").contains("to_pod"),
        "{}",
        filters("egress")
    );
}

/// The issue's second failure: removing the `services` and `conntrack` pins is noticed at the
/// next resync, which pins the maps the programs use again (same ids); an agent killed and
/// restarted then finds them, and established connections keep their backends. Without the
/// repair the restart created empty maps: each connection's next packet was balanced anew,
/// and two of three backends answer it with a reset.
#[test]
fn removed_map_pins_are_pinned_again_and_a_restart_keeps_established_connections() {
    let (mut node, client, _web, _echo) = node_with_service("tamper-maps");
    let args = agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node.start_agent_with(&args).unwrap();
    let mut agent = node.take_agent().unwrap();
    let pins = node.pins.path().to_owned();
    let index = ifindex(&node.node, client.host_ifname());
    let in_use = maps_of_linked_program(&node.node, &pins.join(format!("links/{index}-ingress")));
    let ids: Vec<(PathBuf, u64)> = ["services", "conntrack"]
        .iter()
        .map(|map| {
            let pin = pins.join(map);
            let id = pinned_map_id(&node.node, &pin);
            assert!(in_use.contains(&id), "{map} (id {id}) not in {in_use:?}");
            (pin, id)
        })
        .collect();

    let mut connections: Vec<(TcpStream, String)> = (0..6)
        .map(|i| {
            let mut stream = echo_connection(&client);
            let backend = exchange(&mut stream, &format!("before-{i}"));
            (stream, backend)
        })
        .collect();

    {
        let _frozen = Frozen::new(&mut agent);
        for (pin, _) in &ids {
            std::fs::remove_file(pin).unwrap();
            assert!(!pin.exists());
        }
    }
    for map in ["services", "conntrack"] {
        let line = repair_line(&mut agent, &format!("repaired: map `{map}`"));
        assert!(line.contains("was no longer pinned"), "{line}");
    }
    for (pin, id) in &ids {
        assert_eq!(
            pinned_map_id(&node.node, pin),
            *id,
            "{} is not the map the programs use",
            pin.display()
        );
    }

    agent.kill_hard().unwrap();
    drop(agent);
    node.start_agent_with(&args).unwrap();
    for (i, (stream, backend)) in connections.iter_mut().enumerate() {
        assert_eq!(
            &exchange(stream, &format!("after-{i}")),
            backend,
            "connection {i} changed backends"
        );
    }
    for (pin, id) in &ids {
        assert_eq!(pinned_map_id(&node.node, pin), *id, "{}", pin.display());
    }
    assert_eq!(answered(&client, 10), 10);
}

/// At start, a map pin under Sluice's name holding a map of another layout (an array where
/// `conntrack` is an LRU hash) is named and refused: the agent does not start, the map stays
/// pinned, and the agent leaves no pin of its own behind.
#[test]
fn a_foreign_map_pin_stops_the_agent_at_start_naming_it_and_is_kept() {
    let mut node = SluiceNode::new("tamper-start").unwrap();
    let pins = node.pins.path().to_owned();
    std::fs::create_dir_all(&pins).unwrap();
    let foreign = pins.join("conntrack");
    node.node
        .exec_ok(&[
            "bpftool",
            "map",
            "create",
            foreign.to_str().unwrap(),
            "type",
            "array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "1",
            "name",
            "not_sluice",
        ])
        .unwrap();
    let id = pinned_map_id(&node.node, &foreign);

    let error = match node.start_agent() {
        Ok(agent) => panic!("the agent started over a foreign pin:\n{}", agent.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("exited"), "{error}");
    assert!(
        error.contains(&format!("map `conntrack` pinned at {}", foreign.display())),
        "{error}"
    );
    assert!(error.contains("Array"), "{error}");
    assert!(error.contains("sluice cleanup"), "{error}");
    assert_eq!(
        pinned_map_id(&node.node, &foreign),
        id,
        "the pin was replaced"
    );
    let left: Vec<String> = std::fs::read_dir(&pins)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["conntrack"], "the agent left pins behind");
}

/// At start, a link pin under Sluice's name for a pod's veth that holds something else (a map
/// here) is named and left alone: that veth is refused, the others are attached and the
/// service works; the resyncs do not touch it either.
#[test]
fn a_foreign_link_pin_at_start_is_named_and_left_alone() {
    let (mut node, client, _web, _echo) = node_with_service("tamper-linkpin");
    let bystander = node.node.add_pod("bystander", ip(40)).unwrap();
    let index = ifindex(&node.node, bystander.host_ifname());
    let links = node.pins.path().join("links");
    std::fs::create_dir_all(&links).unwrap();
    let foreign = links.join(format!("{index}-ingress"));
    node.node
        .exec_ok(&[
            "bpftool",
            "map",
            "create",
            foreign.to_str().unwrap(),
            "type",
            "array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "not_a_link",
        ])
        .unwrap();
    let id = pinned_map_id(&node.node, &foreign);

    let args = agent_args();
    let agent = node
        .start_agent_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("attach failed") && l.contains(&foreign.display().to_string()))
        .unwrap_or_else(|| panic!("the foreign pin is not named:\n{log}"));
    assert!(line.contains("Array map"), "{line}");
    assert!(line.contains("refusing"), "{line}");
    assert_eq!(answered(&client, 10), 10);
    thread::sleep(Duration::from_secs(RESYNC + 1));
    assert_eq!(
        pinned_map_id(&node.node, &foreign),
        id,
        "the pin was replaced"
    );
    assert!(!links.join(format!("{index}-egress")).exists());
    let log = node.agent_mut().unwrap().log();
    assert!(!log.contains("repaired:"), "{log}");
}

/// Nothing to repair, nothing repaired: on a two-node cluster (pod veths and the nodes'
/// external interfaces, tcx links of both kinds) the pass at start and three resyncs find all
/// in place.
#[test]
fn a_healthy_datapath_is_left_alone() {
    let mut cluster = SluiceCluster::new("tamper-none", 2).unwrap();
    for i in 1..=2 {
        let node = cluster.node(i);
        node.add_pod("web", node.pod_ip(10)).unwrap();
    }
    cluster
        .agent_args
        .extend(["--resync-interval".to_owned(), "1".to_owned()]);
    cluster.start_agents().unwrap();
    thread::sleep(Duration::from_millis(3500));
    for i in 1..=2 {
        let log = cluster.agent_mut(i).unwrap().log();
        assert!(log.contains("attached to external interface"), "{log}");
        assert!(log.contains("attached to pod interface"), "{log}");
        assert!(!log.contains("repaired"), "node-{i}:\n{log}");
    }
}

// ---------------------------------------------------------------------------------------------
// Long-lived connections: echo servers in the web pods.

/// A server per pod answering every line of every connection with "<pod> <line>", until
/// dropped.
struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl EchoServers {
    fn start(pods: &[Pod]) -> EchoServers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = pods
            .iter()
            .map(|pod| {
                let listener = in_netns(pod.netns_path(), || {
                    TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT))
                })
                .unwrap()
                .unwrap();
                listener.set_nonblocking(true).unwrap();
                let (name, stop) = (pod.name().to_owned(), Arc::clone(&stop));
                thread::spawn(move || serve_echo(listener, &name, &stop))
            })
            .collect();
        EchoServers { stop, threads }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_echo(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (name, stop) = (name.to_owned(), Arc::clone(stop));
                connections.push(thread::spawn(move || echo_lines(stream, &name, &stop)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    drop(listener);
    for connection in connections {
        let _ = connection.join();
    }
}

fn echo_lines(stream: TcpStream, name: &str, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer
                    .write_all(format!("{name} {line}").as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A connection from `client` to the service's echo port.
fn echo_connection(client: &Pod) -> TcpStream {
    let to = SocketAddrV4::new(VIP, ECHO_PORT);
    let stream = in_netns(client.netns_path(), || {
        TcpStream::connect_timeout(&to.into(), TIMEOUT)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Sends `word`; returns the pod that echoed it.
fn exchange(stream: &mut TcpStream, word: &str) -> String {
    stream
        .write_all(format!("{word}\n").as_bytes())
        .unwrap_or_else(|e| panic!("sending {word:?}: {e}"));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no echo of {word:?}: {e}"));
    let (pod, echoed) = line
        .trim_end()
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad echo {line:?} of {word:?}"));
    assert_eq!(echoed, word);
    pod.to_owned()
}
