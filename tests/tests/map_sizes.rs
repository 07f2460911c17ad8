//! Map sizes with real traffic: an agent restarted with other `--max-services`,
//! `--max-backends` and `--max-conntrack` replaces the pinned maps by resized copies while a
//! TCP connection through a ClusterIP stays up.

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use sluice_testbed::{in_netns, sluice::SluiceNode, Pod};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 70, 10);
const ECHO_PORT: u16 = 7070;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the echo servers accept connections and wait for lines.
const SERVE_FOR: Duration = Duration::from_secs(90);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, last)
}

/// Service `echo` (VIP:80 -> 7070) over `backends`.
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
metadata: {{name: echo, namespace: sizes}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: tcp, port: 80, targetPort: {ECHO_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: sizes
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: tcp, port: {ECHO_PORT}, protocol: TCP}}
"#
    )
}

/// A server in `pod` answering every line of every connection with "<pod> <line>", for
/// [`SERVE_FOR`] at most.
fn serve_echo(pod: &Pod) {
    let listener = in_netns(pod.netns_path(), || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT))
    })
    .unwrap()
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    let name = pod.name().to_string();
    thread::spawn(move || {
        let deadline = Instant::now() + SERVE_FOR;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let name = name.clone();
                    thread::spawn(move || echo_lines(stream, &name, deadline));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    });
}

fn echo_lines(stream: TcpStream, name: &str, deadline: Instant) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while Instant::now() < deadline {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer
                    .write_all(format!("{name} {}", line).as_bytes())
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

/// Sends `word` on the connection; returns the pod that echoed it.
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
        .unwrap_or_else(|| panic!("bad echo {line:?}"));
    assert_eq!(echoed, word);
    pod.to_string()
}

/// `sluice state maps --json` of the node: (map, max entries).
fn pinned_sizes(node: &SluiceNode) -> Vec<(String, u64)> {
    let bin = sluice_testbed::sluice::sluice_bin();
    let pins = node.pins.path().to_str().unwrap().to_string();
    let stdout = node
        .node
        .exec_ok(&[
            bin.to_str().unwrap(),
            "state",
            "--pin-path",
            &pins,
            "--json",
            "maps",
        ])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["max_entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn size_of(sizes: &[(String, u64)], map: &str) -> u64 {
    sizes
        .iter()
        .find(|(name, _)| name == map)
        .unwrap_or_else(|| panic!("{map} not shown: {sizes:?}"))
        .1
}

#[test]
fn an_agent_restarted_with_other_map_sizes_keeps_an_established_connection() {
    let mut node = SluiceNode::new("mapsize").unwrap();
    let client = node.node.add_pod("client", ip(10)).unwrap();
    let web: Vec<Pod> = (1..=3)
        .map(|i| node.node.add_pod(&format!("echo-{i}"), ip(20 + i)).unwrap())
        .collect();
    for pod in &web {
        serve_echo(pod);
    }
    node.manifests.write("echo.yaml", &manifests(&web)).unwrap();
    node.start_agent().unwrap();
    assert_eq!(size_of(&pinned_sizes(&node), "services"), 65_536);

    let vip = SocketAddrV4::new(VIP, 80);
    let mut stream = in_netns(client.netns_path(), || {
        TcpStream::connect_timeout(&vip.into(), TIMEOUT)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("connecting to {vip}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let backend = exchange(&mut stream, "before");

    // Larger maps: each is replaced by a copy of the new size while the connection is open.
    let agent = node
        .start_agent_with(&[
            "--max-services",
            "1000",
            "--max-backends",
            "5000",
            "--max-conntrack",
            "8192",
        ])
        .unwrap();
    assert!(
        agent.log().contains("resized map pinned in place"),
        "{}",
        agent.log()
    );
    let sizes = pinned_sizes(&node);
    for (map, want) in [
        ("services", 1_000),
        ("services6", 1_000),
        ("backends", 5_000),
        ("conntrack", 8_192),
        ("conntrack6", 8_192),
    ] {
        assert_eq!(size_of(&sizes, map), want, "{map}");
    }
    assert_eq!(exchange(&mut stream, "after"), backend);

    // And back to the defaults (smaller conntrack, larger services): still the same flow.
    node.start_agent().unwrap();
    let sizes = pinned_sizes(&node);
    assert_eq!(size_of(&sizes, "services"), 65_536);
    assert_eq!(size_of(&sizes, "conntrack"), 262_144);
    assert_eq!(exchange(&mut stream, "again"), backend);

    // New connections are balanced as before.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        let mut fresh = in_netns(client.netns_path(), || {
            TcpStream::connect_timeout(&vip.into(), TIMEOUT)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("new connection {i} to {vip}: {e}"));
        fresh.set_read_timeout(Some(TIMEOUT)).unwrap();
        seen.insert(exchange(&mut fresh, "new"));
    }
    assert_eq!(seen.len(), 3, "new connections reached {seen:?}");
}
