//! What the API server would refuse in a NetworkPolicy (networking/validation's
//! `ValidateNetworkPolicySpec`, the rules that matter to enforcement). Pure.
//!
//! Such a policy never exists in a cluster: `kubectl apply` gets an error and nothing changes.
//! Read from a manifests directory, Sluice treats it the same way: rejected whole, it selects
//! no pod and isolates nothing (it is not half-applied with its bad peer or port left out,
//! which would cut the selected pods off from what the policy meant to allow).

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// Every reason the API server would refuse `policy`, each as `field.path: problem`; empty
/// when it would accept it.
pub fn refusals(policy: &NetworkPolicy) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(spec) = &policy.spec else {
        return errors;
    };
    if let Some(selector) = &spec.pod_selector {
        label_selector(selector, "spec.podSelector", &mut errors);
    }
    let rules = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| (r.ports.as_deref(), r.from.as_deref()))
        .map(|r| ("ingress", "from", r));
    let egress = spec
        .egress
        .iter()
        .flatten()
        .map(|r| (r.ports.as_deref(), r.to.as_deref()))
        .map(|r| ("egress", "to", r));
    let mut index = [0usize; 2];
    for (list, peers_field, (ports, peers)) in rules.chain(egress) {
        let i = &mut index[usize::from(list == "egress")];
        let path = format!("spec.{list}[{i}]");
        *i += 1;
        for (j, port) in ports.into_iter().flatten().enumerate() {
            policy_port(port, &format!("{path}.ports[{j}]"), &mut errors);
        }
        for (j, peer) in peers.into_iter().flatten().enumerate() {
            policy_peer(peer, &format!("{path}.{peers_field}[{j}]"), &mut errors);
        }
    }
    if let Some(types) = &spec.policy_types {
        if types.len() > 2 {
            errors.push("spec.policyTypes: may not specify more than two policyTypes".into());
        } else {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    errors.push(format!(
                        "spec.policyTypes[{i}]: unsupported value {t:?} (Ingress or Egress)"
                    ));
                }
            }
        }
    }
    errors
}

fn policy_port(port: &NetworkPolicyPort, path: &str, errors: &mut Vec<String>) {
    if let Some(protocol) = &port.protocol {
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            errors.push(format!(
                "{path}.protocol: unsupported value {protocol:?} (TCP, UDP or SCTP)"
            ));
        }
    }
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(number)), end) => {
            if !(1..=65535).contains(number) {
                errors.push(format!(
                    "{path}.port: invalid value {number}: must be between 1 and 65535"
                ));
            }
            if let Some(end) = end {
                if end < *number {
                    errors.push(format!(
                        "{path}.endPort: invalid value {end}: must be greater than or equal to port"
                    ));
                }
                if !(1..=65535).contains(&end) {
                    errors.push(format!(
                        "{path}.endPort: invalid value {end}: must be between 1 and 65535"
                    ));
                }
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                errors.push(format!(
                    "{path}.endPort: may not be specified when port is non-numeric"
                ));
            }
            if let Err(e) = port_name(name) {
                errors.push(format!("{path}.port: invalid value {name:?}: {e}"));
            }
        }
        (None, Some(_)) => errors.push(format!(
            "{path}.endPort: may not be specified when port is not specified"
        )),
        (None, None) => {}
    }
}

fn policy_peer(peer: &NetworkPolicyPeer, path: &str, errors: &mut Vec<String>) {
    if let Some(selector) = &peer.pod_selector {
        label_selector(selector, &format!("{path}.podSelector"), errors);
    }
    if let Some(selector) = &peer.namespace_selector {
        label_selector(selector, &format!("{path}.namespaceSelector"), errors);
    }
    if let Some(block) = &peer.ip_block {
        ip_block(block, &format!("{path}.ipBlock"), errors);
    }
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (selectors, peer.ip_block.is_some()) {
        (false, false) => errors.push(format!("{path}: must specify a peer")),
        (true, true) => errors.push(format!(
            "{path}: may not specify both ipBlock and another peer"
        )),
        _ => {}
    }
}

fn ip_block(block: &IPBlock, path: &str, errors: &mut Vec<String>) {
    if block.cidr.is_empty() {
        errors.push(format!("{path}.cidr: required"));
        return;
    }
    let cidr = match block.cidr.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => {
            errors.push(format!(
                "{path}.cidr: invalid value {:?}: must be a valid CIDR",
                block.cidr
            ));
            return;
        }
    };
    for (i, except) in block.except.iter().flatten().enumerate() {
        match except.parse::<IpNet>() {
            Ok(hole) if cidr.contains(&hole.network()) && hole.prefix_len() > cidr.prefix_len() => {
            }
            Ok(_) => errors.push(format!(
                "{path}.except[{i}]: invalid value {except:?}: must be a strict subset of cidr {}",
                block.cidr
            )),
            Err(_) => errors.push(format!(
                "{path}.except[{i}]: invalid value {except:?}: must be a valid CIDR"
            )),
        }
    }
}

