//! Kubernetes objects -> desired datapath state. Pure: no I/O, no clock, fully unit-tested.
//!
//! The rules follow kube-proxy (pkg/proxy: servicechangetracker.go, endpointslicecache.go):
//! * ExternalName and headless (`clusterIP: None`) services get nothing programmed; so do
//!   services labelled `service.kubernetes.io/service-proxy-name` (they belong to another proxy).
//! * Every service port becomes a frontend on each IPv4 cluster IP.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`, in the
//!   service's namespace, of address type IPv4; a slice port is matched to the service port by
//!   name and protocol, and its number is the backend port (that is how `targetPort` by name is
//!   resolved). Only an endpoint's first address is used, as kube-proxy does.
//! * Ready endpoints are used (a missing `ready` counts as ready). When none is ready, the ones
//!   that are serving and terminating are used, so connections drain during a rollout (KEP-1669).
//! * A selector-less service is treated like any other: its slices are whatever the user wrote.
//! * Several slices of one service are merged; duplicate endpoints are removed.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};

use crate::{
    manifests::{ObjectRef, Objects},
    node::NodeContext,
    state::{BackendAddr, DesiredState, Frontend, Protocol, ServiceEntry},
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// An object, or part of one, that could not be translated. The rest still is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateError {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Translates every service in `objects`. Problems are returned next to the state; an object
/// with a problem contributes what it correctly can.
pub fn translate(objects: &Objects, _node: &NodeContext) -> (DesiredState, Vec<TranslateError>) {
    let mut state = DesiredState::default();
    let mut errors = Vec::new();

    // Index slices by the service they belong to, once.
    let mut slices_by_service: BTreeMap<ObjectRef, Vec<(&ObjectRef, &EndpointSlice)>> =
        BTreeMap::new();
    for (key, slice) in &objects.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let owner = ObjectRef {
            namespace: key.namespace.clone(),
            name: service.clone(),
        };
        slices_by_service
            .entry(owner)
            .or_default()
            .push((key, slice));
    }

    for (key, service) in &objects.services {
        let slices = slices_by_service
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        translate_service(key, service, slices, &mut state, &mut errors);
    }
    (state, errors)
}

fn translate_service(
    key: &ObjectRef,
    service: &Service,
    slices: &[(&ObjectRef, &EndpointSlice)],
    state: &mut DesiredState,
    errors: &mut Vec<TranslateError>,
) {
    let object = format!("Service {key}");
    let error = |errors: &mut Vec<TranslateError>, message: String| {
        errors.push(TranslateError {
            object: object.clone(),
            message,
        })
    };
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        tracing::debug!(service = %key, "ignored: {SERVICE_PROXY_NAME_LABEL} names another proxy");
        return;
    }
    let Some(spec) = &service.spec else {
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }

    // clusterIPs (dual stack) supersedes clusterIP; both may be set and then agree.
    let mut cluster_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref());
    }
    let mut vips = Vec::new();
    for ip in cluster_ips {
        if ip.is_empty() || ip == "None" {
            continue; // headless
        }
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => vips.push(v4),
            Ok(IpAddr::V6(_)) => {
                tracing::debug!(service = %key, %ip, "IPv6 cluster IP not programmed yet")
            }
            Err(_) => error(errors, format!("invalid cluster IP {ip:?}")),
        }
    }
    if vips.is_empty() {
        return;
    }

    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(proto) = parse_protocol(port.protocol.as_deref()) else {
            let protocol = port.protocol.as_deref().unwrap_or_default();
            error(
                errors,
                format!("port {port_name:?}: unsupported protocol {protocol:?}"),
            );
            continue;
        };
        let Some(number) = valid_port(port.port) else {
            error(
                errors,
                format!("port {port_name:?}: invalid port {}", port.port),
            );
            continue;
        };
        let backends = backends_for_port(port, proto, slices, errors);
        for vip in &vips {
            let frontend = Frontend {
                ip: *vip,
                port: number,
                proto,
            };
            let name = if port_name.is_empty() {
                key.to_string()
            } else {
                format!("{key}:{port_name}")
            };
            if let Some(previous) = state.services.get(&frontend) {
                error(
                    errors,
                    format!(
                        "frontend {frontend} is already used by {}; ignoring this port",
                        previous.name
                    ),
                );
                continue;
            }
            state.services.insert(
                frontend,
                ServiceEntry {
                    name,
                    backends: backends.clone(),
                },
            );
        }
    }
}

