//! The node Sluice runs on, as the translation needs it: which Node object is "this node", its
//! addresses, the cluster's pod CIDRs and kube-proxy's node-level options. `sluice agent` and
//! `sluice trace` take the same flags ([`NodeOptions`]) and resolve them with the same code, so
//! a trace builds exactly the state the agent would.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

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
}
