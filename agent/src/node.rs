//! The node Sluice runs on, as the translation needs it: which Node object is "this node", its
//! addresses, the cluster's pod CIDRs and kube-proxy's node-level options. `sluice agent` and
//! `sluice trace` take the same flags ([`NodeOptions`]) and resolve them with the same code, so
//! a trace builds exactly the state the agent would.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use sluice_common::CtTimeouts;

use crate::manifests::Objects;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// kube-proxy's node-level options that shape the datapath state.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// The Node object that is this node; its status addresses are the node IPs.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The cluster's pod CIDRs (comma separated), kube-proxy's clusterCIDR: traffic from
    /// outside them is not pod traffic.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// CIDRs whose node addresses serve NodePorts (kube-proxy's nodePortAddresses); empty
    /// means all node IPs.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Masquerade all traffic to services (kube-proxy's masqueradeAll).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Conntrack timeouts (kube-proxy's `conntrack` settings, nf_conntrack's names for the
    /// rest), written to the `config` map.
    #[command(flatten)]
    pub conntrack: ConntrackOptions,
    /// The source ports masquerading to a node address uses, `FIRST-LAST`, less the node's
    /// ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default), which are
    /// skipped so a masqueraded flow never shares a tuple with a connection the node opens
    /// itself. A port is needed per (node address, backend address and port, protocol): the
    /// default leaves 36,280 concurrent masqueraded connections per backend port.
    #[arg(long, default_value = "1024-65535")]
    pub masquerade_port_range: PortRange,
    /// The node's ephemeral ports, skipped by masquerading: read by the agent at start
    /// ([`ephemeral_ports`]), not a flag.
    #[arg(skip)]
    pub ephemeral_ports: Option<PortRange>,
}

/// How long a silent flow stays in conntrack, by protocol and TCP state. Durations as
/// `24h`, `90s`, `500ms`; 0 keeps the default.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackOptions {
    /// Established TCP connections (kube-proxy's flag of that name).
    #[arg(long, default_value = "24h", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_established: Duration,
    /// TCP connections closed by one side (kube-proxy's flag of that name).
    #[arg(long, default_value = "1h", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// UDP flows the backend has not answered (kube-proxy's flag; nf_conntrack_udp_timeout).
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub conntrack_udp_timeout: Duration,
    /// UDP flows the backend answered (kube-proxy's flag; nf_conntrack_udp_timeout_stream).
    #[arg(long, default_value = "120s", value_parser = parse_timeout)]
    pub conntrack_udp_timeout_stream: Duration,
    /// TCP connections the backend has not answered (nf_conntrack_tcp_timeout_syn_sent).
    #[arg(long, default_value = "120s", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_syn_sent: Duration,
    /// TCP connections reset, or closed by both sides (nf_conntrack_tcp_timeout_close).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub conntrack_tcp_timeout_close: Duration,
    /// SCTP associations (nf_conntrack_sctp_timeout_established).
    #[arg(long, default_value = "210s", value_parser = parse_timeout)]
    pub conntrack_sctp_timeout: Duration,
}

impl ConntrackOptions {
    /// The flags' default values: what an agent started without them uses (`Default` gives
    /// zeroes, which the datapath reads as its built-in defaults).
    pub fn flag_defaults() -> ConntrackOptions {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            conntrack: ConntrackOptions,
        }
        <Flags as clap::Parser>::parse_from(["sluice"]).conntrack
    }

    /// The timeouts as the `config` map holds them (milliseconds; 0 = the datapath default).
    pub fn timeouts(&self) -> CtTimeouts {
        let ms = |d: &Duration| d.as_millis() as u32;
        CtTimeouts {
            tcp_syn_ms: ms(&self.conntrack_tcp_timeout_syn_sent),
            tcp_established_ms: ms(&self.conntrack_tcp_timeout_established),
            tcp_close_wait_ms: ms(&self.conntrack_tcp_timeout_close_wait),
            tcp_close_ms: ms(&self.conntrack_tcp_timeout_close),
            udp_ms: ms(&self.conntrack_udp_timeout),
            udp_stream_ms: ms(&self.conntrack_udp_timeout_stream),
            sctp_ms: ms(&self.conntrack_sctp_timeout),
            _pad: 0,
        }
    }
}

/// The longest timeout the datapath holds: `u32::MAX` milliseconds, about 49 days.
const MAX_TIMEOUT: Duration = Duration::from_millis(u32::MAX as u64);