/// The backends of one service port, merged over all the service's slices.
fn backends_for_port(
    port: &ServicePort,
    proto: Protocol,
    slices: &[(&ObjectRef, &EndpointSlice)],
    errors: &mut Vec<TranslateError>,
) -> Vec<BackendAddr> {
    let wanted_name = port.name.as_deref().unwrap_or_default();
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for (slice_key, slice) in slices {
        if slice.address_type != "IPv4" {
            continue; // IPv6 and FQDN slices: not programmed yet
        }
        let object = format!("EndpointSlice {slice_key}");
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == wanted_name
                && parse_protocol(p.protocol.as_deref()) == Some(proto)
        });
        let Some(slice_port) = slice_port else {
            continue;
        };
        let Some(number) = slice_port.port.and_then(valid_port) else {
            errors.push(TranslateError {
                object,
                message: format!("port {wanted_name:?}: missing or invalid port number"),
            });
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let ip = match address.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    errors.push(TranslateError {
                        object: object.clone(),
                        message: format!("invalid endpoint address {address:?}"),
                    });
                    continue;
                }
            };
            let backend = BackendAddr { ip, port: number };
            match condition(endpoint) {
                Condition::Ready => ready.push(backend),
                Condition::ServingTerminating => terminating.push(backend),
                Condition::Unusable => {}
            }
        }
    }
    let mut backends = if ready.is_empty() { terminating } else { ready };
    backends.sort();
    backends.dedup();
    backends
}

enum Condition {
    Ready,
    ServingTerminating,
    Unusable,
}

/// EndpointConditions as the API defines them: `ready` unset means ready; `serving` unset
/// means the same as `ready`; `terminating` unset means not terminating.
fn condition(endpoint: &Endpoint) -> Condition {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        Condition::Ready
    } else if serving && terminating {
        Condition::ServingTerminating
    } else {
        Condition::Unusable
    }
}

fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn translate_all(objects: &Objects) -> (DesiredState, Vec<TranslateError>) {
        translate(objects, &NodeContext::default())
    }

    fn objects(yaml: &str) -> Objects {
        crate::manifests::parse_valid(yaml)
    }

    fn fe(ip: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn be(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip.parse::<Ipv4Addr>().unwrap(),
            port,
        }
    }

    const BACKEND: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend-service, namespace: ecommerce}
spec:
  clusterIP: 10.96.0.1
  ports: [{port: 8080, targetPort: 8080}]
  selector: {app: backend}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: backend-service-1
  namespace: ecommerce
  labels: {kubernetes.io/service-name: backend-service}