/// A label selector as `ValidateLabelSelector` checks it: valid keys and values, and each
/// expression's operator with (In, NotIn) or without (Exists, DoesNotExist) values.
pub fn label_selector(selector: &LabelSelector, path: &str, errors: &mut Vec<String>) {
    for (key, value) in selector.match_labels.iter().flatten() {
        if let Err(e) = label_key(key) {
            errors.push(format!("{path}.matchLabels: invalid key {key:?}: {e}"));
        }
        if let Err(e) = label_value(value) {
            errors.push(format!(
                "{path}.matchLabels: invalid value {value:?} of {key:?}: {e}"
            ));
        }
    }
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let path = format!("{path}.matchExpressions[{i}]");
        if let Err(e) = label_key(&requirement.key) {
            errors.push(format!(
                "{path}.key: invalid value {:?}: {e}",
                requirement.key
            ));
        }
        let values = requirement.values.as_deref().unwrap_or_default();
        match requirement.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errors.push(format!(
                "{path}.values: must be specified when operator is {}",
                requirement.operator
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => errors.push(format!(
                "{path}.values: may not be specified when operator is {}",
                requirement.operator
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {
                for value in values {
                    if let Err(e) = label_value(value) {
                        errors.push(format!("{path}.values: invalid value {value:?}: {e}"));
                    }
                }
            }
            other => errors.push(format!(
                "{path}.operator: unsupported value {other:?} (In, NotIn, Exists or DoesNotExist)"
            )),
        }
    }
}

/// A label name: up to 63 alphanumerics, `-`, `_` and `.`, starting and ending alphanumeric.
fn label_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let ends_ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if name.len() > 63 {
        Err("must be no more than 63 characters".into())
    } else if !inner_ok || !ends_ok {
        Err(
            "must consist of alphanumerics, '-', '_' or '.', and start and end with an \
             alphanumeric"
                .into(),
        )
    } else {
        Ok(())
    }
}

/// A label key: a name with an optional DNS subdomain prefix (`example.com/name`).
fn label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let labels_ok = prefix.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
            if prefix.len() > 253 || !labels_ok {
                return Err(format!("prefix {prefix:?} must be a DNS subdomain"));
            }
            name
        }
        None => key,
    };
    label_name(name)
}

/// A label value: empty, or a label name.
fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        Ok(())
    } else {
        label_name(value)
    }
}

/// An IANA service name as a port name: up to 15 lower-case alphanumerics and `-`, with a
/// letter, no `-` at either end or twice in a row.
fn port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(
            "must be an IANA service name: at most 15 lower-case letters, digits and '-', with \
             a letter, and no '-' at either end or twice in a row"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(spec_yaml: &str) -> Vec<String> {
        let policy: NetworkPolicy = serde_yaml::from_str(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {spec_yaml}\n"
        ))
        .unwrap();
        refusals(&policy)
    }

    #[test]
    fn what_the_api_server_accepts_passes() {
        for spec in [
            "{podSelector: {}}",
            "{podSelector: {matchLabels: {app: web, example.com/tier: ''}}, policyTypes: [Ingress, Egress]}",
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]}",
            "{podSelector: {}, ingress: [{from: [{podSelector: {}, namespaceSelector: {matchExpressions: [{key: env, operator: NotIn, values: [prod]}]}}]}]}",
            "{podSelector: {}, egress: [{ports: [{port: 8000, endPort: 9000}, {port: http-alt, protocol: UDP}, {protocol: SCTP}]}]}",
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 'fd00::/64', except: ['fd00::/120']}}]}]}",
        ] {
            assert_eq!(refused(spec), Vec::<String>::new(), "{spec}");
        }
    }

    #[test]
    fn what_the_api_server_refuses_is_named_by_field() {
        for (spec, expected) in [
            (
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "spec.ingress[0].from[0].ipBlock.cidr: invalid value \"10.0.0.0/33\"",
            ),
            (
                "{podSelector: {}, ingress: [{}, {from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}",
                "spec.ingress[1].from[0].ipBlock.except[0]: invalid value \"10.1.0.0/24\": must be a strict subset",
            ),
            (
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]}",
                "strict subset",
            ),
            (
                "{podSelector: {}, egress: [{to: [{}]}]}",
                "spec.egress[0].to[0]: must specify a peer",
            ),
            (
                "{podSelector: {}, egress: [{to: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]}]}",
                "may not specify both ipBlock and another peer",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
                "spec.ingress[0].ports[0].port: invalid value 0",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: 80, endPort: 79}]}]}",
                "endPort: invalid value 79: must be greater than or equal to port",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
                "may not be specified when port is non-numeric",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{port: Web_Port}]}]}",
                "must be an IANA service name",
            ),
            (
                "{podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}",
                "protocol: unsupported value \"ICMP\"",
            ),
            (
                "{podSelector: {matchExpressions: [{key: pod, operator: Within, values: [a]}]}}",
                "spec.podSelector.matchExpressions[0].operator: unsupported value \"Within\"",
            ),
            (
                "{podSelector: {matchExpressions: [{key: pod, operator: In}]}}",
                "values: must be specified when operator is In",
            ),
            (
                "{podSelector: {matchLabels: {'bad key!': x}}}",
                "invalid key \"bad key!\"",
            ),
            ("{podSelector: {}, policyTypes: [Inbound]}", "unsupported value \"Inbound\""),
        ] {
            let errors = refused(spec);
            assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{spec}: {errors:?} lacks {expected:?}"
            );
        }
    }
}