fn parse_timeout(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration like 24h, 90s or 500ms: {e}"))?;
    if duration > MAX_TIMEOUT {
        return Err(format!(
            "{value:?} is longer than the datapath holds (at most {})",
            humantime::format_duration(MAX_TIMEOUT)
        ));
    }
    Ok(duration)
}

/// An inclusive port range, `FIRST-LAST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> PortRange {
        PortRange {
            first: sluice_common::SNAT_PORT_MIN_DEFAULT,
            last: sluice_common::SNAT_PORT_MAX_DEFAULT,
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(value: &str) -> Result<PortRange, String> {
        let bad =
            || format!("port range {value:?} is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535");
        let (first, last) = value.trim().split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// The node's ephemeral port range (net.ipv4.ip_local_port_range of the network namespace
/// the calling thread is in), the ports its own outgoing connections take.
pub fn ephemeral_ports() -> anyhow::Result<PortRange> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok(PortRange { first, last }),
        _ => anyhow::bail!("{PATH} holds {text:?}, not two ports"),
    }
}

/// What masquerading uses: `masquerade` less `ephemeral` (the node's ephemeral ports), as a
/// log line; a warning when nothing would be left (the range is then used whole).
pub fn describe_masquerade_ports(
    masquerade: &PortRange,
    ephemeral: Option<&PortRange>,
) -> (String, bool) {
    let config = sluice_common::NodeConfig {
        snat_port_min: masquerade.first,
        snat_port_max: masquerade.last,
        skip_port_min: ephemeral.map_or(0, |r| r.first),
        skip_port_max: ephemeral.map_or(0, |r| r.last),
        ..Default::default()
    };
    let (_, usable, _, skipped) = config.snat_port_space();
    match ephemeral {
        Some(ephemeral) if ephemeral.overlaps(masquerade) && skipped == 0 => (
            format!(
                "--masquerade-port-range {masquerade} lies inside the node's ephemeral ports \
                 {ephemeral} (net.ipv4.ip_local_port_range): all of it is used, and a \
                 masqueraded flow may collide with a connection of the node itself"
            ),
            true,
        ),
        Some(ephemeral) if skipped != 0 => (
            format!(
                "masquerade ports {masquerade} less the node's ephemeral ports {ephemeral}: \
                 {usable} per backend address and port"
            ),
            false,
        ),
        _ => (
            format!("masquerade ports {masquerade}: {usable} per backend address and port"),
            false,
        ),
    }
}

/// [`NodeOptions`] resolved against the objects: the input of the translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: Option<String>,
    /// The node's `topology.kubernetes.io/zone` label, for topology-aware routing.
    pub zone: Option<String>,
    /// InternalIP and ExternalIP addresses of this node's Node object.
    pub node_ips: Vec<IpAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    pub nodeport_addresses: Vec<IpNet>,
    pub masquerade_all: bool,
    /// Conntrack timeouts (all 0: the datapath's defaults).
    pub conntrack: CtTimeouts,
    /// The masquerade source ports; `None`: the datapath's default range.
    pub masquerade_ports: Option<PortRange>,
    /// Ports masquerading skips (the node's ephemeral ports); `None`: none.
    pub skip_ports: Option<PortRange>,
}

impl NodeContext {
    /// Whether `ip` belongs to the cluster's pod network. Without a configured cluster CIDR
    /// every source counts as a pod, as kube-proxy does when clusterCIDR is unset.
    pub fn is_pod_ip(&self, ip: IpAddr) -> bool {
        self.cluster_cidrs.is_empty() || self.cluster_cidrs.iter().any(|c| c.contains(&ip))
    }
}

/// The named Node object does not exist among the objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown node {name:?}: no Node object of that name (known: {known})")]
pub struct UnknownNode {
    pub name: String,
    pub known: String,
}