addressType: IPv4
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
- addresses: [10.244.2.15]
ports: [{port: 8080, protocol: TCP}]
"#;

    #[test]
    fn cluster_ip_service_with_its_slice() {
        let (state, errors) = translate_all(&objects(BACKEND));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.services.len(), 1);
        let entry = &state.services[&fe("10.96.0.1", 8080, Protocol::Tcp)];
        assert_eq!(entry.name, "ecommerce/backend-service");
        assert_eq!(
            entry.backends,
            vec![be("10.244.1.10", 8080), be("10.244.2.15", 8080)]
        );
    }

    #[test]
    fn headless_external_name_and_other_proxy_are_ignored() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: postgres-service}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata:
  name: other
  labels: {service.kubernetes.io/service-proxy-name: some-other-proxy}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"#,
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(state.services.is_empty(), "{:?}", state.services);
    }

    #[test]
    fn multi_port_named_target_ports_and_merged_slices() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: http-alt}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.2]}, {addresses: [10.244.0.3]}]
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.3]}, {addresses: [10.244.0.4]}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00::1"]}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#,
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            state.services[&fe("10.96.0.20", 80, Protocol::Tcp)].backends,
            vec![
                be("10.244.0.2", 8080),
                be("10.244.0.3", 8080),
                be("10.244.0.4", 8080)
            ]
        );
        assert_eq!(
            state.services[&fe("10.96.0.20", 53, Protocol::Udp)].backends,
            vec![be("10.244.0.2", 5353), be("10.244.0.3", 5353)]
        );
        assert_eq!(
            state.services[&fe("10.96.0.20", 80, Protocol::Tcp)].name,
            "default/web:http"
        );
    }

    #[test]
    fn not_ready_endpoints_and_terminating_fallback() {
        let yaml = |second_ready: bool| {
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: s}}
spec: {{clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-1, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.0.5], conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.0.6], conditions: {{ready: {second_ready}}}}}
- {{addresses: [10.244.0.7], conditions: {{ready: false, serving: false, terminating: true}}}}
ports: [{{port: 80}}]
"#
            )
        };
        let (state, _) = translate_all(&objects(&yaml(true)));
        assert_eq!(
            state.services[&fe("10.96.0.30", 80, Protocol::Tcp)].backends,
            vec![be("10.244.0.6", 80)]
        );
        // No ready endpoint: serving + terminating ones keep the service alive.
        let (state, _) = translate_all(&objects(&yaml(false)));
        assert_eq!(
            state.services[&fe("10.96.0.30", 80, Protocol::Tcp)].backends,
            vec![be("10.244.0.5", 80)]
        );
    }

    #[test]
    fn service_without_slices_is_programmed_without_backends() {
        let (state, errors) = translate_all(&objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}\n",
        ));
        assert!(errors.is_empty());
        assert!(state.services[&fe("10.96.0.40", 80, Protocol::Tcp)]
            .backends
            .is_empty());
    }

    #[test]
    fn bad_values_are_reported_by_object_and_the_rest_is_kept() {
        let (state, errors) = translate_all(&objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {clusterIP: 10.96.0.41, ports: [{name: a, port: 70000}, {name: b, port: 81, protocol: ICMP}, {name: c, port: 82}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-port-x, labels: {kubernetes.io/service-name: bad-port}}
addressType: IPv4
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.0.9]}]
ports: [{name: c, port: 8082}]
"#,
        ));
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            messages.contains(
                &"Service default/bad-ip: invalid cluster IP \"10.96.0.300\"".to_string()
            ),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("Service default/bad-port: port \"a\": invalid port 70000")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unsupported protocol \"ICMP\"")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(
                |m| m.starts_with("EndpointSlice default/bad-port-x: invalid endpoint address")
            ),
            "{messages:?}"
        );
        assert_eq!(state.services.len(), 1);
        assert_eq!(
            state.services[&fe("10.96.0.41", 82, Protocol::Tcp)].backends,
            vec![be("10.244.0.9", 8082)]
        );
    }

    #[test]
    fn the_seed_platform() {
        let text = [
            include_str!("../../examples/ecommerce/services.yaml"),
            include_str!("../../examples/ecommerce/endpointslices.yaml"),
        ]
        .join("\n---\n");
        let (state, errors) = translate_all(&objects(&text));
        assert!(errors.is_empty(), "{errors:?}");
        let summary: Vec<(String, &str, usize)> = state
            .services
            .iter()
            .map(|(f, e)| (f.to_string(), e.name.as_str(), e.backends.len()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "10.96.0.1:8080/TCP".to_string(),
                    "ecommerce/backend-service",
                    2
                ),
                (
                    "10.96.0.2:3000/TCP".to_string(),
                    "ecommerce/frontend-service",
                    2
                ),
                (
                    "10.96.0.6:6379/TCP".to_string(),
                    "ecommerce/redis-service",
                    1
                ),
            ]
        );
    }
}