/// Resolves the options against the Node objects. A named node that is not there is an error
/// (the caller decides whether to wait for it or give up); no name means no node addresses.
pub fn resolve(options: &NodeOptions, objects: &Objects) -> Result<NodeContext, UnknownNode> {
    let mut context = NodeContext {
        name: options.node_name.clone(),
        zone: None,
        node_ips: Vec::new(),
        cluster_cidrs: options.cluster_cidr.clone(),
        nodeport_addresses: options.nodeport_addresses.clone(),
        masquerade_all: options.masquerade_all,
        conntrack: options.conntrack.timeouts(),
        masquerade_ports: Some(options.masquerade_port_range),
        skip_ports: options.ephemeral_ports,
    };
    if let Some(name) = &options.node_name {
        let Some(node) = objects.nodes.get(name) else {
            let known: Vec<&str> = objects.nodes.keys().map(String::as_str).collect();
            return Err(UnknownNode {
                name: name.clone(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        };
        context.node_ips = node_ips(node);
        context.zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned();
    }
    Ok(context)
}

/// InternalIP then ExternalIP addresses, in the order the Node lists them, without duplicates.
fn node_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut ips = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for address in addresses.iter().filter(|a| a.type_ == kind) {
            match address.address.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    node = node.metadata.name.as_deref().unwrap_or_default(),
                    address = %address.address,
                    "ignoring an invalid node address"
                ),
            }
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Objects {
        crate::manifests::parse_valid(yaml)
    }

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: kind-worker}
status:
  addresses:
  - {type: Hostname, address: kind-worker}
  - {type: ExternalIP, address: 203.0.113.7}
  - {type: InternalIP, address: 172.18.0.3}
  - {type: InternalIP, address: "fc00:f853:ccd:e793::3"}
---
apiVersion: v1
kind: Node
metadata: {name: kind-control-plane}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
"#;

    #[test]
    fn node_ips_come_from_the_named_node() {
        let options = NodeOptions {
            node_name: Some("kind-worker".into()),
            cluster_cidr: vec!["10.244.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let context = resolve(&options, &objects(NODES)).unwrap();
        let ips: Vec<String> = context.node_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["172.18.0.3", "fc00:f853:ccd:e793::3", "203.0.113.7"]);
        assert!(context.is_pod_ip("10.244.3.4".parse().unwrap()));
        assert!(!context.is_pod_ip("172.18.0.9".parse().unwrap()));
    }

    #[test]
    fn an_unknown_node_is_an_error_naming_the_known_ones() {
        let options = NodeOptions {
            node_name: Some("nope".into()),
            ..Default::default()
        };
        let error = resolve(&options, &objects(NODES)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown node \"nope\": no Node object of that name (known: kind-control-plane, kind-worker)"
        );
        // Without a name there are no node addresses, and every source is a pod.
        let context = resolve(&NodeOptions::default(), &objects(NODES)).unwrap();
        assert!(context.node_ips.is_empty());
        assert!(context.is_pod_ip("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn port_ranges_and_timeouts_parse_or_say_what_is_wrong() {
        let range: PortRange = "61000-65535".parse().unwrap();
        assert_eq!((range.first, range.last), (61_000, 65_535));
        assert_eq!(range.to_string(), "61000-65535");
        for bad in ["65000-61000", "0-10", "61000", "a-b", "1-70000"] {
            let error = bad.parse::<PortRange>().unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
        let ephemeral = PortRange {
            first: 32_768,
            last: 60_999,
        };
        assert!(!range.overlaps(&ephemeral));
        assert!("60000-61000"
            .parse::<PortRange>()
            .unwrap()
            .overlaps(&ephemeral));

        let (line, warn) = describe_masquerade_ports(&PortRange::default(), Some(&ephemeral));
        assert!(!warn);
        assert!(line.contains("36280 per backend"), "{line}");
        let (line, warn) =
            describe_masquerade_ports(&"40000-50000".parse().unwrap(), Some(&ephemeral));
        assert!(warn, "{line}");
        let (line, _) = describe_masquerade_ports(&range, None);
        assert!(line.contains("4536 per backend"), "{line}");

        assert_eq!(parse_timeout("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_timeout("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_timeout("forever").unwrap_err().contains("forever"));
        assert!(parse_timeout("60d").unwrap_err().contains("longer"));
    }

    #[test]
    fn conntrack_flags_default_to_kube_proxys_and_nf_conntracks_values() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeOptions,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["sluice"]).unwrap();
        let timeouts = cli.node.conntrack.timeouts();
        assert_eq!(
            timeouts,
            CtTimeouts {
                _pad: 0,
                ..CtTimeouts::DEFAULT
            }
        );
        assert_eq!(cli.node.masquerade_port_range, PortRange::default());
        let cli = <Cli as clap::Parser>::try_parse_from([
            "sluice",
            "--conntrack-udp-timeout",
            "2s",
            "--conntrack-tcp-timeout-established",
            "1h",
        ])
        .unwrap();
        let timeouts = cli.node.conntrack.timeouts();
        assert_eq!(
            (timeouts.udp_ms, timeouts.tcp_established_ms),
            (2_000, 3_600_000)
        );
    }
}
